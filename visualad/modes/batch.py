"""Batch mode (mutual scoring, MuSc): each image of an unlabeled set of one product is scored against the
other images of the same set. Anomalies are rare and local, so a normal patch finds a close match in other
images and an anomalous one does not. No training, no references.

Per image: the nearest-patch distance to each of ``compare_with`` other images (a seeded choice, so cost
grows linearly with the set), the interval average of the lowest 10%, the mean over blocks and r; then the
head's upsampling and blur, and the maximum as the image score. The comparison order is fixed by the
images' content (then the seed), so results do not depend on the order the images were given in.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError
from . import knn
from .choice import check_set_size

NAME = "batch"


class BatchMode:
    """Mutual scoring settings; :meth:`score_set` scores one set's features."""

    name = NAME

    def __init__(self, compare_with: int = 64, seed: int = 0, blocks: Optional[Sequence[int]] = None,
                 rs: Sequence[int] = knn.DEFAULT_R, fraction: float = knn.DEFAULT_FRACTION) -> None:
        if int(compare_with) < 1:
            raise ConfigError(f"compare_with must be >= 1, got {compare_with!r}")
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
        self.compare_with = int(compare_with)
        self.seed = int(seed)
        self.blocks = None if blocks is None else tuple(int(b) for b in blocks)
        self.rs = tuple(int(r) for r in rs)
        self.fraction = float(fraction)

    def blocks_for(self, depth: int) -> Tuple[int, ...]:
        return self.blocks or knn.blocks_for_depth(depth)

    def order(self, digests: Sequence[str]) -> List[int]:
        """The comparison order: sorted by content, then a seeded shuffle (independent of the input order)."""
        by_content = sorted(range(len(digests)), key=lambda i: (digests[i], i))
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(by_content), generator=g).tolist()
        return [by_content[p] for p in perm]

    def score_set(self, features: Dict[Tuple[int, int], torch.Tensor], digests: Sequence[str]) -> torch.Tensor:
        """Unit features per (block, r), each [N, P, C] in input order -> patch-grid maps [N, g, g]."""
        n = len(digests)
        check_set_size(n)
        order = torch.tensor(self.order(digests))
        total = None
        for f in features.values():
            d = knn.mutual_distances(f, self.compare_with, order=order)
            s = knn.interval_average(d, self.fraction)
            total = s if total is None else total + s
        grid_in_order = total / len(features)
        out = torch.empty_like(grid_in_order)
        out[order.to(out.device)] = grid_in_order
        g = int(round(math.sqrt(out.shape[1])))
        return out.view(n, g, g)

    def describe(self) -> dict:
        return {"mode": NAME, "compare_with": self.compare_with, "seed": self.seed}
