"""Batch mode (mutual scoring, MuSc): each image of an unlabeled set of one product is scored against the
other images of the same set. Anomalies are rare and local, so a normal patch finds a close match in other
images and an anomalous one does not. No training, no references.

Per image: the nearest-patch distance to each of ``compare_with`` other images (a seeded choice, so cost
grows linearly with the set), the interval average of the lowest 10%, the mean over blocks and r; then the
head's upsampling and blur, and the maximum as the image score. The comparison order is fixed by the
images' content (then the seed), so results do not depend on the order the images were given in.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError
from . import partners
from .base import NO_THRESHOLD, Scorer, register
from .choice import MAX_SET, WARN_BELOW, check_set_size

NAME = "batch"


@register
class BatchMode(Scorer):
    """Mutual scoring settings; :meth:`score_set` scores one set's features."""

    name = NAME
    kind = "set"

    def __init__(self, compare_with: int = 64, seed: int = 0, blocks: Optional[Sequence[int]] = None,
                 rs: Sequence[int] = partners.DEFAULT_R, fraction: float = partners.DEFAULT_FRACTION,
                 max_set: int = MAX_SET) -> None:
        if int(compare_with) < 1:
            raise ConfigError(f"compare_with must be >= 1, got {compare_with!r}")
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
        if int(max_set) < WARN_BELOW:
            raise ConfigError(f"max_set must be >= {WARN_BELOW}, got {max_set!r}")
        #: the most images scored as one set; a longer input is split into sets in input order
        #: (:func:`visualad.runtime.pipeline.run`), none of fewer than ``max_set / 4`` images
        self.max_set = int(max_set)
        self.compare_with = int(compare_with)
        self.seed = int(seed)
        self.blocks = None if blocks is None else tuple(int(b) for b in blocks)
        self.rs = tuple(int(r) for r in rs)
        self.fraction = float(fraction)

    @classmethod
    def from_settings(cls, *, references: Any = None, compare_with: int = 64, seed: int = 0) -> "BatchMode":
        return cls(compare_with=compare_with, seed=seed)

    def blocks_for(self, depth: int) -> Tuple[int, ...]:
        return self.blocks or partners.blocks_for_depth(depth)

    def order(self, digests: Sequence[str]) -> List[int]:
        """The comparison order: sorted by content, then a seeded shuffle (independent of the input order)."""
        return partners.comparison_order(digests, self.seed)

    def score_set(self, backend: Any, features: Dict[int, Any], digests: Sequence[str]) -> Any:
        """Layer-normed rows per block, each [N, P, C] in input order -> patch-grid maps [N, P]: the mean over
        blocks and r (the backend's arrays; its ``knn`` core computes)."""
        check_set_size(len(digests))
        order = self.order(digests)
        ops = backend.knn
        # the interval average: the mean of each patch's k lowest distances, all the core keeps of them
        k = partners.interval_count(min(self.compare_with, len(digests) - 1), self.fraction)
        total = None
        for f in features.values():
            s = ops.mutual_distances(f, self.compare_with, self.rs, order=order, keep=k).mean(-2).sum(0)
            total = s if total is None else total + s
        return ops.unpermute(total / (len(features) * len(self.rs)), order)

    def why(self, n_images: int, head_trained: bool) -> str:
        sets = f" in sets of at most {self.max_set}" if n_images > self.max_set else ""
        return (f"{n_images} images scored against each other{sets}; it assumes that defects are local and on a "
                "minority of them")

    def next_step(self, labelled: bool, n_normal: Optional[int]) -> str:
        step = "new parts one at a time: give a few good parts (--references DIR)"
        return step if labelled else f"{NO_THRESHOLD}; {step}"

    def describe(self) -> Dict[str, Any]:
        return {"mode": NAME, "compare_with": self.compare_with, "seed": self.seed}
