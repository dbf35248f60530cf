"""Dynamic batching for the HTTP service: images of concurrent requests share one forward pass.

One worker thread owns the model. A request submits its decoded images with its scorer; the worker takes the
oldest request, adds later ones of the same head or references scorer until the batch is full or the oldest
has waited ``max_latency_ms``, scores them in one forward and hands each request its own rows. A batch-mode
request is never merged: its images are scored against each other only.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import numpy as np

from ..runtime import pipeline

Scored = Tuple[np.ndarray, np.ndarray]  # model-size maps [n, S, S], scores [n]


@dataclass
class _Job:
    squares: List[np.ndarray]
    scorer: Any
    future: Future = field(default_factory=Future)
    created: float = field(default_factory=time.perf_counter)


def _key(scorer: Any) -> Tuple[type, str]:
    """Scorers that compute the same function share a forward (a new one is made per request)."""
    return type(scorer), repr(sorted(scorer.describe().items()))


class Batcher:
    """Queue of scoring jobs served by one thread; :meth:`score` blocks its caller until its rows are done."""

    def __init__(self, backend: Any, max_batch_size: int = 8, max_latency_ms: float = 10.0) -> None:
        self.backend = backend
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_latency = max(0.0, float(max_latency_ms)) / 1000.0
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._held: Optional[_Job] = None
        self.batches = 0  # forwards run: tests and the benchmark read it
        self._thread = threading.Thread(target=self._loop, name="visualad-batcher", daemon=True)
        self._thread.start()

    def score(self, squares: List[np.ndarray], scorer: Any) -> Scored:
        job = _Job(list(squares), scorer)
        self._queue.put(job)
        return job.future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # --- the worker ----------------------------------------------------------------------------------
    def _next(self, timeout: Optional[float]) -> Optional[_Job]:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            if first.scorer.kind != "images":  # a set: one request's images, alone
                self._run([first])
                continue
            jobs, n = [first], len(first.squares)
            deadline = first.created + self.max_latency
            while n < self.max_batch_size:
                nxt = self._next(max(0.0, deadline - time.perf_counter()))
                if nxt is None:
                    if not self._queue.empty():
                        continue
                    break
                if _key(nxt.scorer) != _key(first.scorer) or n + len(nxt.squares) > self.max_batch_size:
                    self._held = nxt  # the next forward starts with it
                    break
                jobs.append(nxt)
                n += len(nxt.squares)
            self._run(jobs)

    def _run(self, jobs: List[_Job]) -> None:
        try:
            scorer = jobs[0].scorer
            if scorer.kind != "images":
                outs = list(pipeline.run(self.backend, jobs[0].squares, scorer, self.max_batch_size))
                maps = np.stack([m for _, m, _ in outs])
                scores = np.array([s for _, _, s in outs], np.float32)
            else:
                maps, scores = self.backend.score(self.backend.prepare([sq for job in jobs for sq in job.squares]),
                                                  scorer)
            self.batches += 1
            start = 0
            for job in jobs:
                end = start + len(job.squares)
                job.future.set_result((maps[start:end], scores[start:end]))
                start = end
        except BaseException as exc:  # the requests get the error; the worker lives on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
