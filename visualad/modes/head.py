"""Head mode: the trained tokens' cosine contrast (VisualAD's zero-shot map, the paper's method)."""
from __future__ import annotations

from typing import Tuple

import torch

from ..model import VisualAD

NAME = "head"


class HeadMode:
    """Scores a batch with the trained head: top-1% mean of the smoothed fused map (method doc §5)."""

    name = NAME

    def score(self, model: VisualAD, batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return model.predict_maps(batch)

    def describe(self) -> dict:
        return {"mode": NAME}
