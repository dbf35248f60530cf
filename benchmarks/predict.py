"""Prediction speed and peak memory against two baselines measured in the same run.

- ``backbone``: the frozen backbone alone (timm ``forward_features`` / the open_clip image tower), same batch,
  same input size, same dtype: the floor that VisualAD's extra tokens, SCA, SAF and scoring add to.
- ``authors``: the authors' way, reimplemented here: one image at a time, fp32, SCA run once per token, each
  layer map upsampled then summed, the map moved to the host and blurred with scipy, the top-1% mean in NumPy.

``ours`` is ``Engine.score_arrays`` (normalise on the device, one forward per batch, blur, upsample
and top-k on the device, maps to the host once); ``ours+io`` adds the resize to the square input and back to
each image's original size (``predict`` on decoded images).

Each configuration runs in its own subprocess so that its peak RSS (CPU) or peak CUDA memory is its own.

    python benchmarks/predict.py                      # dinov2-s-imgfocus at 224/448/518, batch 1 and 8, CPU
    python benchmarks/predict.py --large              # + ViT-L/14 (CLIP, random weights) at 336 and 518
    python benchmarks/predict.py --device cuda --dtype bf16 --large --batches 1 8 32
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

import numpy as np
import torch


def _time(fn: Callable[[], Any], reps: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _authors_way(model: Any, x: torch.Tensor) -> float:
    """One image: their forward order and host-side scoring (method doc §5, §7.2, §10)."""
    from scipy.ndimage import gaussian_filter

    from visualad.model import scoring
    from visualad.model.heads import contrast_map
    from visualad.model.tokens import NUM_TOKENS

    cfg = model.config
    with torch.no_grad():
        layer_outs, last = model.encoder(x)
        norm = model.final_norm if model.final_norm is not None else model.backbone.final_norm
        tokens = norm(last[:, :NUM_TOKENS])
        start = model.encoder.prefix_len
        total = 0
        for layer, h in zip(cfg.layers, layer_outs):
            full = norm(h)
            patches = full[:, start:]
            sca = model.sca[f"layer_{layer}"]
            a = sca(tokens[:, :1], patches)  # K and V computed once per token, as the authors do
            n = sca(tokens[:, 1:], patches)
            aligned = model.saf[f"layer_{layer}"](full)[:, start:]  # SAF on the whole sequence
            s = contrast_map(aligned, torch.cat([a, n], dim=1)).view(1, 1, model.grid, model.grid)
            total = total + scoring.upsample(s, cfg.image_size)[0, 0]
    m = gaussian_filter(total.cpu().numpy(), sigma=cfg.sigma)
    k = scoring.topk_count(cfg.topk_ratio, m.size)
    return float(np.sort(m.ravel())[-k:].mean())


def run_one(args: argparse.Namespace) -> Dict[str, Any]:
    from visualad import AnomalyDetector
    from visualad.modes.head import HeadMode

    torch.manual_seed(0)
    device = torch.device(args.device)
    large = args.model == "clip-l"
    det = AnomalyDetector.from_backbone(args.model, device=args.device, dtype=args.dtype, image_size=args.size,
                                        pretrained_backbone=not large, compile=args.compile)
    model = det.model
    bb = model.backbone
    b, s = args.batch, args.size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    squares = [rng.integers(0, 255, size=(s, s, 3), dtype=np.uint8) for _ in range(b)]
    originals = [rng.integers(0, 255, size=(600, 800, 3), dtype=np.uint8) for _ in range(b)]
    x = det.engine.prepare(squares)
    autocast = det.engine.autocast

    def backbone() -> None:
        with torch.inference_mode(), autocast():
            if hasattr(bb, "vit"):
                bb.vit.forward_features(x)
            else:
                bb.visual(x)

    def ours() -> None:
        det.engine.score_arrays(squares, HeadMode())

    def ours_io() -> None:
        det.predict(originals, batch_size=b, keep_image=False)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reps = args.reps
    out: Dict[str, Any] = {"model": args.model, "size": s, "batch": b, "device": args.device,
                           "dtype": str(det.dtype).replace("torch.", "") + ("+compile" if args.compile else "")}
    out["backbone_s"] = _time(backbone, reps, sync) / b
    out["ours_s"] = _time(ours, reps, sync) / b
    out["ours_io_s"] = _time(ours_io, reps, sync) / b
    if args.authors:
        fp32 = AnomalyDetector(model, device=args.device, dtype="fp32")
        one = fp32.engine.prepare(squares[:1])
        out["authors_s"] = _time(lambda: _authors_way(model, one), reps, sync)
        with torch.inference_mode():
            ref_maps, ref_scores = fp32.engine.score_arrays(squares[:1], HeadMode())
        maps, scores = det.engine.score_arrays(squares[:1], HeadMode())
        out["map_max_abs_diff_vs_fp32"] = float(np.abs(maps - ref_maps).max())
        out["score_abs_diff_vs_fp32"] = float(abs(scores[0] - ref_scores[0]))
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 518])
    p.add_argument("--large-sizes", type=int, nargs="+", default=[336, 518])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--large", action="store_true", help="also ViT-L/14 (CLIP ViT-L/14@336, random weights)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="ours with compile=True (the first call compiles)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="dinov2-s-imgfocus", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=224, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--authors", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    jobs = [("dinov2-s-imgfocus", s) for s in args.sizes]
    if args.large:
        jobs += [("clip-l", s) for s in args.large_sizes]
    rows: List[Dict[str, Any]] = []
    for model, size in jobs:
        for batch in args.batches:
            cmd = [sys.executable, __file__, "--one", "--model", model, "--size", str(size), "--batch", str(batch),
                   "--device", args.device, "--dtype", args.dtype, "--reps", str(args.reps)]
            if args.compile:
                cmd.append("--compile")
            if batch == max(args.batches):
                cmd.append("--authors")
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-2000:], file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            _print_row(rows[-1], header=len(rows) == 1)


def _print_row(r: Dict[str, Any], header: bool) -> None:
    if header:
        print(f"{'model':<18} {'px':>4} {'B':>3} {'dtype':>14} {'backbone img/s':>14} {'ours img/s':>10} "
              f"{'+io img/s':>9} {'ours/bb':>7} {'authors img/s':>13} {'speedup':>7} {'peak MB':>8} {'map diff':>9}")
    authors = r.get("authors_s")
    speed = f"{authors / r['ours_s']:.2f}x" if authors else "-"
    diff = f"{r['map_max_abs_diff_vs_fp32']:.1e}" if "map_max_abs_diff_vs_fp32" in r else "-"
    print(f"{r['model']:<18} {r['size']:>4} {r['batch']:>3} {r['dtype']:>14} {1 / r['backbone_s']:>14.2f} "
          f"{1 / r['ours_s']:>10.2f} {1 / r['ours_io_s']:>9.2f} {r['ours_s'] / r['backbone_s']:>7.3f} "
          f"{(1 / authors) if authors else math.nan:>13.2f} {speed:>7} {r['peak_mem_mb']:>8.0f} {diff:>9}",
          flush=True)


if __name__ == "__main__":
    main()
