"""Exact, memory-bounded evaluation metrics for anomaly detection (plain NumPy in and out).

Why this module exists: the reference implementations call scikit-learn once per metric, and every call
re-sorts all pixels of a class (tens to hundreds of millions), and the papers' AUPRO loops over 200
thresholds with a connected-component pass per threshold. Here every metric of a class comes from one
sorted sweep over the scores:

* positives and negatives are split and sorted separately (float32 stays float32: half the memory of a
  joint argsort, no int64 index array over all pixels);
* the two sorted arrays are swept from the highest score downwards in bounded value chunks; in each
  chunk they are merged and the curve is evaluated at every *distinct* score value, exactly as
  scikit-learn's ``_binary_clf_curve`` does (ties are one threshold);
* AUROC (exact, integer arithmetic), AP (scikit-learn's ``average_precision_score``: sum over recall steps
  of the precision) and F1-max (max of 2PR/(P+R) over the points of ``precision_recall_curve``) are
  accumulated chunk by chunk;
* AUPRO is the same sweep with a weight on every positive pixel, ``1 / (region size * number of
  regions)``: the per-region overlap averaged over regions at threshold ``t`` is the weighted count of
  positive pixels scoring ``>= t``. Regions are labelled once per image (OpenCV, 8-connectivity).

Values are fractions in [0, 1]; a metric that is undefined (only one class present, no ground-truth
region, no negative pixel) is NaN, never an exception. Bad input (shape mismatch, NaN/Inf scores,
labels other than 0/1) raises :class:`ValueError`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["image_metrics", "pixel_metrics", "aupro", "AUPRO_VARIANTS"]

logger = logging.getLogger(__name__)

AUPRO_VARIANTS = ("mvtec", "zsad")
"""``"mvtec"``: the MVTec AD definition (default). ``"zsad"``: the zero-shot papers' 200-threshold variant."""

_CHUNK = 1 << 16  # elements per sorted array per sweep chunk: bounds the temporaries (~4 MB), cache-friendly
# (float dot products are written as multiply + sum on purpose: np.dot goes to a multi-threaded BLAS whose
# per-call synchronisation cost dominated the sweep on a busy machine)
_ZSAD_STEPS = 200
_NAN = float("nan")


# --------------------------------------------------------------------------------------------- input


def _as_scores(x: Any, name: str) -> np.ndarray:
    """Scores as a float array without losing distinct values (float64 stays float64, float32 stays float32)."""
    a = np.asarray(x)
    if a.dtype.kind == "f":
        if a.dtype.itemsize < 4:
            a = a.astype(np.float32)
    elif a.dtype.kind in "iub":
        a = a.astype(np.float64)
    else:
        try:
            a = a.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be numeric, got dtype {a.dtype}") from exc
    return a


def _as_labels(y: Any, name: str) -> np.ndarray:
    """Ground truth as bool; only bool or values in {0, 1} are accepted (a 0/255 mask is a bug upstream)."""
    a = np.asarray(y)
    if a.dtype == np.bool_:
        return a
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be bool or 0/1, got dtype {a.dtype}")
    if a.size and not np.all((a == 0) | (a == 1)):
        bad = np.unique(a[(a != 0) & (a != 1)])[:5]
        raise ValueError(f"{name} must contain only 0 and 1 (or be bool); found e.g. {bad.tolist()}")
    return a != 0


def _check_finite(sorted_arr: np.ndarray, name: str) -> None:
    """NumPy sorts NaN last and +-Inf to the ends, so the two ends of a sorted array tell it all."""
    if sorted_arr.size and not (np.isfinite(sorted_arr[0]) and np.isfinite(sorted_arr[-1])):
        raise ValueError(f"{name} contains NaN or Inf; scores must be finite")


@dataclass
class _Sorted:
    """Scores of the positives and negatives of one class, each sorted ascending."""

    pos: np.ndarray
    neg: np.ndarray
    pos_w: Optional[np.ndarray] = None  # AUPRO weight of each sorted positive (float64), or None
    n_regions: int = 0


def _split_sorted(scores: np.ndarray, labels: np.ndarray, name: str) -> _Sorted:
    pos = scores[labels]  # boolean indexing with a same-shape mask: no int64 index array
    neg = scores[~labels]
    neg.sort()
    _check_finite(neg, name)
    return _Sorted(pos=pos, neg=neg)


def _prepare_pixels(maps: Any, masks: Any, regions: bool) -> _Sorted:
    """Validate (N,H,W) maps and masks, or lists of (H_i,W_i) pairs of different sizes (maps scored at each
    image's own resolution); split, sort; optionally label GT regions and weight positives."""
    if isinstance(maps, (list, tuple)):
        return _prepare_pixel_list(maps, masks, regions)
    m = _as_scores(maps, "maps")
    g = _as_labels(masks, "masks")
    if m.ndim == 2:
        m = m[None]
    if g.ndim == 2:
        g = g[None]
    if m.ndim != 3:
        raise ValueError(f"maps must have shape (N, H, W), got {np.shape(maps)}")
    if m.shape != g.shape:
        raise ValueError(f"maps and masks must have the same shape, got {np.shape(maps)} and {np.shape(masks)}")
    g = np.ascontiguousarray(g)
    s = _split_sorted(m, g, "maps")
    return _order_positives(s, _label_regions(g) if regions else None)


def _prepare_pixel_list(maps: Any, masks: Any, regions: bool) -> _Sorted:
    if not isinstance(masks, (list, tuple)) or len(masks) != len(maps):
        raise ValueError("a list of maps needs a list of masks of the same length")
    pos, neg, rids, sizes = [], [], [], []
    base = 0
    for i, (mi, gi) in enumerate(zip(maps, masks)):
        m, g = _as_scores(mi, "maps"), _as_labels(gi, "masks")
        if m.ndim != 2 or m.shape != g.shape:
            raise ValueError(f"maps[{i}] and masks[{i}] must be 2-D of the same shape, got {m.shape} and {g.shape}")
        g = np.ascontiguousarray(g)
        pos.append(m[g])
        neg.append(m[~g])
        if regions:
            rid, size = _label_regions(g[None])
            rids.append(rid + base)
            sizes.append(size)
            base += size.size
    s = _Sorted(pos=np.concatenate(pos), neg=np.concatenate(neg))
    s.neg.sort()
    _check_finite(s.neg, "maps")
    labelled = (np.concatenate(rids), np.concatenate(sizes)) if regions else None
    return _order_positives(s, labelled)


def _order_positives(s: _Sorted, labelled: "Optional[tuple[np.ndarray, np.ndarray]]") -> _Sorted:
    """Sort the positives; with GT regions, carry each positive pixel's AUPRO weight along."""
    if labelled is None:
        s.pos.sort()
        _check_finite(s.pos, "maps")
        return s
    order = np.argsort(s.pos)
    s.pos = s.pos[order]
    _check_finite(s.pos, "maps")
    rid, sizes = labelled
    n_regions = int(sizes.size)
    s.n_regions = n_regions
    if n_regions:
        w_region = 1.0 / (sizes.astype(np.float64) * n_regions)
        s.pos_w = w_region[rid[order]]
    logger.debug("metrics: %d positive / %d negative pixels, %d GT regions", s.pos.size, s.neg.size, n_regions)
    return s


def _label_regions(masks: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
    """Region id of every positive pixel (in ``maps[masks]`` order) and the size of every region.

    Regions are 8-connected components of each image's mask (skimage's default full connectivity in 2-D,
    as in the MVTec and the papers' code); a region never spans two images.
    """
    import cv2  # a declared dependency; imported here so the rest of the module works without it

    counts = masks.reshape(masks.shape[0], -1).sum(axis=1)
    rid = np.empty(int(counts.sum()), dtype=np.int64 if counts.sum() >= 2**31 else np.int32)
    sizes = []
    off = base = 0
    for i in np.flatnonzero(counts):
        n_lab, lab, stats, _ = cv2.connectedComponentsWithStats(
            masks[i].view(np.uint8), connectivity=8, ltype=cv2.CV_32S
        )
        c = int(counts[i])
        rid[off : off + c] = lab[masks[i]] + (base - 1)
        sizes.append(stats[1:, cv2.CC_STAT_AREA])
        off += c
        base += n_lab - 1
    return rid, (np.concatenate(sizes) if sizes else np.zeros(0, np.int64))


# --------------------------------------------------------------------------------------------- sweep


def _sweep(
    s: _Sorted, *, ranking: bool, fpr_limit: Optional[float], chunk: Optional[int] = None
) -> Dict[str, float]:
    """One pass from the highest score down over every distinct score value.

    At each distinct value t: tp = #positives >= t, fp = #negatives >= t, pw = summed AUPRO weight of the
    positives >= t (= mean region overlap). ``ranking`` accumulates AUROC/AP/F1-max; ``fpr_limit``
    accumulates the PRO-over-FPR area up to the limit (interpolated exactly there) and stops early when
    nothing else is needed.
    """
    pos, neg, pos_w = s.pos, s.neg, s.pos_w
    n_pos, n_neg = pos.size, neg.size
    chunk = int(chunk or _CHUNK)
    want_pro = fpr_limit is not None and pos_w is not None and n_neg > 0
    out: Dict[str, float] = {}
    if ranking and (n_pos == 0 or n_neg == 0):
        logger.debug("metrics: only one class present (%d positives, %d negatives) -> NaN", n_pos, n_neg)
        out.update(auroc=_NAN, ap=_NAN, f1_max=_NAN)
        ranking = False
    if not ranking and not want_pro:
        if fpr_limit is not None:
            out["aupro"] = _NAN
        return out

    cuts = np.union1d(pos[::chunk], neg[::chunk])  # chunk k holds the values in [cuts[k], cuts[k+1])
    pb = np.append(np.searchsorted(pos, cuts, "left"), n_pos)
    nb = np.append(np.searchsorted(neg, cuts, "left"), n_neg)

    tp_prev = fp_prev = 0
    pw_prev = 0.0
    auc2 = 0  # exact: sum of dfp * (tp + tp_prev) = 2 * P * N * AUROC
    ap_sum = 0.0
    f1_max = 0.0
    pro_area = 0.0
    pro_open = want_pro
    lim = float(fpr_limit) if fpr_limit is not None else 0.0

    for k in range(cuts.size - 1, -1, -1):
        ps = pos[pb[k] : pb[k + 1]]
        ns = neg[nb[k] : nb[k + 1]]
        m_p = ps.size
        vals = np.concatenate((ps, ns))
        order = np.argsort(vals, kind="stable")  # merges two sorted runs: linear time
        v = vals[order][::-1]  # descending
        is_pos = (order < m_p)[::-1]
        ends = np.flatnonzero(v[1:] != v[:-1])
        ends = np.append(ends, v.size - 1)  # last index of each run of equal values
        del vals, v
        tpc = np.cumsum(is_pos, dtype=np.int64)[ends]
        tp = tp_prev + tpc
        fp = fp_prev + (ends + 1 - tpc)
        tp_all = np.concatenate(([tp_prev], tp))
        fp_all = np.concatenate(([fp_prev], fp))

        if ranking:
            dtp = tp_all[1:] - tp_all[:-1]
            dfp = fp_all[1:] - fp_all[:-1]
            auc2 += int((dfp * (tp_all[1:] + tp_all[:-1])).sum())
            precision = tp / (tp + fp).astype(np.float64)
            ap_sum += float((dtp * precision).sum())
            recall = tp / float(n_pos)
            denom = precision + recall
            f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
            f1_max = max(f1_max, float(f1.max()))

        if pro_open:  # only until the FPR passes the limit
            wm = np.zeros(order.size, dtype=np.float64)
            wm[:m_p] = pos_w[pb[k] : pb[k + 1]]
            pw = pw_prev + np.cumsum(wm[order][::-1])[ends]
            x = fp_all / float(n_neg)
            y = np.concatenate(([pw_prev], pw))
            j = int(np.searchsorted(x, lim, "right"))  # x[:j] <= lim < x[j:]
            if j >= 2:
                pro_area += float(((x[1:j] - x[: j - 1]) * (y[1:j] + y[: j - 1])).sum()) / 2.0
            if j < x.size:  # the curve crosses the limit inside (x[j-1], x[j]]: interpolate there
                x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
                y_lim = y0 + (y1 - y0) * (lim - x0) / (x1 - x0)
                pro_area += (lim - x0) * (y0 + y_lim) / 2.0
                pro_open = False
            pw_prev = float(pw[-1])
        tp_prev, fp_prev = int(tp[-1]), int(fp[-1])
        if not ranking and not pro_open:
            break

    if ranking:
        out["auroc"] = _clip(auc2 / (2 * n_pos * n_neg))
        out["ap"] = _clip(ap_sum / n_pos)
        out["f1_max"] = _clip(f1_max)
    if fpr_limit is not None:
        out["aupro"] = _clip(pro_area / lim) if want_pro else _NAN
    return out


def _clip(v: float) -> float:
    """Guard against 1 + 1e-16 from float rounding; NaN passes through."""
    return v if math.isnan(v) else min(1.0, max(0.0, float(v)))


def _aupro_zsad(s: _Sorted, fpr_limit: float, steps: int = _ZSAD_STEPS) -> float:
    """The papers' ``cal_pro_score`` (VisualAD, AnomalyCLIP, APRIL-GAN), vectorised, same numbers.

    Thresholds ``np.arange(min, max, (max - min) / 200)`` over the class-wide min/max of the maps, built
    exactly as the authors do; a pixel is predicted anomalous when its score is ``> threshold``; PRO = mean
    over regions of the overlap; keep the points with FPR <= ``fpr_limit``; min-max rescale the kept FPRs
    to [0, 1]; trapezoid. Returns 0.0 when the maps are constant or fewer than 2 points are kept (as the
    authors' code does) or the kept FPRs are all equal (theirs gives NaN there); NaN when there is no GT
    region or no negative pixel.
    """
    pos, neg, pos_w = s.pos, s.neg, s.pos_w
    if pos_w is None or neg.size == 0:
        return _NAN
    lo = min(pos[0], neg[0])  # scalars of the maps' dtype, as ``amaps.min()`` in the authors' code
    hi = max(pos[-1], neg[-1])
    if abs(float(hi) - float(lo)) < 1e-12:
        return 0.0
    th = np.arange(lo, hi, (hi - lo) / steps)  # the authors' thresholds, literally (200, rarely 201)
    # count(x > th) for x of the array's dtype equals count(x > floor_to_dtype(th)); searching with keys
    # of the array's own dtype avoids NumPy upcasting (copying) the whole sorted array.
    th_d = th.astype(pos.dtype)
    over = th_d.astype(np.float64) > th
    th_d[over] = np.nextafter(th_d[over], np.asarray(-np.inf, dtype=pos.dtype))
    fpr = (neg.size - np.searchsorted(neg, th_d, "right")) / float(neg.size)
    cw = np.concatenate(([0.0], np.cumsum(pos_w)))
    pro = cw[-1] - cw[np.searchsorted(pos, th_d, "right")]
    keep = fpr <= fpr_limit
    if keep.sum() < 2:
        return 0.0
    f, p = fpr[keep], pro[keep]
    span = f.max() - f.min()
    if not span > 0:
        return 0.0
    f = (f - f.min()) / span
    # sklearn.metrics.auc on a monotone decreasing x: -trapezoid
    area = -float((np.diff(f) * (p[1:] + p[:-1])).sum()) / 2.0
    return _clip(area)


# -------------------------------------------------------------------------------------------- public


def image_metrics(scores: Any, labels: Any) -> Dict[str, float]:
    """Image-level AUROC, AP and F1-max; equal to scikit-learn's ``roc_auc_score``,
    ``average_precision_score`` and the max F1 over ``precision_recall_curve`` (ties included).

    ``scores``: (N,) floats, higher = more anomalous. ``labels``: (N,) bool or 0/1 (1 = anomalous).
    Returns ``{"auroc", "ap", "f1_max"}``; all NaN when only one class is present.
    """
    x = _as_scores(scores, "scores")
    y = _as_labels(labels, "labels")
    if x.ndim != 1 or y.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"scores and labels must be 1-D of the same length, got {np.shape(scores)} and {np.shape(labels)}"
        )
    s = _split_sorted(x, y, "scores")
    s.pos.sort()
    _check_finite(s.pos, "scores")
    return _sweep(s, ranking=True, fpr_limit=None)


def pixel_metrics(
    maps: Any, masks: Any, *, aupro_fpr_limit: float = 0.3, with_aupro: bool = True
) -> Dict[str, float]:
    """Pixel-level AUROC, AP, F1-max and AUPRO (MVTec definition) of one class, from a single sort.

    ``maps``: (N, H, W) anomaly maps (float). ``masks``: (N, H, W) bool or 0/1 ground truth.
    Returns ``{"auroc", "ap", "f1_max", "aupro"}``; ``aupro`` is NaN when ``with_aupro=False`` or when
    there is no GT region; the others are NaN when only one class is present.
    """
    _check_limit(aupro_fpr_limit)
    s = _prepare_pixels(maps, masks, regions=with_aupro)
    out = _sweep(s, ranking=True, fpr_limit=aupro_fpr_limit if with_aupro else None)
    out.setdefault("aupro", _NAN)
    return {k: out[k] for k in ("auroc", "ap", "f1_max", "aupro")}


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3, variant: str = "mvtec") -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

    ``variant="mvtec"`` (default, the MVTec AD definition, what anomalib reports): at every distinct score
    threshold, PRO = mean over all 8-connected GT regions (of all images) of the fraction of the region's
    pixels scoring >= threshold, FPR = false-positive pixels / all GT-negative pixels; integrate PRO over
    FPR in [0, fpr_limit] (trapezoid, interpolated exactly at the limit) and divide by ``fpr_limit``:
    1.0 = perfect. Invariant to any monotone rescaling of the maps.

    ``variant="zsad"``: the zero-shot papers' ``cal_pro_score`` (200 thresholds between the maps' min and
    max, keep FPR <= ``fpr_limit``, rescale the kept FPRs to [0, 1], trapezoid). Only for comparing with
    published tables: it is not the definition and depends on the maps' scale and outliers.

    NaN when there is no GT region or no negative pixel.
    """
    if variant not in AUPRO_VARIANTS:
        raise ValueError(f"variant must be one of {AUPRO_VARIANTS}, got {variant!r}")
    _check_limit(fpr_limit)
    s = _prepare_pixels(maps, masks, regions=True)
    if variant == "zsad":
        return _aupro_zsad(s, float(fpr_limit))
    return _sweep(s, ranking=False, fpr_limit=float(fpr_limit))["aupro"]


def _check_limit(fpr_limit: float) -> None:
    if not (isinstance(fpr_limit, (int, float, np.floating)) and 0.0 < float(fpr_limit) <= 1.0):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")


def recall_at_false_alarms(scores: Any, labels: Any, rate: float) -> float:
    """Image-level recall at a false-alarm rate: the threshold flags at most ``floor(rate * n_normal)`` of the
    normal images (a score must lie above the next normal score to be flagged: ties are not), and the recall
    is the share of anomalous images it flags. NaN without normal or anomalous images."""
    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D of the same length, got {x.shape} and {y.shape}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must lie in [0, 1), got {rate!r}")
    normal, anomalous = np.sort(x[~y])[::-1], x[y]
    if normal.size == 0 or anomalous.size == 0:
        return math.nan
    allowed = int(math.floor(rate * normal.size + 1e-9))  # normal images that may be flagged
    return float(np.mean(anomalous > normal[allowed])) if allowed < normal.size else 1.0
