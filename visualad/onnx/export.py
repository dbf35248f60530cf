"""Export an engine's model (and a reference bank) to ONNX: a directory that
:class:`visualad.onnx.OnnxDetector` runs without torch.

Three graphs, each taking what the engine computes on the device, with a dynamic batch dimension:

- ``head.onnx``: normalised images [B, 3, S, S] -> smoothed maps [B, S, S] and scores [B] (head mode);
- ``features.onnx``: normalised images -> the layer-normed patch rows of the references and batch modes, one
  output ``ln_<block>`` [B, N, C] per block (the backbone stops at its deepest feature block; the NumPy core
  aggregates each r);
- ``grid_to_map.onnx``: patch-grid maps [B, g, g] -> smoothed maps [B, S, S] (the head's upsampling and blur).

The nearest-neighbour search itself runs in NumPy (``visualad.onnx.knn``). ``visualad_onnx.json`` holds the
config (thresholds and the mode they were calibrated in), the preprocessing and the feature blocks, and
``references.npz`` the reference bank when one is set, so the directory stands alone. The position table is
resampled once for the export size (timm's antialiased bicubic resize has no ONNX operator).
"""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..atomic import atomic_write_bytes, atomic_write_json
from ..modes import knn
from ..modes.bank import LAYERNORM
from ..types import PathLike
from .meta import FORMAT, FORMAT_VERSION, META_NAME

logger = logging.getLogger(__name__)

OPSET = 18


class _Head(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.model.predict_maps(images)


class _Features(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, blocks: Tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.blocks = model, blocks

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(knn.layer_normed(f) for f in self.model.backbone_features(images, self.blocks))


class _GridToMap(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.model.grid_to_map(grid)


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, inputs: List[str],
            outputs: List[str]) -> None:
    import io

    module.eval()
    with torch.inference_mode():
        module(example)  # fills the backbone's position-table cache outside the trace
    axes = {name: {0: "batch"} for name in inputs + outputs}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # sizes are fixed per export (only the batch is dynamic): the tracer's notes about constants are expected
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, (example,), buf, input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False)
    atomic_write_bytes(path, buf.getvalue())


def export_onnx(engine: Any, out_dir: PathLike, references: Optional[Any] = None) -> Path:
    """Write the three graphs, the metadata and ``references`` (a bank, if given) to ``out_dir``; fp32 on the
    CPU. ``engine`` is left as it is: a model on another device is copied to the CPU for the export."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = engine.model
    if engine.device.type != "cpu":
        model = copy.deepcopy(model).to("cpu")
    size = model.config.image_size
    grid = model.grid
    blocks, rs = knn.blocks_for_depth(model.backbone.depth), knn.DEFAULT_R
    images = torch.zeros(2, 3, size, size)
    _export(_Head(model), images, out / "head.onnx", ["images"], ["maps", "scores"])
    names = [f"ln_{b}" for b in blocks]
    _export(_Features(model, blocks), images, out / "features.onnx", ["images"], names)
    _export(_GridToMap(model), torch.zeros(2, grid, grid), out / "grid_to_map.onnx", ["grid"], ["maps"])
    bank = references
    meta: Dict = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "opset": OPSET,
        "config": model.config.to_dict(),
        "pixel_mean": [float(v) for v in model.pixel_mean.flatten()],
        "pixel_std": [float(v) for v in model.pixel_std.flatten()],
        "image_size": size, "grid": grid, "depth": model.backbone.depth, "blocks": list(blocks), "rs": list(rs),
        "fraction": knn.DEFAULT_FRACTION, "features": names,
        "references": None if bank is None else {"shots": bank.shots, "digests": bank.digests,
                                                  "fingerprint": bank.fingerprint},
    }
    if bank is not None:
        if bank.blocks != tuple(blocks) or bank.rs != tuple(rs) or bank.rows != LAYERNORM:
            raise ValueError("the reference bank uses other features than the exported graph: set the "
                             "references again before exporting")
        arrays = {f"ln_{b}": v.detach().cpu().float().numpy() for b, v in bank.features.items()}
        atomic_write_bytes(out / "references.npz", _npz_bytes(arrays))
    elif (out / "references.npz").exists():
        (out / "references.npz").unlink()
    atomic_write_json(out / META_NAME, meta)  # last: a directory without it is not an export
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.suffix == ".onnx"}
    logger.info("exported to %s: %s", out, ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in sizes.items()))
    return out


def _npz_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
