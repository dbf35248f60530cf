"""The torch-free half of the nearest-neighbour core, shared by the torch core (:mod:`visualad.modes.knn`) and
the ONNX runtime's NumPy core: which features (blocks, r, the interval fraction), which images of a set meet
which, and in which order. One definition, so both backends score every set size alike."""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np

#: the feature block as a fraction of the backbone's depth: 7 of 12 on DINOv2-S (measured best of 3..12 on
#: shared/data, docs/batch-zero-shot.md); a fraction so that deeper backbones get a block at the same depth
DEFAULT_BLOCK_FRACTIONS: Tuple[float, ...] = (7 / 12,)
DEFAULT_R: Tuple[int, ...] = (1, 3)
#: the interval average: the mean of the lowest fraction of an image's distances to the other images
DEFAULT_FRACTION = 0.1


def blocks_for_depth(depth: int, fractions: Sequence[float] = DEFAULT_BLOCK_FRACTIONS) -> Tuple[int, ...]:
    """1-based block indices at these fractions of ``depth`` (12 -> 7; 24 -> 14), increasing, distinct."""
    return tuple(sorted({min(depth, max(1, int(round(f * depth)))) for f in fractions}))


def grid_side(n: int) -> int:
    """The side of a square grid of ``n`` patches (a ValueError for any other count)."""
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"{n} patches do not form a square grid")
    return g


def interval_count(m: int, fraction: float) -> int:
    """How many of a patch's M distances the interval average keeps: the lowest ``max(1, floor(fraction * M))``."""
    return max(1, int(math.floor(fraction * m)))


def partner_offsets(n: int, compare_with: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Cyclic offsets d: image p is compared with p + d and p - d (``both``) and p + d (``forward``), so each
    image meets exactly ``min(compare_with, n - 1)`` others and each unordered pair is computed once."""
    m = min(int(compare_with), n - 1)
    half = m // 2
    both = tuple(range(1, half + 1))
    forward = (half + 1,) if m % 2 else ()
    return both, forward


def comparison_order(digests: Sequence[str], seed: int) -> List[int]:
    """The order in which a set's images meet their partners: sorted by content (so the input order does not
    matter), then a seeded shuffle (NumPy's PCG64, the same on every backend and machine)."""
    by_content = sorted(range(len(digests)), key=lambda i: (digests[i], i))
    perm = np.random.default_rng(int(seed)).permutation(len(by_content))
    return [by_content[int(p)] for p in perm]
