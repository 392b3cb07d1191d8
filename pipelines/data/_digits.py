"""Synthetic digits: 28x28 renders of a 5x7 bitmap font with random affine jitter.

Each image is a digit glyph whose "on" font pixels are soft disks (stroke thickness =
disk radius), drawn through a random affine map (scale, rotation, shear, translation),
with random ink level and additive Gaussian noise, clipped to [0, 1]. Everything is drawn
from one numpy Generator, so (seed, split) fixes every byte. The MLP must learn real
invariances; it is no MNIST, but a 784-1024-1024-10 net has work to do.

Shape legend: N images, G = 784 grid points, K on-pixels of a glyph.
"""

import numpy as np

SIDE = 28
FONT = {
    0: (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    1: ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    2: (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    3: ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    4: ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    5: ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    6: ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    7: ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    8: (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    9: (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}


def _glyph_points(digit: int) -> np.ndarray:
    """(K, 2) centred font coordinates (x right, y down) of the glyph's on-pixels."""
    rows = FONT[digit]
    pts = [
        (c - 2.0, r - 3.0) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch == "#"
    ]
    return np.array(pts, dtype=np.float32)


_GRID = np.stack(
    np.meshgrid(np.arange(SIDE) - (SIDE - 1) / 2, np.arange(SIDE) - (SIDE - 1) / 2), axis=-1
).reshape(-1, 2)


def render_digits(rng: np.random.Generator, n: int, noise: float, chunk: int = 1024):
    """(images (n, 784) float32 in [0, 1], labels (n,) int64) drawn from `rng`."""
    labels = rng.integers(0, 10, size=n)
    scale = rng.uniform(2.4, 3.3, size=n)  # pixels per font unit
    angle = rng.uniform(-0.25, 0.25, size=n)  # radians
    shear = rng.uniform(-0.3, 0.3, size=n)
    shift = rng.uniform(-2.0, 2.0, size=(n, 2))  # pixels
    radius = rng.uniform(0.5, 0.85, size=n)  # stroke half-width, font units
    ink = rng.uniform(0.7, 1.0, size=n)
    images = np.empty((n, SIDE * SIDE), dtype=np.float32)
    # Inverse affine per image: font = M^-1 (pixel - shift), M = scale * R(angle) @ Shear.
    c, s = np.cos(angle), np.sin(angle)
    m = np.empty((n, 2, 2))
    m[:, 0, 0] = c
    m[:, 0, 1] = c * shear - s
    m[:, 1, 0] = s
    m[:, 1, 1] = s * shear + c
    m *= scale[:, None, None]
    inv = np.linalg.inv(m)
    for digit in range(10):
        pts = _glyph_points(digit)  # (K, 2)
        idx = np.flatnonzero(labels == digit)
        for lo in range(0, idx.size, chunk):
            sel = idx[lo : lo + chunk]
            rel = (_GRID[None, :, :] - shift[sel, None, :]).astype(np.float32)  # (N, G, 2)
            font = np.matmul(rel, inv[sel].transpose(0, 2, 1).astype(np.float32))
            # |f - p|^2 = |f|^2 - 2 f.p + |p|^2, the cross term one (N*G, 2) @ (2, K) matmul
            d2 = (font * font).sum(-1, keepdims=True) - 2 * (font @ pts.T) + (pts * pts).sum(1)
            dist = np.sqrt(np.maximum(d2.min(axis=2), 0.0))  # (N, G)
            # soft edge of width ~1/3 font unit around the stroke radius
            val = np.clip((radius[sel, None] - dist) * 3.0 + 0.5, 0.0, 1.0)
            images[sel] = val * ink[sel, None]
    if noise > 0:
        images += rng.normal(0.0, noise, size=images.shape).astype(np.float32)
        np.clip(images, 0.0, 1.0, out=images)
    return images, labels.astype(np.int64)


def make_triplets(rng: np.random.Generator, labels: np.ndarray, n: int) -> np.ndarray:
    """(n, 3) int64 rows (anchor, positive, negative): same class, same, different."""
    by_class = [np.flatnonzero(labels == k) for k in range(10)]
    anchor_cls = rng.integers(0, 10, size=n)
    neg_cls = (anchor_cls + rng.integers(1, 10, size=n)) % 10
    out = np.empty((n, 3), dtype=np.int64)
    for k in range(10):
        pool = by_class[k]
        sel = np.flatnonzero(anchor_cls == k)
        a = rng.integers(0, pool.size, size=sel.size)
        # positive: a different member of the class (offset 1..size-1 from the anchor)
        p = (a + rng.integers(1, max(pool.size, 2), size=sel.size)) % pool.size
        out[sel, 0] = pool[a]
        out[sel, 1] = pool[p]
        sel_neg = np.flatnonzero(neg_cls == k)
        out[sel_neg, 2] = pool[rng.integers(0, pool.size, size=sel_neg.size)]
    return out
