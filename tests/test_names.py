"""Names Vertex AI and Firebase accept (dual_deploy.names) and the config checks built on them.

The rules are taken from the client libraries' own sources where they state them (read as text: importing
firebase_admin.ml would import TensorFlow): aiplatform_v1's Model.version_aliases docstring and
firebase_admin.ml's patterns. Firebase ML's API is stricter than the SDK's display-name regex.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import re
import string
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

from dual_deploy import names
from dual_deploy.config import DEFAULT_CONFIG, ConfigError, build_config
from dual_deploy.dag_helpers import TEMPLATE_FILTERS

ROOT = Path(__file__).resolve().parents[1]


def _package_source(package: str, relative: str) -> str:
    locations = importlib.util.find_spec(package).submodule_search_locations  # finds, does not import
    return (Path(list(locations)[0]) / relative).read_text()


def _vertex_alias_rule() -> re.Pattern:
    doc = _package_source("google.cloud", "aiplatform_v1/types/model.py")
    rule = re.search(r"The format is (\S+) to\s+distinguish from\s+version_id", doc).group(1)
    return re.compile(f"^{rule}$")


def _firebase_sdk_pattern(name: str) -> re.Pattern:
    src = _package_source("firebase_admin", "ml.py")
    return re.compile(re.search(rf"^{name} = re\.compile\(r'([^']+)'\)", src, re.M).group(1))


def _run_ids() -> list[str]:
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + "_-:+.T é/"
    ids = [
        "manual__2026-01-01T00:00:00+00:00",
        "scheduled__2026-11-23T03:00:00+00:00",
        "newdata__" + "0123456789abcdef" * 4,
        "a" * 99 + "__bbbb",  # the old 100-character cut ended in "-" here
        "x" * 300,
        "___",  # no letter or digit at all
        "",
        "É" * 10,
        "9" * 130,
    ]
    ids += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 260))) for _ in range(300)]
    return ids


SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def test_short_run_ids_keep_their_slug():
    # Run folders of existing runs must not move.
    assert names.slug("manual__2026-01-01T00:00:00+00:00") == "manual-2026-01-01t00-00-00-00-00"
    assert names.slug("newdata__abc") == "newdata-abc"
    assert names.slug("a" * 100) == "a" * 100


@pytest.mark.parametrize("max_len", [8, 20, 63, 100, 124])
def test_slug_is_valid_bounded_and_deterministic(max_len):
    for run_id in _run_ids():
        s = names.slug(run_id, max_len)
        assert SLUG.match(s) and len(s) <= max_len, (run_id, s)
        assert names.slug(run_id, max_len) == s


def test_long_run_ids_sharing_a_prefix_get_different_names():
    a, b = "manual__" + "x" * 200 + "1", "manual__" + "x" * 200 + "2"
    assert names.slug(a) != names.slug(b)
    assert names.run_alias(a) != names.run_alias(b) and names.run_label(a) != names.run_label(b)
    cut = names.slug("a" * 99 + "__bbbb")
    assert not cut.endswith("-") and len(cut) <= 100 and cut.startswith("a" * 90)


def test_run_alias_matches_vertex_alias_rule():
    rule = _vertex_alias_rule()
    assert rule.pattern == "^[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]$"  # what aiplatform_v1 documents
    for run_id in _run_ids():
        alias = names.run_alias(run_id)
        assert rule.match(alias), (run_id, alias)
        assert alias.startswith("run-")
    assert names.run_alias("manual__2026-01-01T00:00:00+00:00") == "run-manual-2026-01-01t00-00-00-00-00"


def test_run_label_is_a_valid_label_value():
    for run_id in _run_ids():
        label = names.run_label(run_id)
        assert re.match(r"^[a-z0-9_-]{1,63}$", label), (run_id, label)


def test_display_name_keeps_the_prefix_and_fits():
    prefix = "dual-deploy-" + "t" * 31 + "-"  # the longest target name the config allows
    for run_id in _run_ids():
        name = names.display_name(prefix, run_id)
        assert name.startswith(prefix) and len(name) <= names.VERTEX_DISPLAY_NAME_MAX
        assert not name.endswith("-")
    assert len(names.display_name("p-", "x" * 300, max_len=40)) == 40
    with pytest.raises(ValueError, match="leaves 3 of 128 characters"):
        names.display_name("p" * 125, "manual__1")


def test_template_filters_render_the_same_names():
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.filters.update(TEMPLATE_FILTERS)
    run_id = "manual__" + "2026-11-23T03:00:00+00:00" * 8
    rendered = env.from_string(
        "{{ run_id | slug }}|{{ run_id | run_alias }}|{{ run_id | run_label }}|"
        "{{ run_id | display_name('dual-deploy-cloud-') }}|{{ run_id | display_name('x-', 30) }}"
    ).render(run_id=run_id)
    assert rendered.split("|") == [names.slug(run_id), names.run_alias(run_id), names.run_label(run_id),
                                   names.display_name("dual-deploy-cloud-", run_id),
                                   names.display_name("x-", run_id, 30)]


def test_firebase_rules_against_the_sdk():
    sdk_name = _firebase_sdk_pattern("_DISPLAY_NAME_PATTERN")
    sdk_tag = _firebase_sdk_pattern("_TAG_PATTERN")
    assert sdk_tag.pattern == names.FIREBASE_TAG_PATTERN.pattern
    valid = ["flowers_mobilenet_v3", "m", "A" * 32, "Flowers2"]
    invalid_for_the_api = ["flowers-mobile", "3flowers", "_flowers"]  # the SDK lets these through
    for name in valid:
        assert names.check_firebase_ml_display_name(name) == name and sdk_name.match(name)
    for name in invalid_for_the_api:
        assert sdk_name.match(name)
        with pytest.raises(ValueError, match="starting with a letter"):
            names.check_firebase_ml_display_name(name)
    for name in ["", "a" * 33, "bad name!"]:
        assert not sdk_name.match(name)
        with pytest.raises(ValueError):
            names.check_firebase_ml_display_name(name)
    with pytest.raises(ValueError, match="e.g. 'flowers_mobile'"):
        names.check_firebase_ml_display_name("flowers-mobile")


# ================================================================ config checks


def _gcp_raw() -> dict:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["gcp"].update(project="p", trainer_image="r/trainer:abc", serving_image="r/serving:abc",
                      firebase_storage_bucket="p.firebasestorage.app")
    return raw


def _error(raw: dict, platform: str = "gcp") -> str:
    with pytest.raises(ConfigError) as e:
        build_config(copy.deepcopy(raw), platform)
    return str(e.value)


@pytest.mark.parametrize("backend", ["firebase_ml", "firebase_storage"])
def test_firebase_backend_without_bucket_fails_validation_on_gcp(backend):
    raw = _gcp_raw()
    raw["gcp"]["firebase_storage_bucket"] = None
    raw["targets"][1]["publish"]["backend"] = backend
    msg = _error(raw)
    assert "gcp.firebase_storage_bucket" in msg and f"targets[mobile].publish.backend={backend}" in msg
    build_config(copy.deepcopy(raw), "local")  # the local platform publishes into its own bucket


def test_firebase_bucket_is_a_name_not_a_uri():
    raw = _gcp_raw()
    raw["gcp"]["firebase_storage_bucket"] = "gs://p.firebasestorage.app/"
    assert "'p.firebasestorage.app' instead of 'gs://p.firebasestorage.app/'" in _error(raw)


def test_valid_gcp_config_passes():
    cfg = build_config(copy.deepcopy(_gcp_raw()), "gcp")
    assert cfg.gcp.firebase_storage_bucket == "p.firebasestorage.app"


@pytest.mark.parametrize(("path", "value", "expected"), [
    (("publish", "display_name"), "flowers-mobile", "targets.1.publish.display_name"),
    (("publish", "display_name"), "a" * 33, "targets.1.publish.display_name"),
    (("publish", "tags"), ["ok", "not ok"], "targets.1.publish.tags"),
    (("endpoint", "display_name"), "e" * 129, "targets.0.endpoint.display_name"),
    (("endpoint", "model_display_name"), "m" * 119, "targets.0.endpoint.model_display_name"),
])
def test_configured_names_google_would_reject(path, value, expected):
    raw = _gcp_raw()
    target = raw["targets"][0 if path[0] == "endpoint" else 1]
    target[path[0]][path[1]] = value
    for platform in ("gcp", "local"):
        assert expected in _error(raw, platform)
    ok = _gcp_raw()
    ok["targets"][0]["endpoint"]["model_display_name"] = "m" * 118
    build_config(ok, "gcp")


_PARSE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print("ERRORS=" + json.dumps({k: str(v) for k, v in bag.import_errors.items()}))
"""


def test_missing_firebase_bucket_is_a_dag_import_error(tmp_path):
    raw = _gcp_raw()
    raw["gcp"]["firebase_storage_bucket"] = None
    config = tmp_path / "gcp.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "DUAL_DEPLOY"))}
    env.update(AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               PYTHONPATH=os.pathsep.join([str(ROOT / "include"), str(ROOT / "plugins")]),
               DUAL_DEPLOY_CONFIG=str(config), DUAL_DEPLOY_PLATFORM="gcp")
    proc = subprocess.run([sys.executable, "-c", _PARSE, str(ROOT / "dags" / "dual_deployment.py")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("ERRORS=")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    errors = json.loads(line[len("ERRORS="):])
    assert len(errors) == 1 and "gcp.firebase_storage_bucket is not set" in next(iter(errors.values()))
