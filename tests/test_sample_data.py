"""dualml.sample_data: the deterministic synthetic tf_flowers stand-in. No TensorFlow."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualml import dataset, sample_data
from dualml.sample_data import CLASSES, generate

PER_CLASS = 30
SIZE = 64


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def flowers(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flowers")
    assert generate(root, per_class=PER_CLASS, size=SIZE) == {c: PER_CLASS for c in CLASSES}
    return root


def test_classes_are_the_tf_flowers_names():
    assert CLASSES == ("daisy", "dandelion", "roses", "sunflowers", "tulips")
    assert list(CLASSES) == sorted(CLASSES)  # class index = position, as everywhere else


def test_layout_and_counts(flowers):
    files = sorted(p.relative_to(flowers).as_posix() for p in flowers.rglob("*") if p.is_file())
    expected = sorted(f"{c}/{c}_{i:04d}.jpg" for c in CLASSES for i in range(PER_CLASS))
    assert files == expected
    # The dataset module sees exactly that layout and accepts it.
    listed = dataset.list_image_folder(str(flowers))
    assert list(listed) == list(CLASSES)
    good, report = dataset.validate(listed)
    assert report.classes == {c: PER_CLASS for c in CLASSES} and not report.bad_files


def test_same_arguments_give_identical_bytes(flowers, tmp_path):
    again = tmp_path / "again"
    generate(again, per_class=PER_CLASS, size=SIZE)
    first = _digests(flowers)
    assert len(first) == 5 * PER_CLASS
    assert _digests(again) == first
    # Each image is unique, and another seed gives other images.
    assert len(set(first.values())) == len(first)
    other = tmp_path / "other"
    generate(other, per_class=3, size=SIZE, seed=8)
    assert not set(_digests(other).values()) & set(first.values())


def test_image_is_a_function_of_its_rng_only():
    a = sample_data.render("roses", np.random.default_rng([7, 2, 0]), size=32)
    b = sample_data.render("roses", np.random.default_rng([7, 2, 0]), size=32)
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("size", [32, 48, 96])
def test_images_decode_at_the_requested_size(tmp_path, size):
    generate(tmp_path, per_class=2, size=size, classes=("daisy", "tulips"))
    for p in tmp_path.rglob("*.jpg"):
        assert dataset.check_image(p.read_bytes()) is None
        with Image.open(p) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (size, size)
            im.load()


def test_subset_of_classes_and_unknown_class(tmp_path):
    assert generate(tmp_path / "two", per_class=1, size=32, classes=("roses", "daisy")) == {
        "roses": 1,
        "daisy": 1,
    }
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["daisy", "roses"]
    with pytest.raises(ValueError, match="unknown class 'lilies'"):
        generate(tmp_path / "bad", per_class=1, size=32, classes=("lilies",))


def test_cli(tmp_path, capsys):
    sample_data.main([str(tmp_path / "cli"), "--per-class", "2", "--size", "32", "--seed", "3"])
    assert "wrote 10 images in 5 classes" in capsys.readouterr().out
    assert len(list((tmp_path / "cli").rglob("*.jpg"))) == 10


# ---------------------------------------------------------------- learnable, not trivially so


def _flower_colour(path: Path) -> np.ndarray:
    """Mean RGB of the image's least-green quarter of pixels: roughly the flower's colour.

    (The whole-image mean is dominated by the random foliage background and separates the
    classes only weakly.)
    """
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    greenness = px[:, 1] - (px[:, 0] + px[:, 2]) / 2
    return px[greenness <= np.quantile(greenness, 0.25)].mean(axis=0)


def _nearest_centroid_accuracy(x_train, y_train, x_test, y_test) -> float:
    centroids = np.stack([x_train[y_train == c].mean(axis=0) for c in range(len(CLASSES))])
    pred = np.argmin(((x_test[:, None, :] - centroids[None]) ** 2).sum(axis=-1), axis=1)
    return float((pred == y_test).mean())


@pytest.fixture(scope="module")
def colour_features(flowers):
    x, y = [], []
    for ci, cls in enumerate(CLASSES):
        for p in sorted((flowers / cls).glob("*.jpg")):
            x.append(_flower_colour(p))
            y.append(ci)
    x, y = np.array(x), np.array(y)
    train = np.arange(len(y)) % 2 == 0  # half of each class to fit, the other half to score
    return x[train], y[train], x[~train], y[~train]


def test_classes_are_separable(colour_features):
    # Chance is 20 %; a trivial colour classifier must do far better, so a CNN can learn it.
    acc = _nearest_centroid_accuracy(*colour_features)
    assert acc >= 0.6, acc


def test_shuffled_labels_score_near_chance(colour_features):
    x_train, y_train, x_test, y_test = colour_features
    rng = np.random.default_rng(0)
    scores = [
        _nearest_centroid_accuracy(x_train, rng.permutation(y_train), x_test, y_test) for _ in range(20)
    ]
    assert 0.1 <= float(np.mean(scores)) <= 0.3, scores
    assert max(scores) < _nearest_centroid_accuracy(*colour_features)
