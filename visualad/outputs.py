"""What ``visualad predict`` keeps besides its rows: pictures, raw maps and predicted masks, one file each per
input, written atomically, their names mirroring the inputs' folders and never colliding.

A file that cannot be written (a full disk, a file where a folder should be) fails that input's row, never
the run.
"""
from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .atomic import atomic_write_bytes
from .errors import VisualADError
from .result import AnomalyResult

MAP_FORMATS = ("npy", "png16")
Input = Tuple[Path, Optional[Path]]  # (file, the folder it was found in, or None)


def target_paths(inputs: Sequence[Input], folder: Path, suffix: str, taken: Optional[Set[str]] = None) -> List[Path]:
    """Each input's path under ``folder`` (relative to the folder it was found in) with ``suffix`` instead of
    its extension. Every input gets its own file: inputs that would share a name (``a.png``, ``a.jpg``) keep
    their extension (``a.jpg.png``), and a name still taken, case-insensitively as on macOS and Windows (also in
    ``taken``, the names of other targets in the same folder), gets a number (``a.jpg~2.png``)."""
    rel = [p.relative_to(base) if base is not None else Path(p.name) for p, base in inputs]
    plain = [folder / r.with_suffix(suffix) for r in rel]
    counts = Counter(str(t).casefold() for t in plain)
    taken = set() if taken is None else taken
    out = []
    for t, r in zip(plain, rel):
        target, n = (t if counts[str(t).casefold()] == 1 else folder / r.with_name(r.name + suffix)), 2
        while str(target).casefold() in taken:
            target, n = folder / r.with_name(f"{r.name}~{n}{suffix}"), n + 1
        taken.add(str(target).casefold())
        out.append(target)
    return out


def real_path(path: Path) -> Path:
    """Where ``path`` points, to compare an output with the inputs: ``Path.resolve`` raises on a link loop
    (before Python 3.13), and an input that is one must still fail its own row, not the run."""
    return Path(os.path.realpath(path))


def refuse_overwriting_inputs(inputs: Sequence[Input], folders: Dict[str, Optional[Path]],
                              targets: Sequence[Path]) -> None:
    """Outputs never replace an input: an output folder that is an input folder, or a target that is an input
    file, is an error before anything is written."""
    sources = {real_path(p) for p, _ in inputs}
    bases = {real_path(base) for _, base in inputs if base is not None}
    for option, folder in folders.items():
        if folder is not None and real_path(folder) in bases:
            raise VisualADError(f"{option} is an input folder: its files would be written among the inputs "
                                "(and could replace them); choose another folder", folder)
    for target in targets:
        if real_path(target) in sources:
            raise VisualADError("an output would replace this input; choose another output folder", target)


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
        overlay_targets = mask_targets = map_targets = None
        if overlays is not None:
            from .viz import opencv

            opencv()  # a runtime without OpenCV says so before any image is scored
            overlay_targets = target_paths(inputs, overlays, ".png")
        if maps is not None:  # maps and masks share the folder: their names are chosen together
            taken = set() if overlays is None or real_path(overlays) != real_path(maps) else {
                str(t).casefold() for t in overlay_targets or []}
            map_targets = target_paths(inputs, maps, ".npy" if map_format == "npy" else ".png", taken)
            mask_targets = target_paths(inputs, maps, ".mask.png", taken)
        refuse_overwriting_inputs(inputs, {"--overlays": overlays, "--save-maps": maps},
                                  [t for ts in (overlay_targets, map_targets, mask_targets) for t in ts or []])
        for folder in (overlays, maps):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        return cls(overlays=overlay_targets, maps=map_targets, masks=mask_targets, map_format=map_format, **style)

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
