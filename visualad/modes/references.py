"""References mode: each patch's distance to its nearest patch among a few normal images of the product.

The bank (:mod:`visualad.modes.bank` on torch, the export's arrays on onnxruntime) is built by the backend;
the mode asks the backend for the nearest-reference grid of a batch, upsampled and blurred like the head's
map, and takes its maximum as the image score. Measured on shared/data (docs/batch-zero-shot.md,
docs/modes.md): references alone beat the old fusion with the trained head.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import ConfigError
from .base import Scorer, register

NAME = "references"


@register
class ReferencesMode(Scorer):
    """Scores a batch against a bank (``shots``, ``digests``, ``fingerprint``); ``exclude`` leaves one
    reference out (leave-one-out)."""

    name = NAME
    kind = "images"

    def __init__(self, bank: Any, exclude: Optional[int] = None) -> None:
        self.bank = bank
        self.exclude = exclude

    @classmethod
    def from_settings(cls, *, references: Any = None, compare_with: int = 64, seed: int = 0) -> "ReferencesMode":
        if references is None:
            raise ConfigError("mode='references' needs reference images: det.set_references(normal_images) "
                              "or predict(..., references=normal_images)")
        return cls(references)

    def score(self, backend: Any, batch: Any) -> Tuple[np.ndarray, np.ndarray]:
        return backend.grid_to_map(backend.references_grid(batch, self.bank, self.exclude))

    def holdout(self, digest: str) -> "ReferencesMode":
        own = self.bank.digests.index(digest) if digest in self.bank.digests else None
        return self if own is None else ReferencesMode(self.bank, exclude=own)

    def why(self, n_images: int, head_trained: bool) -> str:
        return "normal reference images are set"

    def describe(self) -> Dict[str, Any]:
        return {"mode": NAME, "shots": self.bank.shots, "fingerprint": self.bank.fingerprint}
