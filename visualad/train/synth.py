"""Synthetic anomalies with pixel masks, for auxiliary sets that hold only normal images.

The paper's losses need anomalous images with masks (issue #10 of the official repo: training on normal
images alone does not work). When a set has none, each normal image is, with probability 1/2, turned into
an anomalous one by one of two well-known recipes, implemented here in NumPy:

- **CutPaste** (Li et al., CVPR 2021): a random rectangle cut from the same or another normal image,
  colour-jittered and flipped, pasted at another place; the mask is the rectangle.
- **Perlin texture blend** (DRAEM, Zavrtanik et al., ICCV 2021): a thresholded Perlin-noise mask in which a
  texture (another training image, or a patch-shuffled, colour-jittered copy of the image) is blended in
  with opacity ``beta`` drawn from [0.1, 1).

Everything is driven by a NumPy ``Generator`` seeded by ``(seed, epoch, index)`` (:func:`sample_rng`), so an
image's augmentation does not depend on the order in which images are drawn: a resumed run sees exactly the
same data as an uninterrupted one.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np

TextureSource = Callable[[np.random.Generator], Optional[np.ndarray]]

PERLIN_THRESHOLD = 0.5  # DRAEM's threshold on the noise
MAX_PERLIN_LOG2_SCALE = 6  # lattice resolutions 2^0 .. 2^5 per axis, as DRAEM
CUTPASTE_AREA = (0.02, 0.15)  # of the image (CutPaste paper)
CUTPASTE_ASPECT = (0.3, 3.3)
BETA_RANGE = (0.1, 1.0)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one (seed, epoch, image): independent of every other draw."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), 0x5EED])


def perlin_noise(shape: Tuple[int, int], res: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise of ``shape`` with ``res`` lattice cells per axis, values in about [-1, 1].

    Random unit gradients on a (res+1)^2 lattice, quintic fade ``6t^5 - 15t^4 + 10t^3``, bilinear blend of
    the four corner dot products; ``res`` need not divide ``shape``.
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(ry + 1, rx + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    ys = np.arange(h, dtype=np.float64) * ry / h
    xs = np.arange(w, dtype=np.float64) * rx / w
    yi, xi = ys.astype(np.int64), xs.astype(np.int64)
    yf, xf = ys - yi, xs - xi

    def corner(dy: int, dx: int) -> np.ndarray:
        iy, ix = (yi + dy)[:, None], (xi + dx)[None, :]
        return gy[iy, ix] * (yf[:, None] - dy) + gx[iy, ix] * (xf[None, :] - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)

    u, v = fade(yf)[:, None], fade(xf)[None, :]
    top = corner(0, 0) * (1.0 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1.0 - v) + corner(1, 1) * v
    return np.sqrt(2.0) * (top * (1.0 - u) + bottom * u)


def perlin_mask(size: int, rng: np.random.Generator, tries: int = 8) -> Optional[np.ndarray]:
    """A non-empty thresholded Perlin mask [size, size] (random scales, flips), or None after ``tries``."""
    max_log2 = max(1, min(MAX_PERLIN_LOG2_SCALE, int(np.log2(max(2, size // 2))) + 1))
    for _ in range(tries):
        res = (2 ** int(rng.integers(0, max_log2)), 2 ** int(rng.integers(0, max_log2)))
        noise = perlin_noise((size, size), res, rng)
        noise = _random_flip(noise, rng)
        mask = noise > PERLIN_THRESHOLD
        if mask.any() and not mask.all():
            return mask
    return None


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.4) -> np.ndarray:
    """Brightness, contrast and per-channel gain jitter of a uint8 image (float math, clipped)."""
    x = image.astype(np.float32)
    x = x * rng.uniform(1.0 - strength, 1.0 + strength)  # brightness
    mean = x.mean()
    x = (x - mean) * rng.uniform(1.0 - strength, 1.0 + strength) + mean  # contrast
    x = x * rng.uniform(1.0 - strength / 2, 1.0 + strength / 2, size=(1, 1, 3))  # colour
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def shuffled_texture(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image cut into a k x k grid of blocks, blocks permuted and colour-jittered: a texture that keeps
    the image's own statistics but none of its structure."""
    size = image.shape[0]
    k = int(rng.integers(2, 9))
    edges = np.linspace(0, size, k + 1).astype(int)
    out = image.copy()
    order = rng.permutation(k * k)
    for dst, src in enumerate(order):
        dy, dx = divmod(dst, k)
        sy, sx = divmod(int(src), k)
        h = min(edges[dy + 1] - edges[dy], edges[sy + 1] - edges[sy])
        w = min(edges[dx + 1] - edges[dx], edges[sx + 1] - edges[sx])
        block = image[edges[sy]:edges[sy] + h, edges[sx]:edges[sx] + w]
        out[edges[dy]:edges[dy] + h, edges[dx]:edges[dx] + w] = _random_flip(block, rng)
    return color_jitter(out, rng)


def cutpaste(image: np.ndarray, rng: np.random.Generator, source: Optional[np.ndarray] = None
             ) -> Tuple[np.ndarray, np.ndarray]:
    """Paste a jittered rectangle of ``source`` (default: the image itself) at a random place.

    Returns (image uint8 [S, S, 3], mask bool [S, S]); the mask is never empty.
    """
    size = image.shape[0]
    src = image if source is None else source
    area = rng.uniform(*CUTPASTE_AREA) * size * size
    aspect = float(np.exp(rng.uniform(np.log(CUTPASTE_ASPECT[0]), np.log(CUTPASTE_ASPECT[1]))))
    h = int(np.clip(round(np.sqrt(area * aspect)), 1, size - 1))
    w = int(np.clip(round(np.sqrt(area / aspect)), 1, size - 1))
    sy, sx = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    patch = color_jitter(src[sy:sy + h, sx:sx + w], rng)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1]
    ty, tx = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    out = image.copy()
    out[ty:ty + h, tx:tx + w] = patch
    mask = np.zeros((size, size), dtype=bool)
    mask[ty:ty + h, tx:tx + w] = True
    return out, mask


def perlin_blend(image: np.ndarray, rng: np.random.Generator, texture: np.ndarray
                 ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """DRAEM-style blend: ``image·(1-m) + ((1-β)·image + β·texture)·m`` with a Perlin mask m, β in [0.1, 1).

    Returns None when no non-empty mask could be drawn (the caller falls back to CutPaste).
    """
    mask = perlin_mask(image.shape[0], rng)
    if mask is None:
        return None
    beta = rng.uniform(*BETA_RANGE)
    img = image.astype(np.float32)
    tex = texture.astype(np.float32)
    blended = (1.0 - beta) * img + beta * tex
    out = np.where(mask[..., None], blended, img)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), mask


def synthesize(image: np.ndarray, rng: np.random.Generator, other: Optional[TextureSource] = None,
               normal_fraction: float = 0.5) -> Tuple[np.ndarray, np.ndarray, str]:
    """Keep a normal image as is (probability ``normal_fraction``) or give it a synthetic anomaly.

    image: uint8 [S, S, 3] (already at the model's size); ``other(rng)`` returns another normal training image
    at the same size (or None). Returns (image, mask bool [S, S], kind) with kind in
    ``"normal" | "cutpaste" | "perlin"``; an anomalous result always has a non-empty mask.
    """
    size = image.shape[0]
    if rng.random() < normal_fraction:
        return image, np.zeros((size, size), dtype=bool), "normal"
    use_other = other is not None and rng.random() < 0.5
    src = other(rng) if use_other else None
    if rng.random() < 0.5:
        out, mask = cutpaste(image, rng, source=src)
        return out, mask, "cutpaste"
    texture = _random_flip(src, rng) if src is not None else shuffled_texture(image, rng)
    result = perlin_blend(image, rng, texture)
    if result is None:
        out, mask = cutpaste(image, rng, source=src)
        return out, mask, "cutpaste"
    return result[0], result[1], "perlin"


def _random_flip(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the 8 symmetries of the square (for square arrays; flips only otherwise)."""
    if a.shape[0] == a.shape[1] and rng.random() < 0.5:
        a = np.swapaxes(a, 0, 1)
    if rng.random() < 0.5:
        a = a[::-1]
    if rng.random() < 0.5:
        a = a[:, ::-1]
    return np.ascontiguousarray(a)
