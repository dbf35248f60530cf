"""The nearest-neighbour core of the references and batch modes in NumPy, for the torch-free runtime: the same
functions as :mod:`visualad.modes.knn` on unit features that the exported graph already computed."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

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


def mutual_distances(features: np.ndarray, compare_with: int, order: np.ndarray) -> np.ndarray:
    """Features [N, P, C] -> [N, M, P] in comparison order (row i is image ``order[i]``): each patch's nearest
    distance in each of its M = min(compare_with, N - 1) partners; each pair's product serves both ways."""
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


def references_grid(queries: Dict[str, np.ndarray], bank: Dict[str, np.ndarray]) -> np.ndarray:
    """Mean over (block, r) of each query patch's nearest reference distance: {key: [B, N, C]} -> [B, N]."""
    total: Optional[np.ndarray] = None
    for key, q in queries.items():
        b, n, c = q.shape
        d = nearest_distance(q.reshape(b * n, c), bank[key]).reshape(b, n)
        total = d if total is None else total + d
    return total / len(queries)


def batch_grid(features: Dict[str, np.ndarray], order: Sequence[int], compare_with: int,
               fraction: float) -> np.ndarray:
    """Mutual scoring of one set: {key: [N, P, C]} -> [N, P] in input order."""
    order_arr = np.asarray(order)
    total: Optional[np.ndarray] = None
    for f in features.values():
        s = interval_average(mutual_distances(f, compare_with, order_arr), fraction)
        total = s if total is None else total + s
    in_order = total / len(features)
    out = np.empty_like(in_order)
    out[order_arr] = in_order
    return out


def comparison_order(digests: List[str], seed: int) -> List[int]:
    """Sorted by content, then a seeded shuffle (NumPy's: for sets larger than ``compare_with + 1`` the
    partners differ from the torch engine's, whose shuffle is torch's)."""
    by_content = sorted(range(len(digests)), key=lambda i: (digests[i], i))
    perm = np.random.default_rng(seed).permutation(len(by_content))
    return [by_content[p] for p in perm]
