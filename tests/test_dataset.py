"""dualml.dataset: listing, validation, the stratified split and its manifest. No TensorFlow."""

from __future__ import annotations

import io
import json
import random
import uuid
from pathlib import Path

import pytest
from PIL import Image

from dualml import dataset
from dualml.dataset import DatasetError, SplitManifest, stratified_split


def _jpeg(color=(200, 30, 40), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def _png(color=(10, 200, 40), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _make_folder(root: Path, per_class: dict[str, int]) -> dict[str, list[str]]:
    out = {}
    for cls, n in per_class.items():
        out[cls] = [_write(root / cls / f"{cls}_{i:03d}.jpg", _jpeg((i * 7 % 256, 40, 90))) for i in range(n)]
    return out


def _synthetic(per_class: dict[str, int]) -> dict[str, list[str]]:
    """File names only (the split never reads files)."""
    return {c: [f"/data/{c}/{c}_{i:03d}.jpg" for i in range(n)] for c, n in per_class.items()}


def _assignment(m: SplitManifest) -> dict[str, str]:
    return {uri: split for split, files in m.files.items() for uri, _ in files}


# ---------------------------------------------------------------- listing


def test_listing_ignores_stray_files_and_nested_folders(tmp_path):
    expected = _make_folder(tmp_path, {"roses": 2, "daisy": 3})
    # Upper-case and .jpeg/.png extensions count as images.
    expected["daisy"].append(_write(tmp_path / "daisy" / "Z.JPEG", _jpeg()))
    expected["roses"].append(_write(tmp_path / "roses" / "x.png", _png()))
    # Not images of a class:
    _write(tmp_path / "README.md", b"# flowers")
    _write(tmp_path / "top_level.jpg", _jpeg())  # no class folder
    _write(tmp_path / "daisy" / "notes.txt", b"hello")
    _write(tmp_path / "daisy" / "thumbs" / "t.jpg", _jpeg())  # nested deeper
    _write(tmp_path / "roses" / "meta.json", b"{}")
    _write(tmp_path / "empty_class" / "LICENSE", b"cc-by")  # a folder with no images is no class

    listed = dataset.list_image_folder(str(tmp_path) + "/")  # trailing slash is fine

    assert list(listed) == ["daisy", "roses"]  # sorted class names
    assert listed == {c: sorted(v) for c, v in sorted(expected.items())}


def test_listing_missing_local_folder_raises_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        dataset.list_image_folder(str(tmp_path / "nope"))


def test_labels_text_round_trip():
    labels = ["daisy", "dandelion", "roses"]
    text = dataset.labels_text(labels)
    assert text == "daisy\ndandelion\nroses\n"
    assert dataset.parse_labels(text) == labels
    assert dataset.parse_labels("a\r\n\n b \n") == ["a", "b"]


# ---------------------------------------------------------------- split


def test_split_is_deterministic_per_seed():
    files = _synthetic({"a": 20, "b": 20, "c": 20})
    m1 = stratified_split(files, seed=1)
    m2 = stratified_split(files, seed=1)
    m3 = stratified_split(files, seed=2)
    assert m1 == m2
    assert m1.fingerprint() == m2.fingerprint()
    assert _assignment(m1) != _assignment(m3)
    assert m1.fingerprint() != m3.fingerprint()
    assert m1.seed == 1 and m3.seed == 2


def test_split_is_stratified_with_expected_proportions():
    files = _synthetic({"a": 20, "b": 40, "c": 7})
    m = stratified_split(files, val_fraction=0.15, test_fraction=0.15, seed=3)
    assert m.labels == ["a", "b", "c"]
    per = {s: {c: 0 for c in range(3)} for s in dataset.SPLITS}
    for s, entries in m.files.items():
        for _, idx in entries:
            per[s][idx] += 1
    # round(n * 0.15) per class, at least one; train gets the rest.
    assert per["test"] == {0: 3, 1: 6, 2: 1}
    assert per["val"] == {0: 3, 1: 6, 2: 1}
    assert per["train"] == {0: 14, 1: 28, 2: 5}
    # Every file exactly once, with its class's index.
    all_entries = [e for s in dataset.SPLITS for e in m.files[s]]
    assert len(all_entries) == len({u for u, _ in all_entries}) == 67
    for uri, idx in all_entries:
        assert uri.split("/")[2] == m.labels[idx]
    assert m.counts() == {"train": 47, "val": 10, "test": 10}
    assert m.fractions == {"val": 0.15, "test": 0.15}


@pytest.mark.parametrize(
    "n, val_fraction, test_fraction",
    [(3, 0.15, 0.15), (3, 0.15, 0.5), (3, 0.1, 0.8), (4, 0.3, 0.6), (5, 0.45, 0.45), (10, 0.05, 0.05)],
)
def test_every_class_lands_in_every_split(n, val_fraction, test_fraction):
    m = stratified_split(_synthetic({"a": n, "b": n}), val_fraction=val_fraction, test_fraction=test_fraction)
    for s in dataset.SPLITS:
        assert {idx for _, idx in m.files[s]} == {0, 1}, (s, m.files)
    assert sum(m.counts().values()) == 2 * n


def test_split_independent_of_listing_order():
    files = _synthetic({"a": 15, "b": 15, "c": 15})
    shuffled = {}
    rng = random.Random(0)
    for cls in reversed(list(files)):  # different dict order too
        lst = list(files[cls])
        rng.shuffle(lst)
        shuffled[cls] = lst
    assert stratified_split(shuffled, seed=5) == stratified_split(files, seed=5)


def test_adding_a_class_does_not_reshuffle_the_others():
    files = _synthetic({"daisy": 20, "roses": 20})
    before = stratified_split(files, seed=9)
    after = stratified_split({**files, "aster": _synthetic({"aster": 20})["aster"]}, seed=9)
    assert after.labels == ["aster", "daisy", "roses"]  # indices shift, assignments must not
    a_before, a_after = _assignment(before), _assignment(after)
    assert {u: a_after[u] for u in a_before} == a_before
    for uri, idx in (e for s in dataset.SPLITS for e in after.files[s]):
        assert uri.split("/")[2] == after.labels[idx]


def test_split_rejects_bad_fractions_and_tiny_classes():
    files = _synthetic({"a": 10, "b": 10})
    for val, test in [(0, 0.1), (0.1, 0), (0.5, 0.5), (0.7, 0.4), (1.0, 0.1)]:
        with pytest.raises(DatasetError, match="val_fraction"):
            stratified_split(files, val_fraction=val, test_fraction=test)
    with pytest.raises(DatasetError, match=r"class 'b' has 2 image\(s\)"):
        stratified_split(_synthetic({"a": 10, "b": 2}))


# ---------------------------------------------------------------- manifest


def test_manifest_json_round_trip_and_fingerprint():
    m = stratified_split(_synthetic({"a": 8, "b": 9}), seed=4, data_root="gs://bucket/flowers")
    text = m.to_json()
    d = json.loads(text)
    assert d["version"] == dataset.MANIFEST_VERSION
    assert d["fingerprint"] == m.fingerprint()
    assert d["data_root"] == "gs://bucket/flowers"
    back = SplitManifest.from_json(text)
    assert back == m
    assert back.fingerprint() == m.fingerprint()
    assert back.to_json() == text


def test_fingerprint_is_stable_and_content_sensitive():
    m = SplitManifest(
        labels=["a", "b"],
        seed=1,
        fractions={"val": 0.2, "test": 0.2},
        files={"train": [("a/1.jpg", 0), ("b/1.jpg", 1)], "val": [("a/2.jpg", 0)], "test": [("b/2.jpg", 1)]},
    )
    # A fixed value: the fingerprint must not depend on the process (no hash() randomisation).
    assert m.fingerprint() == "21f1b8ef903f4925"
    # Seed, fractions and data_root are not content; labels and assignment are.
    same = SplitManifest(labels=["a", "b"], seed=99, fractions={}, files=m.files, data_root="/elsewhere")
    assert same.fingerprint() == m.fingerprint()
    moved = SplitManifest(
        labels=["a", "b"],
        seed=1,
        fractions=m.fractions,
        files={"train": [("a/1.jpg", 0)], "val": [("a/2.jpg", 0), ("b/1.jpg", 1)], "test": [("b/2.jpg", 1)]},
    )
    assert moved.fingerprint() != m.fingerprint()
    relabelled = SplitManifest(labels=["b", "a"], seed=1, fractions=m.fractions, files=m.files)
    assert relabelled.fingerprint() != m.fingerprint()


def test_manifest_with_other_version_is_rejected():
    d = json.loads(stratified_split(_synthetic({"a": 3, "b": 3})).to_json())
    d["version"] = 999
    with pytest.raises(DatasetError, match="version 999"):
        SplitManifest.from_json(json.dumps(d))


# ---------------------------------------------------------------- validation


def test_validate_accepts_a_good_dataset(tmp_path):
    files = _make_folder(tmp_path, {"a": 4, "b": 3})
    files["b"].append(_write(tmp_path / "b" / "p.png", _png()))
    good, report = dataset.validate(files)
    assert good == files
    assert report.classes == {"a": 4, "b": 4}
    assert report.num_images == 8
    assert report.bad_files == {} and report.warnings == []


@pytest.mark.parametrize("classes", [{}, {"only": 5}])
def test_validate_needs_two_classes(tmp_path, classes):
    files = _make_folder(tmp_path, classes)
    with pytest.raises(DatasetError) as e:
        dataset.validate(files)
    msg = str(e.value)
    assert f"found {len(classes)} class folder(s)" in msg
    assert "need at least 2" in msg
    assert "<root>/<class_name>/<image>.jpg" in msg
    assert ("only" in msg) if classes else ("none" in msg)


def test_validate_class_with_too_few_images(tmp_path):
    files = _make_folder(tmp_path, {"daisy": 5, "roses": 2, "tulips": 1})
    with pytest.raises(DatasetError) as e:
        dataset.validate(files, min_per_class=3)
    msg = str(e.value)
    assert "too few readable images" in msg
    assert "roses (2)" in msg and "tulips (1)" in msg
    assert "daisy" not in msg
    assert "at least 3" in msg


def _bad_files(root: Path) -> dict[str, str]:
    """Unreadable images, each with (a fragment of) the reason validate() must give."""
    good = _jpeg(size=64)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    return {
        _write(root / "a" / "empty.jpg", b""): "empty file",
        _write(root / "a" / "corrupt.jpg", bytes(random.Random(1).randrange(256) for _ in range(500))): (
            "not a readable image"
        ),
        _write(root / "b" / "truncated.jpg", good[: len(good) // 2]): "not a readable image",
        _write(root / "b" / "text.png", b"this is not a picture\n" * 10): "not a readable image",
        _write(root / "b" / "anim.jpg", gif.getvalue()): "unsupported format GIF",
    }


def test_validate_names_each_unreadable_file(tmp_path):
    files = _make_folder(tmp_path, {"a": 5, "b": 5})
    bad = _bad_files(tmp_path)
    for path in bad:
        files[Path(path).parent.name].append(path)
    with pytest.raises(DatasetError) as e:
        dataset.validate(files)
    msg = str(e.value)
    assert "5 of 15 images are unreadable" in msg
    assert "raise max_bad_fraction" in msg
    for path, reason in bad.items():
        assert f"{path}: {reason}" in msg


def test_check_image_reasons():
    assert dataset.check_image(_jpeg()) is None
    assert dataset.check_image(_png()) is None
    assert dataset.check_image(b"") == "empty file"
    j = _jpeg(size=64)
    assert dataset.check_image(j[: len(j) // 2]).startswith("not a readable image")


def test_tolerated_bad_files_are_skipped_with_a_warning(tmp_path):
    files = _make_folder(tmp_path, {"a": 10, "b": 10})
    broken = _write(tmp_path / "b" / "broken.jpg", b"\xff\xd8garbage")
    files["b"].append(broken)
    good, report = dataset.validate(files, max_bad_fraction=0.1)  # 1 of 21 < 10 %
    assert broken not in good["b"]
    assert good["a"] == files["a"] and len(good["b"]) == 10
    assert report.classes == {"a": 10, "b": 10}
    assert list(report.bad_files) == [broken]
    assert len(report.warnings) == 1
    assert "skipping 1 unreadable image(s)" in report.warnings[0]
    assert broken in report.warnings[0]
    # The same file with no tolerance is an error.
    with pytest.raises(DatasetError, match="broken.jpg"):
        dataset.validate(files)


def test_tolerance_is_a_fraction_of_all_images(tmp_path):
    files = _make_folder(tmp_path, {"a": 4, "b": 4})
    for i in range(2):
        files["a"].append(_write(tmp_path / "a" / f"bad{i}.jpg", b"nope"))
    with pytest.raises(DatasetError, match="2 of 10 images are unreadable, above the tolerated 10%"):
        dataset.validate(files, max_bad_fraction=0.1)
    good, report = dataset.validate(files, max_bad_fraction=0.25)
    assert len(report.bad_files) == 2 and report.classes == {"a": 4, "b": 4}


def test_bad_files_leaving_a_class_too_small(tmp_path):
    files = _make_folder(tmp_path, {"a": 6, "b": 2})
    files["b"].append(_write(tmp_path / "b" / "bad.jpg", b""))
    with pytest.raises(DatasetError, match=r"b \(2\)"):
        dataset.validate(files, max_bad_fraction=0.5)


def test_many_bad_files_are_summarised(tmp_path):
    files = _make_folder(tmp_path, {"a": 3, "b": 3})
    for i in range(12):
        files["a"].append(_write(tmp_path / "a" / f"bad{i:02d}.jpg", b""))
    with pytest.raises(DatasetError, match=r"\(and 2 more\)"):
        dataset.validate(files)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 2])
def test_validate_rejects_bad_tolerance(fraction):
    with pytest.raises(DatasetError, match="max_bad_fraction must be in"):
        dataset.validate({"a": [], "b": []}, max_bad_fraction=fraction)


def test_validate_uses_the_given_reader():
    blobs = {f"mem://{c}/{i}.jpg": _jpeg() for c in "ab" for i in range(3)}
    files = {c: [u for u in blobs if u.startswith(f"mem://{c}/")] for c in "ab"}
    good, report = dataset.validate(files, read=blobs.__getitem__)
    assert report.classes == {"a": 3, "b": 3}


# ---------------------------------------------------------------- gs:// (emulator)


def _gcs_client():
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    return gcs.Client(project="local-project", credentials=AnonymousCredentials())


def test_gcs_listing_validation_and_split(gcs_emulator):
    bucket_name = f"ds-{uuid.uuid4().hex[:10]}"
    bucket = _gcs_client().create_bucket(bucket_name)
    for cls in ("tulips", "daisy"):
        for i in range(4):
            bucket.blob(f"flowers/{cls}/{i}.jpg").upload_from_string(_jpeg((i * 40, 90, 10)))
    bucket.blob("flowers/README.txt").upload_from_string(b"stray")
    bucket.blob("flowers/daisy/nested/x.jpg").upload_from_string(_jpeg())
    bucket.blob("flowers/daisy/").upload_from_string(b"")  # a "folder" placeholder object
    bucket.blob("other/roses/0.jpg").upload_from_string(_jpeg())  # outside the prefix

    root = f"gs://{bucket_name}/flowers"
    listed = dataset.list_image_folder(root + "/")
    assert listed == {
        "daisy": [f"{root}/daisy/{i}.jpg" for i in range(4)],
        "tulips": [f"{root}/tulips/{i}.jpg" for i in range(4)],
    }
    good, report = dataset.validate(listed)  # reads through the emulator
    assert report.classes == {"daisy": 4, "tulips": 4}
    m = stratified_split(good, data_root=root)
    assert m.labels == ["daisy", "tulips"] and m.data_root == root
    assert all(u.startswith(root + "/") for s in m.files.values() for u, _ in s)


def test_gcs_missing_bucket_is_a_dataset_error(gcs_emulator):
    missing = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/flowers"
    with pytest.raises(DatasetError) as e:
        dataset.list_image_folder(missing)
    msg = str(e.value)
    assert missing in msg
    assert "does not exist" in msg


def test_gcs_empty_prefix_has_no_classes(gcs_emulator):
    bucket_name = f"ds-{uuid.uuid4().hex[:10]}"
    _gcs_client().create_bucket(bucket_name)
    listed = dataset.list_image_folder(f"gs://{bucket_name}/nothing-here")
    assert listed == {}
    with pytest.raises(DatasetError, match=r"found 0 class folder\(s\) with images \(none\)"):
        dataset.validate(listed)


# ---------------------------------------------------------------- what is left out, and why (issue 15.3)


def test_listing_names_every_skipped_file_and_nested_folder(tmp_path):
    _make_folder(tmp_path, {"daisy": 3, "roses": 3})
    _write(tmp_path / "README.md", b"# flowers")
    _write(tmp_path / "daisy" / "notes.txt", b"hello")
    _write(tmp_path / "daisy" / "x.heic", b"heic")
    for i in range(4):
        _write(tmp_path / "daisy" / "thumbs" / f"t{i}.jpg", _jpeg())
    _write(tmp_path / "roses" / "more" / "deeper" / "r.jpg", _jpeg())

    files = [str(p) for p in sorted(tmp_path.rglob("*")) if p.is_file()]
    classes, skipped = dataset.split_listing(str(tmp_path), files)

    assert {c: len(v) for c, v in classes.items()} == {"daisy": 3, "roses": 3}
    assert list(skipped) == ["README.md", "daisy/notes.txt", "daisy/thumbs/", "daisy/x.heic", "roses/more/"]
    assert "not in a class folder" in skipped["README.md"]
    assert "not a .jpg/.jpeg/.png image" in skipped["daisy/x.heic"]
    assert skipped["daisy/thumbs/"].startswith("nested folder (4 file(s)) ignored")
    assert skipped["roses/more/"].startswith("nested folder (1 file(s))")
    assert dataset.group_by_class(str(tmp_path), files) == classes
    assert dataset.skipped_entries(str(tmp_path), files) == skipped


def test_skipped_summary_is_bounded():
    skipped = {f"c/{i:03d}.txt": "not an image" for i in range(120)}
    out = dataset.summarize_skipped(skipped, limit=50)
    assert len(out) == 51 and out["..."] == "and 70 more"
    assert dataset.summarize_skipped({"a": "b"}) == {"a": "b"}


def _photo(width: int, height: int, seed: int = 0) -> bytes:
    """A smooth, phone-photo-like JPEG: compresses like a real photo, unlike noise."""
    rng = random.Random(seed)
    small = Image.new("RGB", (24, 18))
    small.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(24 * 18)])
    buf = io.BytesIO()
    small.resize((width, height), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_validate_lists_images_a_prediction_request_cannot_carry(tmp_path):
    files = _make_folder(tmp_path, {"daisy": 3, "roses": 3})
    big = _write(tmp_path / "roses" / "phone.jpg", _photo(4000, 3000))
    files["roses"].append(big)
    good, report = dataset.validate(files)
    assert big in good["roses"]  # it trains as it is
    assert list(report.oversized) == [big]
    assert "4000x3000 px is above the 1024 px" in report.oversized[big]
    assert any("larger than an online prediction request carries" in w and big in w for w in report.warnings)
