"""Bring-up of the local platform's real parts, used by `make run`, `make stop` and tests.

``python -m dual_deploy.local_platform emulator-start|upload-dataset|show-summary ...``

- a GCS API server (gcp-storage-emulator) with on-disk storage under the state dir, so the
  model registry, endpoints and published mobile models survive between runs;
- the dataset uploaded to the bucket, then read back by the DAG through GCSHook.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dual_deploy.local_processes import ProcessFailed, _alive


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
        if not _alive(proc.pid):
            raise ProcessFailed(f"gcp-storage-emulator exited; see {state / 'logs' / 'gcs-emulator.log'}")
        time.sleep(0.2)
    raise ProcessFailed(f"gcp-storage-emulator did not answer on port {port} within {timeout_s:.0f} s")


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


def upload_dataset(local_dir: str, dest_uri: str) -> int:
    """Mirror a tf_flowers-layout folder to ``dest_uri`` (objects not in the folder are removed)."""
    from dualml import storage

    src = Path(local_dir)
    if not src.is_dir():
        raise SystemExit(f"DATA={local_dir} is not a folder (expected <folder>/<class>/*.jpg)")
    bucket, prefix = storage.split_gcs(dest_uri)
    ensure_bucket(bucket)
    client_bucket = storage._client().bucket(bucket)
    wanted = {p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*")) if p.is_file()}
    existing = {b.name[len(prefix) + 1 :]: b for b in client_bucket.list_blobs(prefix=prefix + "/")}
    for rel, blob in existing.items():
        if rel not in wanted:
            blob.delete()
    for rel, path in wanted.items():
        blob = existing.get(rel)
        if blob is None or blob.size != path.stat().st_size:
            client_bucket.blob(f"{prefix}/{rel}").upload_from_filename(str(path))
    return len(wanted)


def show_summary(path: str, endpoint_example_image: str | None = None) -> None:
    from dual_deploy.operators.summary import render_text

    summary = json.loads(Path(path).read_text())
    print(render_text(summary))
    print(f"\nrun summary: {Path(path).resolve()}  (also at {summary.get('summary_uri')})")
    for t in summary["targets"].values():
        url = (t.get("endpoint") or {}).get("prediction_url")
        if url and endpoint_example_image:
            print("\nThe endpoint is up. Try it (Vertex AI request format):")
            print(
                f'  curl -s -X POST {url} -H "Content-Type: application/json" \\\n'
                f'    -d "{{\\"instances\\": [{{\\"b64\\": \\"$(base64 -w0 {endpoint_example_image})\\"}}]}}"'
            )
            print("Stop it (and the GCS emulator) with: make stop")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dual_deploy.local_platform")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("emulator-start")
    e.add_argument("--port", type=int, default=9023)
    e.add_argument("--state-dir", default=".state")
    u = sub.add_parser("upload-dataset")
    u.add_argument("local_dir")
    u.add_argument("dest_uri")
    s = sub.add_parser("show-summary")
    s.add_argument("path")
    s.add_argument("--example-image")
    a = p.parse_args(argv)
    if a.cmd == "emulator-start":
        print(f"gcs emulator on port {a.port} (pid {start_emulator(a.port, a.state_dir)})")
    elif a.cmd == "upload-dataset":
        print(f"{a.dest_uri}: {upload_dataset(a.local_dir, a.dest_uri)} files")
    else:
        show_summary(a.path, a.example_image)


if __name__ == "__main__":
    main()
