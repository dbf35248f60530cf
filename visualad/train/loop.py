"""The fine-tuning loop (method doc §6): the recipe (:mod:`visualad.train.recipe`) over the auxiliary set
(:mod:`visualad.train.data`), a checkpoint after every epoch (:mod:`visualad.train.checkpoint`), exact resume,
one writer under torchrun. The recipe's deviations from the paper are listed in :mod:`visualad.train.recipe`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Union

import torch

from ..atomic import atomic_write_json
from ..errors import ConfigError
from ..progress import progress_bar
from ..types import PathLike
from .checkpoint import (CHECKPOINT_DIR, CHECKPOINT_FILE, STATE_FILE, backbone_checksum, load_checkpoint,  # noqa: F401
                         restore, save_checkpoint)
from .data import TrainBatch, TrainingSet  # noqa: F401 - public here too
from .distributed import join, local_device, wrap
from .recipe import LOSS_KEYS, RESUME_FREE, TrainConfig, autocast_dtype, build_optimizer, train_step  # noqa: F401

if TYPE_CHECKING:
    from ..modes.bank import ReferenceBank
    from ..runtime.engine import Engine

logger = logging.getLogger(__name__)

REPORT_FILE = "training_report.json"


def finetune(engine: "Engine", aux: PathLike, out_dir: Optional[PathLike] = None, resume: bool = False,
             seed: Optional[int] = 111, progress: bool = True, device: Optional[Union[str, torch.device]] = None,
             on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]] = None,
             references: Optional["ReferenceBank"] = None, start: Optional[str] = None,
             **overrides: Any) -> Dict[str, Any]:
    """Train the engine's head on the auxiliary dataset ``aux``; returns the training report.

    ``overrides`` are :class:`TrainConfig` fields (plus ``lr``, the token learning rate). With ``out_dir``
    a checkpoint is written after every epoch, and at the end the model (``save_pretrained``) and
    ``training_report.json``. ``resume=True`` continues from ``out_dir/checkpoint`` to the same result as
    an uninterrupted run; the checkpoint's config is used, and an explicitly given option that changes what
    is computed (not e.g. ``num_workers``) is an error. ``on_epoch_end(epoch, stats)`` runs after each
    epoch's checkpoint (1-based epoch). ``references`` are saved with the model (they do not train).
    ``start`` says where the head starts from (recorded in the report).
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
    amp_dtype = autocast_dtype(config.amp, dev)
    data = TrainingSet(aux, model.config.image_size, config)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    optimizer, scheduler = build_optimizer(model, config)
    history: List[Dict[str, Any]] = []
    start_epoch, seconds_before, skipped = 0, 0.0, 0
    checksum = backbone_checksum(model)
    if saved is not None:
        if not math.isclose(saved.get("backbone_checksum", checksum), checksum, rel_tol=1e-6):
            raise ConfigError("resume: the detector's backbone weights differ from the interrupted run's")
        restore(model, optimizer, scheduler, tensors, saved, str(ckpt_dir / CHECKPOINT_FILE))
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
        "train_config": config.to_dict(), "world_size": world.size, "start": start,
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
