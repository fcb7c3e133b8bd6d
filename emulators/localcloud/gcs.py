"""The server's own Cloud Storage access (AutoML): read import files, check that images exist, write
exported models. Through the GCS emulator when the server has one (``storage_emulator_host``),
else Google Cloud Storage with the environment's credentials, as Vertex AI reads and writes the
caller's buckets."""

from __future__ import annotations

import threading
from pathlib import Path

_local = threading.local()


def split(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://") or len(uri) <= len("gs://"):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, name = uri[len("gs://"):].partition("/")
    return bucket, name


class Gcs:
    def __init__(self, emulator_host: str | None):
        self.emulator_host = emulator_host

    def _client(self):
        client = getattr(_local, "client", None)
        if client is None or getattr(_local, "host", None) != self.emulator_host:
            from google.cloud import storage

            if self.emulator_host:
                from google.auth.credentials import AnonymousCredentials

                client = storage.Client(project="local-project", credentials=AnonymousCredentials(),
                                        client_options={"api_endpoint": self.emulator_host})
            else:
                client = storage.Client()
            _local.client, _local.host = client, self.emulator_host
        return client

    def read_text(self, uri: str) -> str:
        bucket, name = split(uri)
        return self._client().bucket(bucket).blob(name).download_as_bytes().decode("utf-8-sig")

    def sizes(self, uris: list[str]) -> dict[str, int]:
        """Size of each of ``uris`` that exists (one listing per folder, not one request per object)."""
        folders: dict[tuple[str, str], set[str]] = {}
        for uri in uris:
            bucket, name = split(uri)
            folders.setdefault((bucket, name.rpartition("/")[0]), set()).add(name)
        found: dict[str, int] = {}
        for (bucket, folder), names in folders.items():
            prefix = f"{folder}/" if folder else ""
            for blob in self._client().list_blobs(bucket, prefix=prefix, delimiter="/"):
                if blob.name in names:
                    found[f"gs://{bucket}/{blob.name}"] = int(blob.size or 0)
        return found

    def upload_dir(self, local_dir: str | Path, dest_uri: str) -> list[str]:
        bucket_name, prefix = split(dest_uri.rstrip("/") + "/")
        bucket = self._client().bucket(bucket_name)
        root = Path(local_dir)
        written = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            name = f"{prefix}{path.relative_to(root).as_posix()}"
            bucket.blob(name).upload_from_filename(str(path))
            written.append(f"gs://{bucket_name}/{name}")
        return written
