"""The nearest-neighbour core of the references and batch modes in NumPy, for the torch-free runtime: the same
functions as :mod:`visualad.modes.knn` on the layer-normed rows that the exported graph computes. Each r's unit
rows are made here (r x r mean, L2 norm) and multiplied as they are: the plain definition, which the torch core
computes with one product for all r."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from ..modes.partners import grid_side, interval_count, partner_offsets

CHUNK_ELEMENTS = 1 << 22  # similarities per chunk (16 MB in fp32)


def to_distance(sim: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit vectors -> their Euclidean distance ``sqrt(2 - 2 cos)``."""
    return np.sqrt(np.clip(2.0 - 2.0 * sim, 0.0, None))


def aggregated(rows: np.ndarray, r: int) -> np.ndarray:
    """Layer-normed rows [..., P, C] on a square grid -> the unit rows of their r x r means (zero padding,
    counted), float32."""
    rows = np.asarray(rows, np.float32)
    if r > 1:
        *lead, p, c = rows.shape
        g = grid_side(p)
        h = r // 2
        padded = np.pad(rows.reshape(-1, g, g, c), ((0, 0), (h, h), (h, h), (0, 0)))
        total = sum(padded[:, y:y + g, x:x + g] for y in range(r) for x in range(r))
        rows = (total / np.float32(r * r)).reshape(*lead, p, c)
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), np.float32(1e-8))


def nearest_distance(queries: np.ndarray, bank: np.ndarray, rs: Sequence[int]) -> np.ndarray:
    """Per r, the distance of each query patch [B, P, C] to its nearest patch among the bank's images
    [K * P, C] -> [R, B, P], in chunks."""
    b, p, c = queries.shape
    out = np.empty((len(rs), b * p), np.float32)
    rows = max(1, CHUNK_ELEMENTS // max(1, bank.shape[0]))
    for i, r in enumerate(rs):
        q = aggregated(queries, r).reshape(-1, c)
        units = aggregated(bank.reshape(-1, p, c), r).reshape(-1, c)
        for s in range(0, q.shape[0], rows):
            out[i, s:s + rows] = (q[s:s + rows] @ units.T).max(axis=1)
    return to_distance(out).reshape(len(rs), b, p)


def interval_average(distances: np.ndarray, fraction: float) -> np.ndarray:
    """[..., M, P] -> [..., P]: the mean of each patch's lowest ``max(1, floor(fraction * M))`` distances."""
    k = interval_count(distances.shape[-2], fraction)
    return np.sort(distances, axis=-2)[..., :k, :].mean(axis=-2)


def mutual_distances(features: np.ndarray, compare_with: int, rs: Sequence[int], order: Sequence[int],
                     keep: Optional[int] = None) -> np.ndarray:
    """Layer-normed rows [N, P, C] -> [R, N, K, P] in comparison order (row i is image ``order[i]``): per r, the
    K (``keep``, default all) smallest of each patch's nearest distances in its M = min(compare_with, N - 1)
    partners, ascending; each pair's product serves both ways."""
    order = np.asarray(order)
    n, p, _ = features.shape
    both, forward = partner_offsets(n, compare_with)
    out = np.empty((len(rs), n, 2 * len(both) + len(forward), p), np.float32)
    block = max(1, CHUNK_ELEMENTS // max(1, p * p))
    idx = np.arange(n)
    for i, r in enumerate(rs):
        units = aggregated(features, r)
        slot = 0
        for d in both + forward:
            for s in range(0, n, block):
                rows = idx[s:s + block]
                partners = (rows + d) % n
                sim = units[order[rows]] @ units[order[partners]].transpose(0, 2, 1)
                out[i, rows, slot] = to_distance(sim.max(axis=2))
                if d in both:
                    out[i, partners, slot + 1] = to_distance(sim.max(axis=1))
            slot += 2 if d in both else 1
    return np.sort(out, axis=2)[:, :, :keep]


def distances_to_images(query: np.ndarray, images: np.ndarray, rs: Sequence[int]) -> np.ndarray:
    """Per r, the nearest-patch distance of each query patch [P, C] in each of ``images`` [W, Q, C]
    -> [R, W, P]."""
    w, n, _ = images.shape
    out = np.empty((len(rs), w, query.shape[0]), np.float32)
    block = max(1, CHUNK_ELEMENTS // max(1, query.shape[0] * n))
    for i, r in enumerate(rs):
        q = aggregated(query, r)
        for s in range(0, w, block):
            out[i, s:s + block] = (aggregated(images[s:s + block], r) @ q.T).max(axis=1)
    return to_distance(out)


def without_rows(bank: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The bank less rows [start, stop) (one reference image's patches)."""
    return np.concatenate([bank[:start], bank[stop:]])


def nearest_outside_neighbourhood(q: np.ndarray, bank: np.ndarray, rs: Sequence[int]) -> np.ndarray:
    """One image's layer-normed patches [P, C] against the same image's [P, C] outside each patch's 3x3 grid
    neighbourhood -> [R, P] (leave-one-out with a single reference)."""
    g = grid_side(q.shape[0])
    yy, xx = np.divmod(np.arange(g * g), g)
    near = (np.abs(yy[:, None] - yy[None]) <= 1) & (np.abs(xx[:, None] - xx[None]) <= 1)
    out = []
    for r in rs:
        sim = aggregated(q, r) @ aggregated(bank, r).T
        sim[near] = -1.0
        out.append(sim.max(axis=1))
    return to_distance(np.stack(out))


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