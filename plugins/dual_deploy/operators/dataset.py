"""Shared upstream steps: locate and validate the dataset, stage the split.

Both fail with AirflowFailException (no retries: retrying bad data cannot help) and a
message that names what is wrong, so nothing downstream trains or deploys.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from airflow.sdk.exceptions import AirflowFailException

from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.operators.base import DictOutputOperator
from dualml import dataset, storage

READ_THREADS = 16  # parallel image reads (<= storage.HTTP_POOL_SIZE)


def dataset_fingerprint(io: GcsIO, data_uri: str) -> str:
    """Content identity of the images under ``data_uri`` (class/file names + MD5s; markers ignored)."""
    entries = [(rel, md5) for rel, md5 in io.list_with_hashes(data_uri) if rel.count("/") == 1
               and rel.lower().endswith(dataset.IMAGE_EXTENSIONS)]
    return dataset.content_fingerprint(entries)


def _list(io: GcsIO, data_uri: str) -> list[str]:
    """Objects under ``data_uri``, listed directly: no bucket metadata GET (storage.buckets.get),
    which the object roles a least-privilege service account holds do not grant."""
    from google.api_core.exceptions import Forbidden, NotFound

    bucket, _ = io.parse(data_uri)
    try:
        return io.list_files(data_uri)
    except NotFound:
        raise AirflowFailException(
            f"bucket gs://{bucket} does not exist (data_uri={data_uri}); create it or set the data_uri param "
            "/ data.uri in dags/config/dual_deploy.yaml"
        ) from None
    except Forbidden as e:
        raise AirflowFailException(
            f"permission denied listing {data_uri} ({e.message}): grant the environment's service account "
            f"roles/storage.objectViewer (or roles/storage.objectAdmin) on gs://{bucket}"
        ) from None


def _locate(io: GcsIO, data_uri: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(images per class, skipped entries with the reason) under ``data_uri``."""
    files = _list(io, data_uri)
    if not files:
        raise AirflowFailException(
            f"no files under {data_uri}; upload images as {data_uri}/<class>/<image>.jpg or fix data_uri"
        )
    return dataset.split_listing(data_uri, files)


class ValidateDatasetOperator(DictOutputOperator):
    """Check that ``data_uri`` holds a trainable tf_flowers-layout dataset.

    Every image is downloaded and decoded (in parallel): corrupt files are named. Up to
    ``max_bad_fraction`` of them are skipped with a warning; more fails the run.

    Nothing is left out silently: files and nested folders outside the ``<class>/<image>`` layout are
    listed in ``skipped`` (relative path -> reason), and images larger than one online prediction
    request carries (they train, but clients must send them resized with
    ``dualml.request_image.prepare_image``) in ``oversized``; both also become warnings.

    XCom: ``{"data_uri", "fingerprint", "classes": {name: count}, "num_images", "bad_files": {uri: reason},
    "skipped": {relative path: reason}, "oversized": {uri: reason}, "warnings": [...], "duration_s"}``
    (``skipped``/``oversized`` name at most 50 entries, then ``"...": "and N more"``).
    """

    template_fields: Sequence[str] = ("data_uri",)
    ui_color = "#e8f0fe"

    def __init__(self, *, data_uri: str, min_classes: int = 2, min_images_per_class: int = 5,
                 max_bad_fraction: float = 0.0, gcp_conn_id: str = "google_cloud_default", **kwargs):
        super().__init__(**kwargs)
        self.data_uri = data_uri
        self.min_classes = min_classes
        self.min_images_per_class = min_images_per_class
        self.max_bad_fraction = max_bad_fraction
        self.gcp_conn_id = gcp_conn_id

    def execute(self, context) -> dict:
        t0 = time.monotonic()
        io = GcsIO(self.gcp_conn_id)
        data_uri = self.data_uri.rstrip("/")
        by_class, skipped = _locate(io, data_uri)
        all_files = [f for fs in by_class.values() for f in fs]
        # One pooled connection per reader thread (requests' default pool of 10 made urllib3 warn and reconnect).
        storage.size_connection_pool(io.hook.get_conn()._http)
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            contents = dict(zip(all_files, pool.map(io.read_bytes, all_files), strict=True))
        try:
            _, report = dataset.validate(
                by_class,
                min_classes=self.min_classes,
                min_per_class=self.min_images_per_class,
                max_bad_fraction=self.max_bad_fraction,
                read=contents.__getitem__,
            )
        except dataset.DatasetError as e:
            raise AirflowFailException(f"dataset {data_uri} is not usable: {e}") from None
        warnings = list(report.warnings)
        if skipped:
            shown = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5])
            more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
            warnings.insert(0, f"left out {len(skipped)} file(s)/folder(s) that are not <class>/<image>: {shown}{more}")
        for w in warnings:
            self.log.warning("%s", w)
        fingerprint = dataset_fingerprint(io, data_uri)
        self.log.info("dataset %s: %d images in %d classes %s, fingerprint %s", data_uri, report.num_images,
                      len(report.classes), report.classes, fingerprint)
        return {
            "data_uri": data_uri,
            "fingerprint": fingerprint,
            "classes": report.classes,
            "num_images": report.num_images,
            "bad_files": report.bad_files,
            "skipped": dataset.summarize_skipped(skipped),
            "oversized": dataset.summarize_skipped(report.oversized),
            "warnings": warnings,
            "duration_s": round(time.monotonic() - t0, 2),
        }


class StageSplitOperator(DictOutputOperator):
    """Write the run's deterministic, stratified ``split.json`` that every target trains on.

    ``exclude`` (usually the validation task's ``bad_files``) drops unreadable images.
    XCom: ``{"split_uri", "labels", "counts", "fingerprint", "duration_s"}``.
    """

    template_fields: Sequence[str] = ("data_uri", "split_uri", "exclude")

    def __init__(self, *, data_uri: str, split_uri: str, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 seed: int = 42, exclude=None, gcp_conn_id: str = "google_cloud_default", **kwargs):
        super().__init__(**kwargs)
        self.data_uri = data_uri
        self.split_uri = split_uri
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.exclude = exclude
        self.gcp_conn_id = gcp_conn_id

    def execute(self, context) -> dict:
        t0 = time.monotonic()
        io = GcsIO(self.gcp_conn_id)
        data_uri = self.data_uri.rstrip("/")
        bad = set(self.exclude or ())
        by_class = {c: [f for f in fs if f not in bad] for c, fs in _locate(io, data_uri)[0].items()}
        try:
            manifest = dataset.stratified_split(
                by_class, val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=int(self.seed),
                data_root=data_uri,
            )
        except dataset.DatasetError as e:
            raise AirflowFailException(f"cannot split {data_uri}: {e}") from None
        io.write_bytes(self.split_uri, manifest.to_json(), mime_type="application/json")
        self.log.info("staged split %s: %s (fingerprint %s)", self.split_uri, manifest.counts(), manifest.fingerprint())
        return {
            "split_uri": self.split_uri,
            "labels": manifest.labels,
            "counts": manifest.counts(),
            "fingerprint": manifest.fingerprint(),
            "duration_s": round(time.monotonic() - t0, 2),
        }
