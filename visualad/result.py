"""AnomalyResult: what predict() returns for one image (anomalib's field names)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np


#: the columns of a row (:meth:`AnomalyResult.to_row` plus what the output writers add), in order
ROW_COLUMNS = ("path", "score", "label", "normalized_score", "threshold", "operating_point", "mode", "error", "height",
               "width",
               "map_path", "mask_path", "map_range", "regions")


@dataclass
class AnomalyResult:
    """Score and heat map of one image, at the image's original (displayed) resolution.

    ``pred_label``, ``pred_mask`` and ``normalized_score`` stay ``None`` until a threshold exists
    (``calibrate()`` or ``threshold=``). ``error`` is set instead of a score when the input could not be
    read and the caller asked to go on (``on_error="return"``).
    """

    pred_score: float
    anomaly_map: Optional[np.ndarray]
    image_path: Optional[str] = None
    pred_label: Optional[bool] = None
    pred_mask: Optional[np.ndarray] = None
    normalized_score: Optional[float] = None
    threshold: Optional[float] = None
    operating_point: Optional[str] = None  # what the threshold means: "threshold for 1% false alarms, ..."
    error: Optional[str] = None
    mode: Optional[str] = None  # the way of scoring that produced it: "head", "references" or "batch"
    image_size: Optional[Tuple[int, int]] = None  # (height, width) of the input as displayed
    image: Optional[np.ndarray] = field(default=None, repr=False)  # the RGB uint8 input, for overlays
    map_range: Optional[Tuple[float, float]] = field(default=None, repr=False)  # calibrated colour scale
    pixel_threshold: Optional[float] = field(default=None, repr=False)

    def __repr__(self) -> str:
        shape = "x".join(str(v) for v in self.anomaly_map.shape) if self.anomaly_map is not None else None
        score = None if self.pred_score is None or math.isnan(self.pred_score) else round(float(self.pred_score), 6)
        err = f", error={self.error!r}" if self.error else ""
        return (f"AnomalyResult(score={score}, label={self.pred_label}, mode={self.mode!r}, map={shape}, "
                f"path={self.image_path!r}{err})")

    @property
    def ok(self) -> bool:
        return self.error is None

    def overlay(self, alpha: float = 0.5, cmap: str = "jet",
                scale: Union[str, Tuple[float, float]] = "auto", legend: bool = True) -> "Any":
        """The heat map over the image as a PIL image, with a legend below (see :func:`visualad.viz.overlay`)."""
        from .viz import overlay

        return overlay(self, alpha=alpha, cmap=cmap, scale=scale, legend=legend)

    def panel(self, mask: Optional[np.ndarray] = None, alpha: float = 0.5, cmap: str = "jet",
              scale: Union[str, Tuple[float, float]] = "auto", tile: int = 384) -> "Any":
        """Image | heat map | ground truth side by side, ``tile`` px high (see :func:`visualad.viz.panel`)."""
        from .viz import panel

        return panel(self, mask=mask, alpha=alpha, cmap=cmap, scale=scale, tile=tile)

    def regions(self) -> List[Dict[str, Any]]:
        """Connected regions of the predicted mask, most anomalous first: bounding box (x, y, width, height in
        pixels of the map), area in pixels and peak score. Empty without a pixel threshold."""
        if self.pred_mask is None or self.anomaly_map is None:
            return []
        from .regions import regions

        return regions(self.pred_mask, self.anomaly_map)

    def to_row(self) -> Dict[str, Any]:
        """The one row of a result, as the CLI, Ray and the service write it (:data:`ROW_COLUMNS`; the
        output writers add ``map_path``, ``mask_path`` and ``map_range`` for the files they write)."""
        row = self.to_dict()
        row["regions"] = self.regions() if self.ok else []
        return row

    def to_dict(self, with_map: bool = False) -> Dict[str, Any]:
        """A JSON-serialisable summary; the map (as nested lists) only when asked."""
        score = None if self.pred_score is None or math.isnan(self.pred_score) else float(self.pred_score)
        d: Dict[str, Any] = {
            "path": self.image_path,
            "score": score,
            "label": None if self.pred_label is None else bool(self.pred_label),
            "normalized_score": self.normalized_score,
            "threshold": self.threshold,
            "operating_point": self.operating_point,
            "mode": self.mode,
            "error": self.error,
        }
        size = self.image_size or (None if self.anomaly_map is None else self.anomaly_map.shape)
        if size is not None:
            d["height"], d["width"] = (int(x) for x in size)
        if self.anomaly_map is not None:
            if with_map:
                d["anomaly_map"] = self.anomaly_map.tolist()
        return d
