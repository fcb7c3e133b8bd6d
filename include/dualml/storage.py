"""Read and write files that live either on local disk or in GCS (``gs://bucket/path``).

GCS access goes through google-cloud-storage, which honours ``STORAGE_EMULATOR_HOST``,
so the same code talks to Google Cloud Storage and to the local gcp-storage-emulator.
(TensorFlow's own gs:// filesystem does not follow the emulator variable.)

Least privilege: nothing here reads bucket metadata (``storage.buckets.get``). Objects are
listed, read and written directly, which ``roles/storage.objectViewer`` (read) and
``roles/storage.objectAdmin`` (read/write) allow; a missing bucket shows up as a 404 on the
listing and a missing permission as a 403, each turned into a :class:`StorageError` that
says what to fix (and that no retry will help).
"""

from __future__ import annotations

import base64
import hashlib
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# One HTTP connection per download thread: requests' default pool (10) is smaller than the
# trainer's parallel downloads and urllib3 then warns "Connection pool is full" and reconnects.
DOWNLOAD_THREADS = 16
HTTP_POOL_SIZE = 32


class StorageError(RuntimeError):
    """A storage location is missing or unreadable; the message says which and how to fix it."""


class StoragePermissionError(StorageError):
    """The credentials may not read/write an object (HTTP 401/403): fix IAM, retrying cannot help."""


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


def make_client(http=None):
    """A storage.Client configured for this module (emulator-aware, pool sized, no bucket GETs).

    ``http``: a requests Session to use as transport (tests put a recording one under the client).
    """
    from google.cloud import storage

    kwargs = {"_http": http} if http is not None else {}
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # The emulator needs no credentials; an anonymous client avoids ADC lookups.
        from google.auth.credentials import AnonymousCredentials

        client = storage.Client(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT", "local-project"),
            credentials=AnonymousCredentials(),
            **kwargs,
        )
    else:
        client = storage.Client(**kwargs)
    size_connection_pool(client._http)
    if getattr(client, "_bucket_metadata_cache", None) is not None:
        # google-cloud-storage >= 3.10 GETs each bucket's metadata in a background thread to label
        # telemetry spans: a storage.buckets.get that object roles lack (a 403 per process in the
        # audit log) and that nothing here uses.
        client._bucket_metadata_cache = None
    return client


@lru_cache(maxsize=1)
def _client():
    return make_client()


def size_connection_pool(session) -> None:
    """Give the client's requests session a pool as large as our thread count."""
    import requests

    if getattr(session, "is_mtls", False):
        return  # google-auth mounted its own mTLS adapter: keep it
    for scheme in ("https://", "http://"):
        session.mount(scheme, requests.adapters.HTTPAdapter(pool_connections=HTTP_POOL_SIZE,
                                                            pool_maxsize=HTTP_POOL_SIZE))


_READ_ROLE = "roles/storage.objectViewer"
_WRITE_ROLE = "roles/storage.objectAdmin"


@contextmanager
def _gcs_errors(uri: str, action: str = "read", missing: str | None = None):
    """Turn the API's 401/403/404 into StorageErrors that name the object, the role and the fix."""
    from google.api_core.exceptions import Forbidden, NotFound, Unauthorized

    bucket = split_gcs(uri)[0]
    try:
        yield
    except (Forbidden, Unauthorized) as e:
        role = _WRITE_ROLE if action in ("write", "delete") else f"{_READ_ROLE} (or {_WRITE_ROLE})"
        raise StoragePermissionError(
            f"permission denied to {action} {uri} ({e.code} {getattr(e, 'message', e)}): grant the job's "
            f"service account {role} on gs://{bucket} (bucket metadata access, storage.buckets.get, is not "
            "needed). Retrying will not help."
        ) from None
    except NotFound as e:
        raise StorageError(missing or f"{uri} does not exist ({e.message})") from None


def _missing_bucket(bucket: str) -> str:
    return f"GCS bucket gs://{bucket} does not exist: create it or fix the configured URI"


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its URI and the content hashes GCS returns with every listing."""

    uri: str
    size: int
    md5: str | None  # hex; None for composite objects (GCS gives them only a CRC32C)
    crc32c: str | None  # hex
    updated: float | None = None  # seconds since the epoch

    @property
    def content_key(self) -> str:
        """Identity of the bytes: ``md5-<hex>`` (or ``crc32c-<hex>-<size>``)."""
        if self.md5:
            return f"md5-{self.md5}"
        return f"crc32c-{self.crc32c}-{self.size}"


def _b64_to_hex(value: str | None) -> str | None:
    return base64.b64decode(value).hex() if value else None


def _list_blobs(bucket_name: str, prefix: str) -> Iterator:
    """Objects under ``prefix`` (no bucket GET: a missing bucket is the listing's 404)."""
    uri = f"gs://{bucket_name}/{prefix}"
    with _gcs_errors(uri, "list", missing=_missing_bucket(bucket_name)):
        yield from (b for b in _client().list_blobs(bucket_name, prefix=prefix) if not b.name.endswith("/"))


def _dir_prefix(path: str) -> str:
    return path.rstrip("/") + "/" if path else ""


def list_objects(uri: str) -> list[ObjectInfo]:
    """Every object under a gs:// directory URI (recursive), sorted, with size and content hashes."""
    bucket_name, prefix = split_gcs(uri)
    out = [
        ObjectInfo(f"gs://{bucket_name}/{b.name}", int(b.size or 0), _b64_to_hex(b.md5_hash),
                   _b64_to_hex(b.crc32c), b.updated.timestamp() if b.updated else None)
        for b in _list_blobs(bucket_name, _dir_prefix(prefix))
    ]
    return sorted(out, key=lambda o: o.uri)


def list_files(uri: str) -> list[str]:
    """All files under a directory URI (recursive), as full URIs/paths, sorted."""
    if is_gcs(uri):
        bucket_name, prefix = split_gcs(uri)
        return sorted(f"gs://{bucket_name}/{b.name}" for b in _list_blobs(bucket_name, _dir_prefix(prefix)))
    root = Path(uri)
    if not root.is_dir():
        raise StorageError(f"directory {uri} does not exist")
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def exists(uri: str) -> bool:
    if is_gcs(uri):
        bucket_name, path = split_gcs(uri)
        with _gcs_errors(uri, "read"):
            return _client().bucket(bucket_name).blob(path).exists()
    return os.path.exists(uri)


def read_bytes(uri: str) -> bytes:
    if is_gcs(uri):
        bucket_name, path = split_gcs(uri)
        with _gcs_errors(uri, "read"):
            return _client().bucket(bucket_name).blob(path).download_as_bytes()
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError as e:
        raise StorageError(f"{uri} does not exist") from e


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes, content_type: str | None = None) -> None:
    if is_gcs(uri):
        bucket_name, path = split_gcs(uri)
        with _gcs_errors(uri, "write", missing=_missing_bucket(bucket_name)):
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
            with _gcs_errors(target, "write", missing=_missing_bucket(bucket_name)):
                _client().bucket(bucket_name).blob(path).upload_from_filename(str(p))
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            if Path(target).resolve() != p.resolve():
                shutil.copy2(p, target)
        written.append(target)
    return written


def safe_local_target(local_dir: str | Path, relative_name: str, source: str = "") -> Path:
    """``local_dir / relative_name``, refusing names that would land outside ``local_dir``.

    Object names are arbitrary strings on GCS: ``a/../../etc/x`` or ``/abs`` are valid names
    and would otherwise write anywhere the process may write.
    """
    root = Path(local_dir).resolve()
    parts = relative_name.split("/")
    if not relative_name or relative_name.startswith("/") or ".." in parts or "\\" in relative_name:
        raise StorageError(
            f"refusing to download {source or relative_name!r}: its name {relative_name!r} would be written "
            f"outside {root} (absolute, '..' or backslash parts). Rename or remove the object."
        )
    target = (root / posixpath.normpath(relative_name)).resolve()
    if target != root and root not in target.parents:
        raise StorageError(f"refusing to download {source or relative_name!r}: it resolves to {target}, "
                           f"outside {root}")
    return target


def download_dir(src_uri: str, local_dir: str) -> str:
    """Copy everything under ``src_uri`` into ``local_dir``; returns ``local_dir``.

    Every object name is checked before anything is written: one name that would escape
    ``local_dir`` fails the whole copy.
    """
    dest = Path(local_dir)
    if not is_gcs(src_uri):
        shutil.copytree(src_uri, dest, dirs_exist_ok=True)
        return str(dest)
    bucket_name, prefix = split_gcs(src_uri)
    prefix = _dir_prefix(prefix)
    blobs = list(_list_blobs(bucket_name, prefix))
    if not blobs:
        raise StorageError(f"nothing found under {src_uri}")
    dest.mkdir(parents=True, exist_ok=True)
    targets = [(b, safe_local_target(dest, b.name[len(prefix) :], f"gs://{bucket_name}/{b.name}")) for b in blobs]
    for blob, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _gcs_errors(f"gs://{bucket_name}/{blob.name}", "read"):
            blob.download_to_filename(str(target))
    return str(dest)


def download_file(uri: str, local_path: str) -> str:
    Path(local_path).parent.mkdir(parents=True, exist_ok=True)
    if is_gcs(uri):
        Path(local_path).write_bytes(read_bytes(uri))
    else:
        shutil.copy2(uri, local_path)
    return local_path


# ---------------------------------------------------------------- content-addressed download cache


def _common_dir(paths: list[str]) -> str:
    common = os.path.commonprefix(paths)
    return common[: common.rfind("/") + 1] if "/" in common else ""


def _file_digest(path: str, kind: str) -> str:
    if kind == "md5":
        h = hashlib.md5()  # noqa: S324 - GCS's content hash, not security
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    import google_crc32c

    c = google_crc32c.Checksum()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            c.update(chunk)
    return c.digest().hex()


def _cache_path(cache_dir: str, obj: ObjectInfo) -> str:
    bucket, name = split_gcs(obj.uri)
    slot = hashlib.sha1(name.encode()).hexdigest()[:16]  # noqa: S324 - a folder name, not security
    return os.path.join(cache_dir, bucket, slot, f"{obj.content_key}-{os.path.basename(name)[-100:]}")


def _evict_stale(slot_dir: str, keep: str, stale_after_s: float, now: float) -> None:
    """Remove other versions / partial downloads in one object's cache folder unused for ``stale_after_s``."""
    with os.scandir(slot_dir) as entries:
        for entry in entries:
            if entry.path == keep:
                continue
            try:
                if now - entry.stat().st_mtime >= stale_after_s:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass  # another job evicted it first


def download_cached(uris: list[str], cache_dir: str, threads: int = DOWNLOAD_THREADS,
                    stale_after_s: float = 3600) -> dict[str, str]:
    """Local copies of gs:// objects in a cache keyed by *content*; returns {uri: local path}.

    The listing (one request per 1000 objects) gives every object's MD5/CRC32C for free, so a
    file whose bytes changed under the same name (even at the same size) is fetched again, and
    unchanged files are never re-downloaded. Each copy is written to a temporary name, checked
    against the listed hash and renamed into place, so an interrupted or raced download never
    leaves a wrong file that a later run would trust.

    Layout: ``<cache>/<bucket>/<hash of the name>/<content key>-<basename>``. Older versions of an
    object (and leftovers of killed downloads) not used for ``stale_after_s`` are deleted, so the
    cache holds about one copy per object however often the data changes; the grace period keeps
    the version a concurrent job (the other target, trained from the same cache) still reads.
    """
    by_bucket: dict[str, list[str]] = {}
    for u in uris:
        bucket, path = split_gcs(u)
        by_bucket.setdefault(bucket, []).append(path)
    info: dict[str, ObjectInfo] = {}
    for bucket, paths in by_bucket.items():
        listed = {o.uri: o for o in list_objects(f"gs://{bucket}/{_common_dir(paths)}")}
        for p in paths:
            u = f"gs://{bucket}/{p}"
            if u not in listed:
                raise StorageError(f"{u} does not exist (listed under gs://{bucket}/{_common_dir(paths)})")
            info[u] = listed[u]
    mapping = {u: _cache_path(cache_dir, o) for u, o in info.items()}

    def fetch(u: str) -> None:
        target, obj = mapping[u], info[u]
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".part-")
        os.close(fd)
        try:
            bucket, name = split_gcs(u)
            with _gcs_errors(u, "read"):
                _client().bucket(bucket).blob(name).download_to_filename(tmp)
            kind, expected = ("md5", obj.md5) if obj.md5 else ("crc32c", obj.crc32c)
            if expected and _file_digest(tmp, kind) != expected:
                raise StorageError(f"{u} changed while it was being read (its {kind} no longer matches the "
                                   "listing); re-run once the upload is complete")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    todo = sorted({u for u in info if not os.path.exists(mapping[u])})
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, HTTP_POOL_SIZE))) as pool:
            list(pool.map(fetch, todo))
    now = time.time()
    for path in set(mapping.values()):
        os.utime(path, (now, now))  # mtime = last use: what eviction looks at
        _evict_stale(os.path.dirname(path), path, stale_after_s, now)
    return mapping
