"""From model-size maps to what a user gets: the map at the image's original size, thresholds, labels.

Thresholds know the mode they were calibrated in (and, for references, the bank's fingerprint): in another
mode they are not applied, and the result says so once in the log instead of flagging every part.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np

from ..config import VisualADConfig
from ..data import images as imio
from ..errors import WeightsError
from ..result import AnomalyResult
from .readahead import Loaded

logger = logging.getLogger(__name__)


def make_result(x: Loaded, model_map: Optional[np.ndarray], score: float, mode: str,
                at_model_size: bool = False, resize: Callable[[np.ndarray, int, int], np.ndarray] = imio.resize_map
                ) -> AnomalyResult:
    """The result of one input: its map resized to the original size (bilinear, ``resize``), or its error."""
    if not x.ok:
        return AnomalyResult(pred_score=float("nan"), anomaly_map=None, image_path=x.path, error=str(x.error),
                             mode=mode)
    if not np.isfinite(score) or not np.isfinite(model_map).all():
        return AnomalyResult(pred_score=float("nan"), anomaly_map=None, image_path=x.path, mode=mode,
                             error=f"{x.path or 'input'}: the model produced NaN or infinite values (broken weights "
                                   "or references); no score", image_size=(x.height, x.width))
    amap = model_map if at_model_size else resize(model_map, x.height, x.width)
    return AnomalyResult(pred_score=score, anomaly_map=amap, image_path=x.path, image=x.image, mode=mode,
                         image_size=(x.height, x.width))


def finish(scored: Iterable[Tuple[Loaded, Optional[np.ndarray], float]], scorer: Any, config: VisualADConfig,
           thresholds: "Thresholds", dtype: str, threshold: Optional[float] = None, at_model_size: bool = False,
           on_error: str = "return", resize: Callable[[np.ndarray, int, int], np.ndarray] = imio.resize_map
           ) -> Iterator[AnomalyResult]:
    """(input, model-size map, score) -> results with the thresholds of ``scorer``'s mode applied; a
    non-finite output of a readable input raises :class:`WeightsError` when ``on_error="raise"``."""
    described = scorer.describe()
    for x, amap, score in scored:
        res = make_result(x, amap, score, described["mode"], at_model_size=at_model_size, resize=resize)
        if x.ok and not res.ok and on_error == "raise":  # the input was fine, the output is not finite
            raise WeightsError(res.error)
        thresholds.apply(res, config, described, dtype, threshold)
        yield res


def operating_point(stats: Dict[str, Any]) -> str:
    """What a calibrated threshold means, from its score statistics (configs before operating points: their
    percentile)."""
    point = stats.get("operating_point")
    if isinstance(point, dict) and isinstance(point.get("description"), str):
        return point["description"]
    if stats.get("method") == "f1":
        return f"F1-optimal threshold on {stats.get('n_normal', '?')} normal and {stats.get('n_anomalous', '?')} " \
               "anomalous images"
    return f"threshold at the {stats.get('percentile', '?')}th percentile of {stats.get('n_normal', '?')} normal scores"


def mismatch(config: VisualADConfig, mode: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    """Why the config's thresholds do not hold for a scorer that ``describe()``s as ``mode`` (a key and the
    warning), or None when they hold (older configs were calibrated in head mode)."""
    stats = config.score_stats or {}
    calibrated = stats.get("mode", "head")
    if calibrated != mode["mode"]:
        return (f"mode:{mode['mode']}", f"thresholds were calibrated in {calibrated} mode and this prediction runs "
                f"in {mode['mode']} mode: pred_label stays None; calibrate in {mode['mode']} mode "
                f"(detector.calibrate(normal_images, mode={mode['mode']!r}))")
    fp = stats.get("references_fingerprint")
    if "fingerprint" in mode and fp is not None and fp != mode["fingerprint"]:
        return ("bank", "thresholds were calibrated with other reference images: pred_label stays None; calibrate "
                "again after set_references")
    return None


class Thresholds:
    """Applies the calibrated thresholds of a config to results, warning once per reason."""

    def __init__(self) -> None:
        self._warned: set = set()

    def _warn_once(self, key: str, msg: str, *args: Any, level: int = logging.WARNING) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.log(level, msg, *args)

    def applicable(self, config: VisualADConfig, mode: Dict[str, Any]) -> bool:
        """Whether the config's thresholds were calibrated in this mode (older configs: the head mode)."""
        why = mismatch(config, mode)
        if why is not None:
            self._warn_once(why[0], "%s", why[1])
        return why is None

    def apply(self, res: AnomalyResult, config: VisualADConfig, mode: Dict[str, Any], dtype: str,
              threshold: Optional[float] = None) -> None:
        if not res.ok:
            return
        stats = config.score_stats or {}
        if threshold is None:
            if config.image_threshold is None:
                self._warn_once("none", "no threshold: pred_label stays None; call detector.calibrate("
                                "normal_images) or pass threshold=", level=logging.INFO)
                return
            if not self.applicable(config, mode):
                return
            calibrated_in = stats.get("dtype")
            if calibrated_in and calibrated_in != dtype:
                self._warn_once("dtype", "thresholds were calibrated in %s but the model runs in %s: scores "
                                "differ slightly between precisions; calibrate again in this dtype or load "
                                "with dtype=%r", calibrated_in, dtype, calibrated_in)
            if "map_min" in stats and "map_max" in stats:
                res.map_range = (stats["map_min"], stats["map_max"])
        thr = threshold if threshold is not None else config.image_threshold
        res.threshold = float(thr)
        res.operating_point = "threshold set by hand" if threshold is not None else operating_point(stats)
        res.pred_label = bool(res.pred_score >= thr)
        lo, hi = stats.get("min"), stats.get("max")
        span = (hi - lo) if lo is not None and hi is not None and hi > lo else 1.0
        res.normalized_score = float(min(1.0, max(0.0, (res.pred_score - thr) / span + 0.5)))
        pix = config.pixel_threshold if threshold is None else None
        if pix is not None and res.anomaly_map is not None:
            res.pixel_threshold = float(pix)
            res.pred_mask = res.anomaly_map >= pix
