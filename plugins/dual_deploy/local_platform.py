"""Bring-up of the local platform's real parts, used by `make run`, `make stop` and tests.

``python -m dual_deploy.local_platform emulator-start|localcloud-start|ensure-buckets|upload-dataset|show-summary``

- a GCS API server (gcp-storage-emulator) with on-disk storage under the state dir, so run artifacts,
  champions and published mobile models survive between runs (a cut-short object index is repaired);
- the local Vertex AI server (emulators/localcloud; its own SQLite state under the state dir): custom
  jobs, Model Registry, endpoints and predictions for the provider's unmodified operators;
- the dataset uploaded to the bucket, then read back by the DAG through GCSHook.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dual_deploy.local_processes import ProcessFailed, alive


def start_emulator(port: int, state_dir: str, in_memory: bool = False, timeout_s: float = 30) -> int:
    """Start gcp-storage-emulator (idempotent: reuse one already answering on ``port``). Returns its pid."""
    state = Path(state_dir).resolve()
    pid_file = state / "pids" / "gcs-emulator.pid"
    url = f"http://127.0.0.1:{port}/storage/v1/b"
    if _answers(url):
        info = json.loads(pid_file.read_text()) if pid_file.exists() else {"pid": -1}
        return info["pid"]
    (state / "pids").mkdir(parents=True, exist_ok=True)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    if not in_memory:
        recovered = recover_gcs_metadata(state / "gcs")
        if recovered:
            print(recovered, file=sys.stderr)
    exe = shutil.which("gcp-storage-emulator") or str(Path(sys.executable).parent / "gcp-storage-emulator")
    cmd = [exe, "start", "--host", "127.0.0.1", "--port", str(port), "--quiet"]
    if in_memory:
        cmd.append("--in-memory")
    env = {**os.environ, "STORAGE_BASE": str(state / "gcs")}
    (state / "gcs").mkdir(parents=True, exist_ok=True)
    log = open(state / "logs" / "gcs-emulator.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    pid_file.write_text(json.dumps({"pid": proc.pid, "port": port}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _answers(url):
            return proc.pid
        if not alive(proc.pid):
            raise ProcessFailed(f"gcp-storage-emulator exited; see {state / 'logs' / 'gcs-emulator.log'}")
        time.sleep(0.2)
    raise ProcessFailed(f"gcp-storage-emulator did not answer on port {port} within {timeout_s:.0f} s")


GCS_META = Path(".cloudstorage") / ".meta"  # gcp-storage-emulator's object index under STORAGE_BASE


def recover_gcs_metadata(storage_base: Path) -> str | None:
    """gcp-storage-emulator rewrites one JSON index of every bucket and object in place; a kill in the
    middle of that write leaves it truncated, and the emulator then dies on start with a JSONDecodeError.
    Each start keeps a copy of the last index that parsed; a broken one is replaced by that copy.
    Returns a message saying what happened (None when the index was fine)."""
    meta = storage_base / GCS_META
    good = meta.with_name(".meta.last-good")
    if not meta.exists():
        return None
    try:
        json.loads(meta.read_bytes())
    except (ValueError, UnicodeDecodeError):
        broken = meta.with_name(f".meta.broken-{int(time.time())}")
        meta.replace(broken)
        if good.exists():
            shutil.copyfile(good, meta)
            return (f"GCS emulator: its object index {meta} was cut short (the emulator was killed while writing it); "
                    f"restored the copy taken when it last started ({good}); objects written since then are not "
                    f"listed any more. The broken file is kept as {broken}.")
        return (f"GCS emulator: its object index {meta} was cut short (the emulator was killed while writing it) and "
                f"there is no earlier copy: the local buckets start empty (datasets are uploaded again; champions, "
                f"run artifacts and published models are gone; `make clean` starts from scratch). Kept as {broken}.")
    shutil.copyfile(meta, good)
    return None


LOCALCLOUD_CONFIG = Path(__file__).resolve().parents[2] / "emulators" / "localcloud.yaml"


def start_localcloud(grpc_port: int, state_dir: str, storage_emulator_host: str, timeout_s: float = 180) -> dict:
    """Start the local Vertex AI server (idempotent: reuse one answering on ``grpc_port + 1``).
    Returns its server.json (pid, grpc and http addresses)."""
    state = Path(state_dir).resolve()
    lc_state = state / "localcloud"
    health = f"http://127.0.0.1:{grpc_port + 1}/localcloud/health"
    if _answers(health) and (lc_state / "server.json").exists():
        return json.loads((lc_state / "server.json").read_text())
    from localcloud.process import LocalCloudProcess

    server = LocalCloudProcess(lc_state, config=LOCALCLOUD_CONFIG, grpc_port=grpc_port,
                               storage_emulator_host=storage_emulator_host, log_path=state / "logs" / "localcloud.log",
                               start_timeout_s=timeout_s)
    try:
        server.start()
    except RuntimeError as e:
        raise ProcessFailed(f"the local Vertex AI server did not start: {e}") from None
    (state / "pids").mkdir(parents=True, exist_ok=True)
    (state / "pids" / "localcloud.pid").write_text(json.dumps({"pid": server.proc.pid, "grpc_port": grpc_port}))
    return server.info


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except Exception:  # noqa: BLE001 - any failure means "not up yet"
        return False


def ensure_bucket(name: str) -> None:
    from google.api_core.exceptions import Conflict

    from dualml import storage

    client = storage._client()
    if not client.bucket(name).exists():
        try:
            client.create_bucket(name)
        except Conflict:
            pass


def local_md5_b64(path: str | os.PathLike) -> str:
    """Base64 MD5 of a local file: the form GCS reports as an object's ``md5Hash``."""
    h = hashlib.md5()  # noqa: S324 - GCS's content hash, not security
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return base64.b64encode(h.digest()).decode("ascii")


def dataset_files(src: Path) -> dict[str, Path]:
    """Relative path -> file for everything under ``src``, following symlinked folders and files
    (a class folder is often a link to images kept elsewhere). A broken link or a folder reached
    twice (a link loop, or two links to one folder) is refused, by name: either would change the
    class set or the images without anyone noticing."""
    files: dict[str, Path] = {}
    problems: list[str] = []
    seen: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(here)
        rel_dir = here.relative_to(src).as_posix()
        if real in seen:
            problems.append(f"folder {rel_dir}/ is the same folder as {seen[real]}/ (a symlink loop or a duplicate link)")
            dirnames[:] = []
            continue
        seen[real] = rel_dir
        dirnames.sort()
        for name in sorted(filenames):
            path = here / name
            if not path.exists():
                problems.append(f"{path.relative_to(src).as_posix()} is a broken symlink (-> {os.readlink(path)})")
                continue
            files[path.relative_to(src).as_posix()] = path
    if problems:
        raise SystemExit(f"DATA={src}: cannot upload it as it is: " + "; ".join(problems)
                         + ". Fix or remove these links.")
    return files


def upload_dataset(local_dir: str, dest_uri: str) -> int:
    """Mirror a tf_flowers-layout folder to ``dest_uri`` (objects not in the folder are removed).

    A file is sent when its content differs (local MD5 vs the object's MD5, which the listing
    gives for free), not only when its size does: an edited image of the same size is uploaded.
    Symlinked class folders are followed. Returns the number of files in the folder.
    """
    from dualml import storage

    src = Path(local_dir)
    if not src.is_dir():
        raise SystemExit(f"DATA={local_dir} is not a folder (expected <folder>/<class>/*.jpg)")
    bucket, prefix = storage.split_gcs(dest_uri)
    prefix = prefix.strip("/")
    if not prefix:
        raise SystemExit(f"{dest_uri}: upload the dataset to a folder (gs://bucket/datasets/<name>), not a bucket's "
                         "root: the upload mirrors the folder and would delete everything else in the bucket")
    base = f"{prefix}/"
    ensure_bucket(bucket)
    client_bucket = storage._client().bucket(bucket)
    wanted = dataset_files(src)
    existing = {b.name[len(base) :]: b for b in storage._client().list_blobs(bucket, prefix=base)}
    removed = sent = 0
    for rel, blob in existing.items():
        if rel not in wanted:
            blob.delete()
            removed += 1
    for rel, path in wanted.items():
        blob = existing.get(rel)
        if blob is None or blob.md5_hash != local_md5_b64(path):
            client_bucket.blob(f"{base}{rel}").upload_from_filename(str(path))
            sent += 1
    print(f"uploaded {sent}, unchanged {len(wanted) - sent}, removed {removed}")
    return len(wanted)


def curl_example(prediction_url: str, image_path: str, instance_format: str = "b64") -> str:
    """The shell command that asks the endpoint about ``image_path``, safe to paste whatever the path holds
    (the path is quoted for the shell, inside the command substitution that base64-encodes it).
    ``instance_format``: ``b64`` (the serving app) or ``automl_image`` (AutoML models take ``content``)."""
    key = "content" if instance_format == "automl_image" else "b64"
    return (
        f'curl -s -X POST {shlex.quote(prediction_url)} -H "Content-Type: application/json" \\\n'
        f'    -d "{{\\"instances\\": [{{\\"{key}\\": \\"$(base64 -w0 {shlex.quote(image_path)})\\"}}]}}"'
    )


def request_ready_image(image_path: str, out_dir: str) -> str:
    """``image_path`` itself when a prediction request can carry it, else a resized copy in ``out_dir``
    (the same rule the smoke tests use: dualml.request_image)."""
    from dualml.request_image import prepare_image

    data = Path(image_path).read_bytes()
    try:
        prepared = prepare_image(data)
    except ValueError:
        return image_path  # not an image: the endpoint will say so
    if prepared is data:
        return image_path
    out = Path(out_dir) / "example_request_image.jpg"
    out.write_bytes(prepared)
    return str(out)


def serving_state(rest: str | None = None) -> dict | None:
    """What the local Vertex AI server serves right now (its admin state), or None when it is not up.
    ``rest``: its REST address (default: from VERTEX_AI_EMULATOR_HOST, REST on the next port)."""
    if rest is None:
        host = os.environ.get("VERTEX_AI_EMULATOR_HOST")
        if not host:
            return None
        name, _, port = host.rpartition(":")
        rest = f"{name}:{int(port) + 1}"
    try:
        with urllib.request.urlopen(f"http://{rest}/localcloud/state", timeout=10) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def serving_lines(state: dict | None) -> list[str]:
    """One line per endpoint: which model versions take its traffic, and whether their replicas are ready."""
    if state is None:
        return ["nothing serves: the local Vertex AI server is not running (make serve brings the endpoints back)"]
    versions = {(v["name"], v["version_id"]): v for v in state.get("model_versions", [])}
    lines = []
    for ep in state.get("endpoints", []):
        parts = []
        for dm in ep.get("deployed_models", []):
            replicas = state.get("replicas", {}).get(f"{ep['name']}/{dm['id']}", [])
            ready = sum(1 for r in replicas if r.get("ready"))
            model = versions.get((dm["model"], dm["model_version_id"]), {})
            parts.append(f"{model.get('display_name', dm['model'])} v{dm['model_version_id']} "
                         f"{ep.get('traffic_split', {}).get(dm['id'], 0)} % ({ready}/{len(replicas)} replicas ready)")
        lines.append(f"endpoint {ep['display_name']}: " + (", ".join(parts) or "no deployed model"))
    return lines or ["no endpoint exists yet"]


def check_serving(summary: dict, state: dict | None) -> list[str]:
    """Problems between what the run summary says each endpoint target serves and what actually does."""
    problems = []
    for name, t in summary.get("targets", {}).items():
        endpoint = t.get("endpoint") or {}
        if t.get("kind") != "endpoint" or not endpoint.get("endpoint_id"):
            continue
        if state is None:
            problems.append(f"[{name}] the summary says version {endpoint.get('model_version_id')} serves, but the "
                            "local Vertex AI server is not running: nothing answers (make serve)")
            continue
        ep = next((e for e in state.get("endpoints", []) if e["name"].endswith("/" + endpoint["endpoint_id"])), None)
        live = {dm["id"]: dm["model_version_id"] for dm in (ep or {}).get("deployed_models", [])}
        split = (ep or {}).get("traffic_split", {})
        serving = {live[k] for k, v in split.items() if v and k in live}
        if serving != {str(endpoint.get("model_version_id"))}:
            problems.append(f"[{name}] the summary says version {endpoint.get('model_version_id')} serves; the "
                            f"endpoint serves {sorted(serving) or 'nothing'}")
    return problems


def show_summary(path: str, endpoint_example_image: str | None = None) -> None:
    from dual_deploy.operators.summary import render_text

    summary = json.loads(Path(path).read_text())
    print(render_text(summary))
    print(f"\nrun summary: {Path(path).resolve()}  (also at {summary.get('summary_uri')})")
    state = serving_state()
    print("\nServing now (local Vertex AI server):")
    for line in serving_lines(state):
        print("  " + line)
    for problem in check_serving(summary, state):
        print("  WARNING: " + problem)
    for t in summary["targets"].values():
        url = (t.get("endpoint") or {}).get("prediction_url")
        if url and endpoint_example_image and state is not None:
            image = request_ready_image(endpoint_example_image, str(Path(path).resolve().parent))
            print("\nThe endpoint is up. Try it (Vertex AI REST request format):")
            print("  " + curl_example(url, image, (t.get("endpoint") or {}).get("instance_format") or "b64"))
            print("Stop it (and the local cloud) with: make stop; bring it back with: make serve")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dual_deploy.local_platform")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("emulator-start")
    e.add_argument("--port", type=int, default=9023)
    e.add_argument("--state-dir", default=".state")
    u = sub.add_parser("upload-dataset")
    u.add_argument("local_dir")
    u.add_argument("dest_uri")
    v = sub.add_parser("localcloud-start")
    v.add_argument("--port", type=int, default=9010, help="gRPC port (VERTEX_AI_EMULATOR_HOST); REST on port + 1")
    v.add_argument("--state-dir", default=".state")
    v.add_argument("--storage-emulator-host", default=os.environ.get("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9023"))
    sub.add_parser("serving", help="what the local Vertex AI server serves now")
    sub.add_parser("ensure-buckets", help="create the local platform's buckets (artifacts, Firebase) if absent")
    s = sub.add_parser("show-summary")
    s.add_argument("path")
    s.add_argument("--example-image")
    a = p.parse_args(argv)
    if a.cmd == "emulator-start":
        print(f"gcs emulator on port {a.port} (pid {start_emulator(a.port, a.state_dir)})")
    elif a.cmd == "localcloud-start":
        info = start_localcloud(a.port, a.state_dir, a.storage_emulator_host)
        print(f"local Vertex AI server: gRPC {info['grpc']}, REST {info['http']} (pid {info['pid']})")
    elif a.cmd == "serving":
        for line in serving_lines(serving_state()):
            print(line)
    elif a.cmd == "ensure-buckets":
        from dual_deploy.config import load_config

        cfg = load_config()
        for bucket in dict.fromkeys(filter(None, [cfg.local.bucket, cfg.gcp.firebase_storage_bucket])):
            ensure_bucket(bucket)
    elif a.cmd == "upload-dataset":
        print(f"{a.dest_uri}: {upload_dataset(a.local_dir, a.dest_uri)} files")
    else:
        show_summary(a.path, a.example_image)


if __name__ == "__main__":
    main()
