"""cloudbuild.yaml, the trainer Dockerfile and README step 1, checked against each other statically.

Cloud Build rules applied here (cloud.google.com/build/docs/configuring-builds/substitute-variable-values):
- for every build only PROJECT_ID, BUILD_ID, PROJECT_NUMBER and LOCATION are set; SHORT_SHA, COMMIT_SHA,
  BRANCH_NAME... are set by triggers only and are EMPTY for `gcloud builds submit` (so `…/trainer:${SHORT_SHA}`
  became `…/trainer:`, an invalid reference);
- a user substitution starts with `_`; one used but defined nowhere fails the build, and one passed on the
  command line but used nowhere fails it too (no ALLOW_LOOSE here);
- with dynamic_substitutions, substitution defaults may reference other substitutions; `$$` is a literal `$`.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "include" / "dualml" / "trainer"
BUILTIN_ALWAYS = {"PROJECT_ID": "my-project", "BUILD_ID": "b-123", "PROJECT_NUMBER": "123456", "LOCATION": "global"}
BUILTIN_TRIGGER_ONLY = ("TRIGGER_NAME", "COMMIT_SHA", "REVISION_ID", "SHORT_SHA", "REPO_NAME", "REPO_FULL_NAME",
                        "BRANCH_NAME", "TAG_NAME", "REF_NAME", "TRIGGER_BUILD_CONFIG_PATH")
_REF = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
# Docker reference: name components, then an optional tag of 1-128 [\w.-] characters that cannot start with . or -.
_IMAGE_REF = re.compile(r"^[a-z0-9.-]+(?::\d+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)+:[\w][\w.-]{0,127}$")


def _config() -> dict:
    return yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _refs(text: str) -> set[str]:
    return {a or b for a, b in _REF.findall(text.replace("$$", ""))}


def _readme_build_command() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running on GCP", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"`(gcloud builds submit [^`]*)`", section)
    assert len(found) == 1, f"README's GCP section must give one image build command, found {found}"
    # What the user's shell does with the command substitution before gcloud sees it.
    return shlex.split(found[0].replace("$(git rev-parse --short HEAD)", "1a2b3c4"))


def _cli_substitutions(argv: list[str]) -> dict[str, str]:
    values = [a.split("=", 1)[1] for a in argv if a.startswith("--substitutions=")]
    assert len(values) == 1, argv
    return dict(pair.split("=", 1) for pair in values[0].split(","))


def _resolve(config: dict, cli: dict[str, str], builtins: dict[str, str]):
    """The values Cloud Build substitutes: command line over file defaults, dynamic references expanded."""
    subs = {**config.get("substitutions", {}), **cli}
    values = {k: "" for k in BUILTIN_TRIGGER_ONLY} | BUILTIN_ALWAYS | builtins

    def expand(text: str, seen=()) -> str:
        def one(m):
            name = m.group(1) or m.group(2)
            if name in subs:
                assert name not in seen, f"substitution cycle through {name}"
                return expand(subs[name], (*seen, name))
            assert name in values, f"${name} is neither defined in cloudbuild.yaml/the command nor a built-in"
            return values[name]
        return _REF.sub(one, text.replace("$$", "\0")).replace("\0", "$")

    return expand


def _tags(config: dict, expand) -> tuple[list[str], list[str]]:
    built = []
    for step in config["steps"]:
        args = step.get("args", [])
        built += [expand(args[i + 1]) for i, a in enumerate(args) if a == "-t"]
    return built, [expand(i) for i in config["images"]]


SCENARIOS = {
    "manual build, README command": lambda: (_cli_substitutions(_readme_build_command()), {}),
    "build trigger, no _TAG": lambda: ({"_REGION": "europe-west4", "_REPO": "dual-deploy"}, {"SHORT_SHA": "9f8e7d6"}),
}


def test_readme_command_is_a_plain_manual_build():
    argv = _readme_build_command()
    assert argv[:3] == ["gcloud", "builds", "submit"] and "--config" in argv
    assert argv[argv.index("--config") + 1] == "cloudbuild.yaml"
    cli = _cli_substitutions(argv)
    assert all(k.startswith("_") for k in cli), f"only user substitutions can be passed: {cli}"
    used = set().union(*(_refs(s) for s in _strings(_config())))
    assert set(cli) <= used, f"substitutions passed but used nowhere fail the build: {set(cli) - used}"
    assert cli["_TAG"] == "1a2b3c4"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_substitution_resolves_and_no_tag_is_empty(scenario):
    config = _config()
    cli, builtins = SCENARIOS[scenario]()
    expand = _resolve(config, cli, builtins)
    for text in _strings(config):  # raises on any reference Cloud Build would reject
        expand(text)
    built, pushed = _tags(config, expand)
    for ref in built + pushed:
        assert not ref.endswith(":"), f"{scenario}: image reference {ref!r} has an empty tag"
        assert _IMAGE_REF.match(ref), f"{scenario}: {ref!r} is not a valid image reference"
    assert sorted(pushed) == sorted(built), "images: must push exactly what the steps build"
    tag = cli.get("_TAG") or builtins["SHORT_SHA"]
    assert {r.rsplit(":", 1)[1] for r in pushed} == {tag, "latest"}


def _check_step(config: dict, expand) -> subprocess.CompletedProcess:
    step = next(s for s in config["steps"] if s.get("id") == "check-tag")
    assert step.get("entrypoint") == "bash"
    later = [s for s in config["steps"] if s is not step]
    assert all(s.get("waitFor") == ["check-tag"] for s in later), "every build step must wait for check-tag"
    return subprocess.run(["bash", *[expand(a) for a in step["args"]]], capture_output=True, text=True, timeout=30)


def test_a_manual_build_without_tag_stops_with_a_message():
    config = _config()
    cli = {k: v for k, v in _cli_substitutions(_readme_build_command()).items() if k != "_TAG"}
    proc = _check_step(config, _resolve(config, cli, {}))
    assert proc.returncode != 0
    assert "_TAG" in proc.stderr and "$(git rev-parse --short HEAD)" in proc.stderr
    ok = _check_step(config, _resolve(config, _cli_substitutions(_readme_build_command()), {}))
    assert ok.returncode == 0, ok.stderr


def _step_building(config: dict, image_sub: str) -> dict:
    steps = [s for s in config["steps"] if f"${{{image_sub}}}:${{_TAG}}" in s.get("args", [])]
    assert len(steps) == 1, f"exactly one step must build ${{{image_sub}}}"
    return steps[0]


def _build_args(step: dict) -> dict[str, str]:
    args = step["args"]
    return dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--build-arg")


def test_trainer_image_is_gpu_by_default_and_a_cpu_variant_exists():
    config = _config()
    dockerfile = (TRAINER / "Dockerfile").read_text()
    assert re.search(r"^ARG TF_VARIANT=gpu$", dockerfile, re.M), "a plain docker build must give the GPU image"
    assert 'pip install -r "/tmp/trainer/requirements-${TF_VARIANT}.txt"' in dockerfile
    subs = config["substitutions"]
    gpu, cpu = _step_building(config, "_TRAINER"), _step_building(config, "_TRAINER_CPU")
    assert subs["_TRAINER"].endswith("/trainer") and subs["_TRAINER_CPU"].endswith("/trainer-cpu")
    assert _build_args(gpu).get("TF_VARIANT", "gpu") == "gpu"
    assert _build_args(cpu)["TF_VARIANT"] == "cpu"
    for step in (gpu, cpu):
        assert step["args"][step["args"].index("-f") + 1] == "include/dualml/trainer/Dockerfile"

    root_tf = re.search(r"^tensorflow==([\d.]+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    gpu_reqs = (TRAINER / "requirements-gpu.txt").read_text().splitlines()
    cpu_reqs = (TRAINER / "requirements-cpu.txt").read_text().splitlines()
    assert f"tensorflow[and-cuda]=={root_tf}" in gpu_reqs  # the CUDA/cuDNN wheels come only with this extra
    assert f"tensorflow=={root_tf}" in cpu_reqs
    assert "-r requirements.txt" in gpu_reqs and "-r requirements.txt" in cpu_reqs
    common = (TRAINER / "requirements.txt").read_text()
    assert not re.search(r"^tensorflow\b", common, re.M), "TensorFlow comes from the variant's file only"


def test_default_config_trains_on_gpus_so_the_readme_points_at_the_gpu_image():
    config = yaml.safe_load((ROOT / "dags" / "config" / "dual_deploy.yaml").read_text())
    assert any(t["training"].get("accelerator_count", 1) and t["training"].get("accelerator_type")
               for t in config["targets"])
    readme = (ROOT / "README.md").read_text().split("## Running on GCP", 1)[1]
    assert re.search(r"`trainer`: \*\*GPU\*\*", readme) and "`trainer-cpu`: CPU-only" in readme
