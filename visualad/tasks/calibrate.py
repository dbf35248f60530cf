"""Thresholds that turn scores into decisions, from normal images alone or from labelled ones.

- ``"percentile"`` (normal images only, the common case on a production line): the image threshold is a high
  percentile of the normal images' scores (default 99.5th) and the pixel threshold a high percentile of their
  map values (default 99.9th), so about 0.5% of normal parts and 0.1% of normal pixels are flagged.
- ``"f1"`` (normal and anomalous images): the image threshold maximising F1 on the given images, and the
  pixel threshold maximising pixel F1 when masks are given (else the normal-pixel percentile).

The image threshold is an operating point (:mod:`visualad.operating`): ``false_alarm_rate=R`` picks the order
statistic of the out-of-sample normal scores that flags a fraction R of normal parts, ``target_recall`` the
highest threshold that flags that share of the anomalous examples; ``operating_point`` names the one to use
("false_alarm", "percentile", "f1", "recall"). Every candidate the data allows is stored with what it means:
the expected false-alarm rate, a distribution-free upper bound on it, and the recall on anomalous examples.

A score is anomalous when it is ``>= threshold``. Thresholds hold for one mode: they record it (and, for
references, the bank's fingerprint). In references mode a normal image that is itself a reference is scored
against the other references only (leave-one-out): otherwise its nearest patch would be itself. In batch mode
the normal images are scored as one set. Each image runs through the model once.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..config import VisualADConfig
from ..data.masks import read_mask, resize_mask
from ..errors import ConfigError
from ..operating import (SELF_CALIBRATED, OperatingPoint, describe_threshold, false_alarm_threshold, kept_scores,
                         recall_threshold)
from ..data.images import image_digest
from ..progress import progress_bar
from ..runtime import pipeline
from ..runtime.readahead import Loaded

logger = logging.getLogger(__name__)

DEFAULT_PERCENTILE = 99.5
DEFAULT_PIXEL_PERCENTILE = 99.9


def scored(backend: Any, items: Sequence[Any], mode: Any, batch_size: int,
           progress: bool = False) -> Iterator[Tuple[Loaded, np.ndarray, float]]:
    """(input, model-size map, score, held out) of each item, out of sample: an input that is part of the
    scorer's own evidence (a reference) is scored by the scorer's ``holdout`` (leave-one-out)."""
    bar = progress_bar(len(items), progress, unit="img", desc="calibrate")
    if mode.kind == "images":
        for chunk in pipeline.read(backend, items, batch_size, on_error="raise"):
            own = [mode.holdout(image_digest(x.square)) for x in chunk]
            rest = [x for x, s in zip(chunk, own) if s is mode]
            out = {}
            if rest:
                maps, scores = backend.score(backend.prepare([x.square for x in rest]), mode)
                out = {id(x): (m, v) for x, m, v in zip(rest, maps, scores)}
            for x, s in zip(chunk, own):
                if s is not mode:
                    m, v = backend.score(backend.prepare([x.square]), s)
                    out[id(x)] = (m[0], v[0])
                x.square = None
                bar.update(1)
                yield x, out[id(x)][0], float(out[id(x)][1]), s is not mode
    else:
        for x, m, s in pipeline.run(backend, items, mode, batch_size, on_error="raise"):
            bar.update(1)
            yield x, m, s, False
    bar.close()


def calibrate(backend: Any, mode: Any, config: VisualADConfig, normal_images: Sequence[Any],
              anomalous_images: Optional[Sequence[Any]] = None, masks: Optional[Sequence[Any]] = None,
              method: str = "auto", percentile: float = DEFAULT_PERCENTILE,
              pixel_percentile: float = DEFAULT_PIXEL_PERCENTILE, batch_size: int = 8,
              progress: bool = False, false_alarm_rate: Optional[float] = None,
              target_recall: Optional[float] = None, operating_point: Optional[str] = None) -> Dict[str, Any]:
    """Set ``config``'s thresholds and score statistics for ``mode``; returns them."""
    if method == "auto":
        method = "f1" if anomalous_images else "percentile"
    if false_alarm_rate is not None and not 0.0 < false_alarm_rate < 1.0:
        raise ConfigError(f"false_alarm_rate must lie in (0, 1), got {false_alarm_rate!r}")
    if target_recall is not None and not (anomalous_images and 0.0 < target_recall <= 1.0):
        raise ConfigError("target_recall needs anomalous images and must lie in (0, 1]")
    if operating_point is None:
        operating_point = "false_alarm" if false_alarm_rate is not None else "recall" if target_recall else method
    possible = {"percentile": True, "false_alarm": false_alarm_rate is not None, "f1": method == "f1",
                "recall": method == "f1" and target_recall is not None}  # f1 scores the anomalous images
    if operating_point not in possible:
        raise ConfigError(f"operating_point must be false_alarm, percentile, f1 or recall, got {operating_point!r}")
    if not possible[operating_point]:  # said before any image is scored
        raise ConfigError(f"operating point {operating_point!r} needs "
                          + ("false_alarm_rate" if operating_point == "false_alarm" else "anomalous images"))
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

    size = backend.image_size
    total = len(normal_images) * size * size
    # The pixel percentile needs only the global top (100 - p)% of normal pixels: keep a running top-k.
    keep = min(total, math.ceil((100.0 - pixel_percentile) / 100.0 * total) + 2)
    top = np.empty(0, dtype=np.float32)
    normal_scores: List[float] = []
    medians: List[float] = []
    normal_maps: List[np.ndarray] = []  # only for the pixel F1 with masks
    held_out = 0
    for _x, amap, score, own in scored(backend, list(normal_images), mode, batch_size, progress):
        normal_scores.append(score)
        held_out += own
        flat = amap.ravel()
        top = np.concatenate([top, flat])
        if top.size > keep:
            top = np.partition(top, top.size - keep)[-keep:]
        medians.append(float(np.median(flat)))
        if masks is not None:
            normal_maps.append(flat)
    scores = np.asarray(normal_scores, dtype=np.float64)
    normal_only = scores  # `scores` gains the anomalous ones below (a new array)
    image_thr = float(np.percentile(scores, percentile))
    pixel_thr = _percentile_of_top(top, total, pixel_percentile)
    labels = np.zeros(len(scores), dtype=np.int8)

    if method == "f1":
        anomalous = list(anomalous_images)
        maps, gts = list(normal_maps), [np.zeros(m.size, dtype=bool) for m in normal_maps]
        anom_scores = []
        for i, (x, amap, score, _own) in enumerate(scored(backend, anomalous, mode, batch_size, progress)):
            anom_scores.append(score)
            if masks is not None:
                m = read_mask(masks[i], (x.height, x.width), image=x.path)
                maps.append(amap.ravel())
                gts.append(resize_mask(m, (size, size)).ravel())
        scores = np.concatenate([scores, anom_scores])
        labels = np.concatenate([labels, np.ones(len(anom_scores), dtype=np.int8)])
        if masks is not None:
            pixel_thr = f1_threshold(np.concatenate(maps), np.concatenate(gts).astype(np.int8))
    points = _operating_points(normal_only, scores[labels == 1], percentile, image_thr,
                               f1_threshold(scores, labels) if labels.any() else None, false_alarm_rate,
                               target_recall)
    if held_out == len(normal_only):  # the references set their own threshold
        points = {k: replace(p, calibrated_on=SELF_CALIBRATED) for k, p in points.items()}
    chosen = points[operating_point]
    image_thr = chosen.threshold
    if chosen.warning:
        logger.warning("%s", chosen.warning)

    mid = float(np.median(medians))
    describe = mode.describe()
    stats = {
        "method": method, "n_normal": int((labels == 0).sum()), "n_anomalous": int(labels.sum()),
        "min": float(scores.min()), "max": float(scores.max()),
        "normal_mean": float(scores[labels == 0].mean()), "normal_std": float(scores[labels == 0].std()),
        "percentile": percentile, "pixel_percentile": pixel_percentile,
        "dtype": backend.dtype_name,  # thresholds hold for this precision (bf16 moves scores ~0.01)
        "mode": describe["mode"],
        # overlay colour scale: the typical normal pixel at the bottom, the pixel threshold in the middle
        "map_min": mid, "map_max": pixel_thr + max(pixel_thr - mid, 1e-6),
        "operating_point": chosen.to_dict(),
        "operating_points": {name: p.to_dict() for name, p in points.items()},
        "normal_scores": kept_scores(normal_only),  # the page's slider reads the rate of any position from them
    }
    if "fingerprint" in describe:
        stats["references_fingerprint"] = describe["fingerprint"]
    config.image_threshold, config.pixel_threshold, config.score_stats = image_thr, pixel_thr, stats
    logger.info("calibrated (%s, %s mode): image threshold %.6g, pixel threshold %.6g", chosen.name, stats["mode"],
                image_thr, pixel_thr)
    return {"image_threshold": image_thr, "pixel_threshold": pixel_thr, **stats}


def _operating_points(normal: np.ndarray, anomalous: np.ndarray, percentile: float, percentile_thr: float,
                      f1_thr: Optional[float], false_alarm_rate: Optional[float],
                      target_recall: Optional[float]) -> Dict[str, OperatingPoint]:
    """Every operating point the data allows, each with what it means on these normal and anomalous scores."""
    anom = anomalous if anomalous.size else None
    points = {"percentile": describe_threshold("percentile", percentile_thr, normal, 1.0 - percentile / 100.0,
                                               anom)}
    if false_alarm_rate is not None:
        points["false_alarm"] = false_alarm_threshold(normal, false_alarm_rate, anom)
    if f1_thr is not None:
        points["f1"] = describe_threshold("f1", f1_thr, normal, None, anom)
    if target_recall is not None and anom is not None:
        points["recall"] = recall_threshold(normal, anom, target_recall)
    return points


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
