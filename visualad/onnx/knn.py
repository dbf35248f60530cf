"""The nearest-neighbour core of the references and batch modes in NumPy, for the torch-free runtime: the same
functions as :mod:`visualad.modes.knn` on unit features that the exported graph already computed."""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np

from ..modes.partners import partner_offsets

CHUNK_ELEMENTS = 1 << 22  # similarities per chunk (16 MB in fp32)


def to_distance(sim: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit vectors -> their Euclidean distance ``sqrt(2 - 2 cos)``."""
    return np.sqrt(np.clip(2.0 - 2.0 * sim, 0.0, None))


def nearest_distance(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Distance of each query row [Nq, C] to its nearest bank row [Nb, C] -> [Nq], in chunks."""
    rows = max(1, CHUNK_ELEMENTS // max(1, bank.shape[0]))
    out = np.empty(queries.shape[0], np.float32)
    for s in range(0, queries.shape[0], rows):
        out[s:s + rows] = (queries[s:s + rows] @ bank.T).max(axis=1)
    return to_distance(out)


def interval_average(distances: np.ndarray, fraction: float) -> np.ndarray:
    """[..., M, P] -> [..., P]: the mean of each patch's lowest ``max(1, floor(fraction * M))`` distances."""
    k = max(1, int(math.floor(fraction * distances.shape[-2])))
    return np.sort(distances, axis=-2)[..., :k, :].mean(axis=-2)


def mutual_distances(features: np.ndarray, compare_with: int, order: Sequence[int]) -> np.ndarray:
    """Features [N, P, C] -> [N, M, P] in comparison order (row i is image ``order[i]``): each patch's nearest
    distance in each of its M = min(compare_with, N - 1) partners; each pair's product serves both ways."""
    order = np.asarray(order)
    n, p, _ = features.shape
    both, forward = partner_offsets(n, compare_with)
    out = np.empty((n, 2 * len(both) + len(forward), p), np.float32)
    block = max(1, CHUNK_ELEMENTS // max(1, p * p))
    idx = np.arange(n)
    slot = 0
    for d in both + forward:
        for s in range(0, n, block):
            rows = idx[s:s + block]
            partners = (rows + d) % n
            sim = features[order[rows]] @ features[order[partners]].transpose(0, 2, 1)
            out[rows, slot] = to_distance(sim.max(axis=2))
            if d in both:
                out[partners, slot + 1] = to_distance(sim.max(axis=1))
        slot += 2 if d in both else 1
    return out


def distances_to_images(query: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Nearest-patch distance of each query patch [P, C] in each of ``images`` [W, Q, C] -> [W, P]."""
    w, n, _ = images.shape
    out = np.empty((w, query.shape[0]), np.float32)
    block = max(1, CHUNK_ELEMENTS // max(1, query.shape[0] * n))
    for s in range(0, w, block):
        out[s:s + block] = (images[s:s + block] @ query.T).max(axis=1)
    return to_distance(out)


def without_rows(bank: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The bank less rows [start, stop) (one reference image's patches)."""
    return np.concatenate([bank[:start], bank[stop:]])


def nearest_outside_neighbourhood(q: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """One image's patches [P, C] against the same image's [P, C] outside each patch's 3x3 grid neighbourhood
    -> [P] (leave-one-out with a single reference)."""
    g = int(round(math.sqrt(q.shape[0])))
    yy, xx = np.divmod(np.arange(g * g), g)
    sim = q @ bank.T
    near = (np.abs(yy[:, None] - yy[None]) <= 1) & (np.abs(xx[:, None] - xx[None]) <= 1)
    sim[near] = -1.0
    return to_distance(sim.max(axis=1))


def stack(items: List[np.ndarray]) -> np.ndarray:
    return np.stack(items)


def unpermute(rows: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Rows in comparison order -> rows in input order (row i of ``rows`` is image ``order[i]``)."""
    out = np.empty_like(rows)
    out[np.asarray(order)] = rows
    return out


def empty_rows(n: int, like: np.ndarray) -> np.ndarray:
    """An uninitialised [n, ...] array with the dtype and row shape of ``like`` (a set's features)."""
    return np.empty((n,) + like.shape[1:], like.dtype)