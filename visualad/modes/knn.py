"""The one nearest-neighbour core of the references and batch modes (patch features, chunked, CPU and CUDA).

Features (MuSc's LNAMD, Li et al. ICLR 2024): per image, LayerNorm over (C, H, W) without affine, an r x r mean
over the patch grid (zero padding), L2 normalisation; one copy per r. Distances are Euclidean between unit
vectors, ``sqrt(2 - 2 cos)``, computed as matrix products in chunks so that memory stays bounded whatever the
number of images.

fp32 features give the exact fp32 function. Half features (fp16: the set features an engine keeps under
dtype="auto" or in bf16 or fp16, half the memory) are multiplied in a half dtype on the devices of
:data:`HALF_PRODUCTS` (CUDA: fp16, on tensor cores), and there the product only picks each patch's few nearest
candidates: their similarities are recomputed as fp32 dot products of the stored rows
(:func:`nearest_similarities`), so no distance is a rounded half product. References mode keeps fp32 rows (a
small bank) and asks for the same candidates there (``half_candidates``): an fp32 product on CUDA runs without
tensor cores. Elsewhere half features are upcast block by block and multiplied in fp32 (a CPU's fp16 product is
emulated on most CPUs). Measured on shared/data (docs/modes.md, "Precision"): bf16 rows moved batch mode's
metrics by up to 0.005, fp16 rows by at most 0.002, so the compact dtype is fp16 whatever the engine's half
dtype; candidates picked by an fp16 or bf16 product moved none.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

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


HALF = (torch.bfloat16, torch.float16)
#: device type -> the dtype of the product that picks nearest candidates from half features (or from fp32 rows
#: asked for ``half_candidates``); elsewhere one exact fp32 product. CPUs are left out: a CPU's half product is
#: emulated on most, and where it is native (bf16) its speed here is not measured (``benchmarks/mode_speed.py
#: --cpu-products bf16`` measures it on such a CPU)
HALF_PRODUCTS: Dict[str, torch.dtype] = {"cuda": torch.float16}


def _as_given(device: torch.device) -> Any:
    """Products in the dtype of their inputs, also inside an engine's bf16 autocast region (references mode
    scores inside it): autocast would round fp32 rows to bf16, which moved metrics by up to 0.007."""
    return torch.autocast(device_type=device.type, enabled=False)


def _for_product(rows: torch.Tensor) -> torch.Tensor:
    """Rows as :func:`nearest_similarities` multiplies them: half rows off :data:`HALF_PRODUCTS` upcast."""
    return rows.float() if rows.dtype in HALF and rows.device.type not in HALF_PRODUCTS else rows


def _candidate_dtype(rows: torch.Tensor, half_candidates: bool) -> Optional[torch.dtype]:
    """The dtype of the product that picks the candidates of :func:`nearest_similarities` (half rows, or fp32
    rows asked for ``half_candidates``, on a device of :data:`HALF_PRODUCTS`), or None: one exact fp32 product."""
    if rows.dtype not in HALF and not half_candidates:
        return None
    return HALF_PRODUCTS.get(rows.device.type)


#: nearest-row candidates a half product keeps per row; their fp32 similarities decide (a half product's
#: rounding can reorder rows whose similarities differ by less than its spacing, 2^-11 near 1 in fp16)
CANDIDATES = 4


def _best_dot(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The largest fp32 dot product of each row of ``a`` [..., P, C] with its candidate rows ``index``
    [..., P, K] of ``b`` [..., Q, C] -> [..., P]."""
    c = b.shape[-1]
    flat = index.reshape(*index.shape[:-2], -1)  # [..., P * K]
    picked = b.gather(-2, flat.unsqueeze(-1).expand(*flat.shape, c)).reshape(*index.shape, c)
    return (a.float().unsqueeze(-2) * picked.float()).sum(dim=-1).amax(dim=-1)


def nearest_similarities(a: torch.Tensor, b: torch.Tensor, both: bool = False,
                         half_candidates: bool = False) -> Tuple[torch.Tensor, ...]:
    """Batched [..., P, C] x [..., Q, C] (unit rows) -> the fp32 similarity of each row of ``a`` to its nearest
    row of ``b`` [..., P] (and, with ``both``, of each row of ``b`` to its nearest row of ``a``, [..., Q]).

    fp32 inputs (and half inputs off :data:`HALF_PRODUCTS`, upcast): the maxima of one fp32 product. Half inputs
    on those devices (and fp32 inputs there with ``half_candidates``): the product in the device's half dtype
    picks :data:`CANDIDATES` nearest rows, and the largest fp32 dot product of the given rows among them is the
    similarity (always that of a real pair of rows; below the exact maximum only when more rows than that tie
    within the half product's rounding)."""
    product = _candidate_dtype(a, half_candidates)
    if product is None:
        a, b = _for_product(a), _for_product(b)
    with _as_given(a.device):
        sim = torch.matmul(a.to(product or a.dtype), b.to(product or a.dtype).transpose(-1, -2))
    if product is None:
        return (sim.amax(dim=-1), sim.amax(dim=-2)) if both else (sim.amax(dim=-1),)
    rows = _best_dot(a, b, sim.topk(min(CANDIDATES, sim.shape[-1]), dim=-1).indices)
    if not both:
        return (rows,)
    return rows, _best_dot(b, a, sim.topk(min(CANDIDATES, sim.shape[-2]), dim=-2).indices.transpose(-1, -2))


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS,
                     half_candidates: bool = False) -> torch.Tensor:
    """Distance of each query row [Nq, C] to its nearest bank row [Nb, C] (unit vectors) -> [Nq] fp32, the
    product in the queries' dtype, or picking candidates (``half_candidates``, see :func:`nearest_similarities`).

    Exact in fp32; queries are taken in chunks of about ``chunk_elements / Nb`` rows, so memory is bounded."""
    bank = bank.to(queries.dtype)
    rows = max(1, chunk_elements // max(1, bank.shape[0]))
    out = torch.empty(queries.shape[0], device=queries.device, dtype=torch.float32)
    for s in range(0, queries.shape[0], rows):
        out[s:s + rows] = nearest_similarities(queries[s:s + rows], bank, half_candidates=half_candidates)[0]
    return to_distance(out)


def distances_to_images(query: torch.Tensor, images: torch.Tensor,
                        chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Nearest-patch distance of each query patch [P, C] in each of ``images`` [W, Q, C] -> [W, P] fp32,
    a block of images at a time (memory bounded by ``chunk_elements`` similarities)."""
    w, n, _ = images.shape
    out = torch.empty(w, query.shape[0], device=query.device, dtype=torch.float32)
    block = max(1, chunk_elements // max(1, query.shape[0] * n))
    for s in range(0, w, block):
        out[s:s + block] = nearest_similarities(query, images[s:s + block])[0]  # [P, C] against [b, Q, C]
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
    partner), so the work is N * M / 2 pair products; memory is the output plus one block of similarities and the
    block's window of partner images."""
    n, p, _ = features.shape
    both, forward = partner_offsets(n, compare_with)
    m = 2 * len(both) + len(forward)
    out = torch.empty(n, m, p, device=features.device, dtype=torch.float32)
    block = chunk_images or max(1, PAIR_BLOCK_ELEMENTS // max(1, p * p))
    idx = torch.arange(n, device=features.device)
    order = idx if order is None else torch.as_tensor(order, device=features.device)
    offsets = both + forward
    for s in range(0, n, block):
        rows = idx[s:s + block]
        # gathered (and upcast) once for all offsets: the block's own rows, and the window of images its
        # partners come from (offset d's partners are rows d-1 onwards of it)
        mine = _for_product(features[order[rows]])
        ahead = _for_product(features[order[(s + 1 + torch.arange(len(rows) + max(offsets, default=1) - 1,
                                                                 device=features.device)) % n]])
        slot = 0
        for d in offsets:
            partners = (rows + d) % n
            near = nearest_similarities(mine, ahead[d - 1:d - 1 + len(rows)], both=d in both)
            out[rows, slot] = to_distance(near[0])
            if d in both:
                out[partners, slot + 1] = to_distance(near[1])
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
    with _as_given(q.device):
        sim = q.float() @ bank.float().t()  # one image against itself: small, so always fp32
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


def empty_rows(n: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised [n, ...] tensor with the dtype, device and row shape of ``like`` (a set's features)."""
    return like.new_empty((n, *like.shape[1:]))
