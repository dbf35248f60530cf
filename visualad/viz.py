"""Pictures of a result that an inspection engineer can read without the code: the heat map over the image
with the predicted defect outlined, a colour bar, and the facts (score, label, threshold, mode, colour scale).

The default colour scale is the calibrated one when a calibration exists (the typical normal pixel at the
bottom, the pixel threshold in the middle), because per-image min-max scaling makes every normal image look
hot; the legend says which scale a picture uses, and warns when colours are not comparable between pictures.

- :func:`overlay`: the blend at the image's size, with a legend strip below it (``legend=False``: the blend
  alone, pixel for pixel aligned with the input);
- :func:`panel`: image | heat map with the predicted-region contour | ground truth (when a mask is given),
  side by side, with the same legend.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple, Union

import numpy as np

from .errors import VisualADError

if TYPE_CHECKING:
    from PIL import Image

    from .result import AnomalyResult

COLORMAPS = {"jet": 2, "turbo": 20, "inferno": 9, "viridis": 16, "magma": 13, "hot": 11}  # cv2.COLORMAP_*
STYLES = ("overlay", "panel")
Scale = Union[str, Tuple[float, float]]
_PREDICTED = (255, 255, 255)  # predicted-region contour
_TRUTH = (0, 255, 0)  # ground-truth contour
_INK, _PAPER = (20, 20, 20), (245, 245, 245)


def opencv() -> Any:
    """OpenCV, which draws the pictures; the torch-free runtime may lack it: a typed error that says how to add it."""
    try:
        import cv2
    except ImportError:
        raise VisualADError("pictures (overlays, panels) need OpenCV: pip install opencv-python-headless (or "
                            "'visualad-runtime[overlays]')") from None
    return cv2


def colorize(amap: np.ndarray, vmin: float, vmax: float, cmap: str = "jet") -> np.ndarray:
    """A float map -> RGB uint8 through an OpenCV colour map, values clipped to [vmin, vmax]."""
    cv2 = opencv()

    if cmap not in COLORMAPS:
        raise ValueError(f"unknown cmap {cmap!r}; choose one of {sorted(COLORMAPS)}")
    span = vmax - vmin if vmax > vmin else 1.0
    u8 = np.clip((amap - vmin) / span * 255.0, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, COLORMAPS[cmap]), cv2.COLOR_BGR2RGB)


def color_range(result: "AnomalyResult", scale: Scale = "auto") -> Tuple[float, float, str]:
    """(vmin, vmax, name) of the colour scale: "calibrated", "per image" or "fixed"."""
    amap = result.anomaly_map
    if scale == "auto":
        scale = "calibrated" if result.map_range is not None else "per_image"
    if scale == "calibrated":
        if result.map_range is None:
            raise ValueError("no calibrated scale: call detector.calibrate(...) first, or use scale='per_image'")
        return float(result.map_range[0]), float(result.map_range[1]), "calibrated"
    if scale == "per_image":
        return float(amap.min()), float(amap.max()), "per image"
    if isinstance(scale, (tuple, list)) and len(scale) == 2:
        return float(scale[0]), float(scale[1]), "fixed"
    raise ValueError("scale must be 'auto', 'calibrated', 'per_image' or (vmin, vmax)")


def _check(result: "AnomalyResult", alpha: float) -> None:
    if result.anomaly_map is None:
        raise ValueError(f"{result.image_path}: no anomaly map to draw ({result.error})")
    if result.image is None:
        raise ValueError("the result holds no image: predict with keep_image=True to draw overlays")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must lie in [0, 1]")


def _blend(result: "AnomalyResult", vmin: float, vmax: float, cmap: str, alpha: float) -> np.ndarray:
    heat = colorize(result.anomaly_map, vmin, vmax, cmap).astype(np.float32)
    return ((1.0 - alpha) * result.image.astype(np.float32) + alpha * heat).round().astype(np.uint8)


def _contour(img: np.ndarray, mask: Optional[np.ndarray], color: Tuple[int, int, int]) -> np.ndarray:
    cv2 = opencv()

    if mask is not None and mask.any():
        if mask.shape != img.shape[:2]:
            mask = cv2.resize(mask.astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, color, max(1, round(max(img.shape[:2]) / 300)))
    return img


def _facts(result: "AnomalyResult", vmin: float, vmax: float, scale_name: str) -> List[str]:
    score = "n/a" if result.pred_score is None or math.isnan(result.pred_score) else f"{result.pred_score:.4g}"
    label = {None: "no threshold", True: "ANOMALOUS", False: "normal"}[result.pred_label]
    line1 = f"score {score}, {label}"
    if result.threshold is not None:
        line1 += f" (threshold {result.threshold:.4g})"
    if result.mode:
        line1 += f", {result.mode} mode"
    line2 = f"colours: {scale_name} scale [{vmin:.3g}, {vmax:.3g}]"
    if scale_name == "per image":
        line2 += " - not comparable between pictures (calibrate for a fixed scale)"
    return [line1] + ([result.operating_point] if result.operating_point else []) + [line2]


def _legend(width: int, facts: List[str], vmin: float, vmax: float, cmap: str,
            marks: Tuple[Tuple[str, Tuple[int, int, int]], ...] = ()) -> np.ndarray:
    """A strip of ``width`` px: the colour bar with its range, then the facts, then what the contours mean."""
    cv2 = opencv()

    font = cv2.FONT_HERSHEY_SIMPLEX
    fs = max(0.35, min(0.9, width / 1400))
    th = max(1, int(round(fs * 2)))
    line_h = int(round(28 * fs)) + 6
    pad = max(4, line_h // 3)
    bar_h = max(8, line_h // 2)
    fits = lambda text, indent: cv2.getTextSize(text, font, fs, th)[0][0] <= width - 2 * pad - indent  # noqa: E731
    facts = [piece for text in facts for piece in _wrap(text, lambda t: fits(t, 0))]
    lines = list(facts) + [text for text, _ in marks]
    strip = np.full((pad * 3 + bar_h + line_h * (len(lines) + 1), width, 3), _PAPER, np.uint8)
    bar_w = max(10, width - 2 * pad)
    ramp = np.linspace(vmin, vmax, bar_w, dtype=np.float32)[None, :].repeat(bar_h, axis=0)
    strip[pad:pad + bar_h, pad:pad + bar_w] = colorize(ramp, vmin, vmax, cmap)
    y = pad + bar_h + line_h - 6
    lo, hi = f"{vmin:.3g}", f"{vmax:.3g}"
    (hw, _), _ = cv2.getTextSize(hi, font, fs, th)
    cv2.putText(strip, lo, (pad, y), font, fs, _INK, th, cv2.LINE_AA)
    cv2.putText(strip, hi, (pad + bar_w - hw, y), font, fs, _INK, th, cv2.LINE_AA)
    colours = [_INK] * len(facts) + [c for _, c in marks]
    for text, colour in zip(lines, colours):
        y += line_h
        if colour != _INK:  # a swatch of the contour colour before its meaning
            cv2.rectangle(strip, (pad, y - line_h // 2), (pad + line_h // 2, y), colour, -1)
            cv2.rectangle(strip, (pad, y - line_h // 2), (pad + line_h // 2, y), _INK, 1)
            text_x = pad + line_h
        else:
            text_x = pad
        cv2.putText(strip, text, (text_x, y), font, fs, _INK, th, cv2.LINE_AA)
    return strip


def _wrap(text: str, fits: "Callable[[str], bool]") -> List[str]:
    """Words of ``text`` on as few lines as fit (a word longer than a line gets a line of its own)."""
    lines: List[str] = []
    for word in text.split(" "):
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return [line for line in lines if line]


def overlay(result: "AnomalyResult", alpha: float = 0.5, cmap: str = "jet", scale: Scale = "auto",
            legend: bool = True) -> "Image.Image":
    """The heat map over the image at its size, the predicted region outlined (when calibrated), and below it
    a legend: colour bar, score, label, threshold, mode and scale. ``legend=False``: the blend alone."""
    from PIL import Image

    _check(result, alpha)
    vmin, vmax, name = color_range(result, scale)
    out = _contour(_blend(result, vmin, vmax, cmap, alpha), result.pred_mask, _PREDICTED)
    if legend:
        marks = (("predicted region",  _PREDICTED),) if result.pred_mask is not None else ()
        out = np.vstack([out, _legend(out.shape[1], _facts(result, vmin, vmax, name), vmin, vmax, cmap, marks)])
    return Image.fromarray(out)


def panel(result: "AnomalyResult", mask: Optional[np.ndarray] = None, alpha: float = 0.5, cmap: str = "jet",
          scale: Scale = "auto", tile: int = 384) -> "Image.Image":
    """Side by side at ``tile`` px high: the image | the heat map with the predicted-region contour | (with a
    ground-truth ``mask``) the image with the true defect outlined; the legend below."""
    cv2 = opencv()
    from PIL import Image

    _check(result, alpha)
    vmin, vmax, name = color_range(result, scale)
    h, w = result.image.shape[:2]
    size = (max(1, round(w * tile / h)), tile)
    heat = _contour(_blend(result, vmin, vmax, cmap, alpha), result.pred_mask, _PREDICTED)
    tiles = [result.image.copy(), heat]
    marks = [("predicted region", _PREDICTED)] if result.pred_mask is not None else []
    if mask is not None:
        tiles.append(_contour(result.image.copy(), np.asarray(mask) > 0, _TRUTH))
        marks.append(("ground truth", _TRUTH))
    gap = np.full((tile, 6, 3), 255, np.uint8)
    row: List[np.ndarray] = []
    for t in tiles:
        row += [cv2.resize(t, size, interpolation=cv2.INTER_AREA), gap]
    top = np.hstack(row[:-1])
    strip = _legend(top.shape[1], _facts(result, vmin, vmax, name), vmin, vmax, cmap, tuple(marks))
    return Image.fromarray(np.vstack([top, strip]))


def figure(result: "AnomalyResult", style: str = "overlay", mask: Optional[np.ndarray] = None,
           alpha: float = 0.5, cmap: str = "jet") -> "Image.Image":
    """The picture the CLI writes for a result: ``style`` "overlay" or "panel"."""
    if style == "overlay":
        return overlay(result, alpha=alpha, cmap=cmap)
    if style == "panel":
        return panel(result, mask=mask, alpha=alpha, cmap=cmap)
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")
