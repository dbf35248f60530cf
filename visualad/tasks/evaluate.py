"""Dataset -> batched predictions -> per-class metrics and their mean (the report format of api.md).

By default maps are scored at the model's input size with masks resized the authors' way (the papers'
protocol, method doc §7); ``at_original_resolution`` scores each map at its image's own size instead.
Each category is scored in one mode, recorded in its row: references (K normal train images, never test
images), batch (the category's test images as one set; categories never mix) or the head; ``"auto"`` takes
references when ``shots > 0``, else batch for a category of 16 or more test images (4 when the head is
untrained), else the head: the rule of :class:`~visualad.modes.choice.ModeChooser`, per category.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .. import metrics
from ..atomic import atomic_write_bytes, atomic_write_json
from ..data import images as imio
from ..data.datasets import Sample, load_dataset, load_mask
from ..errors import ConfigError
from ..modes import MODES
from ..modes.choice import ModeChooser
from ..progress import progress_bar
from ..runtime.engine import Engine
from .references import draw_references

logger = logging.getLogger(__name__)

#: image-level recall at these false-alarm rates (the threshold from the category's normal test images)
FALSE_ALARM_RATES = (0.01, 0.05)
RECALL_KEYS = tuple(f"recall_at_{round(100 * r)}pct_fa" for r in FALSE_ALARM_RATES)
METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
               "pixel_aupro") + RECALL_KEYS


def evaluate(engine: Engine, root: Union[str, "os.PathLike[str]"], out: Optional[Union[str, Path]] = None,
             format: str = "auto", batch_size: int = 8, at_original_resolution: bool = False,
             aupro_variant: str = "mvtec", shots: int = 0, seed: int = 42, progress: bool = True,
             model_name: Optional[str] = None, mode: str = "auto", compare_with: int = 64,
             overlays: Optional[Union[str, Path]] = None, overlay_style: str = "panel", cmap: str = "jet",
             alpha: float = 0.5) -> Dict[str, Any]:
    """Evaluate on every category of the dataset at ``root``; optionally write the JSON report to ``out`` and a
    picture per test image under ``overlays/<category>/<defect>/`` (``overlay_style`` "panel": image | heat
    map with the predicted region | ground truth)."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if shots < 0:
        raise ConfigError(f"shots must be >= 0, got {shots}")
    dataset = load_dataset(root, format=format)
    train = None
    if shots > 0:
        train = load_dataset(root, format=format, split="train")
    t0 = time.perf_counter()
    classes: Dict[str, Dict[str, Any]] = {}
    notes = list(dataset.notes)
    bar = progress_bar(len(dataset), progress, unit="img", desc="eval")
    config = engine.model.config
    for category, samples in dataset.by_category().items():
        scorer, used = _category_mode(engine, mode, samples, train, category, shots, seed, batch_size,
                                      compare_with)
        pictures = None if overlays is None else _Pictures(Path(overlays) / category, overlay_style, cmap, alpha,
                                                           scorer.name)
        classes[category] = _evaluate_category(engine, scorer, samples, batch_size, at_original_resolution,
                                               aupro_variant, bar, pictures)
        classes[category]["mode"] = scorer.name
        if used is not None:
            classes[category]["shots"] = used
        auroc = classes[category]["image_auroc"]
        if scorer.kind == "set" and not math.isnan(auroc) and auroc < 0.5:
            notes.append(f"{category}: image AUROC {auroc:.3f} in {scorer.name} mode is below chance: its defects "
                         "are probably not local or not a minority of the set (a logical anomaly?); score it "
                         "against a few normal images instead (--shots K, or --references)")
    bar.close()
    report: Dict[str, Any] = {
        "model": model_name or config.metadata.get("name") or config.backbone,
        "dataset": str(dataset.root),
        "format": dataset.format,
        "image_size": config.image_size,
        "resolution": "original" if at_original_resolution else "model",
        "aupro": f"{aupro_variant} (fpr_limit 0.3)",
        "mode": mode,
        "shots": shots,
        "classes": classes,
        "mean": {k: _nanmean([c[k] for c in classes.values()]) for k in METRIC_KEYS},
        "false_alarm_rates": list(FALSE_ALARM_RATES),
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if out is not None:
        atomic_write_json(out, _jsonable(report))
    return report


def _category_mode(engine: Engine, mode: str, samples: List[Sample], train: Any, category: str, shots: int,
                   seed: int, batch_size: int, compare_with: int) -> Tuple[Any, Optional[int]]:
    """The scorer of one category and the number of references it really used (None: no references)."""
    if train is not None:
        refs = draw_references(train, category, shots, seed)
        if len(refs) < shots:
            logger.warning("%s: %d shots asked, only %d normal train images: using %d", category, shots,
                           len(refs), len(refs))
        bank = engine.build_references(refs, batch_size=batch_size)
        scorer = ModeChooser().scorer(mode, bank, len(samples), engine.model.config.head_trained,
                                      compare_with=compare_with, seed=seed)
        return scorer, (len(refs) if "shots" in scorer.describe() else None)  # None: the mode took no references
    return ModeChooser().scorer(mode, None, len(samples), engine.model.config.head_trained,
                                compare_with=compare_with, seed=seed), None


def _evaluate_category(engine: Engine, scorer: Any, samples: List[Sample], batch_size: int, original: bool,
                       aupro_variant: str, bar: Any, pictures: Optional["_Pictures"] = None) -> Dict[str, Any]:
    """The category's row, and a row per defect type (that defect's images against the normal ones)."""
    scores = np.empty(len(samples), dtype=np.float64)
    pix_maps: Dict[int, np.ndarray] = {}  # sample index -> map, for the samples with a mask (or normal)
    pix_masks: Dict[int, np.ndarray] = {}
    results = engine.run([s.image_path for s in samples], scorer, batch_size, on_error="raise",
                         keep_image=pictures is not None)
    for i, (sample, (x, amap, score)) in enumerate(zip(samples, results)):
        scores[i] = score
        bar.update(1)
        if pictures is not None:
            pictures.write(sample, x, amap, score)
        if sample.mask_missing:
            continue
        if original:
            amap = imio.resize_map(amap, x.height, x.width)
        h, w = amap.shape
        pix_maps[i] = amap.astype(np.float32, copy=False)
        pix_masks[i] = load_mask(sample, size=(h, w), image_size=(x.height, x.width))
    everything = np.arange(len(samples))
    row = _metrics(everything, samples, scores, pix_maps, pix_masks, aupro_variant)
    good = np.array([s.defect == "good" or s.label == 0 for s in samples])
    defects = sorted({s.defect for s, g in zip(samples, good) if not g})
    row["defects"] = {d: _metrics(everything[good | np.array([s.defect == d for s in samples])], samples, scores,
                                  pix_maps, pix_masks, aupro_variant) for d in defects}
    return row


def _metrics(idx: np.ndarray, samples: List[Sample], scores: np.ndarray, pix_maps: Dict[int, np.ndarray],
             pix_masks: Dict[int, np.ndarray], aupro_variant: str) -> Dict[str, Any]:
    """Image and pixel metrics of the samples ``idx``."""
    labels = np.array([samples[i].label for i in idx], dtype=np.int8)
    s = scores[idx]
    row: Dict[str, Any] = {"n_images": int(len(idx)), "n_anomalous": int(labels.sum())}
    img = metrics.image_metrics(s, labels)
    row.update({"image_auroc": img["auroc"], "image_ap": img["ap"], "image_f1_max": img["f1_max"]})
    row.update({key: metrics.recall_at_false_alarms(s, labels, rate)
                for key, rate in zip(RECALL_KEYS, FALSE_ALARM_RATES)})
    kept = [int(i) for i in idx if int(i) in pix_maps]
    maps_l, masks_l = [pix_maps[i] for i in kept], [pix_masks[i] for i in kept]
    if maps_l and len({m.shape for m in maps_l}) == 1:
        maps, masks = np.stack(maps_l), np.stack(masks_l)
    else:
        maps, masks = maps_l, masks_l
    if maps_l:
        pix = metrics.pixel_metrics(maps, masks, with_aupro=aupro_variant == "mvtec")
        if aupro_variant != "mvtec":
            pix["aupro"] = metrics.aupro(maps, masks, variant=aupro_variant)
    else:
        pix = dict.fromkeys(("auroc", "ap", "f1_max", "aupro"), math.nan)
    row.update({"pixel_auroc": pix["auroc"], "pixel_ap": pix["ap"], "pixel_f1_max": pix["f1_max"],
                "pixel_aupro": pix["aupro"]})
    return row


class _Pictures:
    """One picture per test image of a category: the heat map, the predicted region and the ground truth."""

    def __init__(self, folder: Path, style: str, cmap: str, alpha: float, mode: str) -> None:
        self.folder, self.style, self.cmap, self.alpha, self.mode = folder, style, cmap, alpha, mode

    def write(self, sample: Sample, x: Any, amap: np.ndarray, score: float) -> None:
        import io

        from ..runtime.postprocess import make_result
        from ..viz import figure

        res = make_result(x, amap, score, self.mode)
        mask = None if sample.mask_missing else load_mask(sample, size=(x.height, x.width))
        buf = io.BytesIO()
        figure(res, style=self.style, mask=mask, alpha=self.alpha, cmap=self.cmap).save(buf, format="PNG")
        atomic_write_bytes(self.folder / sample.defect / (Path(sample.image_path).stem + ".png"), buf.getvalue())
        x.image = None


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
    """The report as a fixed-width text table (percent, one decimal; '-' for undefined): a row per class with its
    mode, an indented row per defect type, the mean, then the notes."""
    cols = [("image_auroc", "I-AUROC"), ("image_ap", "I-AP"), ("image_f1_max", "I-F1"),
            ("pixel_auroc", "P-AUROC"), ("pixel_ap", "P-AP"), ("pixel_f1_max", "P-F1"), ("pixel_aupro", "AUPRO")]
    cols += [(key, f"R@{round(100 * r)}%FA") for key, r in zip(RECALL_KEYS, FALSE_ALARM_RATES)]
    rows: List[Tuple[str, str, Dict[str, Any]]] = []
    for name, c in report["classes"].items():
        rows.append((name, c.get("mode", ""), c))
        rows += [(f"  {defect}", "", d) for defect, d in (c.get("defects") or {}).items()]
    rows.append(("mean", "", report["mean"]))
    width = max(8, *(len(r[0]) for r in rows))

    def fmt(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    lines = [f"{'class':<{width}} {'mode':<10} {'n':>5} " + " ".join(f"{h:>8}" for _, h in cols)]
    for name, mode, r in rows:
        n = str(r.get("n_images", "")) if name != "mean" else ""
        lines.append(f"{name:<{width}} {mode:<10} {n:>5} " + " ".join(f"{fmt(r.get(k)):>8}" for k, _ in cols))
    lines += [f"note: {n}" for n in report.get("notes") or []]
    return "\n".join(lines)
