"""Head mode: the trained tokens' cosine contrast (VisualAD's zero-shot map, the paper's method)."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from .base import Scorer, register

NAME = "head"


@register
class HeadMode(Scorer):
    """Scores a batch with the trained head: top-1% mean of the smoothed fused map (method doc §5)."""

    name = NAME
    kind = "images"

    def score(self, backend: Any, batch: Any) -> Tuple[np.ndarray, np.ndarray]:
        return backend.head_maps(batch)

    def next_step(self, labelled: bool, n_normal: Optional[int]) -> str:
        return ("the head transfers poorly to products it never saw: give a few good parts (--references DIR) or "
                "a whole lot of one product at once (--mode batch)")

    def why(self, n_images: int, head_trained: bool) -> str:
        return "the trained head" if head_trained else "an untrained head, as asked"
