"""The one prediction pipeline, over any backend (torch :class:`~visualad.runtime.engine.Engine`, onnxruntime
:class:`~visualad.onnx.runtime.OnnxBackend`); no torch here.

input -> read-ahead (decode, validate, square resize; bounded) -> ``backend.prepare`` -> dispatch on the
scorer's ``kind``: ``images`` (a batch at a time), ``set`` (a set's features, then its grids; sets of at most
``scorer.max_set``),
``stream`` (each image's features as it comes) -> ``backend.grid_to_map`` -> (input, model-size map, score).

A backend provides: ``image_size``, ``depth``, ``dtype_name``, ``knn`` (the nearest-neighbour primitives on
its arrays: ``mutual_distances``, ``interval_average``, ``distances_to_images``, ``stack``, ``empty_rows``,
``unpermute``), ``prepare(squares)``, ``score(batch, scorer)``, ``features(batch, blocks)`` (layer-normed rows
per block), ``references_grid(batch, bank)``, ``grid_to_map(grids) -> (maps, scores)`` on the host,
``inference()`` (the context set and stream scoring run in) and ``build_references(items, batch_size)``.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np

from ..data.images import image_digest
from .readahead import Loaded, batched, paired, read_ahead

logger = logging.getLogger(__name__)
Scored = Tuple[Loaded, Optional[np.ndarray], float]


def read(backend: Any, items: Iterable[Any], batch_size: int, *, keep_image: bool = False,
         on_error: str = "return", label: str = "input") -> Iterator[List[Loaded]]:
    """Batches of decoded inputs, with at most two batches in flight (constant memory)."""
    if int(batch_size) < 1:
        raise ValueError("batch_size must be >= 1")
    stream = read_ahead(items, backend.image_size, keep_image=keep_image, on_error=on_error,
                        in_flight=2 * batch_size, label=label)
    return batched(stream, batch_size)


def references(backend: Any, items: Iterable[Any], batch_size: int) -> Iterator[Tuple[List[Loaded], List[str]]]:
    """Batches of reference images with their digests, for a bank (both backends); an exact copy of an earlier
    one (the same pixels at model size) is left out with a warning: when the references set their own threshold,
    each is scored against the others, and a copy would find its twin at distance 0 and pull the threshold down."""
    seen: Set[str] = set()
    for chunk in read(backend, items, batch_size, on_error="raise", label="reference"):
        kept, digests = [], []
        for x in chunk:
            digest = image_digest(x.square)
            if digest in seen:
                logger.warning("reference %s is a copy of an earlier one (the same pixels at model size): left out",
                               x.path or f"#{x.index}")
                continue
            seen.add(digest)
            kept.append(x)
            digests.append(digest)
        if kept:
            yield kept, digests


def run(backend: Any, items: Iterable[Any], scorer: Any, batch_size: int = 8, *, keep_image: bool = False,
        on_error: str = "return") -> Iterator[Scored]:
    """(input, model-size map or None, score) per input, in order; see the module's docstring."""
    chunks = read(backend, items, batch_size, keep_image=keep_image, on_error=on_error)
    if scorer.kind == "set":  # a set's features are allocated once for the inputs' count, when it is known
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
    """Sets of at most ``scorer.max_set`` images, each scored against itself: an input longer than that is split
    in input order (the first ``max_set`` images are scored once ``max_set / 4`` more have come, and a last
    remainder above ``max_set`` in two halves), so memory is bounded whatever the input's length and no set but
    a whole input has fewer than ``max_set / 4`` images."""
    blocks = scorer.blocks_for(backend.depth)
    limit = int(scorer.max_set)
    slack = limit // 4
    room = limit + slack + batch_size if expected is None else min(expected, limit + slack + batch_size)
    loaded: List[Loaded] = []  # inputs not yet out, in order (failed ones too)
    store: Dict[int, Any] = {}  # per block: one array [capacity, P, C], filled to `count`
    count = 0
    digests: List[str] = []
    for chunk in chunks:
        good = [x for x in chunk if x.ok]
        if good:
            for key, f in backend.features(backend.prepare([x.square for x in good]), blocks).items():
                store[key] = _room(backend.knn, store.get(key), count, f, room)
                store[key][count:count + len(good)] = f
            count += len(good)
            digests += [image_digest(x.square) for x in good]
        for x in chunk:
            x.square = None  # only the features are kept for the set
        loaded += chunk
        while count >= limit + slack:  # a full set, and enough after it that the last set is not small
            head = _through(loaded, limit)
            yield from _score_set(backend, scorer, {k: v[:limit] for k, v in store.items()}, digests[:limit],
                                  loaded[:head], batch_size)
            for v in store.values():  # the rest to the front, `limit` rows at a time (never overlapping)
                for s in range(0, count - limit, limit):
                    v[s:min(s + limit, count - limit)] = v[limit + s:min(2 * limit + s, count)]
            loaded, digests, count = loaded[head:], digests[limit:], count - limit
    half = count // 2 if count > limit else count
    head = _through(loaded, half) if count > limit else len(loaded)
    yield from _score_set(backend, scorer, {k: v[:half] for k, v in store.items()}, digests[:half],
                          loaded[:head], batch_size)
    if count > limit:
        yield from _score_set(backend, scorer, {k: v[half:count] for k, v in store.items()}, digests[half:],
                              loaded[head:], batch_size)


def _through(loaded: List[Loaded], n_ok: int) -> int:
    """How many of ``loaded`` (in order) hold its first ``n_ok`` good inputs, failed ones between them too."""
    seen = 0
    for i, x in enumerate(loaded):
        seen += x.ok
        if seen == n_ok:
            return i + 1
    return len(loaded)


def _score_set(backend: Any, scorer: Any, features: Dict[int, Any], digests: List[str],
               loaded: List[Loaded], batch_size: int) -> Iterator[Scored]:
    """One set's results, in input order: its grids, then maps a batch at a time (failed inputs in place)."""
    with backend.inference():
        grids = scorer.score_set(backend, features, digests)
        done = 0
        for s in range(0, len(loaded), batch_size):
            chunk = loaded[s:s + batch_size]
            n_ok = sum(x.ok for x in chunk)
            maps = scores = None
            if n_ok:
                maps, scores = backend.grid_to_map(grids[done:done + n_ok])
                done += n_ok
            yield from paired(chunk, maps, scores)


def _room(ops: Any, store: Any, used: int, part: Any, expected: int) -> Any:
    """``store`` with room for ``part`` after its first ``used`` rows: allocated once for the ``expected``
    rows (failed inputs leave rows unused), grown by doubling past them."""
    need = used + part.shape[0]
    if store is not None and store.shape[0] >= need:
        return store
    grown = ops.empty_rows(max(need, expected, 2 * (0 if store is None else store.shape[0])), part)
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
            feats = backend.features(backend.prepare([x.square for x in good]), blocks)
            with backend.inference():
                for i, x in enumerate(good):
                    ready.extend(scorer.feed(backend, {k: v[i] for k, v in feats.items()}, image_digest(x.square)))
                    x.square = None
        yield from emit()
    with backend.inference():
        ready.extend(scorer.flush(backend))
    yield from emit()


_BY_KIND = {"images": _images, "stream": _stream}
