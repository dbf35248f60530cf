"""The one nearest-neighbour core of the references and batch modes (patch features, chunked, CPU and CUDA).

Features (MuSc's LNAMD, Li et al. ICLR 2024): per image, LayerNorm over (C, H, W) without affine, an r x r mean
over the patch grid (zero padding), L2 normalisation. Distances are Euclidean between those unit vectors,
``sqrt(2 - 2 cos)``, computed as matrix products in chunks so that memory stays bounded whatever the number of
images. The core keeps one copy of the layer-normed rows per block (:func:`layer_normed`) and derives every r
when it scores: a mean is linear, so the products of the r x r means are an r x r box filter of the rows' own
products over both grids (:func:`_box`), and one product of the rows serves r = 1 and r = 3 (measured:
mutual scoring in 0.69x the time of one product per r, on rows of ViT-S's size at 224 px; half the memory of
a set).

fp32 rows give the exact fp32 function. Half rows (fp16: the set features an engine keeps under dtype="auto"
or in bf16 or fp16, half the memory) are multiplied in a half dtype on the devices of :data:`HALF_PRODUCTS`
(CUDA: fp16, on tensor cores), and there, per r, a product of the unit rows only picks each patch's few nearest
candidates: their similarities are recomputed as fp32 dot products (:func:`nearest_similarities`), so no
distance is a rounded half product. References mode keeps fp32 rows (a small bank) and asks for the same
candidates there (``half_candidates``): an fp32 product on CUDA runs without tensor cores. Elsewhere half rows
are upcast block by block and multiplied in fp32 (a CPU's fp16 product is emulated on most CPUs). Measured on
shared/data (docs/modes.md, "Precision").
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .partners import (DEFAULT_BLOCK_FRACTIONS, DEFAULT_FRACTION, DEFAULT_R,  # noqa: F401 - the core's API
                       blocks_for_depth, grid_side, interval_count, partner_offsets)

CHUNK_ELEMENTS = 1 << 24  # similarity-matrix elements per chunk (64 MB in fp32)
#: similarities per block of image pairs (4 MB): 2^24 left the cache and was measured 2x slower per image on
#: ViT-S at 224 px (benchmarks/mode_speed.py); with the box filter's few copies of a block, 2^20 ran as fast as
#: 2^21 and held 56 MiB less at N = 256 (16 pairs a block at 224 px)
PAIR_BLOCK_ELEMENTS = 1 << 20


def layer_normed(features: torch.Tensor) -> torch.Tensor:
    """Patch features [B, N, C] -> LayerNorm over all of an image's (N, C) values without affine, [B, N, C] fp32:
    the rows that every aggregation size r is derived from (kept once per block)."""
    n, c = int(features.shape[1]), int(features.shape[2])  # plain ints, also while a graph is traced
    return F.layer_norm(features.float(), (n, c))


def _pool(rows: torch.Tensor, r: int) -> torch.Tensor:
    """Rows [..., P, R] on a square grid of P -> their r x r means over the grid (zero padding, counted),
    [..., P, R] (the trailing R values are channels: a view in channels-last order, no copy)."""
    if r == 1:
        return rows
    *lead, p, c = rows.shape
    g = grid_side(p)
    x = rows.reshape(-1, g, g, c).permute(0, 3, 1, 2)
    x = F.avg_pool2d(x, r, stride=1, padding=r // 2, count_include_pad=True)
    return x.permute(0, 2, 3, 1).reshape(*lead, p, c)


def aggregated(rows: torch.Tensor, r: int) -> torch.Tensor:
    """Layer-normed rows [..., P, C] -> the unit rows of aggregation size r (r x r mean, L2 norm), fp32."""
    return F.normalize(_pool(rows.float(), r), dim=-1, eps=1e-8)


def lnamd(features: torch.Tensor, r: int) -> torch.Tensor:
    """Patch features [B, N, C] -> LNAMD unit rows of aggregation size r, [B, N, C] fp32 (banks of schema 3)."""
    return aggregated(layer_normed(features), r)


def _box(products: torch.Tensor, r: int) -> torch.Tensor:
    """Products [..., P, Q] of the rows of two square grids -> the products of their r x r means: the mean of
    the r x r products around (p, q) on both grids, since a mean is linear; a few passes instead of a product."""
    if r == 1:
        return products
    # the second grid made the channels: a copy, but pooling the transposed view would run per 1-channel plane
    return _pool(_pool(products, r).transpose(-1, -2).contiguous(), r).transpose(-1, -2)


def inverse_norms(rows: torch.Tensor, rs: Sequence[int]) -> List[torch.Tensor]:
    """Rows [..., P, C] -> per r, 1 / the norm of each r x r mean, [..., P] fp32 (``F.normalize``'s divisor)."""
    rows = rows.float()
    return [_pool(rows, r).norm(dim=-1).clamp_min_(1e-8).reciprocal_() for r in rs]


def _aggregated_products(a: torch.Tensor, b: torch.Tensor, rs: Sequence[int],
                         norms: Optional[Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]] = None
                         ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per r: the fp32 products of the r x r means of rows ``a`` [..., P, C] and ``b`` [..., Q, C] [..., P, Q],
    and the inverse norms of those means, [..., P] and [..., Q] (``norms``: given, :func:`inverse_norms` of
    ``a`` and of ``b``): one product of the rows serves every r."""
    ia, ib = norms or (inverse_norms(a, rs), inverse_norms(b, rs))
    with _as_given(a.device):
        products = torch.matmul(a.float(), b.float().transpose(-1, -2))
    for i, r in enumerate(rs):
        yield _box(products, r), ia[i], ib[i]


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


def per_r(rows: torch.Tensor, rs: Sequence[int], half_candidates: bool = False) -> List[torch.Tensor]:
    """What :func:`nearest_similarities` derives from rows for each r: their :func:`inverse_norms` for the exact
    product, their unit rows (:func:`aggregated`) where a half product picks candidates. Computed once for rows
    that meet many others (a block of a set and its partners)."""
    if _candidate_dtype(rows, half_candidates) is None:
        return inverse_norms(rows, rs)
    return [aggregated(rows, r) for r in rs]


#: nearest-row candidates a half product keeps per row; their fp32 similarities decide (a half product's
#: rounding can reorder rows whose similarities differ by less than its spacing, 2^-11 near 1 in fp16)
CANDIDATES = 4


def _best_dot(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The largest fp32 dot product of each row of ``a`` [..., P, C] with its candidate rows ``index``
    [..., P, K] of ``b`` [..., Q, C] (leading dimensions broadcast) -> [..., P]."""
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2], index.shape[:-2])
    a, b = a.expand(*lead, *a.shape[-2:]), b.expand(*lead, *b.shape[-2:])
    c = b.shape[-1]
    flat = index.reshape(*index.shape[:-2], -1)  # [..., P * K]
    picked = b.gather(-2, flat.unsqueeze(-1).expand(*flat.shape, c)).reshape(*index.shape, c)
    return (a.float().unsqueeze(-2) * picked.float()).sum(dim=-1).amax(dim=-1)


def nearest_similarities(a: torch.Tensor, b: torch.Tensor, rs: Sequence[int], both: bool = False,
                         half_candidates: bool = False,
                         derived: Optional[Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]] = None
                         ) -> Tuple[torch.Tensor, ...]:
    """Layer-normed rows [..., P, C] x [..., Q, C] (square grids where some r > 1; leading dimensions broadcast)
    -> per r, the fp32 cosine similarity of each row's r x r mean to its nearest among the other side's,
    [R, ..., P] (and, with ``both``, of each row of ``b`` to its nearest row of ``a``, [R, ..., Q]).

    fp32 inputs (and half inputs off :data:`HALF_PRODUCTS`, upcast): one fp32 product of the rows, and each r's
    products from it by an r x r box filter on both grids (:func:`_box`), scaled by the means' inverse norms.
    Half inputs on those devices (and fp32 inputs there with ``half_candidates``): per r, a product of the unit
    means in the device's half dtype picks :data:`CANDIDATES` nearest rows, and the largest fp32 dot product
    among them is the similarity (always that of a real pair; below the exact maximum only when more rows than
    that tie within the half product's rounding). ``derived``: :func:`per_r` of ``a`` and of ``b``, if at hand."""
    product = _candidate_dtype(a, half_candidates)
    derived = derived or (per_r(a, rs, half_candidates), per_r(b, rs, half_candidates))
    rows: List[torch.Tensor] = []
    cols: List[torch.Tensor] = []
    if product is None:
        for sim, ia, ib in _aggregated_products(a, b, rs, derived):
            # max_q s[p, q] ia[p] ib[q] = ia[p] max_q s[p, q] ib[q]: one scaling pass per direction
            rows.append((sim * ib.unsqueeze(-2)).amax(dim=-1) * ia)
            if both:
                cols.append((sim * ia.unsqueeze(-1)).amax(dim=-2) * ib)
    else:
        for ar, br in zip(*derived):
            with _as_given(a.device):
                sim = torch.matmul(ar.to(product), br.to(product).transpose(-1, -2))
            rows.append(_best_dot(ar, br, sim.topk(min(CANDIDATES, sim.shape[-1]), dim=-1).indices))
            if both:
                index = sim.topk(min(CANDIDATES, sim.shape[-2]), dim=-2).indices.transpose(-1, -2)
                cols.append(_best_dot(br, ar, index))
    return (torch.stack(rows), torch.stack(cols)) if both else (torch.stack(rows),)


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, rs: Sequence[int],
                     chunk_elements: int = PAIR_BLOCK_ELEMENTS, half_candidates: bool = False) -> torch.Tensor:
    """Per r, the distance of each query patch [B, P, C] to its nearest patch among the bank's images
    [K * P, C] (layer-normed rows of images of the same grid) -> [R, B, P] fp32; see :func:`nearest_similarities`.

    Queries are taken a few images at a time (about ``chunk_elements`` similarities), so memory is bounded."""
    b, p, c = queries.shape
    images = bank.to(queries.dtype).reshape(-1, p, c)
    per = max(1, chunk_elements // max(1, images.shape[0] * p * p))
    out = torch.empty(len(rs), b, p, device=queries.device, dtype=torch.float32)
    for s in range(0, b, per):
        (sim,) = nearest_similarities(queries[s:s + per, None], images, rs, half_candidates=half_candidates)
        out[:, s:s + per] = sim.amax(dim=2)  # [R, b, K, P]: the nearest over the bank's images
    return to_distance(out)


def distances_to_images(query: torch.Tensor, images: torch.Tensor, rs: Sequence[int],
                        chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Per r, the nearest-patch distance of each query patch [P, C] in each of ``images`` [W, Q, C] -> [R, W, P]
    fp32, a block of images at a time (memory bounded by ``chunk_elements`` similarities)."""
    w, n, _ = images.shape
    out = torch.empty(len(rs), w, query.shape[0], device=query.device, dtype=torch.float32)
    block = max(1, chunk_elements // max(1, query.shape[0] * n))
    for s in range(0, w, block):
        out[:, s:s + block] = nearest_similarities(query, images[s:s + block], rs)[0]  # [P, C] against [b, Q, C]
    return to_distance(out)


def interval_average(distances: torch.Tensor, fraction: float = DEFAULT_FRACTION) -> torch.Tensor:
    """[..., M, P] distances of each patch to M other images -> [..., P]: mean of the lowest
    ``k = max(1, floor(fraction * M))`` (sorted first, so the result does not depend on the images' order)."""
    k = interval_count(distances.shape[-2], fraction)
    return distances.topk(k, dim=-2, largest=False, sorted=True).values.mean(dim=-2)


def _insert(lowest: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> None:
    """One more distance per patch [R, b, P] into the ascending lists ``lowest[:, rows]`` [R, b, K, P]: the
    largest of the K + 1 drops out (a min/max pass per place: K is a few)."""
    kept = lowest[:, rows]
    for j in range(kept.shape[2]):
        place = kept[:, :, j]
        smaller = torch.minimum(place, new)
        new = torch.maximum(place, new)
        kept[:, :, j] = smaller
    lowest[:, rows] = kept


def mutual_distances(features: torch.Tensor, compare_with: int, rs: Sequence[int], chunk_images: int = 0,
                     order: Optional[Sequence[int]] = None, keep: Optional[int] = None) -> torch.Tensor:
    """Mutual scoring of a set: layer-normed rows [N, P, C] -> [R, N, K, P] in comparison order: per r, the K
    (``keep``, default all) smallest of each patch's nearest distances in its M = min(compare_with, N - 1)
    partner images, ascending.

    ``order`` (a permutation of the N images, default as given) is the comparison order: row i of the output
    is image ``order[i]``; the features are indexed through it, never copied whole. One batched product per
    offset and block of images gives both directions of a pair (row maxima for p, column maxima for its
    partner) and every r, so the work is N * M / 2 pair products; memory is the K smallest distances (the
    interval average keeps 6 of 64: 12 MB at N = 1024 instead of 128 MB for all) plus one block of similarities
    and the block's window of partner images."""
    n, p, _ = features.shape
    both, forward = partner_offsets(n, compare_with)
    m = 2 * len(both) + len(forward)
    keep = m if keep is None else max(1, min(int(keep), m))
    lowest = torch.full((len(rs), n, keep, p), float("inf"), device=features.device, dtype=torch.float32)
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
        own, theirs = per_r(mine, rs), per_r(ahead, rs)
        for d in offsets:
            window = slice(d - 1, d - 1 + len(rows))
            near = nearest_similarities(mine, ahead[window], rs, both=d in both,
                                        derived=(own, [t[window] for t in theirs]))
            _insert(lowest, rows, to_distance(near[0]))
            if d in both:
                _insert(lowest, (rows + d) % n, to_distance(near[1]))
    return lowest


def without_rows(bank: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The bank less rows [start, stop) (one reference image's patches)."""
    return torch.cat([bank[:start], bank[stop:]])


def nearest_outside_neighbourhood(q: torch.Tensor, bank: torch.Tensor, rs: Sequence[int]) -> torch.Tensor:
    """One image's layer-normed patches [P, C] against the same image's [P, C] outside each patch's 3x3 grid
    neighbourhood -> [R, P] (leave-one-out with a single reference; always fp32: one image against itself)."""
    g = grid_side(q.shape[0])
    yy, xx = torch.meshgrid(torch.arange(g, device=q.device), torch.arange(g, device=q.device), indexing="ij")
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    near = ((yy[:, None] - yy[None]).abs() <= 1) & ((xx[:, None] - xx[None]).abs() <= 1)
    out = [(sim * ia[:, None] * ib[None]).masked_fill_(near, -1.0).amax(dim=1)
           for sim, ia, ib in _aggregated_products(q, bank, rs)]
    return to_distance(torch.stack(out))


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
