"""Server settings: ports, state dir, and which local command each container image stands for.

``images`` maps container image URIs (glob patterns) to the command the image's ENTRYPOINT would
run, so a CustomJob's or a Model's ``container_spec`` runs as a local process:

    images:
      - match: "*/dualml-trainer:*"
        entrypoint: ["{python}", "-m", "dualml.trainer"]
        env: {PYTHONPATH: "{root}/include"}

``{python}`` is this server's interpreter, ``{root}`` the folder of the config file's project
(``root:`` in the file, default: the config file's parent's parent). A ``container_spec.command``
replaces the entrypoint, as in a container.
"""

from __future__ import annotations

import fcntl
import fnmatch
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class StateDirBusy(RuntimeError):
    pass


def lock_state_dir(state_dir: Path):
    """Take the state dir's lock (an open file to keep), or raise StateDirBusy: two servers on one
    database would both restart its jobs and deployed models."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock_file = open(state_dir / ".lock", "w")  # noqa: SIM115 - held for the server's lifetime
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise StateDirBusy(f"another local Vertex AI server is using {state_dir} "
                           f"(see {state_dir / 'server.json'}); stop it first (make stop)") from None
    return lock_file


@dataclass
class ImageMapping:
    match: str
    entrypoint: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ServerConfig:
    state_dir: Path = Path(".state/localcloud")
    host: str = "127.0.0.1"
    grpc_port: int = 9010
    http_port: int = 9011
    root: Path = Path(".")
    images: list[ImageMapping] = field(default_factory=list)
    storage_emulator_host: str | None = None  # handed to every container, as GCS is reachable on GCP
    deploy_timeout_s: float = 300  # a deployed model must answer its health route within this
    predict_timeout_s: float = 60
    max_deployed_models_per_endpoint: int = 10
    # AutoML: search_image / serving_image (mapped under images:), seconds_per_hour (pipelines.py)
    automl: dict = field(default_factory=dict)
    # Environment variables passed through from the server's own environment to every container
    # (on GCP a container sees none of the caller's environment).
    passthrough_env: list[str] = field(default_factory=lambda: ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"])

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> ServerConfig:
        raw: dict = {}
        if path:
            path = Path(path).resolve()
            raw = yaml.safe_load(path.read_text()) or {}
            raw.setdefault("root", str(path.parent.parent))
        images = [ImageMapping(**m) for m in raw.pop("images", [])]
        cfg = cls(images=images, **{k: v for k, v in raw.items()})
        for key, value in overrides.items():
            if value is not None:
                setattr(cfg, key, value)
        cfg.state_dir = Path(cfg.state_dir).resolve()
        cfg.root = Path(cfg.root).resolve()
        return cfg

    def entrypoint(self, image_uri: str) -> tuple[list[str], dict[str, str]] | None:
        """(argv prefix, env) of the first mapping matching ``image_uri``; None when unmapped."""
        for m in self.images:
            if fnmatch.fnmatchcase(image_uri, m.match):
                fill = {"python": sys.executable, "root": str(self.root)}
                return ([part.format(**fill) for part in m.entrypoint],
                        {k: str(v).format(**fill) for k, v in m.env.items()})
        return None
