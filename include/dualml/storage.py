"""Read and write files that live either on local disk or in GCS (``gs://bucket/path``).

GCS access goes through google-cloud-storage, which honours ``STORAGE_EMULATOR_HOST``,
so the same code talks to Google Cloud Storage and to the local gcp-storage-emulator.
(TensorFlow's own gs:// filesystem does not follow the emulator variable.)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path


class StorageError(RuntimeError):
    """A storage location is missing or unreadable; the message says which and how to fix it."""


def is_gcs(uri: str) -> bool:
    return str(uri).startswith("gs://")


def split_gcs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    rest = uri[len("gs://") :]
    bucket, _, path = rest.partition("/")
    if not bucket:
        raise ValueError(f"GCS URI has no bucket: {uri!r}")
    return bucket, path


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` for gs:// and os.path for local paths."""
    if is_gcs(base):
        out = base.rstrip("/")
        for p in parts:
            out = f"{out}/{p.strip('/')}"
        return out
    return os.path.join(base, *parts)


@lru_cache(maxsize=1)
def _client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # The emulator needs no credentials; an anonymous client avoids ADC lookups.
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT", "local-project"),
            credentials=AnonymousCredentials(),
        )
    return storage.Client()


def _bucket(name: str):
    from google.api_core.exceptions import NotFound

    bucket = _client().bucket(name)
    try:
        if not bucket.exists():
            raise StorageError(f"GCS bucket gs://{name} does not exist: create it or fix the configured URI")
    except NotFound as e:  # pragma: no cover - exists() normally returns False instead
        raise StorageError(f"GCS bucket gs://{name} does not exist") from e
    return bucket


def list_files(uri: str) -> list[str]:
    """All files under a directory URI (recursive), as full URIs/paths, sorted."""
    if is_gcs(uri):
        bucket_name, prefix = split_gcs(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        blobs = _client().list_blobs(_bucket(bucket_name), prefix=prefix)
        return sorted(f"gs://{bucket_name}/{b.name}" for b in blobs if not b.name.endswith("/"))
    root = Path(uri)
    if not root.is_dir():
        raise StorageError(f"directory {uri} does not exist")
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def exists(uri: str) -> bool:
    if is_gcs(uri):
        bucket_name, path = split_gcs(uri)
        return _client().bucket(bucket_name).blob(path).exists()
    return os.path.exists(uri)


def read_bytes(uri: str) -> bytes:
    if is_gcs(uri):
        from google.api_core.exceptions import NotFound

        bucket_name, path = split_gcs(uri)
        try:
            return _client().bucket(bucket_name).blob(path).download_as_bytes()
        except NotFound as e:
            raise StorageError(f"{uri} does not exist") from e
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError as e:
        raise StorageError(f"{uri} does not exist") from e


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes, content_type: str | None = None) -> None:
    if is_gcs(uri):
        bucket_name, path = split_gcs(uri)
        _client().bucket(bucket_name).blob(path).upload_from_string(data, content_type=content_type)
        return
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    Path(uri).write_bytes(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"), content_type="text/plain")


def _walk_local(root: Path) -> Iterator[Path]:
    yield from (p for p in sorted(root.rglob("*")) if p.is_file())


def upload_dir(local_dir: str, dest_uri: str) -> list[str]:
    """Copy a local directory tree to ``dest_uri`` (gs:// or local). Returns written URIs."""
    root = Path(local_dir)
    written = []
    for p in _walk_local(root):
        rel = p.relative_to(root).as_posix()
        target = join(dest_uri, rel)
        if is_gcs(dest_uri):
            bucket_name, path = split_gcs(target)
            _client().bucket(bucket_name).blob(path).upload_from_filename(str(p))
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            if Path(target).resolve() != p.resolve():
                shutil.copy2(p, target)
        written.append(target)
    return written


def download_dir(src_uri: str, local_dir: str) -> str:
    """Copy everything under ``src_uri`` into ``local_dir``; returns ``local_dir``."""
    dest = Path(local_dir)
    dest.mkdir(parents=True, exist_ok=True)
    if not is_gcs(src_uri):
        shutil.copytree(src_uri, dest, dirs_exist_ok=True)
        return str(dest)
    bucket_name, prefix = split_gcs(src_uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    count = 0
    for blob in _client().list_blobs(_bucket(bucket_name), prefix=prefix):
        if blob.name.endswith("/"):
            continue
        target = dest / blob.name[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(target))
        count += 1
    if count == 0:
        raise StorageError(f"nothing found under {src_uri}")
    return str(dest)


def download_file(uri: str, local_path: str) -> str:
    Path(local_path).parent.mkdir(parents=True, exist_ok=True)
    if is_gcs(uri):
        Path(local_path).write_bytes(read_bytes(uri))
    else:
        shutil.copy2(uri, local_path)
    return local_path
