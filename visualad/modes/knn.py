"""The one nearest-neighbour core of the references and batch modes (patch features, chunked, CPU and CUDA).

Features (MuSc's LNAMD, Li et al. ICLR 2024): per image, LayerNorm over (C, H, W) without affine, an r x r mean
over the patch grid (zero padding), L2 normalisation; one copy per r. Distances are Euclidean between unit
vectors, ``sqrt(2 - 2 cos)``, computed as matrix products in fp32 whatever the features' dtype, in chunks so
that memory stays bounded whatever the number of images.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .partners import (DEFAULT_BLOCK_FRACTIONS, DEFAULT_FRACTION, DEFAULT_R,  # noqa: F401 - the core's API
                       blocks_for_depth, partner_offsets)

CHUNK_ELEMENTS = 1 << 24  # similarity-matrix elements per chunk (64 MB in fp32)
#: similarities per block of image pairs in mutual scoring (8 MB): larger blocks leave the cache and were
#: measured 2x slower per image on ViT-S at 224 px (benchmarks/mode_speed.py)
PAIR_BLOCK_ELEMENTS = 1 << 21


def lnamd(features: torch.Tensor, r: int) -> torch.Tensor:
    """Patch features [B, N, C] on a square grid -> LayerNorm(C,H,W) + r x r mean + L2 norm, [B, N, C] fp32."""
    n, c = int(features.shape[1]), int(features.shape[2])  # plain ints, also while a graph is traced
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"{n} patches do not form a square grid")
    x = features.float().transpose(1, 2).reshape(-1, c, g, g)
    x = F.layer_norm(x, (c, g, g))
    if r > 1:
        x = F.avg_pool2d(x, r, stride=1, padding=r // 2, count_include_pad=True)
    return F.normalize(x.reshape(-1, c, n).transpose(1, 2), dim=-1, eps=1e-8)


def to_distance(sim: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of unit vectors -> their Euclidean distance ``sqrt(2 - 2 cos)`` (in place)."""
    return (2.0 - 2.0 * sim).clamp_(min=0.0).sqrt_()


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Distance of each query row [Nq, C] to its nearest bank row [Nb, C] (unit vectors) -> [Nq] fp32.

    Exact; queries are taken in chunks of about ``chunk_elements / Nb`` rows, so memory is bounded."""
    q, bt = queries.float(), bank.float().t()
    rows = max(1, chunk_elements // max(1, bt.shape[1]))
    out = torch.empty(q.shape[0], device=q.device, dtype=torch.float32)
    for s in range(0, q.shape[0], rows):
        out[s:s + rows] = (q[s:s + rows] @ bt).amax(dim=1)
    return to_distance(out)


def distances_to_images(query: torch.Tensor, images: torch.Tensor,
                        chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Nearest-patch distance of each query patch [P, C] in each of ``images`` [W, Q, C] -> [W, P] fp32,
    a block of images at a time (memory bounded by ``chunk_elements`` similarities)."""
    q = query.float()
    w, n, _ = images.shape
    out = torch.empty(w, q.shape[0], device=q.device, dtype=torch.float32)
    block = max(1, chunk_elements // max(1, q.shape[0] * n))
    for s in range(0, w, block):
        sim = torch.matmul(images[s:s + block].float(), q.t())  # [b, Q, P]
        out[s:s + block] = sim.amax(dim=1)
    return to_distance(out)


def interval_average(distances: torch.Tensor, fraction: float = DEFAULT_FRACTION) -> torch.Tensor:
    """[..., M, P] distances of each patch to M other images -> [..., P]: mean of the lowest
    ``k = max(1, floor(fraction * M))`` (sorted first, so the result does not depend on the images' order)."""
    m = distances.shape[-2]
    k = max(1, int(math.floor(fraction * m)))
    return distances.topk(k, dim=-2, largest=False, sorted=True).values.mean(dim=-2)


def mutual_distances(features: torch.Tensor, compare_with: int, chunk_images: int = 0,
                     order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Mutual scoring of a set: features [N, P, C] (unit rows) -> [N, M, P] in comparison order, each patch's
    nearest distance in each of its M = min(compare_with, N - 1) partner images.

    ``order`` (a permutation of the N images, default as given) is the comparison order: row i of the output
    is image ``order[i]``; the features are indexed through it, never copied whole. One batched product per
    offset and block of images gives both directions of a pair (row maxima for p, column maxima for its
    partner), so the work is N * M / 2 pair products; memory is the output plus one block of similarities."""
    n, p, _ = features.shape
    both, forward = partner_offsets(n, compare_with)
    m = 2 * len(both) + len(forward)
    out = torch.empty(n, m, p, device=features.device, dtype=torch.float32)
    block = chunk_images or max(1, PAIR_BLOCK_ELEMENTS // max(1, p * p))
    idx = torch.arange(n, device=features.device)
    order = idx if order is None else torch.as_tensor(order, device=features.device)
    slot = 0
    for d in both + forward:
        for s in range(0, n, block):
            rows = idx[s:s + block]
            partners = (rows + d) % n
            sim = torch.bmm(features[order[rows]].float(), features[order[partners]].float().transpose(1, 2))
            out[rows, slot] = to_distance(sim.amax(dim=2))
            if d in both:
                out[partners, slot + 1] = to_distance(sim.amax(dim=1))
        slot += 2 if d in both else 1
    return out


def without_rows(bank: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The bank less rows [start, stop) (one reference image's patches)."""
    return torch.cat([bank[:start], bank[stop:]])


def nearest_outside_neighbourhood(q: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """One image's patches [P, C] against the same image's [P, C] outside each patch's 3x3 grid neighbourhood
    -> [P] (leave-one-out with a single reference)."""
    g = int(round(math.sqrt(q.shape[0])))
    yy, xx = torch.meshgrid(torch.arange(g, device=q.device), torch.arange(g, device=q.device), indexing="ij")
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    sim = q.float() @ bank.float().t()
    near = ((yy[:, None] - yy[None]).abs() <= 1) & ((xx[:, None] - xx[None]).abs() <= 1)
    sim.masked_fill_(near, -1.0)
    return to_distance(sim.amax(dim=1))


def stack(items: List[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items)


def unpermute(rows: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """Rows in comparison order -> rows in input order (row i of ``rows`` is image ``order[i]``)."""
    out = torch.empty_like(rows)
    out[torch.as_tensor(order, device=rows.device)] = rows
    return out


def concat(items: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat(items)
