"""Local processes standing in for containers: spawn with a container-like environment, stop by
process group, check liveness.

A container on Vertex AI sees only its image's environment plus what Vertex sets; so does a local
process here: a few passthrough variables (PATH, HOME, ...), the image mapping's env, the storage
emulator host, and the AIP_* / CLOUD_ML_* / TF_CONFIG variables of the job or deployment. The
caller's secrets (Airflow connections, Fernet keys) never reach it. Each process gets its own
session so stopping it stops everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from localcloud.config import ServerConfig

# Containers run on this machine, beside the server: the server reaches them (and job replicas each
# other) on loopback, whatever address the server itself listens on (0.0.0.0 in docker compose).
LOOPBACK = "127.0.0.1"


class ImageNotMapped(RuntimeError):
    pass


def container_argv(cfg: ServerConfig, image_uri: str, command: list[str], args: list[str]) -> tuple[list[str], dict]:
    mapped = cfg.entrypoint(image_uri)
    if mapped is None:
        raise ImageNotMapped(
            f"Unable to run image '{image_uri}': the local Vertex AI server maps no local command to it; "
            f"add an entry under 'images:' in its config (patterns: {[m.match for m in cfg.images]})"
        )
    entrypoint, env = mapped
    return (list(command) or entrypoint) + list(args), env


def container_env(cfg: ServerConfig, image_env: dict[str, str], spec_env: dict[str, str],
                  vertex_env: dict[str, str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in cfg.passthrough_env if k in os.environ}
    env.update(image_env)
    if cfg.storage_emulator_host:
        env["STORAGE_EMULATOR_HOST"] = cfg.storage_emulator_host
    env.update(vertex_env)
    env.update(spec_env)
    return env


def spawn(argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(cwd) if cwd else None, start_new_session=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child not yet reaped is a zombie: dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def stop_group(pid: int, grace_s: float = 10, sig: int = signal.SIGTERM) -> None:
    """Signal the process group of ``pid`` (its session leader), then SIGKILL after ``grace_s``."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def listening_pids(port: int) -> set[int] | None:
    """Pids (in this machine's process table) holding a socket that listens on TCP ``port``; None when
    /proc cannot tell (not Linux). Used to check that the server answering on a replica's port is the
    replica just started, not another process that held the port."""
    inodes = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                        inodes.add(f"socket:[{inode}]")
    except OSError:
        return None
    owners = set()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (pid_dir / "fd").iterdir()):
                owners.add(int(pid_dir.name))
        except OSError:
            continue
    return owners


def session_pids(leader: int) -> set[int]:
    """``leader`` and every process in its session (what a container's entrypoint started)."""
    out = {leader}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == leader:  # field 6 of stat: session id
            out.add(int(stat.parent.name))
    return out


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
