"""requirements.lock: matches requirements*.txt (else `make lock`), and is what this venv has installed.

Offline and fast: the staleness check compares a digest of the inputs recorded in the lock's header
(scripts/requirements_lock.py); the installed check reads this interpreter's distributions.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "requirements_lock.py"
LOCK = ROOT / "requirements.lock"
# name==version [; marker]   (continuation lines carry the hashes)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;\s*(.+?))?\s*(?:\\)?$")


def _check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "check", "--root", str(root)], capture_output=True, text=True)


def _pins() -> dict[str, list[tuple[str, str | None]]]:
    pins: dict[str, list[tuple[str, str | None]]] = {}
    for line in LOCK.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            pins.setdefault(canonicalize_name(m.group(1)), []).append((m.group(2), m.group(3)))
    return pins


def _applies(marker: str | None) -> bool:
    return marker is None or Marker(marker).evaluate()


def _direct_requirements() -> list[tuple[str, Requirement]]:
    out = []
    for name in ("requirements.txt", "requirements-dev.txt"):
        for raw in (ROOT / name).read_text().splitlines():
            line = re.split(r"\s+#", raw, maxsplit=1)[0].strip()
            if line and not line.startswith(("#", "-")):
                out.append((name, Requirement(line)))
    return out


def test_lock_matches_the_requirement_files():
    result = _check(ROOT)
    assert result.returncode == 0, result.stderr


def test_every_direct_requirement_is_pinned_and_bounded_with_a_reason_and_the_lock_satisfies_it():
    pins = _pins()
    for file, req in _direct_requirements():
        assert req.specifier, f"{file}: {req.name} has no version pin or bound"
        line = next(raw for raw in (ROOT / file).read_text().splitlines()
                    if re.match(rf"{re.escape(req.name)}(?![A-Za-z0-9_.-])", raw))
        assert re.search(r"\s#\s*\S", line), f"{file}: {req.name} has no reason comment"
        versions = [v for v, marker in pins.get(canonicalize_name(req.name), []) if _applies(marker)]
        assert versions, f"{req.name} is not in requirements.lock: run `make lock`"
        assert all(req.specifier.contains(v, prereleases=True) for v in versions), \
            f"requirements.lock has {req.name}=={versions} outside {file}'s {req.specifier}: run `make lock`"


def test_this_venv_has_exactly_the_locked_versions():
    """What `make setup` (uv pip sync) promises, checked on the interpreter running the tests."""
    pins = _pins()
    wanted = {name: v for name, entries in pins.items() for v, marker in entries if _applies(marker)}
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
                 if d.metadata["Name"]}
    wrong = {n: (installed.get(n), v) for n, v in wanted.items() if installed.get(n) != v}
    extra = sorted(set(installed) - set(wanted) - {"pip", "setuptools", "wheel", "uv"})
    fix = "re-sync the venv with `rm .venv/.installed && make setup`"
    assert not wrong, f"installed vs locked versions differ {wrong}: {fix}"
    assert not extra, (f"installed but not in requirements.lock: {extra}; add them to requirements*.txt and "
                       f"`make lock`, or {fix}")


@pytest.fixture
def lock_copy(tmp_path):
    for name in ("requirements.txt", "requirements-dev.txt", "requirements.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_a_comment_edit_needs_no_relock(lock_copy):
    req = lock_copy / "requirements.txt"
    req.write_text("# a new note\n" + req.read_text().replace("  # ", "   # reworded: ", 1) + "\n\n")
    result = _check(lock_copy)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("edit", ["add", "bound", "include"])
def test_a_requirement_edit_makes_the_lock_stale_and_says_make_lock(lock_copy, edit):
    if edit == "add":  # e.g. a serving dependency added to the runtime list
        with open(lock_copy / "requirements.txt", "a") as f:
            f.write("uvicorn>=0.30,<1  # serving\n")
    elif edit == "bound":
        req = lock_copy / "requirements.txt"
        req.write_text(req.read_text().replace("numpy>=2,<3", "numpy>=2,<2.5"))
    else:  # a new file included from the dev list
        (lock_copy / "requirements-extra.txt").write_text("grpcio>=1.60\n")
        with open(lock_copy / "requirements-dev.txt", "a") as f:
            f.write("-r requirements-extra.txt\n")
    result = _check(lock_copy)
    assert result.returncode == 1
    assert "requirements.lock is stale" in result.stderr and "make lock" in result.stderr, result.stderr


def test_a_lock_without_its_header_is_refused(lock_copy):
    lock = lock_copy / "requirements.lock"
    lock.write_text("".join(line for line in lock.read_text().splitlines(keepends=True)
                            if not line.startswith("# inputs-sha256:")))
    result = _check(lock_copy)
    assert result.returncode == 1 and "header" in result.stderr and "make lock" in result.stderr
