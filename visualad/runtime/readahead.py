"""Bounded read-ahead: decode and resize inputs in threads, a fixed number in flight whatever the input count.

Why: a folder of a million files must run in constant memory, and decoding (PIL) overlaps the forward of the
previous batch. An input's full-size pixels are dropped once resized unless the caller keeps them.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Deque, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from ..data import images as imio
from ..errors import VisualADError


@dataclass
class Loaded:
    """One input after decoding: its square model-size pixels, or the error that stopped it."""

    index: int
    path: Optional[str]
    height: int = 0
    width: int = 0
    square: Optional[np.ndarray] = None  # (S, S, 3) uint8
    image: Optional[np.ndarray] = None  # the full-size RGB pixels, only when kept
    error: Optional[VisualADError] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def load_one(index: int, item: Any, size: int, keep_image: bool, on_error: str = "return",
             label: str = "input") -> Loaded:
    """Decode and resize one input; a :class:`VisualADError` becomes ``Loaded.error`` unless ``on_error="raise"``."""
    is_path = isinstance(item, (str, os.PathLike))
    path = os.fspath(item) if is_path else None
    try:
        img = imio.load_image(item, name=None if is_path else f"<{label} {index}>")
        return Loaded(index, img.path, img.height, img.width, imio.resize_to_square(img.array, size),
                      img.array if keep_image else None)
    except VisualADError as exc:
        if on_error == "raise":
            raise
        return Loaded(index, path, error=exc)


def read_ahead(items: Iterable[Any], size: int, *, keep_image: bool = False, on_error: str = "return",
               in_flight: int = 16, workers: int = 0, label: str = "input") -> Iterator[Loaded]:
    """Yield :class:`Loaded` inputs in order, with at most ``in_flight`` decoded or decoding at once."""
    if on_error not in ("raise", "return"):
        raise ValueError("on_error must be 'raise' or 'return'")
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    pending: Deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, item in enumerate(items):
            pending.append(pool.submit(load_one, index, item, size, keep_image, on_error, label))
            if len(pending) >= max(1, in_flight):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def paired(chunk: Iterable[Loaded], maps: Any, scores: Any) -> Iterator[Tuple[Loaded, Optional[np.ndarray], float]]:
    """Each input of a chunk with its map and score; ``maps``/``scores`` hold rows for the inputs that loaded,
    in order; an input that failed gets none. The scored pixels are dropped on the way."""
    j = 0
    for x in chunk:
        if x.ok:
            x.square = None
            yield x, maps[j], float(scores[j])
            j += 1
        else:
            yield x, None, float("nan")


def batched(loaded: Iterable[Loaded], batch_size: int) -> Iterator[List[Loaded]]:
    """Group a stream into lists of ``batch_size`` (the last may be shorter)."""
    chunk: List[Loaded] = []
    for item in loaded:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
