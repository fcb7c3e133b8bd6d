"""Deterministic synthetic flowers in the tf_flowers layout: ``root/<class>/<class>_NNNN.jpg``.

Five classes (daisy, dandelion, roses, sunflowers, tulips), each a flower with its own
colour scheme and petal shape on a random green/brown background, at a random position,
scale and rotation, with noise. Learnable by a small CNN trained from scratch in a few
epochs, so a correct pipeline scores far above chance (20 %) while a label-order bug
scores at or below it. ``python -m dualml.sample_data OUT [--per-class N] [--size PX]``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("daisy", "dandelion", "roses", "sunflowers", "tulips")

# (petal RGB, centre RGB, petal count, petal length factor, petal width factor)
_STYLE = {
    "daisy": ((245, 245, 240), (235, 190, 40), 14, 1.00, 0.16),
    "dandelion": ((250, 215, 30), (230, 180, 20), 30, 0.85, 0.07),
    "roses": ((200, 20, 45), (130, 10, 30), 6, 0.70, 0.55),
    "sunflowers": ((250, 170, 10), (90, 50, 20), 18, 0.85, 0.22),
    "tulips": ((210, 60, 170), (150, 30, 120), 3, 1.05, 0.70),
}


def _jitter(rgb, rng, amount=25):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def render(cls: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """One synthetic image of class ``cls`` drawn with ``rng`` (fully determined by it)."""
    petal, centre, n_petals, length, width = _STYLE[cls]
    # Background: noisy foliage/soil gradient.
    base = np.array(_jitter((70, 110, 50), rng, 40), dtype=np.float32)
    grad = np.linspace(0.7, 1.2, size, dtype=np.float32)[:, None, None]
    bg = base[None, None, :] * grad + rng.normal(0, 18, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    radius = size * rng.uniform(0.22, 0.36)
    cx = size * rng.uniform(0.35, 0.65)
    cy = size * rng.uniform(0.35, 0.65)
    rot = rng.uniform(0, 2 * math.pi)
    petal_rgb = _jitter(petal, rng)
    for k in range(n_petals):
        a = rot + 2 * math.pi * k / n_petals
        tip = (cx + math.cos(a) * radius * length, cy + math.sin(a) * radius * length)
        side = radius * width
        left = (cx + math.cos(a + math.pi / 2) * side, cy + math.sin(a + math.pi / 2) * side)
        right = (cx + math.cos(a - math.pi / 2) * side, cy + math.sin(a - math.pi / 2) * side)
        draw.polygon([left, tip, right], fill=petal_rgb)
    c = radius * (0.35 if cls != "tulips" else 0.5)
    draw.ellipse([cx - c, cy - c, cx + c, cy + c], fill=_jitter(centre, rng))
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 1.0))))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def generate(
    out_dir: str | Path,
    per_class: int = 60,
    size: int = 128,
    seed: int = 7,
    classes: tuple[str, ...] = CLASSES,
) -> dict[str, int]:
    """Write ``per_class`` JPEGs per class under ``out_dir``; same arguments -> same bytes."""
    out = Path(out_dir)
    counts = {}
    for ci, cls in enumerate(classes):
        if cls not in _STYLE:
            raise ValueError(f"unknown class {cls!r}; available: {', '.join(CLASSES)}")
        d = out / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, ci, i])
            render(cls, rng, size).save(d / f"{cls}_{i:04d}.jpg", format="JPEG", quality=90)
        counts[cls] = per_class
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    counts = generate(a.out_dir, a.per_class, a.size, a.seed)
    print(f"wrote {sum(counts.values())} images in {len(counts)} classes to {a.out_dir}")


if __name__ == "__main__":
    main()
