"""Object IO on gs:// URIs through the provider's GCSHook.

On GCP this is Google Cloud Storage; on the local platform the same hook talks to the
gcp-storage-emulator (anonymous ``google_cloud_default`` connection + STORAGE_EMULATOR_HOST),
so every byte the DAG moves takes the same code path on both.
"""

from __future__ import annotations

import json
from pathlib import Path

from airflow.providers.google.cloud.hooks.gcs import GCSHook, _parse_gcs_url


class GcsIO:
    """Thin URI-based helpers over GCSHook (which speaks bucket/object pairs)."""

    def __init__(self, gcp_conn_id: str = "google_cloud_default", impersonation_chain=None):
        self.hook = GCSHook(gcp_conn_id=gcp_conn_id, impersonation_chain=impersonation_chain)

    @staticmethod
    def parse(uri: str) -> tuple[str, str]:
        return _parse_gcs_url(uri)

    def bucket_exists(self, bucket: str) -> bool:
        from google.api_core.exceptions import NotFound

        try:
            return self.hook.get_conn().bucket(bucket).exists()
        except NotFound:
            return False

    def list_files(self, uri: str) -> list[str]:
        bucket, prefix = self.parse(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        names = self.hook.list(bucket, prefix=prefix) or []
        return sorted(f"gs://{bucket}/{n}" for n in names if not n.endswith("/"))

    def list_with_hashes(self, uri: str) -> list[tuple[str, str]]:
        """(relative path, md5) of every object under ``uri``: enough to fingerprint its content."""
        bucket, prefix = self.parse(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        blobs = self.hook.get_conn().list_blobs(bucket, prefix=prefix)
        return sorted((b.name[len(prefix) :], b.md5_hash or f"size:{b.size}") for b in blobs if not b.name.endswith("/"))

    def read_json_with_generation(self, uri: str) -> tuple[object | None, int]:
        """(parsed JSON or None, generation; 0 when absent) for optimistic read-modify-write."""
        bucket, name = self.parse(uri)
        blob = self.hook.get_conn().bucket(bucket).get_blob(name)
        if blob is None:
            return None, 0
        # Take the generation before downloading: the download resets it from the response headers
        # (None from the emulator, which sends none). Content newer than it fails the download (412)
        # on GCS, or the conditional write (the caller re-reads either way).
        generation = int(blob.generation)
        return json.loads(blob.download_as_bytes(if_generation_match=generation)), generation

    def write_json_if_generation(self, uri: str, obj, generation: int) -> None:
        """Write only if the object is still at ``generation`` (0: only if absent); raises on a race."""
        if generation is None:  # would make the write unconditional
            raise ValueError(f"write_json_if_generation({uri}) needs a generation (0: only if absent)")
        bucket, name = self.parse(uri)
        blob = self.hook.get_conn().bucket(bucket).blob(name)
        blob.upload_from_string(json.dumps(obj, indent=1, sort_keys=True), content_type="application/json",
                                if_generation_match=generation)

    def exists(self, uri: str) -> bool:
        bucket, name = self.parse(uri)
        return self.hook.exists(bucket, name)

    def read_bytes(self, uri: str) -> bytes:
        bucket, name = self.parse(uri)
        return self.hook.download(bucket, name)

    def read_json(self, uri: str):
        return json.loads(self.read_bytes(uri))

    def write_bytes(self, uri: str, data: bytes | str, mime_type: str = "application/octet-stream") -> str:
        bucket, name = self.parse(uri)
        self.hook.upload(bucket, name, data=data, mime_type=mime_type)
        return uri

    def write_json(self, uri: str, obj) -> str:
        return self.write_bytes(uri, json.dumps(obj, indent=1, sort_keys=True), mime_type="application/json")

    def download(self, uri: str, local_path: str) -> str:
        bucket, name = self.parse(uri)
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        self.hook.download(bucket, name, filename=local_path)
        return local_path

    def download_dir(self, uri: str, local_dir: str) -> list[str]:
        """Copy every object under ``uri`` into ``local_dir``. Object names that would land outside
        it (``../``, absolute parts: valid on GCS) fail the whole copy before anything is written."""
        from dualml.storage import safe_local_target

        files = self.list_files(uri)
        base = uri.rstrip("/") + "/"
        targets = [(f, safe_local_target(local_dir, f[len(base) :], f)) for f in files]
        return [self.download(f, str(target)) for f, target in targets]

    def list_objects(self, uri: str) -> list[dict]:
        """Every object under ``uri``: ``{"uri", "size", "updated" (epoch s), "md5"}``, sorted by URI."""
        bucket, prefix = self.parse(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        blobs = self.hook.get_conn().list_blobs(bucket, prefix=prefix)
        return sorted(({"uri": f"gs://{bucket}/{b.name}", "size": int(b.size or 0),
                        "updated": b.updated.timestamp() if b.updated else None, "md5": b.md5_hash}
                       for b in blobs if not b.name.endswith("/")), key=lambda o: o["uri"])

    def delete(self, uri: str) -> None:
        bucket, name = self.parse(uri)
        self.hook.delete(bucket, name)

    def upload_file(self, local_path: str, uri: str, mime_type: str = "application/octet-stream") -> str:
        bucket, name = self.parse(uri)
        self.hook.upload(bucket, name, filename=local_path, mime_type=mime_type)
        return uri
