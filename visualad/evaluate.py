"""Dataset -> batched predictions -> per-class metrics and their mean (the report format of api.md).

By default maps are scored at the model's input size with masks resized the authors' way (the papers'
protocol, method doc §7); ``at_original_resolution`` scores each map at its image's own size instead.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import numpy as np

from . import metrics
from .atomic import atomic_write_json
from .data.datasets import Sample, load_dataset, load_mask
from .progress import progress_bar

if TYPE_CHECKING:
    from .detector import AnomalyDetector

logger = logging.getLogger(__name__)

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")


def evaluate(detector: "AnomalyDetector", root: Union[str, "os.PathLike[str]"], out: Optional[Union[str, Path]] = None,
             format: str = "auto", batch_size: int = 8, at_original_resolution: bool = False,
             aupro_variant: str = "mvtec", shots: int = 0, seed: int = 42, progress: bool = True,
             model_name: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate on every category of the dataset at ``root``; optionally write the JSON report to ``out``."""
    dataset = load_dataset(root, format=format)
    train = None
    if shots > 0:
        train = load_dataset(root, format=format, split="train")
    t0 = time.perf_counter()
    classes: Dict[str, Dict[str, Any]] = {}
    bar = progress_bar(len(dataset), progress, unit="img", desc="eval")
    for category, samples in dataset.by_category().items():
        refs = _reference_images(train, category, shots, seed) if train is not None else None
        if refs is not None:
            detector.set_references(refs)
        try:
            classes[category] = _evaluate_category(detector, samples, batch_size, at_original_resolution,
                                                   aupro_variant, bar)
        finally:
            if refs is not None:
                detector.clear_references()
        if refs is not None:
            classes[category]["shots"] = len(refs)
    bar.close()
    report: Dict[str, Any] = {
        "model": model_name or detector.config.metadata.get("name") or detector.config.backbone,
        "dataset": str(dataset.root),
        "format": dataset.format,
        "image_size": detector.config.image_size,
        "resolution": "original" if at_original_resolution else "model",
        "aupro": f"{aupro_variant} (fpr_limit 0.3)",
        "shots": shots,
        "classes": classes,
        "mean": {k: _nanmean([c[k] for c in classes.values()]) for k in METRIC_KEYS},
        "notes": list(dataset.notes),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if out is not None:
        atomic_write_json(out, _jsonable(report))
    return report


def _evaluate_category(detector: "AnomalyDetector", samples: List[Sample], batch_size: int, original: bool,
                       aupro_variant: str, bar: Any) -> Dict[str, Any]:
    scores = np.empty(len(samples), dtype=np.float64)
    labels = np.array([s.label for s in samples], dtype=np.int8)
    pix_maps: List[np.ndarray] = []
    pix_masks: List[np.ndarray] = []
    results = detector.predict_iter([s.image_path for s in samples], batch_size=batch_size, on_error="raise",
                                    at_model_size=not original)
    for i, (sample, res) in enumerate(zip(samples, results)):
        scores[i] = res.pred_score
        bar.update(1)
        if sample.mask_missing:
            continue
        h, w = res.anomaly_map.shape
        image_hw = None if not original else (h, w)
        pix_maps.append(res.anomaly_map.astype(np.float32, copy=False))
        pix_masks.append(load_mask(sample, size=(h, w), image_size=image_hw))
    row: Dict[str, Any] = {"n_images": len(samples), "n_anomalous": int(labels.sum())}
    img = metrics.image_metrics(scores, labels)
    row.update({"image_auroc": img["auroc"], "image_ap": img["ap"], "image_f1_max": img["f1_max"]})
    if pix_maps and len({m.shape for m in pix_maps}) == 1:
        maps, masks = np.stack(pix_maps), np.stack(pix_masks)
    else:
        maps, masks = pix_maps, pix_masks
    if pix_maps:
        pix = metrics.pixel_metrics(maps, masks, with_aupro=aupro_variant == "mvtec")
        if aupro_variant != "mvtec":
            pix["aupro"] = metrics.aupro(maps, masks, variant=aupro_variant)
    else:
        pix = dict.fromkeys(("auroc", "ap", "f1_max", "aupro"), math.nan)
    row.update({"pixel_auroc": pix["auroc"], "pixel_ap": pix["ap"], "pixel_f1_max": pix["f1_max"],
                "pixel_aupro": pix["aupro"]})
    return row


def _reference_images(train: Any, category: str, shots: int, seed: int) -> List[Path]:
    """K normal images of the category's train split, drawn with a fixed seed (never from the test split)."""
    pool = [s.image_path for s in train.samples if s.category == category and s.label == 0]
    if not pool:
        raise ValueError(f"{category}: --shots needs normal images in its train split")
    rng = random.Random(f"{seed}:{category}")
    return sorted(rng.sample(pool, min(shots, len(pool))))


def _nanmean(values: List[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _jsonable(obj: Any) -> Any:
    """NaN -> null (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    return obj


def format_table(report: Dict[str, Any]) -> str:
    """The report as a fixed-width text table (percent, one decimal; '-' for undefined)."""
    cols = [("image_auroc", "I-AUROC"), ("image_ap", "I-AP"), ("image_f1_max", "I-F1"),
            ("pixel_auroc", "P-AUROC"), ("pixel_ap", "P-AP"), ("pixel_f1_max", "P-F1"), ("pixel_aupro", "AUPRO")]
    rows = [(name, c) for name, c in report["classes"].items()] + [("mean", report["mean"])]
    width = max(8, *(len(r[0]) for r in rows))

    def fmt(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    lines = [f"{'class':<{width}} {'n':>5} " + " ".join(f"{h:>7}" for _, h in cols)]
    for name, r in rows:
        n = str(r.get("n_images", "")) if name != "mean" else ""
        lines.append(f"{name:<{width}} {n:>5} " + " ".join(f"{fmt(r.get(k)):>7}" for k, _ in cols))
    return "\n".join(lines)
