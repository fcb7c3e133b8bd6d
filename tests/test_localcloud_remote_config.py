"""Local cloud server, Firebase Remote Config REST stand-in: one template per project, a version
number, and an ETag a PUT must match (``If-Match``; ``*`` forces), answered as the real API does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid


def _call(localcloud, method: str, project: str, body: dict | None = None, if_match: str | None = None):
    headers = {"Content-Type": "application/json"}
    if if_match:
        headers["If-Match"] = if_match
    req = urllib.request.Request(f"{localcloud.http}/v1/projects/{project}/remoteConfig", method=method,
                                 data=json.dumps(body).encode() if body is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("ETag"), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("ETag"), json.loads(e.read())


def test_remote_config_template_versions_and_etags(localcloud):
    project = f"p-{uuid.uuid4().hex[:8]}"
    status, etag0, template = _call(localcloud, "GET", project)
    assert status == 200 and etag0 and template["parameters"] == {} and template["version"]["versionNumber"] == "0"

    pointer = {"parameters": {"model_version": {"defaultValue": {"value": "3"}}}}
    assert _call(localcloud, "PUT", project, pointer)[0] == 400  # If-Match is required
    status, _, error = _call(localcloud, "PUT", project, pointer, if_match="etag-stale")
    assert status == 412 and error["error"]["status"] == "FAILED_PRECONDITION"

    status, etag1, stored = _call(localcloud, "PUT", project, pointer, if_match=etag0)
    assert status == 200 and etag1 != etag0 and stored["version"]["versionNumber"] == "1"
    status, etag, got = _call(localcloud, "GET", project)
    assert etag == etag1 and got["parameters"] == pointer["parameters"]
    assert _call(localcloud, "PUT", project, pointer, if_match=etag0)[0] == 412  # etag0 is stale now
    assert _call(localcloud, "PUT", project, {"parameters": {}}, if_match="*")[2]["version"]["versionNumber"] == "2"
    assert _call(localcloud, "PUT", project, {"parameters": []}, if_match="*")[0] == 400
    assert _call(localcloud, "GET", f"other-{project}")[2]["parameters"] == {}  # one template per project
