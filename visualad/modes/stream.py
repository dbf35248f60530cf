"""Batch mode over a rolling window, for line cameras: each new image is scored against the last ``window``
unlabeled images of the same product (the mutual-scoring function of :mod:`visualad.modes.batch`, with the
set replaced by the recent past).

The first ``warmup`` images are held back and scored against each other as one set (they have no past);
after that every image is scored as it arrives. Cost per image after warm-up: one backbone forward to the
feature block plus ``window`` image-to-image patch products per r (docs/modes.md has the measured figures).
Results are recorded as batch mode (``describe()`` adds the window), so batch-mode thresholds apply.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError
from . import partners
from .base import Scorer, register
from .batch import NAME, BatchMode
from .choice import MIN_IMAGES

Features = Dict[int, Any]  # block -> [P, C] layer-normed rows of one image (the backend's arrays)


@register
class StreamMode(Scorer):
    """Rolling-window state: :meth:`feed` takes one image's features and returns the grids now ready.
    Registered as "stream" (``det.stream``); its results are recorded as batch mode."""

    name = "stream"
    kind = "stream"
    selectable = False

    def __init__(self, window: int = 64, warmup: int = 16, seed: int = 0, blocks: Optional[Sequence[int]] = None,
                 rs: Sequence[int] = partners.DEFAULT_R, fraction: float = partners.DEFAULT_FRACTION) -> None:
        if int(window) < MIN_IMAGES - 1:
            raise ConfigError(f"window must be >= {MIN_IMAGES - 1}, got {window!r}")
        if int(warmup) < MIN_IMAGES:
            raise ConfigError(f"warmup must be >= {MIN_IMAGES} (the fewest images batch mode scores), got {warmup!r}")
        self.window, self.warmup = int(window), int(warmup)
        self._set = BatchMode(compare_with=self.window, seed=seed, blocks=blocks, rs=rs, fraction=fraction)
        self._past: Deque[Features] = deque(maxlen=self.window)
        self._held: List[Tuple[Features, str]] = []

    @property
    def rs(self) -> Tuple[int, ...]:
        return self._set.rs

    def blocks_for(self, depth: int) -> Tuple[int, ...]:
        return self._set.blocks_for(depth)

    def feed(self, backend: Any, features: Features, digest: str) -> List[Any]:
        """Grids [P] of the images now scored, in arrival order: none while warming up, then the held
        images at once, then one per image."""
        if self._past:  # warmed up (the held images moved to the past)
            grid = self._against_past(backend, features)
            self._past.append(features)
            return [grid]
        self._held.append((features, digest))
        return self.flush(backend) if len(self._held) >= self.warmup else []

    def flush(self, backend: Any) -> List[Any]:
        """Score the held images as one set (the end of a stream shorter than the warm-up)."""
        if not self._held:
            return []
        held, self._held = self._held, []
        keys = list(held[0][0])
        grids = self._set.score_set(backend, {k: backend.knn.stack([f[k] for f, _ in held]) for k in keys},
                                    [d for _, d in held])
        self._past.extend(f for f, _ in held)
        return list(grids)

    def _against_past(self, backend: Any, features: Features) -> Any:
        ops = backend.knn
        total = None
        for key, f in features.items():
            d = ops.distances_to_images(f, ops.stack([p[key] for p in self._past]), self.rs)  # [R, W, P]
            s = ops.interval_average(d, self._set.fraction).sum(0)
            total = s if total is None else total + s
        return total / (len(features) * len(self.rs))

    def describe(self) -> Dict[str, Any]:
        return {"mode": NAME, "window": self.window, "warmup": self.warmup, "seed": self._set.seed}
