"""A model directory: build a model from a config, load one from disk, write one (the only module that
knows the directory's layout; the detector, the authors' converter and finetune all go through it)."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from .config import VisualADConfig
from .layout import BACKBONE_WEIGHTS_NAME, CONFIG_NAME, REFERENCES_NAME, WEIGHTS_NAME
from .model import VisualAD, build_backbone, parse_backbone
from .modes.bank import ReferenceBank
from .types import PathLike
from .errors import WeightsError
from .weights.hub import sha256_file
from .weights.safe import load_safetensors, save_safetensors
from .weights.sources import backbone_state_dict

logger = logging.getLogger(__name__)

HEAD_SCHEMA = "1"


def build_model(config: VisualADConfig, *, seed: Optional[int] = None, model_dir: Optional[Path] = None,
                **fetch: Any) -> VisualAD:
    """The backbone with its weights (pretrained, or the directory's own) and a head from ``seed``."""
    backbone = build_backbone(config.backbone, config.backbone_kwargs)
    if config.backbone_pretrained or model_dir is not None:
        backbone.load_weights(backbone_state_dict(config.backbone, model_dir=model_dir,
                                                  pretrained=config.backbone_pretrained, **fetch))
    config = config.resolved(backbone.depth, backbone.patch_size, parse_backbone(config.backbone).default_image_size)
    with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        return VisualAD(config, backbone)


def fresh_head(model: VisualAD, seed: Optional[int] = 111) -> VisualAD:
    """The same backbone with a new, untrained head initialised from ``seed`` (as :func:`build_model` does)."""
    config = dataclasses.replace(model.config, head_trained=False, image_threshold=None, pixel_threshold=None,
                                 score_stats=None, files={}, metadata={})
    with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        return VisualAD(config, model.backbone).to(model.pixel_mean.device)


def resize_model(model: VisualAD, image_size: int) -> VisualAD:
    """The same backbone and trained head at another input size (checked against the SCA position table)."""
    config = dataclasses.replace(model.config, image_size=int(image_size))
    spec = parse_backbone(config.backbone)
    resized = VisualAD(config.resolved(model.backbone.depth, model.backbone.patch_size, spec.default_image_size),
                       model.backbone)
    resized.load_head_state_dict(model.head_state_dict(), source="the model being resized")
    return resized.to(model.pixel_mean.device)


def load_model(model_dir: PathLike, image_size: Optional[int] = None,
               **fetch: Any) -> Tuple[VisualAD, Optional[ReferenceBank]]:
    """The model of a directory written by :func:`save_model` (strict: missing or unexpected keys are errors)
    and its reference bank, if it has one (on the CPU)."""
    model_dir = Path(model_dir)
    config = VisualADConfig.load(model_dir / CONFIG_NAME)
    _check_files(model_dir, config)
    state = load_safetensors(model_dir / WEIGHTS_NAME)
    if image_size is not None and image_size != config.image_size:
        # resolved() refuses sizes whose patches exceed the trained SCA table
        config = dataclasses.replace(config, image_size=int(image_size))
    model = build_model(config, model_dir=model_dir, **fetch)
    model.load_head_state_dict(state, source=str(model_dir / WEIGHTS_NAME))
    model.eval()
    bank = None
    if (model_dir / REFERENCES_NAME).is_file() and (not config.files or REFERENCES_NAME in config.files):
        bank = ReferenceBank.load(model_dir / REFERENCES_NAME)
        bank.check(model_dir / REFERENCES_NAME, depth=model.backbone.depth, width=model.backbone.embed_dim)
    return model, bank


def _check_files(model_dir: Path, config: VisualADConfig) -> None:
    """Every file the config lists must be there with its digest: a save killed between its renames leaves new
    files beside the old config (or the reverse), and such a directory must not load as if it were whole.
    A backbone file the config does not list is refused (it would be loaded unchecked)."""
    if config.files and BACKBONE_WEIGHTS_NAME not in config.files and (model_dir / BACKBONE_WEIGHTS_NAME).exists():
        raise WeightsError(f"{BACKBONE_WEIGHTS_NAME} is not listed in config.json, so its digest cannot be "
                           "checked: remove it, or write the directory again (save_pretrained, convert-official)",
                           model_dir / BACKBONE_WEIGHTS_NAME)
    for name, digest in config.files.items():
        if name not in (WEIGHTS_NAME, BACKBONE_WEIGHTS_NAME, REFERENCES_NAME):
            raise WeightsError(f"config.json lists an unknown file {name!r}", model_dir / CONFIG_NAME)
        path = model_dir / name
        if not path.is_file():
            raise WeightsError(f"{name} is listed in config.json but missing: the directory is incomplete (an "
                               "interrupted save_pretrained?); save the model again or fetch it again", path)
        if sha256_file(path) != digest:
            raise WeightsError(f"{name} does not match the digest config.json records for it: the directory mixes "
                               "two saves (an interrupted save_pretrained?) or the file was changed; save the "
                               "model again or fetch it again", path)


def save_model(directory: PathLike, model: VisualAD, references: Optional[ReferenceBank] = None,
               model_card: bool = True, backbone: bool = False) -> Path:
    """Write config.json + model.safetensors (only the trained parameters), each atomically, plus the
    reference bank and the backbone weights: always for random backbones (they exist nowhere else), and when
    ``backbone`` is set (a converted model that must load without any network). Every file is in the digest
    list of config.json; a stale bank or backbone file of an earlier save is removed."""
    from .weights.card import write_model_card

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.head_state_dict().items()}
    save_safetensors(state, out / WEIGHTS_NAME, metadata={"format": "pt", "visualad_schema": HEAD_SCHEMA})
    written = [WEIGHTS_NAME]
    if backbone or not model.config.backbone_pretrained:
        bb = {k: v.detach().cpu().contiguous() for k, v in model.backbone.library_state_dict().items()}
        save_safetensors(bb, out / BACKBONE_WEIGHTS_NAME, metadata={"format": "pt", "backbone": model.config.backbone})
        written.append(BACKBONE_WEIGHTS_NAME)
    if references is not None:
        references.save(out / REFERENCES_NAME)
        written.append(REFERENCES_NAME)
    for stale in (BACKBONE_WEIGHTS_NAME, REFERENCES_NAME):  # must not come back with this model
        if stale not in written and (out / stale).exists():
            logger.info("removing %s of an earlier save", out / stale)
            (out / stale).unlink()
    # the config goes last and names the digest of every file saved with it (see _check_files)
    model.config.files = {name: sha256_file(out / name) for name in written}
    model.config.save(out / CONFIG_NAME)
    if model_card:
        write_model_card(out, model.config, n_params=sum(v.numel() for v in state.values()))
    return out


def publish(staged: PathLike, out_dir: PathLike) -> Path:
    """Move a directory written by :func:`save_model` into place: a rename when ``out_dir`` is free, else its
    files one by one (config.json last: its presence means the rest is there), removing the model files of
    an earlier save that this one does not have."""
    staged, out_dir = Path(staged), Path(out_dir)
    try:
        os.rename(staged, out_dir)  # fails when out_dir exists and is not empty
        return out_dir
    except OSError:
        if not out_dir.is_dir():
            raise
    names = sorted(p.name for p in staged.iterdir())
    for stale in (BACKBONE_WEIGHTS_NAME, REFERENCES_NAME):
        if stale not in names and (out_dir / stale).is_file():
            logger.warning("removing %s left by an earlier save", out_dir / stale)
            (out_dir / stale).unlink()
    names.sort(key=lambda n: n == CONFIG_NAME)
    for name in names:
        os.replace(staged / name, out_dir / name)
    shutil.rmtree(staged, ignore_errors=True)
    return out_dir
