"""Local Vertex AI server, ModelService (the Model Registry) through the provider's ModelServiceHook:
versions under a parent model, ``default``, unique aliases, ``@version`` / ``@alias`` names, list
filters, MergeVersionAliases, and a failing UploadModel operation that must leave nothing behind.
"""

from __future__ import annotations

import uuid

import pytest
from google.api_core.future.polling import DEFAULT_POLLING

PROJECT, REGION = "local-project", "us-central1"
PARENT = f"projects/{PROJECT}/locations/{REGION}"
SERVING_IMAGE = "us-central1-docker.pkg.dev/local-project/dual-deploy/serving:test"
FAST = DEFAULT_POLLING.with_delay(initial=0.05, maximum=0.5)  # these operations finish in milliseconds


@pytest.fixture(scope="module")
def hook(localcloud):
    from airflow.providers.google.cloud.hooks.vertex_ai.model_service import ModelServiceHook

    return ModelServiceHook()


def _upload(hook, display_name: str, parent_model: str | None = None, aliases=(), labels=None) -> tuple[str, str]:
    model = {"display_name": display_name, "artifact_uri": f"gs://lc-models/{display_name}/",
             "container_spec": {"image_uri": SERVING_IMAGE}, "version_aliases": list(aliases),
             "labels": labels or {}}
    op = hook.upload_model(project_id=PROJECT, region=REGION, model=model, parent_model=parent_model)
    response = hook.wait_for_operation_result(op, timeout=60, polling=FAST)
    return response.model.rsplit("/", 1)[-1], response.model_version_id


def _get(hook, model_id: str):
    return hook.get_model(project_id=PROJECT, region=REGION, model_id=model_id)


def _versions(hook, model_id: str) -> dict[str, set[str]]:
    pager = hook.list_model_versions(project_id=PROJECT, region=REGION, model_id=model_id)
    return {v.version_id: set(v.version_aliases) for v in pager}


def _name() -> str:
    return f"lc-model-{uuid.uuid4().hex[:8]}"


def test_versions_default_alias_and_resolution(hook, localcloud):
    name = _name()
    model_id, v1 = _upload(hook, name, aliases=["run-a"])
    assert v1 == "1"
    assert _versions(hook, model_id) == {"1": {"run-a", "default"}}  # the first version is the default

    _, v2 = _upload(hook, name, parent_model=model_id, aliases=["run-b"])
    assert v2 == "2"
    assert _versions(hook, model_id) == {"1": {"run-a", "default"}, "2": {"run-b"}}  # default stays

    got = _get(hook, model_id)  # no @: the default version
    assert (got.name, got.version_id) == (f"{PARENT}/models/{model_id}", "1")
    assert _get(hook, f"{model_id}@2").version_id == "2"
    assert _get(hook, f"{model_id}@run-b").version_id == "2"
    assert _get(hook, f"{model_id}@default").version_id == "1"
    assert _get(hook, f"{model_id}@2").artifact_uri == f"gs://lc-models/{name}/"

    # An upload asking for `default` takes it; the previous default keeps its other aliases.
    _, v3 = _upload(hook, name, parent_model=model_id, aliases=["run-c", "default"])
    assert v3 == "3"
    assert _versions(hook, model_id) == {"1": {"run-a"}, "2": {"run-b"}, "3": {"run-c", "default"}}
    assert _get(hook, model_id).version_id == "3"

    # ListModels: one entry per model (its default version), found by display name.
    listed = list(hook.list_models(project_id=PROJECT, region=REGION, filter=f'display_name="{name}"'))
    assert [(m.name.rsplit("/", 1)[-1], m.version_id) for m in listed] == [(model_id, "3")]

    stored = [v for v in localcloud.state()["model_versions"] if v["name"].endswith(f"/models/{model_id}")]
    assert sorted((v["version_id"], tuple(sorted(v["version_aliases"]))) for v in stored) == [
        ("1", ("run-a",)), ("2", ("run-b",)), ("3", ("default", "run-c"))]
    assert {v["display_name"] for v in stored} == {name}


def test_aliases_are_unique_and_checked(hook, localcloud):
    from google.api_core.exceptions import InvalidArgument, NotFound

    name = _name()
    model_id, _ = _upload(hook, name, aliases=["champion"])
    with pytest.raises(InvalidArgument, match="'champion'.*already used by version 1"):
        _upload(hook, name, parent_model=model_id, aliases=["champion"])
    for bad in ("Champion", "1st", "a", "ends-with-", "has_underscore", "x" * 129):
        with pytest.raises(InvalidArgument, match="alias"):
            _upload(hook, name, parent_model=model_id, aliases=[bad])
    with pytest.raises(InvalidArgument, match="duplicates"):
        _upload(hook, name, parent_model=model_id, aliases=["twice", "twice"])
    with pytest.raises(NotFound):
        _upload(hook, name, parent_model="4242424242")
    with pytest.raises(InvalidArgument, match="parent_model"):
        _upload(hook, name, parent_model=f"{model_id}@1")
    with pytest.raises(InvalidArgument, match="display_name"):
        _upload(hook, "n" * 129)
    with pytest.raises(NotFound):
        _get(hook, f"{model_id}@no-such-alias")
    with pytest.raises(NotFound):
        _get(hook, f"{model_id}@7")
    assert _versions(hook, model_id) == {"1": {"champion", "default"}}  # none of that added a version


def test_merge_version_aliases_moves_and_removes(hook, localcloud):
    from google.api_core.exceptions import InvalidArgument, NotFound

    name = _name()
    model_id, _ = _upload(hook, name)
    _upload(hook, name, parent_model=model_id)

    got = hook.add_version_aliases(project_id=PROJECT, region=REGION, model_id=f"{model_id}@1",
                                   version_aliases=["candidate"])
    assert got.version_id == "1" and set(got.version_aliases) == {"default", "candidate"}
    # Adding an alias another version holds moves it (aliases are unique within a model).
    hook.add_version_aliases(project_id=PROJECT, region=REGION, model_id=f"{model_id}@2",
                             version_aliases=["candidate"])
    assert _versions(hook, model_id) == {"1": {"default"}, "2": {"candidate"}}

    hook.set_version_as_default(project_id=PROJECT, region=REGION, model_id=f"{model_id}@candidate")
    assert _versions(hook, model_id) == {"1": set(), "2": {"candidate", "default"}}

    hook.delete_version_aliases(project_id=PROJECT, region=REGION, model_id=f"{model_id}@2",
                                version_aliases=["candidate"])
    assert _versions(hook, model_id) == {"1": set(), "2": {"default"}}
    with pytest.raises(NotFound):
        _get(hook, f"{model_id}@candidate")

    # Below the hook's own client-side checks: the server refuses too.
    client = hook.get_model_service_client(REGION)
    with pytest.raises(InvalidArgument, match="default"):
        client.merge_version_aliases(name=f"{PARENT}/models/{model_id}@2", version_aliases=["-default"])
    with pytest.raises(InvalidArgument, match="must name a version"):
        client.merge_version_aliases(name=f"{PARENT}/models/{model_id}", version_aliases=["x1"])
    with pytest.raises(InvalidArgument, match="alias"):
        client.merge_version_aliases(name=f"{PARENT}/models/{model_id}@1", version_aliases=["Bad"])
    assert _versions(hook, model_id) == {"1": set(), "2": {"default"}}


def test_list_models_filters_by_display_name_and_labels(hook, localcloud):
    from google.api_core.exceptions import InvalidArgument

    team = f"t{uuid.uuid4().hex[:8]}"
    a, b = _name(), _name()
    a_id, _ = _upload(hook, a, labels={"team": team})
    _upload(hook, a, parent_model=a_id)
    b_id, _ = _upload(hook, b, labels={"team": team, "target": "mobile"})

    def ids(flt: str) -> list[str]:
        return [m.name.rsplit("/", 1)[-1] for m in hook.list_models(project_id=PROJECT, region=REGION, filter=flt)]

    assert ids(f'display_name="{a}"') == [a_id]
    assert sorted(ids(f'labels.team="{team}"')) == sorted([a_id, b_id])
    assert ids(f'labels.team="{team}" AND labels.target="mobile"') == [b_id]
    assert ids(f'labels.team="{team}" AND display_name!="{a}"') == [b_id]
    assert ids('display_name="no-such-model"') == []
    with pytest.raises(InvalidArgument):
        ids(f'display_name="{a}" OR display_name="{b}"')


def test_failed_upload_operation_adds_no_version(hook, localcloud):
    from airflow.providers.common.compat.sdk import AirflowException

    name = _name()
    model_id, _ = _upload(hook, name, aliases=["run-a"])
    localcloud.clear_faults()
    localcloud.add_fault(kind="operation", method="UploadModel", code="INTERNAL", message="injected: upload lost")
    try:
        with pytest.raises(AirflowException) as e:
            _upload(hook, name, parent_model=model_id, aliases=["run-b", "default"])
    finally:
        localcloud.clear_faults()
    assert "injected: upload lost" in repr(e.value.__cause__ or e.value)
    assert _versions(hook, model_id) == {"1": {"run-a", "default"}}  # no version, default unmoved
    _, v2 = _upload(hook, name, parent_model=model_id, aliases=["run-b"])  # a retry just works
    assert v2 == "2"


def test_delete_version_keeps_the_default(hook, localcloud):
    from google.api_core.exceptions import FailedPrecondition

    name = _name()
    model_id, _ = _upload(hook, name)
    _upload(hook, name, parent_model=model_id)
    with pytest.raises(FailedPrecondition, match="default"):
        hook.delete_model_version(project_id=PROJECT, region=REGION, model_id=f"{model_id}@1")
    op = hook.delete_model_version(project_id=PROJECT, region=REGION, model_id=f"{model_id}@2")
    hook.wait_for_operation_result(op, timeout=60, polling=FAST)
    assert _versions(hook, model_id) == {"1": {"default"}}
