"""Time one VisualAD training step of the paper's configuration, with and without gradient checkpointing.

Why: training backpropagates through the whole frozen ViT-L to the input tokens (1372 tokens at 518 px,
batch 8), so memory, not compute, decides which GPU can run the recipe; this measures both.

GPU session (the paper's setting, random backbone weights: speed and memory do not depend on them):

    python benchmarks/train_step_gpu.py                      # clip-l, 518 px, batch 8, bf16 autocast

CPU smoke check (a tiny open_clip tower, seconds):

    python benchmarks/train_step_gpu.py --device cpu --tiny

Prints one JSON object per mode (seconds per step, peak CUDA memory) and a summary; ``--out`` writes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from visualad import AnomalyDetector
from visualad.train import TrainConfig, build_optimizer, train_step
from visualad.train.recipe import autocast_dtype

TINY_CLIP = {"backbone": "open_clip:ViT-B-32",
             "backbone_kwargs": {"layers": 4, "width": 64, "head_width": 32, "image_size": 64, "patch_size": 16}}


def make_batch(batch: int, size: int, device: torch.device, seed: int = 0):
    """Random normalised images, half of them with a rectangular defect mask (the loss needs both)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    masks = torch.zeros(batch, size, size)
    labels = torch.zeros(batch)
    for i in range(0, batch, 2):
        y, x = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
        masks[i, y:y + size // 4, x:x + size // 4] = 1
        labels[i] = 1
    has_mask = torch.ones(batch)
    return [t.to(device) for t in (images, masks, labels, has_mask)]


def time_mode(det: AnomalyDetector, checkpointing: bool, args: argparse.Namespace) -> Dict[str, Any]:
    dev = det.device
    cfg = TrainConfig(gradient_checkpointing=checkpointing, amp=args.amp, batch_size=args.batch_size)
    amp_dtype = autocast_dtype(cfg.amp, dev)
    model = det.model
    opt, _ = build_optimizer(model, cfg)
    model.train()
    model.encoder.gradient_checkpointing = checkpointing
    batch = make_batch(args.batch_size, det.config.image_size, dev)
    row: Dict[str, Any] = {"gradient_checkpointing": checkpointing, "batch_size": args.batch_size,
                           "image_size": det.config.image_size, "amp": str(amp_dtype or "fp32"),
                           "device": str(dev)}
    try:
        for _ in range(args.warmup):
            train_step(model, *batch, opt, cfg, amp_dtype)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        times: List[float] = []
        losses = None
        for _ in range(args.steps):
            t = time.perf_counter()
            losses, ok = train_step(model, *batch, opt, cfg, amp_dtype)  # ends in a host sync
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t)
        row.update(seconds_per_step=round(statistics.median(times), 4), seconds_all=[round(t, 4) for t in times],
                   images_per_second=round(args.batch_size / statistics.median(times), 2),
                   loss=losses["total"] if losses else None)
        if dev.type == "cuda":
            row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
            row["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / 2**30, 3)
    except torch.cuda.OutOfMemoryError as exc:  # report, then try the next mode
        row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
    finally:
        model.encoder.gradient_checkpointing = False
        model.eval()
        del opt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny open_clip tower at 64 px (smoke check)")
    p.add_argument("--image-size", type=int, default=None, help="default: 518 (clip-l), 64 (--tiny)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"], help="auto = bf16 on CUDA")
    p.add_argument("--modes", default="off,on", help="gradient checkpointing modes to time")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu --tiny for a smoke check", file=sys.stderr)
        return 2
    t = time.perf_counter()
    if args.tiny:
        det = AnomalyDetector.from_backbone(device=args.device, pretrained_backbone=False,
                                            image_size=args.image_size or 64, **TINY_CLIP)
    else:
        det = AnomalyDetector.from_backbone("clip-l", device=args.device, pretrained_backbone=False,
                                            **({"image_size": args.image_size} if args.image_size else {}))
    n_train = sum(p.numel() for _, p in det.model.head_parameters())
    header = {"backbone": det.config.backbone, "image_size": det.config.image_size,
              "layers": list(det.config.layers), "trainable_parameters": n_train,
              "build_seconds": round(time.perf_counter() - t, 2), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(det.device) if det.device.type == "cuda" else None}
    print(json.dumps(header), flush=True)
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        row = time_mode(det, mode == "on", args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"config": header, "results": rows}, indent=2) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
