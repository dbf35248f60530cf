"""Fine-tuning the tokens, SCA, SAF (and the final norm) on an auxiliary dataset (method doc §6).

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

Checkpoints (after every epoch, ``out_dir/checkpoint/``) hold no pickle: one safetensors file with the head
weights (``head.*``), the optimiser's tensors (``optim.<param index>.<name>``) and the RNG states as uint8
tensors (``rng.*``); everything else (epoch, step counts, param-group hyper-parameters, scheduler state,
loss history, the train config) is JSON in the file's metadata, with a readable copy in
``trainer_state.json``. One file, written atomically, so a crash leaves the previous epoch's checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..atomic import atomic_write_json
from ..data import images as imio
from ..data.datasets import Sample, load_dataset, load_mask
from ..errors import ConfigError, DatasetError, WeightsError
from ..progress import progress_bar
from ..types import PathLike
from . import synth
from .distributed import World, join, local_device, wrap
from .losses import visualad_loss

if TYPE_CHECKING:
    from ..modes.bank import ReferenceBank
    from ..runtime.engine import Engine

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.safetensors"
STATE_FILE = "trainer_state.json"
REPORT_FILE = "training_report.json"
CHECKPOINT_FORMAT = "visualad-train-checkpoint"
CHECKPOINT_VERSION = 1
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
# data


@dataclass
class TrainBatch:
    """One batch on the host: uint8 images [B, S, S, 3], bool masks [B, S, S], labels and mask flags [B]."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    has_mask: np.ndarray
    kinds: List[str] = field(default_factory=list)


class TrainingSet:
    """The auxiliary set's samples, loaded lazily at the model's size, with optional synthetic anomalies.

    Images: ``load_image`` + ``resize_to_square`` (PIL bicubic, as the authors); masks: ``load_mask`` at
    (S, S) (PIL bilinear then ``> 127``, the authors' ``Resize`` + ``> 0.5``).
    """

    def __init__(self, root: PathLike, image_size: int, config: TrainConfig) -> None:
        self.size = int(image_size)
        self.seed = config.seed
        self.normal_fraction = config.synth_normal_fraction
        ds = load_dataset(root, format=config.dataset_format, split="test")
        self.root, self.format = ds.root, ds.format
        samples: List[Sample] = list(ds.samples)
        if config.include_train_normals:
            try:
                seen = {s.image_path for s in samples}
                samples += [s for s in load_dataset(root, format=config.dataset_format, split="train").samples
                            if s.label == 0 and s.image_path not in seen]
            except DatasetError as exc:
                logger.warning("include_train_normals: no train split read (%s)", exc)
        self.samples = samples
        self.normals = [i for i, s in enumerate(samples) if s.label == 0]
        n_anomalous = sum(s.label == 1 for s in samples)
        n_masked = sum(s.label == 1 and s.mask_path is not None for s in samples)
        if config.synthesize == "never" and n_anomalous == 0:
            raise DatasetError("the auxiliary set has only normal images, and training needs anomalies with "
                               "masks; pass synthesize='auto' or 'always' (CLI: --synthesize auto) to train on "
                               "synthetic anomalies", self.root)
        self.synthetic = config.synthesize == "always" or (config.synthesize == "auto" and n_masked == 0)
        if self.synthetic and not self.normals:
            raise DatasetError("synthetic anomalies need normal images, and this set has none", self.root)
        if n_masked == 0 and not self.synthetic:
            logger.warning("no anomalous image has a mask: only the image loss and the hinge will train")
        if self.synthetic:
            logger.info("training on synthetic anomalies (CutPaste, Perlin blend) over %d normal images",
                        len(self.normals))
        self.stats = {
            "root": str(self.root), "format": self.format, "categories": sorted({s.category for s in samples}),
            "n_images": len(samples), "n_anomalous": n_anomalous, "n_normal": len(samples) - n_anomalous,
            "n_anomalous_with_mask": n_masked, "include_train_normals": bool(config.include_train_normals),
            "synthetic_anomalies": bool(self.synthetic),
        }

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: int) -> np.ndarray:
        img = imio.load_image(self.samples[index].image_path)
        return imio.resize_to_square(img.array, self.size)

    def load(self, index: int, epoch: int) -> Tuple[np.ndarray, np.ndarray, int, bool, str]:
        """(image uint8 [S, S, 3], mask bool [S, S], label, has_mask, kind) of one sample in one epoch."""
        s = self.samples[index]
        image = self._image(index)
        if s.label == 0 and self.synthetic:
            rng = synth.sample_rng(self.seed, epoch, index)
            image, mask, kind = synth.synthesize(image, rng, self._other_normal(index),
                                                 normal_fraction=self.normal_fraction)
            return image, mask, int(kind != "normal"), True, kind
        mask = load_mask(s, size=(self.size, self.size))
        return image, mask, int(s.label), not s.mask_missing, "real"

    def _other_normal(self, index: int) -> Optional[synth.TextureSource]:
        others = [i for i in self.normals if i != index]
        if not others:
            return None
        return lambda rng: self._image(others[int(rng.integers(len(others)))])

    def order(self, epoch: int) -> List[int]:
        """The epoch's shuffled order: depends on (seed, epoch) only."""
        g = torch.Generator().manual_seed(int(self.seed) + int(epoch))
        return torch.randperm(len(self.samples), generator=g).tolist()

    def batches(self, epoch: int, batch_size: int, num_workers: int = 0,
                world: Optional[World] = None) -> Iterator[TrainBatch]:
        """The epoch's batches (last one may be short); with workers, up to two batches are decoded ahead.
        Under torchrun, ``world`` keeps this process's share of each global batch."""
        order = self.order(epoch)
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if world is not None and world.size > 1:
            chunks = [world.share(c) for c in chunks]
        if num_workers <= 0:
            for chunk in chunks:
                yield self._collate([self.load(i, epoch) for i in chunk])
            return
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append([pool.submit(self.load, i, epoch) for i in chunk])
                if len(pending) > 2:
                    yield self._collate([f.result() for f in pending.popleft()])
            while pending:
                yield self._collate([f.result() for f in pending.popleft()])

    @staticmethod
    def _collate(items: Sequence[Tuple[np.ndarray, np.ndarray, int, bool, str]]) -> TrainBatch:
        return TrainBatch(images=np.stack([it[0] for it in items]), masks=np.stack([it[1] for it in items]),
                          labels=np.array([it[2] for it in items], dtype=np.float32),
                          has_mask=np.array([it[3] for it in items], dtype=np.float32),
                          kinds=[it[4] for it in items])


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


# --------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON, never pickle)


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


def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
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


def _backbone_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the frozen weights: resuming on another backbone would silently train garbage."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.backbone.parameters()))


# --------------------------------------------------------------------------------------------
# the loop


def finetune(engine: "Engine", aux: PathLike, out_dir: Optional[PathLike] = None, resume: bool = False,
             seed: Optional[int] = 111, progress: bool = True, device: Optional[Union[str, torch.device]] = None,
             on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]] = None,
             references: Optional["ReferenceBank"] = None, **overrides: Any) -> Dict[str, Any]:
    """Train the engine's head on the auxiliary dataset ``aux``; returns the training report.

    ``overrides`` are :class:`TrainConfig` fields (plus ``lr``, the token learning rate). With ``out_dir``
    a checkpoint is written after every epoch, and at the end the model (``save_pretrained``) and
    ``training_report.json``. ``resume=True`` continues from ``out_dir/checkpoint`` to the same result as
    an uninterrupted run; the checkpoint's config is used, and an explicitly given option that changes what
    is computed (not e.g. ``num_workers``) is an error. ``on_epoch_end(epoch, stats)`` runs after each
    epoch's checkpoint (1-based epoch). ``references`` are saved with the model (they do not train).
    """
    t_start = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    if device is not None:
        engine.to(device)
    model = engine.model
    ckpt_dir = out / CHECKPOINT_DIR if out is not None else None
    given = dict(overrides, **({} if seed is None else {"seed": seed}))

    tensors, saved = None, None
    if resume:
        if ckpt_dir is None:
            raise ConfigError("resume=True needs out_dir (the directory of the interrupted run)")
        if not (ckpt_dir / CHECKPOINT_FILE).is_file():
            done = " (training_report.json is there: that run finished)" if (out / REPORT_FILE).is_file() else ""
            raise ConfigError(f"no checkpoint to resume from in {ckpt_dir}{done}")
        tensors, saved = load_checkpoint(ckpt_dir)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        base = TrainConfig(**{k: v for k, v in saved["train_config"].items() if k in known})
        config = TrainConfig.from_overrides(base, **given)
        changed = {k: (getattr(base, k), getattr(config, k)) for k in base.to_dict()
                   if k not in RESUME_FREE and getattr(base, k) != getattr(config, k)}
        if changed:
            raise ConfigError("resume: these options differ from the interrupted run (checkpoint, now): "
                              + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in changed.items())
                              + "; pass the original values or start a new out_dir")
    else:
        config = TrainConfig.from_overrides(None, **given)
        if ckpt_dir is not None and ckpt_dir.exists():
            logger.warning("%s holds a checkpoint of an earlier run; it will be overwritten (resume=True "
                           "continues it instead)", ckpt_dir)

    dev = local_device(engine.device)
    if dev != engine.device:
        engine.to(dev)
    world = join(dev)
    amp_dtype = _amp_dtype(config.amp, dev)
    data = TrainingSet(aux, model.config.image_size, config)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    optimizer, scheduler = build_optimizer(model, config)
    history: List[Dict[str, Any]] = []
    start_epoch, seconds_before, skipped = 0, 0.0, 0
    checksum = _backbone_checksum(model)
    if saved is not None:
        if not math.isclose(saved.get("backbone_checksum", checksum), checksum, rel_tol=1e-6):
            raise ConfigError("resume: the detector's backbone weights differ from the interrupted run's")
        _restore(model, optimizer, scheduler, tensors, saved, str(ckpt_dir / CHECKPOINT_FILE))
        start_epoch = int(saved["epoch"])
        history = list(saved["history"])
        seconds_before = float(saved.get("seconds", 0.0))
        skipped = int(saved.get("skipped_steps", 0))
        logger.info("resuming from epoch %d of %d", start_epoch, config.epochs)

    total_steps = steps_per_epoch * (config.epochs - start_epoch)
    bar = progress_bar(total_steps, progress and world.main, unit="step", desc="finetune")
    step_model = wrap(model, world)
    logger.info("finetune on %s: %d images (%d anomalous), %d epochs x %d steps, batch %d, %s, amp %s",
                data.root, len(data), data.stats["n_anomalous"], config.epochs, steps_per_epoch,
                config.batch_size, dev, amp_dtype or "off")
    run_start = time.perf_counter()
    with _training_context(engine, config), contextlib.closing(bar):
        for epoch in range(start_epoch, config.epochs):
            _seed_epoch(config.seed, epoch, dev)
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            sums = dict.fromkeys(LOSS_KEYS, 0.0)
            n_ok, t_epoch = 0, time.perf_counter()
            for batch in data.batches(epoch, config.batch_size, config.num_workers, world):
                images = engine.prepare(list(batch.images))
                masks = torch.from_numpy(batch.masks).to(dev, non_blocking=True)
                labels = torch.from_numpy(batch.labels).to(dev)
                has_mask = torch.from_numpy(batch.has_mask).to(dev)
                losses, ok = train_step(step_model, images, masks, labels, has_mask, optimizer, config, amp_dtype)
                losses = dict(zip(LOSS_KEYS, world.mean([losses[k] for k in LOSS_KEYS], dev)))
                if ok:
                    n_ok += 1
                    for k in LOSS_KEYS:
                        sums[k] += losses[k]
                else:
                    skipped += 1
                    logger.warning("epoch %d: skipped a batch with a non-finite loss or token gradient", epoch + 1)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()}, refresh=False)
            scheduler.step()
            stats = {"epoch": epoch + 1, "steps": steps_per_epoch, "skipped_steps_total": skipped,
                     **{k if k != "total" else "loss": (sums[k] / n_ok if n_ok else None) for k in LOSS_KEYS},
                     "lr": lrs, "seconds": round(time.perf_counter() - t_epoch, 3)}
            history.append(stats)
            logger.info("epoch %d/%d: loss %s (focal %s, dice %s, bce %s, hinge %s), %.1f s", epoch + 1,
                        config.epochs, *(_fmt(stats[k]) for k in ("loss", "focal", "dice", "bce", "hinge")),
                        stats["seconds"])
            if ckpt_dir is not None and world.main:
                save_checkpoint(ckpt_dir, model, optimizer, scheduler, {
                    "epoch": epoch + 1, "steps": steps_per_epoch * (epoch + 1), "skipped_steps": skipped,
                    "history": history, "train_config": config.to_dict(), "data": data.stats,
                    "seconds": seconds_before + time.perf_counter() - run_start, "backbone_checksum": checksum,
                })
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, dict(stats))
    seconds = seconds_before + time.perf_counter() - run_start

    training_data = dict(data.stats, epochs=config.epochs, seed=config.seed)
    model.config.metadata["training_data"] = training_data
    model.config.head_trained = True
    report = {
        "data": data.stats, "epochs": config.epochs, "steps": steps_per_epoch * config.epochs,
        "steps_per_epoch": steps_per_epoch, "skipped_steps": skipped, "seed": config.seed,
        "history": history, "final_loss": history[-1]["loss"] if history else None,
        "seconds": round(seconds, 3), "seconds_this_run": round(time.perf_counter() - t_start, 3),
        "resumed_from_epoch": start_epoch if saved is not None else None,
        "device": str(dev), "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        "model": {"backbone": model.config.backbone, "image_size": model.config.image_size,
                  "layers": list(model.config.layers or ())},
        "train_config": config.to_dict(), "world_size": world.size,
    }
    if out is not None:
        from ..store import save_model

        if world.main:  # one writer
            save_model(out, model, references)
            atomic_write_json(out / REPORT_FILE, _json_safe(report))
            if not config.keep_checkpoint and ckpt_dir is not None and ckpt_dir.exists():
                shutil.rmtree(ckpt_dir)
        report["out_dir"] = str(out)
    world.barrier()
    world.close()
    return report


def _seed_epoch(seed: int, epoch: int, device: torch.device) -> None:
    """Reseed the dropout RNG from (seed, epoch) alone, so an epoch does not depend on what ran before."""
    s = (int(seed) * 1_000_003 + int(epoch) * 7_919 + 17) % (2**63 - 1)
    torch.default_generator.manual_seed(s)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None
                                      else torch.cuda.current_device()].manual_seed(s)


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "fp32" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


@contextlib.contextmanager
def _training_context(engine: "Engine", config: TrainConfig) -> Iterator[None]:
    """Train mode, gradient checkpointing and deterministic mode for the run; the caller's RNG, settings
    and eval mode come back afterwards, even on an exception or interruption.

    A model compiled for inference (:meth:`AnomalyDetector.compile`) trains eagerly: its graph was built
    for eval mode without gradients, and CPU weight freezing is inference-only. The compiled call comes back
    afterwards and sees the trained weights."""
    model = engine.model
    compiled = getattr(model, "_compiled_call_impl", None)
    dev = engine.device
    cuda_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    old_ckpt = model.encoder.gradient_checkpointing
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            if config.deterministic:
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True, warn_only=True)
            model.encoder.gradient_checkpointing = bool(config.gradient_checkpointing)
            model._compiled_call_impl = None
            model.train()
            with torch.enable_grad():
                yield
        finally:
            model.eval()
            model._compiled_call_impl = compiled
            model.encoder.gradient_checkpointing = old_ckpt
            torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None so that the report stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
