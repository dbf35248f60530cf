"""Thresholds that turn scores into decisions, from normal images alone or from labelled ones.

- ``"percentile"`` (normal images only, the common case on a production line): the image threshold is a high
  percentile of the normal images' scores (default 99.5th) and the pixel threshold a high percentile of their
  map values (default 99.9th), so about 0.5% of normal parts and 0.1% of normal pixels are flagged.
- ``"f1"`` (normal and anomalous images): the image threshold maximising F1 on the given images, and the
  pixel threshold maximising pixel F1 when masks are given (else the normal-pixel percentile).

A score is anomalous when it is ``>= threshold``. The statistics that ``normalized_score`` and the
calibrated overlay scale need are stored in the config with the thresholds, so save_pretrained keeps them.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np

from .detector import dtype_name
from .errors import ConfigError

if TYPE_CHECKING:
    from .detector import AnomalyDetector

logger = logging.getLogger(__name__)

DEFAULT_PERCENTILE = 99.5
DEFAULT_PIXEL_PERCENTILE = 99.9


def calibrate(detector: "AnomalyDetector", normal_images: Sequence[Any], anomalous_images: Optional[Sequence[Any]] = None,
              masks: Optional[Sequence[Any]] = None, method: str = "auto", percentile: float = DEFAULT_PERCENTILE,
              pixel_percentile: float = DEFAULT_PIXEL_PERCENTILE, batch_size: int = 8,
              progress: bool = False) -> Dict[str, Any]:
    """Set ``detector.config`` thresholds and score statistics; returns them."""
    if method == "auto":
        method = "f1" if anomalous_images else "percentile"
    if method not in ("percentile", "f1"):
        raise ConfigError(f"method must be 'auto', 'percentile' or 'f1', got {method!r}")
    if not normal_images:
        raise ConfigError("calibrate needs at least one normal image")
    if method == "f1" and not anomalous_images:
        raise ConfigError("method='f1' needs anomalous images")
    if masks is not None and (anomalous_images is None or len(masks) != len(anomalous_images)):
        raise ConfigError("masks must match anomalous_images one to one")
    if not (50.0 <= percentile <= 100.0 and 50.0 <= pixel_percentile <= 100.0):
        raise ConfigError("percentiles must lie in [50, 100]")

    normal_scores: List[float] = []
    medians: List[float] = []
    size = detector.config.image_size
    total = len(normal_images) * size * size
    # The pixel percentile needs only the global top (100 - p)% of normal pixels: keep a running top-k.
    keep = min(total, math.ceil((100.0 - pixel_percentile) / 100.0 * total) + 2)
    top = np.empty(0, dtype=np.float32)
    for res in detector.predict_iter(list(normal_images), batch_size=batch_size, on_error="raise",
                                     progress=progress, at_model_size=True):
        normal_scores.append(res.pred_score)
        flat = res.anomaly_map.ravel()
        top = np.concatenate([top, flat])
        if top.size > keep:
            top = np.partition(top, top.size - keep)[-keep:]
        medians.append(float(np.median(flat)))
    scores = np.asarray(normal_scores, dtype=np.float64)
    image_thr = float(np.percentile(scores, percentile))
    pixel_thr = _percentile_of_top(top, total, pixel_percentile)
    labels = np.zeros(len(scores), dtype=np.int8)

    if method == "f1":
        anomalous = list(anomalous_images)
        anom_results = list(detector.predict_iter(anomalous, batch_size=batch_size, on_error="raise",
                                                  progress=progress, at_model_size=masks is not None))
        scores = np.concatenate([scores, [r.pred_score for r in anom_results]])
        labels = np.concatenate([labels, np.ones(len(anom_results), dtype=np.int8)])
        image_thr = f1_threshold(scores, labels)
        if masks is not None:
            pixel_thr = _pixel_f1_threshold(detector, normal_images, anom_results, masks, batch_size)

    mid = float(np.median(medians))
    stats = {
        "method": method, "n_normal": int((labels == 0).sum()), "n_anomalous": int(labels.sum()),
        "min": float(scores.min()), "max": float(scores.max()),
        "normal_mean": float(scores[labels == 0].mean()), "normal_std": float(scores[labels == 0].std()),
        "percentile": percentile, "pixel_percentile": pixel_percentile,
        "dtype": dtype_name(detector.dtype),  # thresholds hold for this precision (bf16 moves scores ~0.01)
        # overlay colour scale: the typical normal pixel at the bottom, the pixel threshold in the middle
        "map_min": mid, "map_max": pixel_thr + max(pixel_thr - mid, 1e-6),
    }
    cfg = detector.config
    cfg.image_threshold, cfg.pixel_threshold, cfg.score_stats = image_thr, pixel_thr, stats
    logger.info("calibrated (%s): image threshold %.6g, pixel threshold %.6g", method, image_thr, pixel_thr)
    return {"image_threshold": image_thr, "pixel_threshold": pixel_thr, **stats}


def _percentile_of_top(top: np.ndarray, total: int, q: float) -> float:
    """np.percentile(all values, q) (linear interpolation) from only the largest values of the population."""
    pos = q / 100.0 * (total - 1)  # rank from the bottom of the whole population
    top = np.sort(top)
    offset = total - top.size  # ranks below the kept values
    lo = int(math.floor(pos)) - offset
    hi = min(lo + 1, top.size - 1)
    if lo < 0:
        raise ValueError("not enough top values kept for this percentile")
    frac = pos - math.floor(pos)
    return float(top[lo] + (top[hi] - top[lo]) * frac)


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score t maximising F1 of ``score >= t`` (ties broken toward the higher threshold)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.int64)
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    last = np.r_[np.diff(s) != 0, True]  # the last index of each run of equal scores
    tp, fp, s = tp[last], fp[last], s[last]
    pos = int(y.sum())
    f1 = 2 * tp / np.maximum(tp + fp + pos, 1)
    return float(s[int(np.argmax(f1))])


def _pixel_f1_threshold(detector: "AnomalyDetector", normal_images: Sequence[Any], anom_results: List[Any],
                        masks: Sequence[Any], batch_size: int) -> float:
    from .data.images import load_image, resize_map

    size = detector.config.image_size
    maps, gts = [], []
    for res, mask in zip(anom_results, masks):
        m = load_image(mask).array[..., 0] > 0 if not isinstance(mask, np.ndarray) else np.asarray(mask) > 0
        maps.append(res.anomaly_map.ravel())
        gts.append(resize_map(m.astype(np.float32), size, size).ravel() > 0.5)
    for res in detector.predict_iter(list(normal_images), batch_size=batch_size, at_model_size=True):
        maps.append(res.anomaly_map.ravel())
        gts.append(np.zeros(res.anomaly_map.size, dtype=bool))
    return f1_threshold(np.concatenate(maps), np.concatenate(gts).astype(np.int8))
