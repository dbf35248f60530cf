"""The training recipe: its settings (:class:`TrainConfig`), the optimiser and one training step (method doc §6).

The defaults reproduce the paper's recipe: the auxiliary set's *test* split, batch 8, AdamW with the token
groups at 1e-3 and everything else at 1e-4, weight decay 0.01, a per-epoch cosine schedule whose floor
(1e-4) is shared by all groups (so only the tokens decay), token-only gradient clipping, focal + dice per
layer + BCE on the image logit + token hinge. Deviations, each for a stated reason:

- bf16 autocast on CUDA (the authors train in fp32): ViT-L backprop at 1372 tokens fits and runs faster;
  the losses are still computed in fp32. ``amp="fp32"`` restores the authors' precision.
- no deterministic mode by default (method doc §9.2: the authors' setting crashes on CUDA); with
  ``deterministic=True`` it is switched on with ``warn_only=True``.
- each epoch reseeds the data order (a ``torch.Generator`` seeded by ``seed + epoch``), the dropout RNG and
  the synthetic anomalies from ``(seed, epoch)``, so an epoch never depends on earlier RNG use: a resumed
  run reproduces an uninterrupted one exactly.
- normal-only auxiliary sets get synthetic anomalies (:mod:`visualad.train.synth`); the paper needs masks.
- an anomalous image without a mask still trains the image logit but stays out of focal and dice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import ConfigError
from .losses import visualad_loss

logger = logging.getLogger(__name__)

LOSS_KEYS = ("total", "focal", "dice", "bce", "hinge")
# settings that may change when a run is resumed (they do not change what is computed, or only its speed)
RESUME_FREE = frozenset({"num_workers", "gradient_checkpointing", "keep_checkpoint", "deterministic", "amp"})


@dataclass
class TrainConfig:
    """Every constant of the training recipe, with the paper's value (method doc §6).

    ``epochs``: the paper trains 2 epochs on MVTec AD (for VisA) and 1 on VisA (for everything else); 2 is
    the default because small auxiliary sets (a few hundred images) need the extra pass, and it is the
    setting whose schedule actually decays (1e-3 then 5.5e-4 for the tokens). Pass ``epochs=1`` for the
    VisA recipe.
    """

    epochs: int = 2
    batch_size: int = 8
    lr_tokens: float = 1e-3
    lr_rest: float = 1e-4
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eta_min: float = 1e-4  # shared cosine floor of every group (the authors' quirk, method doc §9.8)
    clip_token_grad: Optional[float] = 1.0  # max norm, each token separately; nothing else is clipped
    focal_gamma: float = 2.0
    focal_smooth: float = 1e-5
    dice_smooth: float = 1.0
    hinge_margin: float = 0.5  # the hinge is zero once cos(anomaly, normal) <= -margin
    w_focal: float = 1.0
    w_dice: float = 1.0
    w_bce: float = 1.0
    w_hinge: float = 1.0
    seed: int = 111
    synthesize: str = "auto"  # "auto" (only when the set has no masked anomalies) | "always" | "never"
    synth_normal_fraction: float = 0.5  # share of normal images left untouched when synthesising
    include_train_normals: bool = False  # also train on train/good (not the paper's protocol)
    dataset_format: str = "auto"
    gradient_checkpointing: bool = False
    amp: str = "auto"  # "auto" = bf16 autocast on CUDA, fp32 elsewhere | "bf16" | "fp32"
    num_workers: int = 0  # threads decoding images ahead of the model (0 = in the training thread)
    deterministic: bool = False  # torch.use_deterministic_algorithms(True, warn_only=True)
    keep_checkpoint: bool = False  # keep out_dir/checkpoint/ after a successful run

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        numbers = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), float)}
        numbers.update(betas=self.betas[0] + self.betas[1])
        bad = sorted(name for name, value in numbers.items() if not math.isfinite(value))
        if bad:  # NaN passes every "< 0" check and turns the whole run into NaN
            raise ConfigError(f"not a finite number: {', '.join(bad)}")
        if int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.synthesize not in ("auto", "always", "never"):
            raise ConfigError(f"synthesize must be 'auto', 'always' or 'never', got {self.synthesize!r}")
        if self.amp not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"amp must be 'auto', 'bf16' or 'fp32' (fp16 would need loss scaling), "
                              f"got {self.amp!r}")
        if not 0.0 <= self.synth_normal_fraction < 1.0:
            raise ConfigError(f"synth_normal_fraction must be in [0, 1), got {self.synth_normal_fraction}")
        if min(self.lr_tokens, self.lr_rest, self.eta_min) < 0 or self.num_workers < 0:
            raise ConfigError("learning rates and num_workers must be >= 0")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_overrides(cls, base: Optional["TrainConfig"] = None, **overrides: Any) -> "TrainConfig":
        """``base`` (default: the paper's values) with ``overrides`` applied.

        ``lr`` is a shorthand for the token learning rate; the other groups and the cosine floor then follow
        at a tenth of it (the paper's ratio) unless they are given too.
        """
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "lr" in overrides:
            lr = float(overrides.pop("lr"))
            overrides.setdefault("lr_tokens", lr)
            overrides.setdefault("lr_rest", lr / 10)
            overrides.setdefault("eta_min", lr / 10)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown finetune options {unknown}; known: {sorted(known | {'lr'})}")
        return dataclasses.replace(base, **overrides) if base is not None else cls(**overrides)


# --------------------------------------------------------------------------------------------
# optimiser


def build_optimizer(model: torch.nn.Module, config: TrainConfig
                    ) -> Tuple[torch.optim.AdamW, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """AdamW with the paper's groups (each token, the final norm, each SAF, all SCA) and the cosine schedule.

    Every group is named (``param_groups[i]["name"]``); the scheduler is stepped once per epoch.
    """
    named = dict(model.head_parameters())
    groups: List[Dict[str, Any]] = []

    def add(name: str, keys: List[str], lr: float) -> None:
        params = [named.pop(k) for k in keys]
        if params:
            groups.append({"name": name, "params": params, "lr": lr})

    add("anomaly_token", ["encoder.anomaly_token"], config.lr_tokens)
    add("normal_token", ["encoder.normal_token"], config.lr_tokens)
    add("final_norm", [k for k in named if k.startswith("final_norm.")], config.lr_rest)
    for key in model.saf:
        add(f"saf.{key}", [k for k in named if k.startswith(f"saf.{key}.")], config.lr_rest)
    add("sca", [k for k in named if k.startswith("sca.")], config.lr_rest)
    if named:
        raise ConfigError(f"head parameters without an optimiser group: {sorted(named)}")
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, lr=config.lr_rest, betas=config.betas, eps=config.eps,
                            weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs, eta_min=config.eta_min)
    return opt, sched


def _token_params(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [model.encoder.anomaly_token, model.encoder.normal_token]


def train_step(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
               has_mask: torch.Tensor, optimizer: torch.optim.Optimizer, config: TrainConfig,
               amp_dtype: Optional[torch.dtype]) -> Tuple[Dict[str, float], bool]:
    """One optimisation step on a normalised batch; returns (loss values, whether the step was taken).

    The backbone is frozen but runs with gradients enabled: the tokens are its inputs. A batch whose loss
    or token gradient is not finite is skipped (the authors' rule). One host sync per step.
    """
    core = getattr(model, "module", model)  # the model inside DistributedDataParallel
    optimizer.zero_grad(set_to_none=True)
    autocast = (torch.autocast(device_type=images.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        out = model(images)
    terms = visualad_loss(out.layer_maps, out.tokens, masks, labels, core.config.image_size,
                          topk_ratio=core.config.topk_ratio, gamma=config.focal_gamma,
                          focal_smooth=config.focal_smooth, dice_smooth=config.dice_smooth,
                          margin=config.hinge_margin, w_focal=config.w_focal, w_dice=config.w_dice,
                          w_bce=config.w_bce, w_hinge=config.w_hinge, seg_weight=has_mask)
    terms["total"].backward()
    finite = torch.isfinite(terms["total"].detach())
    for p in _token_params(core):  # gradients are already averaged over the processes here
        if p.grad is not None:
            finite = finite & torch.isfinite(p.grad).all()
            if config.clip_token_grad:
                torch.nn.utils.clip_grad_norm_([p], config.clip_token_grad)
    values = torch.stack([terms[k].detach().float() for k in LOSS_KEYS] + [finite.float()]).tolist()
    ok = values[-1] == 1.0
    if ok:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return dict(zip(LOSS_KEYS, values[:-1])), ok


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "fp32" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16
