"""Process helpers for the local platform's bring-up (``make run`` / ``make stop`` / tests):
liveness checks and the error type. Standard library only; never imported by DAG files."""

from __future__ import annotations

import os
import socket


class ProcessFailed(RuntimeError):
    """A local platform process exited with an error or never became healthy."""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by us) counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0
