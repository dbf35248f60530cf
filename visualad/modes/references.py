"""References mode: each patch's distance to its nearest patch among a few normal images of the product.

The bank (:mod:`visualad.modes.bank` on torch, the export's arrays on onnxruntime) is built by the backend;
the mode asks the backend for the nearest-reference grid of a batch, upsampled and blurred like the head's
map, and takes its maximum as the image score. Measured on shared/data (docs/batch-zero-shot.md,
docs/modes.md): references alone beat the old fusion with the trained head.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from ..operating import normals_needed
from .base import NO_THRESHOLD, Scorer, register

NAME = "references"


def bank_grid(ops: Any, features: Dict[Any, Any], shots: int, queries: Dict[Any, Any], rs: Sequence[int],
              exclude: Optional[int] = None, half_candidates: bool = False) -> Any:
    """The nearest-reference search of both backends, over their kNN primitives (``ops``: :mod:`modes.knn` or
    :mod:`onnx.knn`): the mean nearest distance over the bank's keys and ``rs``, {key: [B, P, C]} -> [B, P].
    ``exclude`` leaves reference image ``exclude`` out (leave-one-out); with one reference, its own 3x3
    neighbourhood. ``half_candidates`` (torch only): pick the nearest candidates with a half product where the
    device has one (:func:`knn.nearest_similarities`)."""
    nearest = partial(ops.nearest_distance, half_candidates=True) if half_candidates else ops.nearest_distance
    total = None
    for key, q in queries.items():
        b, p, c = q.shape
        bank = features[key]
        if bank.shape[1] != c:
            raise ConfigError(f"the references hold features of size {bank.shape[1]}, the model gives {c}: they "
                              "come from another model; set the references again")
        if exclude is None:
            d = nearest(q, bank, rs).sum(0)
        elif shots > 1:
            d = nearest(q, ops.without_rows(bank, exclude * p, (exclude + 1) * p), rs).sum(0)
        else:
            d = ops.stack([ops.nearest_outside_neighbourhood(q[i], bank, rs).sum(0) for i in range(b)])
        total = d if total is None else total + d
    return total / (len(queries) * len(rs))


def own_queries(features: Dict[Any, Any], shots: int, index: int) -> Dict[Any, Any]:
    """Reference ``index``'s stored rows as a one-image batch of queries, {key: [1, P, C]} (either backend's
    arrays): a reference scored against the others needs no forward, its features are in the bank."""
    out = {}
    for key, rows in features.items():
        p = rows.shape[0] // shots
        out[key] = rows[index * p:(index + 1) * p][None]
    return out


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
        if self.exclude is None:
            return backend.grid_to_map(backend.references_grid(batch, self.bank))
        # a held-out reference (the batch is that image, matched by its digest): its features are the bank's
        return backend.grid_to_map(self.bank.grid(own_queries(self.bank.features, self.bank.shots, self.exclude),
                                                  exclude=self.exclude))

    def holdout(self, digest: str) -> "ReferencesMode":
        own = self.bank.digests.index(digest) if digest in self.bank.digests else None
        return self if own is None else ReferencesMode(self.bank, exclude=own)

    def why(self, n_images: int, head_trained: bool) -> str:
        return f"{self.bank.shots} normal reference image{'s' if self.bank.shots != 1 else ''} given"

    def next_step(self, labelled: bool, n_normal: Optional[int]) -> str:
        if not labelled:
            return NO_THRESHOLD
        needed = normals_needed(0.01)
        if n_normal is not None and n_normal < needed:
            return (f"more good parts make the threshold surer ({normals_needed(0.05)} or more set one for 5% "
                    f"false alarms, {needed} for 1%): --references with more, or visualad calibrate on a set of them")
        return "a whole lot of one product with no good parts at hand: --mode batch scores it against itself"

    def describe(self) -> Dict[str, Any]:
        return {"mode": NAME, "shots": self.bank.shots, "fingerprint": self.bank.fingerprint}
