"""Training checkpoints (after every epoch, ``out_dir/checkpoint/``) hold no pickle: one safetensors file with the head
weights (``head.*``), the optimiser's tensors (``optim.<param index>.<name>``) and the RNG states as uint8
tensors (``rng.*``); everything else (epoch, step counts, param-group hyper-parameters, scheduler state,
loss history, the train config) is JSON in the file's metadata, with a readable copy in
``trainer_state.json``. One file, written atomically, so a crash leaves the previous epoch's checkpoint.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from ..atomic import atomic_write_json
from ..errors import WeightsError

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.safetensors"
STATE_FILE = "trainer_state.json"
CHECKPOINT_FORMAT = "visualad-train-checkpoint"
CHECKPOINT_VERSION = 1




def save_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: Dict[str, Any]) -> Path:
    """Write ``directory/checkpoint.safetensors`` atomically, then a readable ``trainer_state.json`` copy."""
    from safetensors.torch import save

    from ..atomic import atomic_write_bytes

    tensors: Dict[str, torch.Tensor] = {
        f"head.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in model.head_state_dict().items()
    }
    osd = optimizer.state_dict()
    optim_meta: Dict[str, Dict[str, Any]] = {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                optim_meta.setdefault(str(idx), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    device = next(model.head_parameters())[1].device
    if device.type == "cuda":
        tensors["rng.torch_cuda"] = torch.cuda.get_rng_state(device)
    full = dict(state, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION,
                optimizer={"param_groups": groups, "state": optim_meta}, scheduler=scheduler.state_dict())
    text = json.dumps(full, allow_nan=False)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / CHECKPOINT_FILE, save(tensors, metadata={"trainer_state": text}))
    atomic_write_json(directory / STATE_FILE, full)
    return directory / CHECKPOINT_FILE


def load_checkpoint(directory: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, trainer state) of a checkpoint written by :func:`save_checkpoint`."""
    from safetensors import safe_open

    from ..weights.safe import load_safetensors

    path = directory / CHECKPOINT_FILE
    tensors = load_safetensors(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    try:
        state = json.loads(meta["trainer_state"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise WeightsError(f"not a visualad training checkpoint ({exc})", path) from None
    if state.get("format") != CHECKPOINT_FORMAT or int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise WeightsError(f"unsupported checkpoint format {state.get('format')!r} v{state.get('version')}", path)
    return tensors, state


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             tensors: Dict[str, torch.Tensor], state: Dict[str, Any], source: str) -> None:
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    model.load_head_state_dict(head, source=source)
    opt_state: Dict[int, Dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    for idx, extra in state["optimizer"]["state"].items():
        opt_state.setdefault(int(idx), {}).update(extra)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g)
              for g in state["optimizer"]["param_groups"]]
    own = [g.get("name") for g in optimizer.param_groups]
    if [g.get("name") for g in groups] != own:
        raise WeightsError(f"checkpoint optimiser groups {[g.get('name') for g in groups]} do not match {own}",
                           source)
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    device = next(model.head_parameters())[1].device
    if device.type == "cuda" and "rng.torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"], device)


def backbone_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the frozen weights: resuming on another backbone would silently train garbage."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.backbone.parameters()))
