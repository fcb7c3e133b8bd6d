"""Dataset layout, validation and the deterministic, stratified train/val/test split.

Pure Python (no TensorFlow), so Airflow tasks can validate and stage a dataset cheaply and
both trainers read the *same* split manifest: the two models are evaluated on one test set.

Layout (tf_flowers): ``root/<class>/*.jpg|jpeg|png``, on local disk or ``gs://``.
Class names are sorted; a class's index is its position in that sorted list, everywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass, field

from dualml import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val", "test")
MANIFEST_VERSION = 1


class DatasetError(ValueError):
    """The dataset cannot be trained on; the message names what is wrong and how to fix it."""


def list_image_folder(root: str) -> dict[str, list[str]]:
    """Map each class (sub-folder name) to its sorted image files. Ignores non-image files."""
    root = root.rstrip("/")
    try:
        files = storage.list_files(root)
    except storage.StorageError as e:
        raise DatasetError(f"dataset location {root} not found: {e}") from e
    return group_by_class(root, files)


def group_by_class(root: str, files: list[str]) -> dict[str, list[str]]:
    """Group file URIs listed under ``root`` by class folder; stray and nested files are left out
    (:func:`skipped_entries` says which and why)."""
    return split_listing(root, files)[0]


MAX_LISTED_SKIPS = 50  # entries named in a report; the rest are counted


def split_listing(root: str, files: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(images per class, skipped) for files listed under ``root``.

    Only ``<root>/<class>/<image>.jpg|jpeg|png`` is used. ``skipped`` maps what is not, relative
    to ``root``, to the reason: each nested sub-folder once (``daisy/thumbs/``, with its file
    count: a class set that silently lost a folder is how a model changes without anyone
    noticing), and each other file (not an image, not in a class folder).
    """
    classes: dict[str, list[str]] = {}
    nested: dict[str, int] = {}
    skipped: dict[str, str] = {}
    prefix = root.rstrip("/") + "/"
    for f in files:
        rel = f[len(prefix) :] if f.startswith(prefix) else f
        parts = rel.split("/")
        if len(parts) > 2:
            folder = "/".join(parts[:2]) + "/"
            nested[folder] = nested.get(folder, 0) + 1
        elif len(parts) == 1:
            skipped[rel] = "not in a class folder (expected <class>/<image>)"
        elif not parts[1].lower().endswith(IMAGE_EXTENSIONS):
            skipped[rel] = f"not a {'/'.join(IMAGE_EXTENSIONS)} image"
        else:
            classes.setdefault(parts[0], []).append(f)
    for folder, n in nested.items():
        skipped[folder] = (f"nested folder ({n} file(s)) ignored: only <class>/<image> is used; move its images "
                           "into the class folder or make it a class of its own")
    return {c: sorted(v) for c, v in sorted(classes.items())}, dict(sorted(skipped.items()))


def skipped_entries(root: str, files: list[str]) -> dict[str, str]:
    """What :func:`group_by_class` leaves out, and why (see :func:`split_listing`)."""
    return split_listing(root, files)[1]


def summarize_skipped(skipped: dict[str, str], limit: int = MAX_LISTED_SKIPS) -> dict[str, str]:
    """At most ``limit`` entries, plus one ``"..."`` entry counting the rest (bounded XCom/summary size)."""
    if len(skipped) <= limit:
        return dict(skipped)
    out = dict(list(skipped.items())[:limit])
    out["..."] = f"and {len(skipped) - limit} more"
    return out


def inspect_image(data: bytes) -> tuple[dict | None, str | None]:
    """(``{"format", "width", "height", "bytes"}``, None) if ``data`` decodes as JPEG/PNG, else (None, reason)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return None, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("JPEG", "PNG"):
                return None, f"unsupported format {im.format} (use JPEG or PNG)"
            im.load()  # full decode: catches truncated files that verify() misses
            return {"format": im.format, "width": im.width, "height": im.height, "bytes": len(data)}, None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, f"not a readable image ({e})"


def check_image(data: bytes) -> str | None:
    """Return None if ``data`` decodes as a JPEG/PNG image, else the reason it does not."""
    return inspect_image(data)[1]


@dataclass
class ValidationReport:
    classes: dict[str, int]
    bad_files: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Images a prediction request cannot carry as they are (dualml.request_image resizes them).
    oversized: dict[str, str] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return sum(self.classes.values())


def validate(
    files_by_class: dict[str, list[str]],
    *,
    min_classes: int = 2,
    min_per_class: int = 3,
    max_bad_fraction: float = 0.0,
    read=storage.read_bytes,
) -> tuple[dict[str, list[str]], ValidationReport]:
    """Check a listed dataset; return the usable files per class and a report.

    Raises DatasetError for: fewer than ``min_classes`` classes, a class with fewer than
    ``min_per_class`` readable images (too few to put one in each split), or more unreadable
    images than ``max_bad_fraction`` tolerates (naming them). Tolerated bad files are dropped
    with a warning. Images larger than one online prediction request carries are listed in
    ``report.oversized`` (they train fine; clients and smoke tests must send them resized).
    """
    from dualml.request_image import serving_issue

    if not 0 <= max_bad_fraction < 1:
        raise DatasetError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
    if len(files_by_class) < min_classes:
        found = ", ".join(files_by_class) or "none"
        raise DatasetError(
            f"found {len(files_by_class)} class folder(s) with images ({found}); need at least "
            f"{min_classes}. Expected layout: <root>/<class_name>/<image>.jpg"
        )
    bad: dict[str, str] = {}
    oversized: dict[str, str] = {}
    good: dict[str, list[str]] = {}
    for cls, files in files_by_class.items():
        good[cls] = []
        for f in files:
            info, reason = inspect_image(read(f))
            if reason:
                bad[f] = reason
                continue
            good[cls].append(f)
            issue = serving_issue(info["width"], info["height"], info["bytes"], info["format"])
            if issue:
                oversized[f] = issue
    total = sum(len(v) for v in files_by_class.values())
    report = ValidationReport(classes={c: len(v) for c, v in good.items()}, bad_files=bad, oversized=oversized)
    if bad:
        listing = "; ".join(f"{f}: {r}" for f, r in list(bad.items())[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        if len(bad) > max_bad_fraction * total:
            raise DatasetError(
                f"{len(bad)} of {total} images are unreadable, above the tolerated "
                f"{max_bad_fraction:.0%}: {listing}{more}. Remove or re-export them, or raise max_bad_fraction."
            )
        report.warnings.append(f"skipping {len(bad)} unreadable image(s): {listing}{more}")
    if oversized:
        first = "; ".join(f"{f}: {r}" for f, r in list(oversized.items())[:3])
        more = f" (and {len(oversized) - 3} more)" if len(oversized) > 3 else ""
        report.warnings.append(
            f"{len(oversized)} image(s) are larger than an online prediction request carries: {first}{more}. "
            "They train as they are; endpoint clients must send them resized (dualml.request_image.prepare_image)."
        )
    small = {c: n for c, n in report.classes.items() if n < min_per_class}
    if small:
        desc = ", ".join(f"{c} ({n})" for c, n in small.items())
        raise DatasetError(
            f"class(es) with too few readable images for a train/val/test split: {desc}; "
            f"each class needs at least {min_per_class}. Add images or remove the class folder."
        )
    return good, report


@dataclass
class SplitManifest:
    """Which file is in which split, with the class order. Written as ``split.json``."""

    labels: list[str]
    seed: int
    fractions: dict[str, float]
    files: dict[str, list[tuple[str, int]]]  # split -> [(uri, class_index)]
    data_root: str = ""
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["files"] = {s: [[u, i] for u, i in v] for s, v in self.files.items()}
        d["fingerprint"] = self.fingerprint()
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> SplitManifest:
        d = json.loads(text)
        if d.get("version") != MANIFEST_VERSION:
            raise DatasetError(f"split manifest version {d.get('version')} is not {MANIFEST_VERSION}")
        d.pop("fingerprint", None)
        d["files"] = {s: [(u, int(i)) for u, i in v] for s, v in d["files"].items()}
        return cls(**d)

    def fingerprint(self) -> str:
        """Stable hash of the split's content (labels, files, assignment)."""
        h = hashlib.sha256(json.dumps([self.labels, self.files], sort_keys=True).encode())
        return h.hexdigest()[:16]

    def counts(self) -> dict[str, int]:
        return {s: len(v) for s, v in self.files.items()}


def stratified_split(
    files_by_class: dict[str, list[str]],
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
    data_root: str = "",
) -> SplitManifest:
    """Seeded per-class split: every class appears in every split in the same proportions.

    Deterministic: depends only on the sorted file names and the seed, not on listing order.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) "
            "and sum to less than 1"
        )
    labels = sorted(files_by_class)
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for idx, cls in enumerate(labels):
        files = sorted(files_by_class[cls])
        if len(files) < 3:
            raise DatasetError(f"class {cls!r} has {len(files)} image(s); a split needs at least 3")
        # One RNG per class, seeded by (seed, class) so adding a class does not reshuffle others.
        rng = random.Random(f"{seed}:{cls}")
        rng.shuffle(files)
        n = len(files)
        n_test = max(1, round(n * test_fraction))
        n_val = max(1, round(n * val_fraction))
        if n - n_test - n_val < 1:
            # Keep at least one image for train: shrink test too when it alone leaves < 2 (n >= 3).
            n_test = min(n_test, n - 2)
            n_val = n - n_test - 1
        out["test"] += [(f, idx) for f in files[:n_test]]
        out["val"] += [(f, idx) for f in files[n_test : n_test + n_val]]
        out["train"] += [(f, idx) for f in files[n_test + n_val :]]
    for s in SPLITS:
        out[s].sort()
    return SplitManifest(
        labels=labels,
        seed=seed,
        fractions={"val": val_fraction, "test": test_fraction},
        files=out,
        data_root=data_root,
    )


def labels_text(labels: list[str]) -> str:
    """``labels.txt``: one class name per line, line number = class index."""
    return "".join(f"{name}\n" for name in labels)


def parse_labels(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def content_fingerprint(entries: list[tuple[str, str]]) -> str:
    """Identity of a dataset's content: hash of sorted (relative path, content hash) pairs.

    Independent of where the data lives, so the same images uploaded twice (or to another
    prefix) are recognised as already trained on.
    """
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(f"{rel}\t{digest}\n".encode())
    return h.hexdigest()[:20]
