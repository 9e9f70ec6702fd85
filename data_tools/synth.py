"""A deterministic synthetic 10-class 28x28 image data set, written as MNIST-style idx files.

Each class is a stroke figure drawn with anti-aliased distance fields, randomly rotated
(±14 degrees), scaled, shifted (up to ±4 px), with random stroke width and contrast, and
overlaid with up to two stray strokes and pixel noise (a stray stroke across a bar can make it
look like a plus, so the classes overlap a little). The classes differ in shape, not position,
so a linear model, which cannot undo the shifts, does far worse than an MLP: with the default
sizes (20,000 / 4,000, seed 0), softmax regression reaches about 50% test accuracy and a
784-256-10 ReLU MLP (Adam, 15 epochs) about 95%. ``CLASS_NAMES`` lists the classes.

Train and test come from independent streams of ``default_rng([seed, split])``, so the train
set does not depend on the test size. Class counts are balanced (they differ by at most one).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .idx import IDX_FILES, write_idx

CLASS_NAMES = [
    "hbar",      # horizontal bar
    "vbar",      # vertical bar
    "slash",     # /
    "backslash", # \
    "ring",
    "plus",
    "cross",     # x
    "blob",      # filled ellipse
    "equals",    # two parallel bars
    "triangle",  # outline
]
SIZE = 28
# difficulty knobs (tuned so an MLP reaches the mid 90s and a linear model far less)
ANGLE = 0.25  # rotation jitter, radians (about ±14 degrees)
SHIFT = 0.3  # shift jitter, unit coordinates (1 px = 2/28, so about ±4 px)
STRAYS = 2  # at most this many stray strokes per image
STRAY_P = 0.6  # probability of each
STRAY_LEN = (0.12, 0.35)  # half-length range (the figures' bars are 0.4-0.7)
NOISE = 0.15  # pixel noise sigma

# canonical figures in unit coordinates ([-1, 1] spans the image); segments as (x0, y0, x1, y1)
_D = 0.6 / np.sqrt(2)
_SEGMENTS: dict[int, list[tuple[float, float, float, float]]] = {
    0: [(-0.6, 0, 0.6, 0)],
    1: [(0, -0.6, 0, 0.6)],
    2: [(-_D, _D, _D, -_D)],
    3: [(-_D, -_D, _D, _D)],
    5: [(-0.5, 0, 0.5, 0), (0, -0.5, 0, 0.5)],
    6: [(-0.38, -0.38, 0.38, 0.38), (-0.38, 0.38, 0.38, -0.38)],
    8: [(-0.55, -0.28, 0.55, -0.28), (-0.55, 0.28, 0.55, 0.28)],
    9: [(-0.55, 0.4, 0.55, 0.4), (0.55, 0.4, 0, -0.5), (0, -0.5, -0.55, 0.4)],
}


def _seg_dist(px, py, x0, y0, x1, y1):
    """Distance from points (px, py) to segments (x0, y0)-(x1, y1); all broadcast."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((px - x0) * dx + (py - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(px - x0 - t * dx, py - y0 - t * dy)


def render(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one image per label; returns uint8 (N, 28, 28)."""
    n = labels.shape[0]
    g = (np.arange(SIZE) + 0.5) / SIZE * 2 - 1  # pixel centres in [-1, 1]
    gx, gy = g[None, None, :], g[None, :, None]

    def col(a):
        return a[:, None, None]

    px = 2.0 / SIZE  # one pixel in unit coordinates

    angle = col(rng.uniform(-ANGLE, ANGLE, n))
    scale = col(rng.uniform(0.65, 1.15, n))
    shift = rng.uniform(-SHIFT, SHIFT, (2, n))
    width = col(rng.uniform(0.6, 1.6, n)) * px  # half stroke width
    # pixel -> figure coordinates: undo shift, rotation and scale
    x, y = gx - col(shift[0]), gy - col(shift[1])
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * x + s * y) / scale, (-s * x + c * y) / scale

    dist = np.empty((n, SIZE, SIZE))
    for k in range(len(CLASS_NAMES)):
        m = labels == k
        if not m.any():
            continue
        uk, vk = u[m], v[m]
        if k in _SEGMENTS:
            d = np.min([_seg_dist(uk, vk, *seg) for seg in _SEGMENTS[k]], axis=0)
        elif k == 4:  # ring, slightly elliptic
            r = col(rng.uniform(0.35, 0.55, m.sum()))
            asp = col(rng.uniform(0.75, 1.0, m.sum()))
            d = np.abs(np.hypot(uk, vk / asp) - r)
        else:  # 7: filled ellipse, distance 0 inside
            r = col(rng.uniform(0.25, 0.42, m.sum()))
            asp = col(rng.uniform(0.6, 1.0, m.sum()))
            d = np.maximum(np.hypot(uk, vk / asp) - r, 0.0)
        dist[m] = d * scale[m]  # back to image units
    img = np.clip((width - dist) / px + 0.5, 0.0, 1.0)

    # a stray stroke on most images, anywhere, any angle, shorter than the figures
    for _ in range(STRAYS):
        stray = rng.random(n) < STRAY_P
        cx, cy = rng.uniform(-0.7, 0.7, (2, n))
        a = rng.uniform(0, np.pi, n)
        h = rng.uniform(*STRAY_LEN, n)
        d = _seg_dist(gx, gy, col(cx - h * np.cos(a)), col(cy - h * np.sin(a)),
                      col(cx + h * np.cos(a)), col(cy + h * np.sin(a)))
        img = np.maximum(img, np.clip((width - d) / px + 0.5, 0.0, 1.0) * col(stray * 0.8))

    img = img * col(rng.uniform(0.55, 1.0, n)) + rng.normal(0.0, NOISE, img.shape)
    return np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def balanced_labels(n: int, rng: np.random.Generator, num_classes: int = 10) -> np.ndarray:
    """``n`` labels with per-class counts differing by at most one, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.uint8)


def make_split(n: int, seed: int, split_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28) uint8 and labels (n,) uint8 of one split."""
    rng = np.random.default_rng([seed, split_id])
    labels = balanced_labels(n, rng)
    images = np.empty((n, SIZE, SIZE), dtype=np.uint8)
    for a in range(0, n, 4096):  # bounded memory: float64 temporaries per block
        images[a : a + 4096] = render(labels[a : a + 4096], rng)
    return images, labels


def write_synth(out: str | os.PathLike, n_train: int = 20000, n_test: int = 4000, seed: int = 0,
                compress: bool = False) -> list[Path]:
    """Write the four idx files (plus classes.txt) to ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n, sid in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = make_split(n, seed, sid)
        for kind, arr in (("images", images), ("labels", labels)):
            p = out / (IDX_FILES[(split, kind)] + (".gz" if compress else ""))
            write_idx(p, arr, compress=compress)
            paths.append(p)
    (out / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return paths
