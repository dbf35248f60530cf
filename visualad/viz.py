"""Heat-map overlays: the map coloured and blended over the image, with the predicted defect outlined.

The default colour scale is the calibrated one when a calibration exists (the typical normal pixel at the
bottom, the pixel threshold in the middle), because per-image min-max scaling makes every normal image look
hot; ``scale="per_image"`` or explicit ``(vmin, vmax)`` are there when wanted.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Tuple, Union

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from .result import AnomalyResult

COLORMAPS = {"jet": 2, "turbo": 20, "inferno": 9, "viridis": 16, "magma": 13, "hot": 11}  # cv2.COLORMAP_*


def colorize(amap: np.ndarray, vmin: float, vmax: float, cmap: str = "jet") -> np.ndarray:
    """A float map -> RGB uint8 through an OpenCV colour map, values clipped to [vmin, vmax]."""
    import cv2

    if cmap not in COLORMAPS:
        raise ValueError(f"unknown cmap {cmap!r}; choose one of {sorted(COLORMAPS)}")
    span = vmax - vmin if vmax > vmin else 1.0
    u8 = np.clip((amap - vmin) / span * 255.0, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, COLORMAPS[cmap]), cv2.COLOR_BGR2RGB)


def overlay(result: "AnomalyResult", alpha: float = 0.5, cmap: str = "jet",
            scale: Union[str, Tuple[float, float]] = "auto") -> "Image.Image":
    """The heat map over the image at the original size; the predicted mask's outline when calibrated."""
    import cv2
    from PIL import Image

    if result.anomaly_map is None:
        raise ValueError(f"{result.image_path}: no anomaly map to draw ({result.error})")
    if result.image is None:
        raise ValueError("the result holds no image: predict with keep_image=True to draw overlays")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must lie in [0, 1]")
    amap = result.anomaly_map
    if scale == "auto":
        scale = "calibrated" if result.map_range is not None else "per_image"
    if scale == "calibrated":
        if result.map_range is None:
            raise ValueError("no calibrated scale: call detector.calibrate(...) first, or use scale='per_image'")
        vmin, vmax = result.map_range
    elif scale == "per_image":
        vmin, vmax = float(amap.min()), float(amap.max())
    elif isinstance(scale, (tuple, list)) and len(scale) == 2:
        vmin, vmax = float(scale[0]), float(scale[1])
    else:
        raise ValueError("scale must be 'auto', 'calibrated', 'per_image' or (vmin, vmax)")
    heat = colorize(amap, vmin, vmax, cmap).astype(np.float32)
    out = ((1.0 - alpha) * result.image.astype(np.float32) + alpha * heat).round().astype(np.uint8)
    if result.pred_mask is not None and result.pred_mask.any():
        contours, _ = cv2.findContours(result.pred_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thickness = max(1, round(max(out.shape[:2]) / 300))
        cv2.drawContours(out, contours, -1, (255, 255, 255), thickness)
    return Image.fromarray(out)
