"""`make run` helpers (scripts/data_helpers.sh) on a dataset of a few thousand files.

run_local.sh runs under ``set -euo pipefail``. Picking the example image with ``find | sort | head -1``
killed ``sort`` with SIGPIPE once the path list outgrew the pipe buffer, so ``make run DATA=<a few
thousand images>`` exited 141 after the DAG had succeeded. These tests run the helpers exactly as the
script does (same shell options, same command substitutions) on such a dataset.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")
PER_CLASS = 700  # 3500 paths of ~100 characters: several times the 64 KiB pipe buffer


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets") / "My Flowers (2026)"
    for cls in CLASSES:
        d = root / cls
        d.mkdir(parents=True)
        for i in range(PER_CLASS):
            (d / f"{cls}_photo_with_a_rather_long_file_name_{i:05d}.jpg").write_bytes(b"\xff\xd8\xff")
        (d / "README.txt").write_text("not an image")
    (root / "daisy" / "AAA_upper_case.PNG").write_bytes(b"\x89PNG")
    return root


def _run_like_run_local(data: Path) -> subprocess.CompletedProcess:
    # The same options and the same two lines as scripts/run_local.sh.
    script = f"""
set -euo pipefail
source "{SCRIPTS}/data_helpers.sh"
DATA="$1"
NAME="$(dataset_name "$DATA")"
EXAMPLE=$(example_image "$DATA")
printf '%s\\n%s\\n' "$NAME" "$EXAMPLE"
"""
    return subprocess.run(["bash", "-c", script, "run_local_helpers", str(data)], capture_output=True, text=True,
                          timeout=120)


def test_helpers_survive_a_few_thousand_files(big_dataset):
    n_files = sum(1 for p in big_dataset.rglob("*") if p.is_file())
    listing = sum(len(str(p)) + 1 for p in big_dataset.rglob("*.jpg"))
    assert n_files > 3000 and listing > 4 * 65536  # big enough to have killed the old pipe

    proc = _run_like_run_local(big_dataset)
    assert proc.returncode == 0, f"exit {proc.returncode} (141 = SIGPIPE under pipefail)\n{proc.stderr}"
    name, example = proc.stdout.splitlines()
    assert name == "my-flowers--2026-"
    # Byte order (LC_ALL=C): upper case sorts first, and the .PNG counts as an image; README.txt does not.
    assert example == str(big_dataset / "daisy" / "AAA_upper_case.PNG")


def test_example_image_is_empty_without_images(tmp_path):
    (tmp_path / "daisy").mkdir()
    (tmp_path / "daisy" / "notes.txt").write_text("x")
    proc = _run_like_run_local(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == ""


def test_run_local_uses_the_tested_helpers():
    text = (SCRIPTS / "run_local.sh").read_text()
    assert 'source "$(dirname "$0")/data_helpers.sh"' in text
    assert 'NAME="$(dataset_name "$DATA")"' in text
    assert 'EXAMPLE=$(example_image "$DATA")' in text


# Readers that exit before their input ends: under pipefail the writer's SIGPIPE fails the script.
_EARLY_EXIT_READER = re.compile(r"\|\s*(head\b|grep\s+(-\w*[qm]\w*\b|--quiet|--max-count))")


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.sh")))
def test_no_early_exit_reader_in_pipefail_scripts(script):
    # Every script: the sourced ones (local_env.sh, data_helpers.sh) run inside run_local.sh's pipefail.
    text = (SCRIPTS / script).read_text()
    offenders = [line.strip() for line in text.splitlines()
                 if not line.lstrip().startswith("#") and _EARLY_EXIT_READER.search(line)]
    assert not offenders, f"{script}: a pipe into a reader that exits early dies of SIGPIPE under pipefail: {offenders}"
