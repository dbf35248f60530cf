"""What ``visualad predict`` keeps besides its rows: pictures, raw maps and predicted masks, one file each per
input, written atomically, their names mirroring the inputs' folders and never colliding.

A file that cannot be written (a full disk, a file where a folder should be) fails that input's row, never
the run.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .atomic import atomic_write_bytes
from .result import AnomalyResult

MAP_FORMATS = ("npy", "png16")
Input = Tuple[Path, Optional[Path]]  # (file, the folder it was found in, or None)


def target_paths(inputs: Sequence[Input], folder: Path, suffix: str) -> List[Path]:
    """Each input's path under ``folder`` (relative to the folder it was found in) with ``suffix`` instead of
    its extension; inputs that would share a name (``a.png``, ``a.jpg``) keep theirs (``a.jpg.png``)."""
    rel = [p.relative_to(base) if base is not None else Path(p.name) for p, base in inputs]
    plain = [folder / r.with_suffix(suffix) for r in rel]
    counts: Dict[Path, int] = {}
    for t in plain:
        counts[t] = counts.get(t, 0) + 1
    return [t if counts[t] == 1 else folder / r.with_name(r.name + suffix) for t, r in zip(plain, rel)]


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_map(target: Path, amap: np.ndarray, map_format: str = "npy") -> Dict[str, Any]:
    """One raw map, atomically: ``.npy`` float32, or a 16-bit PNG scaled to ``map_range`` (value = lo + png /
    65535 * (hi - lo)); returns the row fields that name it."""
    amap = np.asarray(amap, dtype=np.float32)
    if map_format == "npy":
        buf = io.BytesIO()
        np.save(buf, amap)
        atomic_write_bytes(target, buf.getvalue())
        return {"map_path": str(target)}
    lo, hi = float(amap.min()), float(amap.max())
    u16 = np.round((amap - lo) / (hi - lo if hi > lo else 1.0) * 65535.0).astype(np.uint16)
    atomic_write_bytes(target, _png_bytes(u16))
    return {"map_path": str(target), "map_range": [lo, hi]}


class OutputFiles:
    """Targets and writers for ``--overlays`` (a picture per input) and ``--save-maps`` (the raw map, and the
    predicted mask when a pixel threshold exists)."""

    def __init__(self, overlays: Optional[List[Path]] = None, maps: Optional[List[Path]] = None,
                 masks: Optional[List[Path]] = None, style: str = "overlay", cmap: str = "jet", alpha: float = 0.5,
                 map_format: str = "npy") -> None:
        """Writers for given targets (input i -> ``overlays[i]``, ``maps[i]``, ``masks[i]``); see
        :meth:`for_inputs` for the targets of predict's inputs."""
        if map_format not in MAP_FORMATS:
            raise ValueError(f"map_format must be one of {MAP_FORMATS}")
        self.style, self.cmap, self.alpha, self.map_format = style, cmap, alpha, map_format
        self.overlays, self.maps, self.masks = overlays, maps, masks

    @classmethod
    def for_inputs(cls, inputs: Sequence[Input], overlays: Optional[Path] = None, maps: Optional[Path] = None,
                   map_format: str = "npy", **style: Any) -> "OutputFiles":
        """The targets of ``inputs`` under the ``overlays`` and ``maps`` folders (made here: an unusable folder
        is one error, not one per row)."""
        for folder in (overlays, maps):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        return cls(overlays=target_paths(inputs, overlays, ".png") if overlays is not None else None,
                   maps=target_paths(inputs, maps, ".npy" if map_format == "npy" else ".png") if maps else None,
                   masks=target_paths(inputs, maps, ".mask.png") if maps is not None else None,
                   map_format=map_format, **style)

    @property
    def needs_image(self) -> bool:
        return self.overlays is not None

    @property
    def needs_full_map(self) -> bool:
        return self.overlays is not None or self.maps is not None

    def row(self, i: int, res: AnomalyResult) -> Dict[str, Any]:
        """Input ``i``'s files written, then its row (:meth:`AnomalyResult.to_row` and the files' names)."""
        fields = self.write(i, res)
        row = res.to_row()
        row.update(fields)
        return row

    def write(self, i: int, res: AnomalyResult) -> Dict[str, Any]:
        """Write input ``i``'s files; returns the row fields that name them. A failure sets ``res.error``."""
        fields: Dict[str, Any] = {}
        if not res.ok:
            return fields
        target = None
        try:
            if self.overlays is not None:
                from .viz import figure

                target = self.overlays[i]
                buf = io.BytesIO()
                figure(res, style=self.style, alpha=self.alpha, cmap=self.cmap).save(buf, format="PNG")
                atomic_write_bytes(target, buf.getvalue())
            if self.maps is not None:
                target = self.maps[i]
                fields.update(write_map(target, res.anomaly_map, self.map_format))
                if res.pred_mask is not None:
                    target = self.masks[i]
                    atomic_write_bytes(target, _png_bytes(res.pred_mask.astype(np.uint8) * 255))
                    fields["mask_path"] = str(target)
        except (OSError, ValueError) as exc:
            res.error = f"not written: {target}: {getattr(exc, 'strerror', None) or exc}"
        finally:
            res.image = None  # drawn: the pixels are not needed any more
        return fields
