"""Data integrity and least privilege: storage, caches, uploads, retention (issues 9 and 15).

Everything runs against the real GCS API server (gcp-storage-emulator) through the real
google-cloud-storage client. Where Google behaves differently from the emulator (IAM roles,
object names with ``..``), a requests Session *under* the real client applies Google's rule
on the wire: it records every HTTP request and answers 403 for what a role does not grant,
or rewrites a listing the way real GCS could return it. Nothing above the transport is faked.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage as gcs
from PIL import Image

from dualml import storage

# ---------------------------------------------------------------- a wire-level IAM stand-in

ROLES = {
    "roles/storage.objectViewer": {"storage.objects.get", "storage.objects.list"},
    "roles/storage.objectAdmin": {"storage.objects.get", "storage.objects.list", "storage.objects.create",
                                  "storage.objects.delete", "storage.objects.update"},
    "none": set(),
}


def required_permission(method: str, path: str) -> str:
    """The IAM permission a JSON-API request needs (https://cloud.google.com/storage/docs/access-control/iam-json)."""
    path = path.removeprefix("/download").removeprefix("/upload")
    m = re.fullmatch(r"/storage/v1/b/([^/]+)(/o(/.*)?)?", path)
    assert m, f"unexpected GCS request path {path}"
    if m.group(2) is None:
        return {"GET": "storage.buckets.get", "DELETE": "storage.buckets.delete"}.get(method, "storage.buckets.update")
    if m.group(3) is None:
        return "storage.objects.list" if method == "GET" else "storage.objects.create"
    return {"GET": "storage.objects.get", "DELETE": "storage.objects.delete"}.get(method, "storage.objects.update")


class IamSession(requests.Session):
    """Transport for a real storage.Client: records requests, enforces a role, can rewrite listings."""

    def __init__(self, role: str = "roles/storage.objectAdmin", rename: dict[str, str] | None = None):
        super().__init__()
        self.role = role
        self.rename = rename or {}
        self.calls: list[tuple[str, str]] = []

    def request(self, method, url, *args, **kwargs):
        path = unquote(urlparse(url).path)
        self.calls.append((method, path))
        permission = required_permission(method, path)
        if permission not in ROLES[self.role]:
            bucket = path.split("/b/", 1)[1].split("/", 1)[0]
            resp = requests.Response()
            resp.status_code = 403
            resp.url = url
            resp.request = requests.Request(method, url).prepare()
            resp.headers["Content-Type"] = "application/json"
            resp._content = json.dumps({"error": {"code": 403, "message": (
                f"sa@p.iam.gserviceaccount.com does not have {permission} access to the Google Cloud "
                f"Storage bucket {bucket}.")}}).encode()
            return resp
        resp = super().request(method, url, *args, **kwargs)
        if self.rename and method == "GET" and path.endswith("/o") and resp.status_code == 200:
            body = resp.json()
            for item in body.get("items", []):
                for old, new in self.rename.items():
                    item["name"] = item["name"].replace(old, new)
            resp._content = json.dumps(body).encode()
        return resp

    def bucket_gets(self) -> list[str]:
        return [p for m, p in self.calls if m == "GET" and re.fullmatch(r"/storage/v1/b/[^/]+", p)]


@pytest.fixture
def admin(gcs_emulator) -> gcs.Client:
    """A plain client (no IAM stand-in) to arrange state."""
    return gcs.Client(project="local-project", credentials=AnonymousCredentials())


@pytest.fixture
def bucket(admin) -> str:
    name = f"integrity-{uuid.uuid4().hex[:10]}"
    admin.create_bucket(name)
    return name


@pytest.fixture
def as_role(gcs_emulator, monkeypatch):
    """``as_role(role)`` makes dualml.storage use a real client whose transport is an IamSession."""

    def use(role: str, **kwargs) -> IamSession:
        session = IamSession(role, **kwargs)
        client = storage.make_client(http=session)  # the module's own client, on the recording transport
        monkeypatch.setattr(storage, "_client", lambda: client)
        return session

    return use


def _jpeg(seed: int = 0, size: int = 16, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 37 % 256, seed * 11 % 256, 90)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ================================================================ least privilege (issue 9 item 8)


def test_the_iam_stand_in_refuses_a_bucket_get_to_object_roles(admin, bucket):
    """The rule the tests below rely on: objectViewer/objectAdmin do not grant storage.buckets.get."""
    session = IamSession("roles/storage.objectViewer")
    client = gcs.Client(project="local-project", credentials=AnonymousCredentials(), _http=session)
    from google.api_core.exceptions import Forbidden

    with pytest.raises(Forbidden, match="storage.buckets.get"):
        client.bucket(bucket).exists()  # what dualml.storage used to do before listing
    assert session.bucket_gets() == [f"/storage/v1/b/{bucket}"]


def test_an_object_viewer_reads_lists_and_downloads_without_a_bucket_get(admin, bucket, as_role, tmp_path):
    b = admin.bucket(bucket)
    for cls in ("daisy", "roses"):
        for i in range(3):
            b.blob(f"data/{cls}/{i}.jpg").upload_from_string(_jpeg(i))
    b.blob("model/saved_model.pb").upload_from_string(b"pb")
    b.blob("model/variables/v.index").upload_from_string(b"ix")

    session = as_role("roles/storage.objectViewer")
    root = f"gs://{bucket}/data"
    from dualml import dataset

    assert list(dataset.list_image_folder(root)) == ["daisy", "roses"]
    assert len(storage.list_files(root)) == 6
    assert storage.read_bytes(f"{root}/daisy/0.jpg") == _jpeg(0)
    assert storage.exists(f"{root}/daisy/0.jpg") and not storage.exists(f"{root}/daisy/nope.jpg")
    local = Path(storage.download_dir(f"gs://{bucket}/model", str(tmp_path / "model")))  # what serving does
    assert (local / "saved_model.pb").read_bytes() == b"pb" and (local / "variables" / "v.index").exists()
    cached = storage.download_cached([f"{root}/roses/1.jpg"], str(tmp_path / "cache"))
    assert Path(cached[f"{root}/roses/1.jpg"]).read_bytes() == _jpeg(1)

    assert len(session.calls) >= 7, session.calls  # the requests really went through the stand-in
    assert session.bucket_gets() == [], f"bucket metadata GETs need storage.buckets.get: {session.calls}"


def test_an_object_admin_writes_without_a_bucket_get(admin, bucket, as_role, tmp_path):
    (tmp_path / "export" / "sub").mkdir(parents=True)
    (tmp_path / "export" / "a.txt").write_text("a")
    (tmp_path / "export" / "sub" / "b.txt").write_text("b")
    session = as_role("roles/storage.objectAdmin")
    storage.write_text(f"gs://{bucket}/out/metrics.json", "{}")
    written = storage.upload_dir(str(tmp_path / "export"), f"gs://{bucket}/out/model")
    assert written == [f"gs://{bucket}/out/model/a.txt", f"gs://{bucket}/out/model/sub/b.txt"]
    assert sorted(bl.name for bl in admin.list_blobs(bucket)) == ["out/metrics.json", "out/model/a.txt",
                                                                   "out/model/sub/b.txt"]
    assert session.bucket_gets() == []


def test_a_missing_bucket_is_a_clear_error_from_the_listing(gcs_emulator, as_role):
    session = as_role("roles/storage.objectViewer")
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(storage.StorageError, match=f"GCS bucket gs://{missing} does not exist"):
        storage.list_files(f"gs://{missing}/data")
    with pytest.raises(storage.StorageError, match=f"gs://{missing} does not exist"):
        storage.download_dir(f"gs://{missing}/model", "/nonexistent-never-created")
    assert session.bucket_gets() == []


def test_missing_permission_names_the_role_and_is_not_retried(admin, bucket, as_role):
    admin.bucket(bucket).blob("data/a/1.jpg").upload_from_string(b"x")
    session = as_role("none")
    with pytest.raises(storage.StoragePermissionError) as e:
        storage.list_files(f"gs://{bucket}/data")
    msg = str(e.value)
    assert "roles/storage.objectViewer" in msg and f"gs://{bucket}" in msg and "Retrying will not help" in msg
    assert "storage.objects.list" in msg  # Google's own reason is kept
    assert len(session.calls) == 1, session.calls  # one request, no retry loop

    with pytest.raises(storage.StoragePermissionError, match="roles/storage.objectViewer"):
        storage.read_bytes(f"gs://{bucket}/data/a/1.jpg")

    as_role("roles/storage.objectViewer")
    with pytest.raises(storage.StoragePermissionError, match=r"permission denied to write .*roles/storage.objectAdmin"):
        storage.write_bytes(f"gs://{bucket}/out/x", b"x")
    # A permission error is a StorageError: the trainer exits with its no-retry "data problem" code.
    assert issubclass(storage.StoragePermissionError, storage.StorageError)


# ================================================================ downloads never escape their folder (15.11)


@pytest.mark.parametrize("name", ["../../escaped.txt", "sub/../../escaped.txt", "/tmp/abs-escaped.txt", "..",
                                  "a\\..\\..\\x"])
def test_safe_local_target_refuses_escaping_names(tmp_path, name):
    with pytest.raises(storage.StorageError, match="outside"):
        storage.safe_local_target(tmp_path / "dest", name)


def test_safe_local_target_keeps_ordinary_names(tmp_path):
    dest = tmp_path / "dest"
    assert storage.safe_local_target(dest, "a/b/c.txt") == (dest / "a" / "b" / "c.txt").resolve()
    assert storage.safe_local_target(dest, "a/./b..c") == (dest / "a" / "b..c").resolve()


@pytest.mark.parametrize("hostile", ["../../escaped.txt", "/escaped-abs.txt"])
def test_download_dir_refuses_object_names_that_escape(admin, bucket, as_role, tmp_path, hostile):
    """Real GCS accepts ``model/../../x`` and ``model//x`` as object names (the emulator does not, so the
    transport returns the listing real GCS would)."""
    b = admin.bucket(bucket)
    b.blob("model/ok.txt").upload_from_string(b"ok")
    b.blob("model/HOSTILE").upload_from_string(b"pwned")
    session = as_role("roles/storage.objectViewer", rename={"model/HOSTILE": f"model/{hostile}"})
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(storage.StorageError, match="refusing to download") as e:
        storage.download_dir(f"gs://{bucket}/model", str(dest))
    assert hostile in str(e.value)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], f"nothing may be written when one name is hostile: {written}"
    assert not Path("/escaped-abs.txt").exists()
    assert not any("/o/" in p for _, p in session.calls), "no object was downloaded"


def test_gcs_io_download_dir_refuses_object_names_that_escape(gcs_emulator, monkeypatch, bucket, admin, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", json.dumps(
        {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "local-project"}}))
    from dual_deploy.hooks.gcs_io import GcsIO

    b = admin.bucket(bucket)
    b.blob("runs/r1/model/ok.txt").upload_from_string(b"ok")
    b.blob("runs/r1/model/HOSTILE").upload_from_string(b"pwned")
    io_ = GcsIO()
    session = IamSession(rename={"model/HOSTILE": "model/../../../escaped.txt"})
    io_.hook.get_conn()._http_internal = session
    with pytest.raises(storage.StorageError, match="refusing to download"):
        io_.download_dir(f"gs://{bucket}/runs/r1/model", str(tmp_path / "x" / "y" / "dest"))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    # Ordinary names still work.
    session.rename = {}
    got = io_.download_dir(f"gs://{bucket}/runs/r1/model", str(tmp_path / "dest"))
    assert sorted(Path(p).name for p in got) == ["HOSTILE", "ok.txt"]


# ================================================================ content-keyed download cache (15.4)


def test_download_cache_follows_changed_bytes_under_the_same_name_and_size(admin, bucket, tmp_path):
    storage._client.cache_clear()
    b = admin.bucket(bucket)
    old, new = _jpeg(1, quality=90), _jpeg(2, quality=90)
    assert len(old) == len(new) and old != new  # same name, same size, other bytes
    uri = f"gs://{bucket}/data/daisy/0.jpg"
    b.blob("data/daisy/0.jpg").upload_from_string(old)
    cache = str(tmp_path / "cache")

    first = storage.download_cached([uri], cache)[uri]
    assert Path(first).read_bytes() == old
    b.blob("data/daisy/0.jpg").upload_from_string(new)
    second = storage.download_cached([uri], cache)[uri]
    assert Path(second).read_bytes() == new, "the cache served stale bytes"
    # Unchanged content is not fetched again (same path, same file: a download would rename a new one in).
    before = os.stat(second).st_ino
    assert storage.download_cached([uri], cache)[uri] == second and os.stat(second).st_ino == before
    assert not [p for p in Path(cache).rglob(".part-*")], "no partial downloads are left behind"
    # The old version stays while a concurrent job may still read it, then goes: one copy per object.
    assert Path(first).exists()
    storage.download_cached([uri], cache, stale_after_s=0)
    assert not Path(first).exists() and Path(second).read_bytes() == new
    assert [p.name for p in Path(cache).rglob("*") if p.is_file()] == [Path(second).name]


def test_download_cache_never_trusts_a_partial_file(admin, bucket, tmp_path):
    """A download that died half-way (old code: written in place) must not be served later."""
    storage._client.cache_clear()
    data = _jpeg(3)
    uri = f"gs://{bucket}/d/c/x.jpg"
    admin.bucket(bucket).blob("d/c/x.jpg").upload_from_string(data)
    cache = tmp_path / "cache"
    path = Path(storage.download_cached([uri], str(cache))[uri])
    path.unlink()
    (path.parent / ".part-abc").write_bytes(data[:10])  # leftover of an interrupted download
    assert Path(storage.download_cached([uri], str(cache))[uri]).read_bytes() == data


def test_download_cache_names_a_missing_object(admin, bucket, tmp_path):
    storage._client.cache_clear()
    admin.bucket(bucket).blob("d/c/x.jpg").upload_from_string(b"x")
    with pytest.raises(storage.StorageError, match=f"gs://{bucket}/d/c/y.jpg does not exist"):
        storage.download_cached([f"gs://{bucket}/d/c/x.jpg", f"gs://{bucket}/d/c/y.jpg"], str(tmp_path))


def test_parallel_downloads_do_not_overflow_the_connection_pool(admin, bucket, tmp_path, caplog):
    """Issue 14: urllib3's "Connection pool is full, discarding connection" warnings from the trainer."""
    storage._client.cache_clear()
    b = admin.bucket(bucket)
    uris = []
    for i in range(64):
        b.blob(f"data/c/{i}.jpg").upload_from_string(_jpeg(i, size=64))
        uris.append(f"gs://{bucket}/data/c/{i}.jpg")
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        got = storage.download_cached(uris, str(tmp_path / "cache"), threads=storage.DOWNLOAD_THREADS)
    assert len(got) == 64
    full = [r.getMessage() for r in caplog.records if "pool is full" in r.getMessage()]
    assert not full, full[:3]


def test_upload_md5_helper_matches_gcs(admin, bucket):
    """The base64 MD5 the dataset upload compares is exactly the one GCS reports."""
    from dual_deploy.local_platform import local_md5_b64

    data = _jpeg(5)
    blob = admin.bucket(bucket).blob("x.jpg")
    blob.upload_from_string(data)
    blob.reload()
    assert blob.md5_hash == base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324
    p = Path(os.environ.get("TMPDIR", "/tmp")) / f"md5-{uuid.uuid4().hex}.jpg"
    p.write_bytes(data)
    try:
        assert local_md5_b64(p) == blob.md5_hash
    finally:
        p.unlink()


# ================================================================ serving-sized images (15.2)


def _phone_photo(width: int = 7296, height: int = 5472, seed: int = 0) -> bytes:
    """Like the issue's 40 MP phone photo: smooth content, ~2 MB of JPEG."""
    import random

    rng = random.Random(seed)
    small = Image.new("RGB", (48, 36))
    small.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(48 * 36)])
    buf = io.BytesIO()
    small.resize((width, height), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _request_body(instances: list[dict]) -> bytes:
    return json.dumps({"instances": instances}).encode()


def test_a_40_megapixel_photo_is_prepared_to_fit_an_online_request():
    from dualml import request_image
    from dualml.serving.protocol import parse_predict_body

    photo = _phone_photo()
    raw_body = _request_body([{"b64": base64.b64encode(photo).decode()}])
    assert len(photo) > 1_000_000 and len(raw_body) > request_image.VERTEX_MAX_REQUEST_BYTES  # the 413 case

    body = _request_body([request_image.prediction_instance(photo)])
    assert len(body) < request_image.VERTEX_MAX_REQUEST_BYTES / 2, len(body)
    (sent,) = parse_predict_body(body, max_instances=1)  # what the server decodes
    with Image.open(io.BytesIO(sent)) as im:
        assert im.format == "JPEG" and max(im.size) == request_image.MAX_SIDE
        assert abs(im.width / im.height - 7296 / 5472) < 0.01  # aspect ratio kept
    # At most what the model needs: a 64 px model gets 256 px images.
    with Image.open(io.BytesIO(request_image.prepare_image(photo, image_size=64))) as im:
        assert max(im.size) == 256


def test_small_images_are_sent_unchanged_and_others_re_encoded():
    from dualml import request_image

    small = _jpeg(1, size=200)
    assert request_image.prepare_image(small) is small
    png = io.BytesIO()
    Image.new("RGBA", (2000, 1000), (10, 200, 30, 128)).save(png, format="PNG")
    out = request_image.prepare_image(png.getvalue())
    with Image.open(io.BytesIO(out)) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (1024, 512)
    with pytest.raises(ValueError, match="not a readable image"):
        request_image.prepare_image(b"not an image at all")


def test_serving_issue_agrees_with_prepare_image():
    from dualml import request_image

    assert request_image.serving_issue(1024, 768, 300_000, "JPEG") is None
    assert "above the 1024 px" in request_image.serving_issue(7296, 5472, 2_100_000, "JPEG")
    assert "2.10 MB is above" in request_image.serving_issue(800, 600, 2_100_000, "PNG")


# ================================================================ make run's dataset upload (15.3, 15.4)


def _tree(root: Path, per_class: dict[str, int], seed: int = 0) -> None:
    for ci, (cls, n) in enumerate(per_class.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / cls / f"{i}.jpg").write_bytes(_jpeg(seed + ci * 10 + i))


def _objects(admin, bucket: str, prefix: str) -> dict[str, bytes]:
    return {b.name[len(prefix) + 1 :]: b.download_as_bytes() for b in admin.list_blobs(bucket, prefix=prefix + "/")}


def test_upload_resends_changed_bytes_of_the_same_size(admin, bucket, tmp_path, capsys):
    from dual_deploy.local_platform import upload_dataset

    storage._client.cache_clear()
    data = tmp_path / "flowers"
    _tree(data, {"daisy": 2, "roses": 2})
    dest = f"gs://{bucket}/datasets/flowers"
    assert upload_dataset(str(data), dest) == 4
    old = (data / "roses" / "1.jpg").read_bytes()
    edited = old[:13] + b"\x01\x00\x48\x00\x48" + old[18:]  # JFIF density 72 dpi: same size, other bytes
    assert len(edited) == len(old) and edited != old
    (data / "roses" / "1.jpg").write_bytes(edited)
    capsys.readouterr()
    upload_dataset(str(data), dest)
    assert "uploaded 1, unchanged 3, removed 0" in capsys.readouterr().out
    assert _objects(admin, bucket, "datasets/flowers")["roses/1.jpg"] == edited


def test_upload_follows_symlinked_class_folders(admin, bucket, tmp_path):
    from dual_deploy.local_platform import upload_dataset

    storage._client.cache_clear()
    data = tmp_path / "flowers"
    _tree(data, {"daisy": 2})
    _tree(tmp_path / "elsewhere", {"tulips": 3}, seed=50)
    (data / "tulips").symlink_to(tmp_path / "elsewhere" / "tulips", target_is_directory=True)
    (data / "daisy" / "linked.jpg").symlink_to(tmp_path / "elsewhere" / "tulips" / "0.jpg")
    assert upload_dataset(str(data), f"gs://{bucket}/datasets/flowers") == 6
    objs = _objects(admin, bucket, "datasets/flowers")
    assert sorted(objs) == ["daisy/0.jpg", "daisy/1.jpg", "daisy/linked.jpg", "tulips/0.jpg", "tulips/1.jpg",
                            "tulips/2.jpg"]
    assert objs["tulips/2.jpg"] == (tmp_path / "elsewhere" / "tulips" / "2.jpg").read_bytes()


@pytest.mark.parametrize("problem", ["broken", "loop"])
def test_upload_refuses_broken_links_and_loops_by_name(admin, bucket, tmp_path, problem):
    from dual_deploy.local_platform import upload_dataset

    storage._client.cache_clear()
    data = tmp_path / "flowers"
    _tree(data, {"daisy": 2, "roses": 2})
    if problem == "broken":
        (data / "roses" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
        expected = "roses/gone.jpg is a broken symlink"
    else:
        (data / "roses" / "again").symlink_to(data, target_is_directory=True)
        expected = "folder roses/again/ is the same folder as ./"
    with pytest.raises(SystemExit) as e:
        upload_dataset(str(data), f"gs://{bucket}/datasets/flowers")
    assert expected in str(e.value)
    assert _objects(admin, bucket, "datasets/flowers") == {}, "nothing is uploaded from a folder it refuses"


def test_upload_refuses_a_bucket_root(admin, bucket, tmp_path):
    from dual_deploy.local_platform import upload_dataset

    _tree(tmp_path / "d", {"daisy": 1})
    with pytest.raises(SystemExit, match="not a bucket's root"):
        upload_dataset(str(tmp_path / "d"), f"gs://{bucket}")


# ================================================================ the curl line make run prints (15.11)


def test_printed_curl_line_is_safe_to_paste_whatever_the_image_path(tmp_path):
    import subprocess

    from dual_deploy.local_platform import curl_example

    folder = tmp_path / "$(touch pwned)" / "it's `id` daisy"
    folder.mkdir(parents=True)
    image = folder / "a b.jpg"
    image.write_bytes(_jpeg(4))
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "curl").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$CURL_ARGS"\n')
    (stub / "curl").chmod(0o755)
    work = tmp_path / "cwd"
    work.mkdir()
    line = curl_example("http://127.0.0.1:8501/predict", str(image))
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "CURL_ARGS": str(tmp_path / "args")}
    proc = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.rglob("pwned")), "a $(...) in the folder name ran when the line was pasted"
    args = (tmp_path / "args").read_text().splitlines()
    body = json.loads(args[args.index("-d") + 1])
    assert base64.b64decode(body["instances"][0]["b64"]) == image.read_bytes()
    assert "http://127.0.0.1:8501/predict" in args


def test_curl_example_sends_a_request_sized_copy_of_a_large_photo(tmp_path):
    from dual_deploy.local_platform import request_ready_image

    small = tmp_path / "small.jpg"
    small.write_bytes(_jpeg(1))
    assert request_ready_image(str(small), str(tmp_path)) == str(small)
    big = tmp_path / "phone.jpg"
    big.write_bytes(_phone_photo(4000, 3000))
    out = request_ready_image(str(big), str(tmp_path))
    assert out != str(big)
    with Image.open(out) as im:
        assert max(im.size) == 1024


# ================================================================ the trainer leaves no scratch behind (15.9)


@pytest.mark.slow
def test_trainer_removes_its_scratch_folder_even_when_the_job_fails(gcs_emulator, tmp_path):
    """The job trains, then cannot publish (the model dir's bucket does not exist): exit 3, and the
    ~80 MB ``dualml-train-*`` folder (checkpoints, TensorBoard, export) is gone all the same."""
    import subprocess
    import sys

    from dualml import sample_data

    data = tmp_path / "flowers"
    sample_data.generate(data, per_class=5, size=32, classes=("daisy", "roses"))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIP_", "CLOUD_ML", "TF_CONFIG"))}
    env.update(TMPDIR=str(scratch), TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(root / "include"),
               AIP_MODEL_DIR=f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/model/")
    proc = subprocess.run(
        [sys.executable, "-m", "dualml.trainer", "--architecture", "mobilenet_v3_small", "--image-size", "32",
         "--batch-size", "8", "--weights", "none", "--epochs", "1", "--data-uri", str(data)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=480)
    assert proc.returncode == 3, proc.stdout[-4000:]
    assert "does not exist" in proc.stdout
    assert "test accuracy=" in proc.stdout  # it did train and evaluate: the scratch folder was in use
    assert sorted(p.name for p in scratch.iterdir() if p.name.startswith("dualml-train-")) == []


def test_validate_dataset_reads_in_parallel_without_overflowing_the_connection_pool(admin, bucket, monkeypatch,
                                                                                   caplog, capfd):
    """Issue 14, the Airflow side: validate_dataset's 16 parallel reads through GCSHook."""
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", json.dumps(
        {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "local-project"}}))
    from dual_deploy.operators.dataset import ValidateDatasetOperator

    b = admin.bucket(bucket)
    for cls in ("daisy", "tulips"):
        for i in range(30):
            b.blob(f"flowers/{cls}/{i}.jpg").upload_from_string(_jpeg(i, size=32))
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        out = ValidateDatasetOperator(task_id="validate_dataset", data_uri=f"gs://{bucket}/flowers").execute({})
    assert out["num_images"] == 60
    full = [r.getMessage() for r in caplog.records if "pool is full" in r.getMessage()]
    printed = "".join(capfd.readouterr())  # Airflow's task logger may print instead of propagating
    assert not full and "pool is full" not in printed, (full[:3], printed[-2000:])
