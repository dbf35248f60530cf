"""Which images of a set meet which in mutual scoring: shared by the torch core and the ONNX runtime's NumPy
core (no torch here)."""
from __future__ import annotations

from typing import Tuple


def partner_offsets(n: int, compare_with: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Cyclic offsets d: image p is compared with p + d and p - d (``both``) and p + d (``forward``), so each
    image meets exactly ``min(compare_with, n - 1)`` others and each unordered pair is computed once."""
    m = min(int(compare_with), n - 1)
    half = m // 2
    both = tuple(range(1, half + 1))
    forward = (half + 1,) if m % 2 else ()
    return both, forward
