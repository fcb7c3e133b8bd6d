"""Cloud Composer's plugins/ folder, uploaded exactly as README step 4 says, loaded as Airflow loads it.

Before every task the task runner calls ``airflow.sdk.plugins_manager.integrate_macros_plugins()``,
which imports every ``.py`` file under the plugins folder as a top-level module unless
``plugins/.airflowignore`` excludes it. With ``dual_deploy/`` and ``dualml/`` there and no ignore file
that imports TensorFlow, google.cloud.aiplatform and firebase_admin, then executes
``dualml/trainer/__main__.py`` (argparse -> SystemExit(2)): every task crashes after ~40 s.

The test runs the README's command (``make composer-upload ...``) with a stand-in ``gcloud`` on PATH that
imports files into a folder the way ``gcloud composer environments storage {dags,plugins} import`` does
(googlecloudsdk/command_lib/composer/storage_util.py: a directory source lands as ``<folder>/<name>/``,
a file as ``<folder>/<name>``; wildcards are not expanded), then loads that plugins folder in a fresh
interpreter the way the task runner does, and the way the scheduler / API server loader does with
``[core] dag_ignore_file_syntax = regexp``. Loading time is printed, never asserted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "google.cloud.aiplatform", "firebase_admin")

FAKE_GCLOUD = """#!{python}
# Stand-in for `gcloud composer environments storage {{dags,plugins}} import` (storage API code path):
# the bucket is a local folder ($FAKE_COMPOSER_BUCKET); every call is logged.
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:3] != ["composer", "environments", "storage"] or args[4:5] != ["import"]:
    sys.exit(f"fake gcloud: unsupported command {{args}}")
folder, opts, rest = args[3], {{}}, args[5:]
while rest:
    key, _, value = rest.pop(0).partition("=")
    opts[key] = value if value else rest.pop(0)
if folder not in ("dags", "plugins") or not opts.get("--environment") or not opts.get("--location"):
    sys.exit(f"fake gcloud: need dags|plugins, --environment and --location: {{args}}")
source = opts["--source"]
if any(c in source for c in "*?["):
    sys.exit("fake gcloud: wildcards are not expanded (gcloud: 'Use of gsutil wildcards is no longer supported')")
source = source.rstrip("/")
if not os.path.exists(source):
    sys.exit("ERROR: (gcloud.composer.environments.storage.import) Source for import does not exist.")
dest = os.path.join(os.environ["FAKE_COMPOSER_BUCKET"], folder, opts.get("--destination", ""),
                    os.path.basename(source))
if os.path.isdir(source):
    shutil.copytree(source, dest, dirs_exist_ok=True)
else:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copy2(source, dest)
"""

# A user's own plugin beside ours: proves the loader really ran over the folder (and still loads plugins).
CANARY_PLUGIN = '''
from airflow.plugins_manager import AirflowPlugin


def canary_macro():
    return "canary"


class CanaryPlugin(AirflowPlugin):
    name = "composer_canary"
    macros = [canary_macro]
'''

LOAD = textwrap.dedent("""
    import json, os, sys, time
    main_before = sys.modules["__main__"]
    started = time.monotonic()
    mode = sys.argv[1]
    if mode == "task_runner":  # what airflow.sdk.execution_time.task_runner does before every task
        from airflow.sdk import plugins_manager
        from airflow.sdk.execution_time import macros
        imported = time.monotonic()
        plugins_manager.integrate_macros_plugins()
        macro = getattr(getattr(macros, "composer_canary", None), "canary_macro", None)
        macro_ok = macro is not None and macro() == "canary"
    else:  # the scheduler's / API server's loader, which honours [core] dag_ignore_file_syntax
        from airflow import plugins_manager
        imported = time.monotonic()
        plugins_manager.ensure_plugins_loaded()
        macro_ok = None
    loaded = time.monotonic()
    plugins, errors = plugins_manager._get_plugins()
    folder = os.path.realpath(os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"])

    def from_folder():
        return sorted(name for name, mod in list(sys.modules.items())
                      if os.path.realpath(getattr(mod, "__file__", None) or "/").startswith(folder + os.sep))

    state = {
        "import_airflow_s": imported - started, "load_plugins_s": loaded - imported,
        "plugins": sorted(p.name for p in plugins), "errors": errors, "macro_ok": macro_ok,
        "main_untouched": sys.modules["__main__"] is main_before,
        "heavy": [m for m in %r if m in sys.modules],
        "modules_from_folder": from_folder(),
    }
    # What the DAG files and tasks import must still come from the plugins folder (on sys.path).
    import dual_deploy, dual_deploy.config, dual_deploy.dag_helpers, dualml, dualml.storage
    state["dual_deploy_file"] = dual_deploy.__file__
    state["dualml_file"] = dualml.__file__
    state["heavy_after_imports"] = [m for m in %r if m in sys.modules]
    print("RESULT " + json.dumps(state))
""") % (HEAVY, HEAVY)


def _readme_upload_command() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running on GCP", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"`(make composer-upload [^`]*)`", section)
    assert found, "README's GCP section must give the upload command (make composer-upload ...)"
    assert len(set(found)) == 1, f"README gives several upload commands: {found}"
    return shlex.split(found[0].replace("<environment>", "test-env").replace("<region>", "us-central1"))


@pytest.fixture(scope="module")
def composer_bucket(tmp_path_factory) -> Path:
    """The environment's bucket after running README step 4's command."""
    tmp = tmp_path_factory.mktemp("composer")
    bucket, bin_dir, log = tmp / "bucket", tmp / "bin", tmp / "gcloud-calls.jsonl"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FAKE_COMPOSER_BUCKET": str(bucket), "FAKE_GCLOUD_LOG": str(log)}
    cmd = [*_readme_upload_command(), f"COMPOSER_BUNDLE={tmp / 'bundle'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert all("--environment" in c and "test-env" in c and "us-central1" in c for c in calls), calls
    sources = [(c[3], Path(c[c.index("--source") + 1]).name) for c in calls]
    # The ignore file lands before the packages, so a worker syncing mid-upload never loads them.
    assert sources[0] == ("plugins", ".airflowignore"), sources
    (bucket / "plugins" / "composer_canary_plugin.py").write_text(CANARY_PLUGIN)
    return bucket


def _load(bucket: Path, tmp_path: Path, mode: str, syntax: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k != "PYTHONPATH"}
    env.update(AIRFLOW_HOME=str(tmp_path / "airflow_home"), AIRFLOW__CORE__PLUGINS_FOLDER=str(bucket / "plugins"),
               AIRFLOW__CORE__DAGS_FOLDER=str(bucket / "dags"), AIRFLOW__CORE__LOAD_EXAMPLES="False")
    if syntax:
        env["AIRFLOW__CORE__DAG_IGNORE_FILE_SYNTAX"] = syntax
    # cwd outside the repository, no PYTHONPATH: only the plugins folder can provide our packages.
    proc = subprocess.run([sys.executable, "-c", LOAD, mode], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"plugin loading crashed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def test_upload_layout(composer_bucket):
    plugins = composer_bucket / "plugins"
    assert (plugins / ".airflowignore").read_text() == (ROOT / "plugins" / ".airflowignore").read_text()
    assert (plugins / "dual_deploy" / "__init__.py").is_file()
    assert (plugins / "dualml" / "trainer" / "__main__.py").is_file()
    assert not list(plugins.rglob("__pycache__"))
    dags = composer_bucket / "dags"
    assert sorted(p.name for p in dags.glob("*.py")) == sorted(p.name for p in (ROOT / "dags").glob("*.py"))
    assert (dags / "config" / "dual_deploy.yaml").is_file()  # the DAG files read it from beside themselves


@pytest.mark.parametrize(("mode", "syntax"), [("task_runner", None), ("scheduler", "regexp")],
                         ids=["task-runner", "scheduler-regexp-syntax"])
def test_plugin_loading_imports_none_of_our_code(composer_bucket, tmp_path, mode, syntax):
    state = _load(composer_bucket, tmp_path, mode, syntax)
    print(f"\n{mode}: import airflow {state['import_airflow_s']:.1f} s, load plugins {state['load_plugins_s']:.2f} s")
    assert state["main_untouched"], "a plugins/**/__main__.py replaced sys.modules['__main__']"
    assert state["errors"] == {}
    assert "composer_canary" in state["plugins"]  # the loader did run over this folder
    if mode == "task_runner":
        assert state["macro_ok"]
    assert state["heavy"] == []
    assert state["modules_from_folder"] == ["composer_canary_plugin"], "plugin loading imported our packages"
    plugins = (composer_bucket / "plugins").resolve()
    assert Path(state["dual_deploy_file"]).resolve() == plugins / "dual_deploy" / "__init__.py"
    assert Path(state["dualml_file"]).resolve() == plugins / "dualml" / "__init__.py"
    assert state["heavy_after_imports"] == []


def test_readme_asks_for_a_triggerer():
    # Deferrable training and the new-data sensor never resume without a triggerer.
    readme = (ROOT / "README.md").read_text()
    step3 = readme.split("## Running on GCP", 1)[1].split("\n3. ", 1)[1].split("\n4. ", 1)[0]
    assert "triggerer is required" in step3
    assert re.search(r"gcloud composer environments update \S+ --location \S+ --triggerer-count=1", step3)
