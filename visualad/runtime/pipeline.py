"""The one prediction pipeline, over any backend (torch :class:`~visualad.runtime.engine.Engine`, onnxruntime
:class:`~visualad.onnx.runtime.OnnxBackend`); no torch here.

input -> read-ahead (decode, validate, square resize; bounded) -> ``backend.prepare`` -> dispatch on the
scorer's ``kind``: ``images`` (a batch at a time), ``set`` (the whole set's features, then the set's grids),
``stream`` (each image's features as it comes) -> ``backend.grid_to_map`` -> (input, model-size map, score).

A backend provides: ``image_size``, ``depth``, ``dtype_name``, ``knn`` (the nearest-neighbour primitives on
its arrays: ``mutual_distances``, ``interval_average``, ``distances_to_images``, ``stack``, ``empty_rows``,
``unpermute``), ``prepare(squares)``, ``score(batch, scorer)``, ``features(batch, blocks, rs)``,
``references_grid(batch, bank)``, ``grid_to_map(grids) -> (maps, scores)`` on the host,
``inference()`` (the context set and stream scoring run in) and ``build_references(items, batch_size)``.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from ..data.images import image_digest
from .readahead import Loaded, batched, paired, read_ahead

Scored = Tuple[Loaded, Optional[np.ndarray], float]


def read(backend: Any, items: Iterable[Any], batch_size: int, *, keep_image: bool = False,
         on_error: str = "return", label: str = "input") -> Iterator[List[Loaded]]:
    """Batches of decoded inputs, with at most two batches in flight (constant memory)."""
    if int(batch_size) < 1:
        raise ValueError("batch_size must be >= 1")
    stream = read_ahead(items, backend.image_size, keep_image=keep_image, on_error=on_error,
                        in_flight=2 * batch_size, label=label)
    return batched(stream, batch_size)


def run(backend: Any, items: Iterable[Any], scorer: Any, batch_size: int = 8, *, keep_image: bool = False,
        on_error: str = "return") -> Iterator[Scored]:
    """(input, model-size map or None, score) per input, in order; see the module's docstring."""
    chunks = read(backend, items, batch_size, keep_image=keep_image, on_error=on_error)
    if scorer.kind == "set":  # the set's features are allocated once for the inputs' count, when it is known
        return _set(backend, chunks, scorer, batch_size, len(items) if hasattr(items, "__len__") else None)
    return _BY_KIND[scorer.kind](backend, chunks, scorer, batch_size)


def _images(backend: Any, chunks: Iterable[List[Loaded]], scorer: Any, batch_size: int) -> Iterator[Scored]:
    for chunk in chunks:
        good = [x for x in chunk if x.ok]
        maps = scores = None
        if good:
            maps, scores = backend.score(backend.prepare([x.square for x in good]), scorer)
        yield from paired(chunk, maps, scores)


def _set(backend: Any, chunks: Iterable[List[Loaded]], scorer: Any, batch_size: int,
         expected: Optional[int]) -> Iterator[Scored]:
    blocks = scorer.blocks_for(backend.depth)
    loaded: List[Loaded] = []
    store: Dict[Tuple[int, int], Any] = {}  # per (block, r): one array [capacity, P, C], filled to `count`
    count = 0
    digests: List[str] = []
    for chunk in chunks:
        good = [x for x in chunk if x.ok]
        if good:
            for key, f in backend.features(backend.prepare([x.square for x in good]), blocks, scorer.rs).items():
                store[key] = _room(backend.knn, store.get(key), count, f, expected)
                store[key][count:count + len(good)] = f
            count += len(good)
            digests += [image_digest(x.square) for x in good]
        for x in chunk:
            x.square = None  # only the features are kept for the set
        loaded += chunk
    with backend.inference():
        grids = scorer.score_set(backend, {k: v[:count] for k, v in store.items()}, digests)
        done = 0
        for s in range(0, len(loaded), batch_size):
            chunk = loaded[s:s + batch_size]
            n_ok = sum(x.ok for x in chunk)
            maps = scores = None
            if n_ok:
                maps, scores = backend.grid_to_map(grids[done:done + n_ok])
                done += n_ok
            yield from paired(chunk, maps, scores)


def _room(ops: Any, store: Any, used: int, part: Any, expected: Optional[int]) -> Any:
    """``store`` with room for ``part`` after its first ``used`` rows: allocated once for the ``expected``
    images when the input's length is known (failed inputs leave rows unused), else grown by doubling."""
    need = used + part.shape[0]
    if store is not None and store.shape[0] >= need:
        return store
    grown = ops.empty_rows(max(need, expected or 0, 2 * (0 if store is None else store.shape[0])), part)
    if used:
        grown[:used] = store[:used]
    return grown


def _stream(backend: Any, chunks: Iterable[List[Loaded]], scorer: Any, batch_size: int) -> Iterator[Scored]:
    blocks = scorer.blocks_for(backend.depth)
    waiting: Deque[Loaded] = deque()  # inputs in arrival order whose result is not out yet (errors too)
    ready: Deque[Any] = deque()  # grids of the first waiting inputs that are ok

    def emit() -> Iterator[Scored]:
        while waiting and (not waiting[0].ok or ready):
            x = waiting.popleft()
            if not x.ok:
                yield x, None, float("nan")
                continue
            with backend.inference():
                maps, scores = backend.grid_to_map(backend.knn.stack([ready.popleft()]))
            yield x, maps[0], float(scores[0])

    for chunk in chunks:
        good = [x for x in chunk if x.ok]
        waiting.extend(chunk)
        if good:
            feats = backend.features(backend.prepare([x.square for x in good]), blocks, scorer.rs)
            with backend.inference():
                for i, x in enumerate(good):
                    ready.extend(scorer.feed(backend, {k: v[i] for k, v in feats.items()}, image_digest(x.square)))
                    x.square = None
        yield from emit()
    with backend.inference():
        ready.extend(scorer.flush(backend))
    yield from emit()


_BY_KIND = {"images": _images, "stream": _stream}
