"""Prediction throughput against the floor set by the device's measured matrix rate.

1. Measures the dense matrix-multiply rate of the device in the chosen dtype (square GEMMs, best of a few).
2. Counts the model's FLOPs per image with ``torch.utils.flop_counter`` (one forward at the chosen size).
3. Floor = rate / FLOPs per image: the images per second the model would reach if every FLOP ran at the
   GEMM rate. Reports the measured images per second of ``Engine.score_arrays`` (batched, on-device scoring) as a
   fraction of that floor.

The GPU check of issue 8 (ViT-L/14 at 518 px, bf16, batch 32; target >= 60% of the floor):

    python benchmarks/floor.py --device cuda --model clip-l --size 518 --batch 32 --dtype bf16

It runs anywhere (``--device cpu --model dinov2-s-imgfocus --size 224 --batch 8`` checks the script itself).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable, Dict

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from visualad import AnomalyDetector
from visualad.modes.head import HeadMode  # noqa: E402


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product (2 n^3 FLOPs), best of ``reps``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = _sync(device)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def flops_per_image(det: AnomalyDetector) -> float:
    """FLOPs of one forward (backbone with tokens, SCA, SAF, maps) on one image at the model's size."""
    s = det.config.image_size
    x = torch.zeros(1, 3, s, s, device=det.device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), det.engine.autocast():  # FlopCounterMode fails under inference_mode
        det.model(x)
    return float(counter.get_total_flops())


def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    det = AnomalyDetector.from_backbone(args.model, device=args.device, dtype=args.dtype, image_size=args.size,
                                        pretrained_backbone=args.pretrained, compile=args.compile)
    rate = matmul_rate(device, det.dtype, args.gemm)
    flops = flops_per_image(det)
    rng = np.random.default_rng(0)
    squares = [rng.integers(0, 255, size=(args.size, args.size, 3), dtype=np.uint8) for _ in range(args.batch)]
    sync = _sync(device)
    for _ in range(args.warmup):
        det.engine.score_arrays(squares, HeadMode())
    sync()
    t = time.perf_counter()
    for _ in range(args.reps):
        det.engine.score_arrays(squares, HeadMode())
    sync()
    ips = args.reps * args.batch / (time.perf_counter() - t)
    floor = rate / flops
    out = {"model": args.model, "size": args.size, "batch": args.batch, "device": str(device),
           "dtype": str(det.dtype).replace("torch.", ""), "compile": args.compile,
           "gemm_tflops": rate / 1e12, "gflops_per_image": flops / 1e9, "floor_img_s": floor, "img_s": ips,
           "fraction_of_floor": ips / floor}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="clip-l")
    p.add_argument("--size", type=int, default=518)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="bf16", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--gemm", type=int, default=8192, help="matrix size of the rate measurement")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--pretrained", action="store_true",
                   help="load the backbone's real weights (default: random weights; the speed is the same)")
    args = p.parse_args()
    res = run(args)
    print(json.dumps(res, indent=2))
    print(f"{res['model']} {res['size']} px batch {res['batch']} {res['dtype']}: {res['img_s']:.1f} img/s, "
          f"floor {res['floor_img_s']:.1f} img/s ({res['gflops_per_image']:.0f} GFLOP/image at "
          f"{res['gemm_tflops']:.1f} TFLOP/s) -> {100 * res['fraction_of_floor']:.0f}% of the floor")


if __name__ == "__main__":
    main()
