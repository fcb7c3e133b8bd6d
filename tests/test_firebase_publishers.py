"""Firebase publishers driven through the real firebase-admin SDK, with no network.

- Firebase ML: the SDK's own HTTP clients talk to a fake ``requests`` adapter mounted on their
  sessions (``ml._get_ml_service(app)._client.session`` and ``._operation_client.session``), the
  way firebase-admin's own tests do;
  every request is recorded and its URL, method and body asserted.
- Cloud Storage: the SDK's google-cloud-storage client talks to the gcp-storage-emulator
  (``gcs_emulator`` fixture). The emulator ignores ``ifGenerationMatch``; the
  ``gcs_preconditions`` fixture adds GCS's precondition semantics in front of it.
- Credentials: an RSA key generated in the test (nothing on disk) behind a tiny google-auth
  credentials class that signs locally and holds a static token, so V4 URL signing works and no
  request ever goes to an OAuth or IAM endpoint. (Real service-account credentials would also
  start a background "regional access boundary" lookup at iamcredentials.googleapis.com.)
- ``no_network`` (autouse) makes any DNS lookup of a non-loopback host fail the test.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from urllib.parse import parse_qs, urlparse

import firebase_admin
import google.auth.credentials
import pytest
import requests
from airflow.sdk.exceptions import AirflowFailException
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.api_core.exceptions import PreconditionFailed
from google.auth import crypt
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import storage
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from dual_deploy.hooks.firebase import (
    FirebaseHook,
    FirebaseMLPublisherHook,
    FirebaseStoragePublisherHook,
)
from dual_deploy.hooks.mobile_publisher import PublishError
from dual_deploy.operators.publish import PublishMobileModelOperator

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "dual-deploy-test"
CONN_ID = "firebase_test"
NAME = "flowers_mobile"
SA_EMAIL = f"publisher@{PROJECT}.iam.gserviceaccount.com"
ML_BASE = f"https://firebaseml.googleapis.com/v1beta2/projects/{PROJECT}/"
RC_URL = f"https://firebaseremoteconfig.googleapis.com/v1/projects/{PROJECT}/remoteConfig"


# --- no network ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    attempts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in ("127.0.0.1", "localhost", "::1"):
            attempts.append(name)
            raise OSError(f"network is disabled in tests (tried {name})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield
    assert not attempts, f"a test tried to reach the network: {attempts}"


# --- credentials -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


class OfflineSigningCredentials(google.auth.credentials.Credentials, google.auth.credentials.Signing):
    """Signs locally with an RSA key (as a service account would) and carries a static token."""

    def __init__(self, pem: str, email: str = SA_EMAIL):
        super().__init__()
        self._signer = crypt.RSASigner.from_string(pem, key_id="test-key")
        self._email = email
        self.token = "test-access-token"  # no expiry: never refreshed

    def refresh(self, request):
        raise AssertionError("test credentials must never refresh (that would call oauth2.googleapis.com)")

    def sign_bytes(self, message):
        return self._signer.sign(message)

    @property
    def signer_email(self):
        return self._email

    @property
    def signer(self):
        return self._signer


@pytest.fixture
def credentials(rsa_pem):
    return OfflineSigningCredentials(rsa_pem)


@pytest.fixture
def make_hook(monkeypatch, credentials):
    """Build publisher hooks on connection ``firebase_test`` with the offline credentials."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}",
                       json.dumps({"conn_type": "google_cloud_platform", "extra": {"project": PROJECT}}))
    state = {"credentials": credentials}
    monkeypatch.setattr(FirebaseHook, "get_credentials_and_project_id", lambda self: (state["credentials"], PROJECT))
    hooks = []

    def make(cls, *, creds=None, **kwargs):
        if creds is not None:
            state["credentials"] = creds
        hook = cls(firebase_conn_id=CONN_ID, **kwargs)
        hook._log = logging.getLogger(f"test.{cls.__name__}")  # a stdlib logger, so caplog sees it
        hooks.append(hook)
        return hook

    yield make
    for name in {h.app_name for h in hooks}:  # apps are cached per process: start every test fresh
        try:
            firebase_admin.delete_app(firebase_admin.get_app(name))
        except ValueError:
            pass


# --- storage ------------------------------------------------------------------------------------


@pytest.fixture
def bucket_name(gcs_emulator) -> str:
    name = f"fb-{uuid.uuid4().hex[:12]}"
    storage.Client(project=PROJECT, credentials=AnonymousCredentials()).create_bucket(name)
    return name


def emulator_bucket(name: str):
    return storage.Client(project=PROJECT, credentials=AnonymousCredentials()).bucket(name)


@pytest.fixture
def gcs_preconditions(monkeypatch):
    """GCS's ifGenerationMatch semantics for uploads, which the emulator ignores.

    ``state["before_manifest_write"]``: a one-shot callable run just before a manifest upload is
    checked (to let a concurrent publisher in). ``state["failed"]``: (object, expected generation)
    of every upload answered with 412.
    """
    real_from_filename = storage.Blob.upload_from_filename
    real_from_string = storage.Blob.upload_from_string
    state = {"before_manifest_write": None, "failed": []}

    def check(blob, kwargs):
        expected = kwargs.get("if_generation_match")
        if expected is None:
            return
        current = blob.bucket.get_blob(blob.name)
        actual = 0 if current is None else int(current.generation)
        if actual != int(expected):
            state["failed"].append((blob.name, int(expected)))
            raise PreconditionFailed(f"ifGenerationMatch={expected}, but gs://{blob.bucket.name}/{blob.name} is at {actual}")

    def upload_from_filename(self, filename, *args, **kwargs):
        check(self, kwargs)
        return real_from_filename(self, filename, *args, **kwargs)

    def upload_from_string(self, data, *args, **kwargs):
        if self.name.endswith("/manifest.json"):
            callback, state["before_manifest_write"] = state["before_manifest_write"], None
            if callback:
                callback()
        check(self, kwargs)
        return real_from_string(self, data, *args, **kwargs)

    monkeypatch.setattr(storage.Blob, "upload_from_filename", upload_from_filename)
    monkeypatch.setattr(storage.Blob, "upload_from_string", upload_from_string)
    return state


@pytest.fixture
def tflite(tmp_path):
    """Distinct fake .tflite files (the publishers never parse them)."""

    def make(tag: str) -> str:
        path = tmp_path / f"{tag}.tflite"
        path.write_bytes(b"TFL3" + tag.encode() * 64)
        return str(path)

    return make


def sha256_of(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- a fake HTTP API on a requests session ----------------------------------------------------


@dataclass
class Call:
    method: str
    url: str
    body: object
    headers: dict


class FakeApi(BaseAdapter):
    """Scripted answers per (method, url); the last answer for a route repeats. Records every call."""

    def __init__(self, routes: dict[tuple[str, str], list[tuple]]):
        super().__init__()
        self.routes = {k: list(v) for k, v in routes.items()}
        self.calls: list[Call] = []

    def send(self, request, **kwargs):
        body = request.body
        if isinstance(body, bytes):
            body = body.decode()
        self.calls.append(Call(request.method, request.url, json.loads(body) if body else None,
                               CaseInsensitiveDict(request.headers)))
        answers = self.routes.get((request.method, request.url))
        if not answers:
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        status, payload, *rest = answers.pop(0) if len(answers) > 1 else answers[0]
        response = requests.Response()
        response.status_code = status
        response._content = json.dumps(payload).encode()
        response.headers.update({"Content-Type": "application/json; charset=UTF-8", **(rest[0] if rest else {})})
        response.url = request.url
        response.request = request
        return response

    def close(self):
        pass

    def sequence(self) -> list[tuple[str, str]]:
        return [(c.method, c.url) for c in self.calls]


# --- Firebase ML ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml_module():
    # firebase_admin.ml imports tensorflow only for its SavedModel/Keras converters, which the hook
    # never uses; hiding it while the module loads saves 10-30 s. Nothing else changes: the hook's
    # own `from firebase_admin import ml` then gets this module.
    if "firebase_admin.ml" not in sys.modules and "tensorflow" not in sys.modules:
        sys.modules["tensorflow"] = None
        try:
            import firebase_admin.ml  # noqa: F401
        finally:
            del sys.modules["tensorflow"]
    from firebase_admin import ml

    return ml


@pytest.fixture
def ml(ml_module, monkeypatch):
    monkeypatch.setattr(ml_module._MLService, "POLL_BASE_WAIT_TIME_SECONDS", 0.01)  # poll fast
    return ml_module


MODEL_ID = "8513200"
OP_NAME = f"projects/{PROJECT}/operations/op-{MODEL_ID}"
OP_URL = f"https://firebaseml.googleapis.com/v1beta2/{OP_NAME}"
LIST_URL = f"{ML_BASE}models?filter=display_name%3D{NAME}"
CREATE_URL = f"{ML_BASE}models"
GET_URL = f"{ML_BASE}models/{MODEL_ID}"
UPDATE_URL = f"{ML_BASE}models/{MODEL_ID}?updateMask=displayName,tags,tfliteModel.gcsTfliteUri"
PUBLISH_URL = f"{ML_BASE}models/{MODEL_ID}?updateMask=state.published"


def model_json(tags, *, published=False, locked=False, uri="gs://bucket/Firebase/ML/Models/x.tflite"):
    data = {
        "name": f"projects/{PROJECT}/models/{MODEL_ID}",
        "displayName": NAME,
        "tags": tags,
        "createTime": "2026-03-01T10:00:00.000000Z",
        "updateTime": "2026-03-02T10:00:00.000000Z",
        "etag": f"etag-{len(tags)}-{published}",
        "modelHash": "a1b2c3d4",
        "state": {"published": published},
        "tfliteModel": {"gcsTfliteUri": uri, "sizeBytes": "260"},
    }
    if locked:
        data["activeOperations"] = [{"name": OP_NAME}]
    return data


def op_running():
    return {
        "name": OP_NAME,
        "metadata": {"@type": "type.googleapis.com/google.firebase.ml.v1beta2.ModelOperationMetadata",
                     "name": f"projects/{PROJECT}/models/{MODEL_ID}", "basicOperationStatus": "BASIC_OPERATION_STATUS_UPLOADING"},
        "done": False,
    }


def op_done(model):
    return {"done": True, "response": model}


def mount_ml(ml, hook, routes) -> FakeApi:
    api = FakeApi(routes)
    service = ml._get_ml_service(hook.get_app())
    # Two clients: models (project URL) and long-running operations (API root).
    for client in (service._client, service._operation_client):
        client.session.mount("https://firebaseml.googleapis.com", api)
    return api


def staged_name(version: int, path: str) -> str:
    return f"Firebase/ML/Models/{NAME}-v{version}-{sha256_of(path)[:12]}.tflite"


def test_firebase_ml_create_uploads_signs_creates_and_publishes(ml, make_hook, bucket_name, tflite, gcs_emulator, caplog):
    path = tflite("a")
    gs_uri = f"gs://{bucket_name}/{staged_name(1, path)}"
    created = model_json(["flowers", "mobile", "v1"], uri=gs_uri)
    hook = make_hook(FirebaseMLPublisherHook, storage_bucket=bucket_name, unlock_timeout_s=30)
    api = mount_ml(ml, hook, {
        ("GET", LIST_URL): [(200, {})],
        ("POST", CREATE_URL): [(200, op_done(created))],
        ("PATCH", PUBLISH_URL): [(200, op_done({**created, "state": {"published": True}}))],
    })

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        record = hook.publish(NAME, path, ["mobile", "flowers", "mobile"], {"run_id": "r1"})

    assert api.sequence() == [("GET", LIST_URL), ("POST", CREATE_URL), ("PATCH", PUBLISH_URL)]
    create = api.calls[1]
    assert create.headers["Authorization"] == "Bearer test-access-token"
    assert set(create.body) == {"displayName", "tags", "tfliteModel"}
    assert create.body["displayName"] == NAME
    assert create.body["tags"] == ["flowers", "mobile", "v1"]
    # The SDK sends a V4 signed URL of the object it uploaded (10 minutes, signed by our key) ...
    signed = urlparse(create.body["tfliteModel"]["gcsTfliteUri"])
    query = parse_qs(signed.query)
    assert f"{signed.scheme}://{signed.netloc}" == gcs_emulator
    assert signed.path == f"/{bucket_name}/{staged_name(1, path)}"
    assert query["X-Goog-Algorithm"] == ["GOOG4-RSA-SHA256"]
    assert query["X-Goog-Credential"][0].startswith(f"{SA_EMAIL}/")
    assert query["X-Goog-Expires"] == ["600"] and query["X-Goog-Signature"][0]
    # ... and that URL serves the uploaded bytes.
    assert requests.get(create.body["tfliteModel"]["gcsTfliteUri"], timeout=10).content == Path(path).read_bytes()
    assert api.calls[2].body == {"name": f"projects/{PROJECT}/models/{MODEL_ID}", "state": {"published": True}}

    assert record == {
        "model_id": MODEL_ID, "display_name": NAME, "version": 1, "tags": ["flowers", "mobile", "v1"],
        "published": True, "model_hash": "a1b2c3d4", "tflite_uri": gs_uri, "created": True,
        "size_bytes": 260, "etag": "etag-3-False",
    }
    # One clear shutdown warning per publish; the SDK's per-call DeprecationWarnings are absorbed.
    shutdown = [r for r in caplog.records if "2027-06-15" in r.getMessage()]
    assert len(shutdown) == 1 and "firebase_storage" in shutdown[0].getMessage()
    assert not [w for w in caught if "Firebase ML is deprecated" in str(w.message)]


def test_firebase_ml_update_patches_existing_model_with_update_mask_and_waits_for_unlock(
        ml, make_hook, bucket_name, tflite):
    path = tflite("b")
    gs_uri = f"gs://{bucket_name}/{staged_name(4, path)}"
    existing = model_json(["flowers", "v3"], published=True)
    updated = model_json(["flowers", "mobile", "v4"], published=True, uri=gs_uri)
    hook = make_hook(FirebaseMLPublisherHook, storage_bucket=bucket_name, unlock_timeout_s=30)
    api = mount_ml(ml, hook, {
        ("GET", LIST_URL): [(200, {"models": [existing]})],
        # The update starts a long-running operation; the model is locked until it is done.
        ("PATCH", UPDATE_URL): [(200, op_running())],
        ("GET", GET_URL): [(200, {**updated, "activeOperations": [{"name": OP_NAME}]})],
        ("GET", OP_URL): [(200, op_running()), (200, op_done(updated))],
        ("PATCH", PUBLISH_URL): [(200, op_done(updated))],
    })

    record = hook.publish(NAME, path, ["flowers", "mobile"])

    # Found by the list filter and updated in place: no second create. The SDK (7.7) re-reads a
    # locked model without the app; the hook re-reads it through its app (GET models/<id>).
    assert api.sequence() == [
        ("GET", LIST_URL), ("PATCH", UPDATE_URL), ("GET", GET_URL), ("GET", OP_URL), ("GET", OP_URL),
        ("PATCH", PUBLISH_URL),
    ]
    patch = api.calls[1].body
    assert set(patch) == {"name", "displayName", "tags", "tfliteModel"}
    assert patch["name"] == f"projects/{PROJECT}/models/{MODEL_ID}" and patch["displayName"] == NAME
    assert patch["tags"] == ["flowers", "mobile", "v4"]
    assert urlparse(patch["tfliteModel"]["gcsTfliteUri"]).path == f"/{bucket_name}/{staged_name(4, path)}"
    assert emulator_bucket(bucket_name).blob(staged_name(4, path)).download_as_bytes() == Path(path).read_bytes()
    assert (record["model_id"], record["version"], record["created"], record["published"]) == (MODEL_ID, 4, False, True)
    assert record["tflite_uri"] == gs_uri


def test_firebase_ml_lock_wait_timeout_names_model_and_timeout(ml, make_hook, bucket_name, tflite):
    hook = make_hook(FirebaseMLPublisherHook, storage_bucket=bucket_name, unlock_timeout_s=1.5)
    api = mount_ml(ml, hook, {
        ("GET", LIST_URL): [(200, {}), (200, {"models": [model_json(["v1"], locked=True)]})],
        ("POST", CREATE_URL): [(200, op_running())],
        ("GET", OP_URL): [(200, op_running())],  # never finishes
    })

    with pytest.raises(PublishError) as err:
        hook.publish(NAME, tflite("c"), [])

    message = str(err.value)
    assert f"{NAME!r} (id {MODEL_ID})" in message and "still locked 1.5 s after create_model" in message
    assert "unlock_timeout_s=1.5" in message
    assert api.sequence()[:3] == [("GET", LIST_URL), ("POST", CREATE_URL), ("GET", LIST_URL)]
    assert set(api.sequence()[3:]) == {("GET", OP_URL)} and len(api.sequence()) > 4  # polled until the deadline
    assert ("PATCH", PUBLISH_URL) not in api.sequence()  # never published


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        pytest.param(
            {("GET", LIST_URL): [(403, {"error": {"code": 403, "status": "PERMISSION_DENIED",
                                                  "message": "Permission 'firebaseml.models.list' denied"}})]},
            "Firebase ML list_models failed: HTTP 403 PERMISSION_DENIED: Permission 'firebaseml.models.list' denied",
            id="403-on-list",
        ),
        pytest.param(
            {("GET", LIST_URL): [(200, {})],
             ("POST", CREATE_URL): [(500, {"error": {"code": 500, "status": "INTERNAL", "message": "Internal error encountered."}})]},
            "Firebase ML create_model failed: HTTP 500 INTERNAL: Internal error encountered.",
            id="500-on-create",
        ),
    ],
)
def test_firebase_ml_api_errors_become_publish_errors(ml, make_hook, bucket_name, tflite, routes, expected):
    hook = make_hook(FirebaseMLPublisherHook, storage_bucket=bucket_name)
    mount_ml(ml, hook, routes)
    with pytest.raises(PublishError) as err:
        hook.publish(NAME, tflite("d"), ["flowers"])
    assert str(err.value) == expected
    assert isinstance(err.value.__cause__, firebase_admin.exceptions.FirebaseError)


def test_firebase_ml_refuses_bad_input_and_non_signing_credentials_before_any_call(ml, make_hook, bucket_name, tflite):
    hook = make_hook(FirebaseMLPublisherHook, storage_bucket=bucket_name)
    api = mount_ml(ml, hook, {})
    with pytest.raises(PublishError, match="display name 'bad name!' is invalid"):
        hook.publish("bad name!", tflite("e"), [])
    with pytest.raises(PublishError, match=r"tags \['v2'\] are reserved"):
        hook.publish(NAME, tflite("e"), ["v2"])
    assert api.calls == []

    anonymous = make_hook(FirebaseMLPublisherHook, storage_bucket=bucket_name, creds=AnonymousCredentials(),
                          firebase_project="dual-deploy-anon")
    with pytest.raises(PublishError, match="can sign a V4 URL.*AnonymousCredentials"):
        anonymous.publish(NAME, tflite("e"), [])
    assert list(emulator_bucket(bucket_name).list_blobs()) == []  # nothing uploaded


# --- Cloud Storage for Firebase -------------------------------------------------------------------


def read_manifest(bucket_name: str) -> tuple[dict, storage.Blob]:
    """(manifest, its blob with the stored properties). Downloading through a blob overwrites
    its properties from the emulator's response headers, so the content goes through another."""
    path = f"mobile-models/{NAME}/manifest.json"
    bucket = emulator_bucket(bucket_name)
    return json.loads(bucket.blob(path).download_as_bytes()), bucket.get_blob(path)


def test_storage_publish_versions_manifest_and_is_idempotent(make_hook, bucket_name, tflite, gcs_preconditions):
    hook = make_hook(FirebaseStoragePublisherHook, storage_bucket=bucket_name)
    first, second = tflite("v1"), tflite("v2")
    assert hook.get(NAME) is None

    r1 = hook.publish(NAME, first, ["mobile", "flowers"], {"run_id": "run-1"})
    manifest, _ = read_manifest(bucket_name)
    assert (r1["version"], r1["created"], manifest["version"]) == (1, True, 1)

    r2 = hook.publish(NAME, second, ["mobile", "flowers"], {"run_id": "run-2"})
    manifest, blob = read_manifest(bucket_name)
    path2 = f"mobile-models/{NAME}/v2/model.tflite"
    assert manifest == {
        "display_name": NAME, "version": 2, "path": path2, "gs_uri": f"gs://{bucket_name}/{path2}",
        "sha256": sha256_of(second), "size_bytes": os.path.getsize(second), "tags": ["flowers", "mobile"],
        "updated_at": manifest["updated_at"], "metadata": {"run_id": "run-2"},
    }
    assert blob.content_type == "application/json" and blob.cache_control == "no-cache, max-age=0"
    assert r2 == {
        "model_id": f"gs://{bucket_name}/mobile-models/{NAME}", "display_name": NAME, "version": 2,
        "tags": ["flowers", "mobile"], "published": True, "model_hash": sha256_of(second),
        "tflite_uri": f"gs://{bucket_name}/{path2}", "created": False,
        "manifest_uri": f"gs://{bucket_name}/mobile-models/{NAME}/manifest.json",
        "size_bytes": os.path.getsize(second), "updated_at": manifest["updated_at"], "remote_config": None,
    }
    bucket = emulator_bucket(bucket_name)
    for version, path in ((1, first), (2, second)):
        obj = bucket.get_blob(f"mobile-models/{NAME}/v{version}/model.tflite")
        assert obj.download_as_bytes() == Path(path).read_bytes()
        assert obj.metadata == {"sha256": sha256_of(path), "tags": "flowers,mobile", "display_name": NAME,
                                "version": str(version)}
    assert hook.get(NAME)["version"] == 2

    # Same bytes and tags again (e.g. an Airflow retry): nothing new is written.
    generation = blob.generation
    r3 = hook.publish(NAME, second, ["flowers", "mobile"], {"run_id": "run-3"})
    assert (r3["version"], r3["created"]) == (2, False)
    assert read_manifest(bucket_name)[1].generation == generation
    assert bucket.get_blob(f"mobile-models/{NAME}/v3/model.tflite") is None
    assert gcs_preconditions["failed"] == []


def test_storage_concurrent_publishers_never_claim_the_same_version(make_hook, bucket_name, tflite, gcs_preconditions):
    a = make_hook(FirebaseStoragePublisherHook, storage_bucket=bucket_name)
    b = make_hook(FirebaseStoragePublisherHook, storage_bucket=bucket_name)
    mine, theirs = tflite("mine"), tflite("theirs")
    results = {}
    # A has read "no manifest" and uploaded v1; before A writes the manifest, B publishes in full.
    gcs_preconditions["before_manifest_write"] = lambda: results.update(b=b.publish(NAME, theirs, ["flowers"]))

    results["a"] = a.publish(NAME, mine, ["flowers"])

    manifest_path = f"mobile-models/{NAME}/manifest.json"
    assert gcs_preconditions["failed"] == [
        (f"mobile-models/{NAME}/v1/model.tflite", 0),  # B: v1 is taken by A's upload, so B takes v2
        (manifest_path, 0),  # A: the manifest it read as absent now exists -> 412 -> re-read, v3
    ]
    assert (results["b"]["version"], results["a"]["version"]) == (2, 3)
    manifest, _ = read_manifest(bucket_name)
    assert (manifest["version"], manifest["sha256"]) == (3, sha256_of(mine))
    bucket = emulator_bucket(bucket_name)
    assert bucket.get_blob(f"mobile-models/{NAME}/v1/model.tflite") is None  # A's orphan removed
    assert bucket.blob(f"mobile-models/{NAME}/v2/model.tflite").download_as_bytes() == Path(theirs).read_bytes()
    assert bucket.blob(f"mobile-models/{NAME}/v3/model.tflite").download_as_bytes() == Path(mine).read_bytes()


def rc_template(param_value: str | None = None) -> dict:
    template = {
        "conditions": [{"name": "ios", "expression": "device.os == 'ios'"}],
        "parameters": {"welcome": {"defaultValue": {"value": "hi"}, "valueType": "STRING"}},
        "parameterGroups": {"ml": {"parameters": {}}},
        "version": {"versionNumber": "7", "updateTime": "2026-03-01T10:00:00Z"},
    }
    if param_value is not None:
        template["parameterGroups"]["ml"]["parameters"]["mobile_model"] = {
            "defaultValue": {"value": param_value}, "valueType": "JSON"}
    return template


def rc_session(credentials, routes) -> tuple[AuthorizedSession, FakeApi]:
    session = AuthorizedSession(credentials)
    api = FakeApi(routes)
    session.mount("https://firebaseremoteconfig.googleapis.com", api)
    return session, api


def test_storage_remote_config_get_then_put_with_if_match(make_hook, bucket_name, tflite, credentials):
    session, api = rc_session(credentials, {
        ("GET", RC_URL): [(200, rc_template("{}"), {"ETag": "etag-1"}), (200, rc_template("{}"), {"ETag": "etag-2"})],
        ("PUT", RC_URL): [(412, {"error": {"code": 412, "status": "FAILED_PRECONDITION", "message": "etag mismatch"}}),
                          (200, {}, {"ETag": "etag-3"})],
    })
    hook = make_hook(FirebaseStoragePublisherHook, storage_bucket=bucket_name,
                     remote_config_parameter="mobile_model", remote_config_session=session)
    path = tflite("rc")

    record = hook.publish(NAME, path, ["flowers"])

    # GET, PUT (412: someone else published in between), GET again, PUT with the new ETag.
    assert api.sequence() == [("GET", RC_URL), ("PUT", RC_URL), ("GET", RC_URL), ("PUT", RC_URL)]
    assert [c.headers.get("If-Match") for c in api.calls] == [None, "etag-1", None, "etag-2"]
    assert all(c.headers["Authorization"] == "Bearer test-access-token" for c in api.calls)
    value = {"version": 1, "path": f"mobile-models/{NAME}/v1/model.tflite", "sha256": sha256_of(path),
             "size_bytes": os.path.getsize(path)}
    put = api.calls[3].body
    assert put["parameterGroups"]["ml"]["parameters"]["mobile_model"] == {  # updated where it lives
        "defaultValue": {"value": json.dumps(value, sort_keys=True)}, "valueType": "JSON",
        "description": f"dual-deploy: current {NAME} model (manifest.json)"}
    assert put["parameters"] == rc_template()["parameters"]  # everything else kept as it was
    assert put["conditions"] == rc_template()["conditions"]
    assert put["version"] == {"description": f"dual-deploy: {NAME} -> v1"}
    assert record["remote_config"] == {"parameter": "mobile_model", "value": json.dumps(value, sort_keys=True),
                                       "etag": "etag-3", "changed": True}


def test_storage_remote_config_error_then_retry_fixes_the_pointer_without_a_new_version(
        make_hook, bucket_name, tflite, credentials):
    denied = {"error": {"code": 403, "status": "PERMISSION_DENIED",
                        "message": "The caller does not have permission"}}
    session, api = rc_session(credentials, {("GET", RC_URL): [(403, denied)]})
    hook = make_hook(FirebaseStoragePublisherHook, storage_bucket=bucket_name,
                     remote_config_parameter="welcome_model", remote_config_session=session)
    path = tflite("rc-retry")

    with pytest.raises(PublishError) as err:
        hook.publish(NAME, path, [])
    assert str(err.value) == (f"Remote Config GET {RC_URL} failed: HTTP 403 PERMISSION_DENIED: "
                              "The caller does not have permission")
    assert read_manifest(bucket_name)[0]["version"] == 1  # the manifest step had succeeded

    api.routes = {("GET", RC_URL): [(200, rc_template(), {"ETag": "etag-9"})], ("PUT", RC_URL): [(200, {})]}
    record = hook.publish(NAME, path, [])  # the task's retry
    assert (record["version"], record["created"], record["remote_config"]["changed"]) == (1, False, True)
    assert api.calls[-1].method == "PUT" and api.calls[-1].headers["If-Match"] == "etag-9"
    assert json.loads(api.calls[-1].body["parameters"]["welcome_model"]["defaultValue"]["value"])["version"] == 1


# --- FirebaseHook credentials ---------------------------------------------------------------------


def test_firebase_hook_builds_named_app_from_connection_keyfile(monkeypatch, rsa_pem):
    from google.oauth2 import service_account

    keyfile = {"type": "service_account", "project_id": "key-project", "private_key_id": "k1",
               "private_key": rsa_pem, "client_email": SA_EMAIL, "client_id": "1",
               "token_uri": "https://oauth2.googleapis.com/token"}
    monkeypatch.setenv("AIRFLOW_CONN_FIREBASE_KEYFILE", json.dumps(
        {"conn_type": "google_cloud_platform", "extra": {"keyfile_dict": keyfile, "project": "conn-project"}}))
    hooks = [FirebaseHook(firebase_conn_id="firebase_keyfile", storage_bucket="conn-project.firebasestorage.app"),
             FirebaseHook(firebase_conn_id="firebase_keyfile"),
             FirebaseHook(firebase_conn_id="firebase_keyfile", firebase_project="other-project")]
    try:
        app = hooks[0].get_app()
        assert app.name == "dual-deploy:firebase_keyfile:conn-project"
        assert app.project_id == "conn-project"  # the connection's project extra
        assert app.options.get("storageBucket") == "conn-project.firebasestorage.app"
        credential = app.credential.get_credential()
        assert isinstance(credential, service_account.Credentials) and credential.service_account_email == SA_EMAIL
        assert hooks[1].get_app() is app  # one app per connection + project, reused
        assert hooks[2].get_app().project_id == "other-project"
    finally:
        for name in {hook.app_name for hook in hooks}:
            try:
                firebase_admin.delete_app(firebase_admin.get_app(name))
            except ValueError:
                pass


# --- the operator ---------------------------------------------------------------------------------


def operator(**kwargs) -> PublishMobileModelOperator:
    return PublishMobileModelOperator(task_id="publish", display_name=NAME, tflite_uri="gs://b/model.tflite",
                                      tags=["flowers"], **kwargs)


FIREBASE_ARGS = {"firebase_conn_id": "fb_conn", "firebase_project": "proj-1",
                 "firebase_storage_bucket": "proj-1.firebasestorage.app"}


def test_operator_builds_firebase_ml_hook():
    with mock.patch("dual_deploy.operators.publish.FirebaseMLPublisherHook") as ml_hook, \
            mock.patch("dual_deploy.operators.publish.FirebaseStoragePublisherHook") as storage_hook:
        publisher = operator(backend="firebase_ml", unlock_timeout_s=120, remote_config_parameter="ignored",
                             **FIREBASE_ARGS).get_publisher()
    ml_hook.assert_called_once_with(firebase_conn_id="fb_conn", firebase_project="proj-1",
                                    storage_bucket="proj-1.firebasestorage.app", unlock_timeout_s=120)
    assert publisher is ml_hook.return_value
    storage_hook.assert_not_called()


def test_operator_builds_firebase_storage_hook():
    with mock.patch("dual_deploy.operators.publish.FirebaseStoragePublisherHook") as storage_hook, \
            mock.patch("dual_deploy.operators.publish.FirebaseMLPublisherHook") as ml_hook:
        publisher = operator(backend="firebase_storage", remote_config_parameter="mobile_model",
                             **FIREBASE_ARGS).get_publisher()
    storage_hook.assert_called_once_with(firebase_conn_id="fb_conn", firebase_project="proj-1",
                                         storage_bucket="proj-1.firebasestorage.app",
                                         remote_config_parameter="mobile_model")
    assert publisher is storage_hook.return_value
    ml_hook.assert_not_called()


def test_operator_config_errors():
    with pytest.raises(AirflowFailException, match="unknown mobile publishing backend 'local'"):
        operator(backend="local", **FIREBASE_ARGS).get_publisher()  # gone: locally it is firebase_storage too
    with pytest.raises(AirflowFailException, match="needs firebase_storage_bucket"):
        operator(backend="firebase_storage").get_publisher()
    with pytest.raises(AirflowFailException, match="unknown mobile publishing backend 'firebase'"):
        operator(backend="firebase", **FIREBASE_ARGS).get_publisher()


def test_operator_execute_publishes_to_firebase_storage(monkeypatch, make_hook, bucket_name, tflite):
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", json.dumps(
        {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": PROJECT}}))
    path = tflite("op")
    emulator_bucket(bucket_name).blob("runs/r1/model.tflite").upload_from_filename(path)
    make_hook(FirebaseStoragePublisherHook, storage_bucket=bucket_name)  # the app to clean up afterwards
    op = PublishMobileModelOperator(task_id="publish", display_name=NAME,
                                    tflite_uri=f"gs://{bucket_name}/runs/r1/model.tflite", tags=["flowers"],
                                    backend="firebase_storage", firebase_conn_id=CONN_ID,
                                    firebase_storage_bucket=bucket_name, metadata={"run_id": "r1"})

    out = op.execute(context={})

    assert {"backend", "model_id", "display_name", "version", "tags", "published", "model_hash", "tflite_uri",
            "created", "duration_s"} <= set(out)
    assert (out["backend"], out["version"], out["created"], out["model_hash"]) == (
        "firebase_storage", 1, True, sha256_of(path))
    assert read_manifest(bucket_name)[0]["metadata"] == {"run_id": "r1"}


# --- parse-time imports ---------------------------------------------------------------------------


def test_importing_hooks_and_operator_loads_neither_tensorflow_nor_firebase_ml():
    code = ("import sys, dual_deploy.hooks.firebase, dual_deploy.operators.publish; "
            "print(sorted(m for m in ('tensorflow', 'firebase_admin.ml') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), str(ROOT / "plugins")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
