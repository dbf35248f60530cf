"""bf16 against fp32 on real images: map and score differences, and the metrics each precision gives.

Runs the model on every test image of ``shared/data`` once in fp32 and once in each other precision, at the
model's input size (the papers' protocol), and prints per category: the largest absolute map difference,
the same relative to the fp32 map's own range (max - min over that image), the largest score difference,
and image AUROC / pixel AUROC / AUPRO in each precision. This is the measurement behind ``dtype="auto"``
choosing bf16 on CPUs with native bf16 instructions (docs/speed.md).

    python benchmarks/precision.py [--model dinov2-s-imgfocus] [--dtypes bf16] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visualad import AnomalyDetector, metrics  # noqa: E402
from visualad.modes.head import HeadMode  # noqa: E402
from visualad.data import images as imio  # noqa: E402
from visualad.data.datasets import load_dataset, load_mask  # noqa: E402


def run(det: AnomalyDetector, arrays: List[np.ndarray], batch: int) -> "tuple[np.ndarray, np.ndarray]":
    maps, scores = [], []
    for s in range(0, len(arrays), batch):
        m, sc = det.engine.score_arrays(arrays[s:s + batch], HeadMode())
        maps.append(m)
        scores.append(sc)
    return np.concatenate(maps), np.concatenate(scores)


def quality(maps: np.ndarray, scores: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    img = metrics.image_metrics(scores, labels)["auroc"] if 0 < labels.sum() < len(labels) else float("nan")
    pix = metrics.pixel_metrics(maps, masks)
    return np.array([img, pix["auroc"], pix["aupro"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--model", default=None, help="default: the offline default model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16"])
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    dets: Dict[str, AnomalyDetector] = {d: AnomalyDetector.from_pretrained(args.model, device=args.device, dtype=d)
                                        for d in ["fp32", *args.dtypes]}
    size = dets["fp32"].config.image_size
    print(f"model {args.model or 'default'}, {size} px, device {args.device}, threads {torch.get_num_threads()}")
    print("| category | images | dtype | max abs map diff | max diff / map range | max score diff | "
          "I-AUROC | P-AUROC | AUPRO |")
    print("|---|---|---|---|---|---|---|---|---|")
    for root in sorted(p for p in args.data.iterdir() if p.is_dir()):
        samples = load_dataset(root).samples
        for category in sorted({s.category for s in samples}):
            test = [s for s in samples if s.category == category]
            arrays = [imio.resize_to_square(imio.load_image(s.image_path).array, size) for s in test]
            masks = np.stack([load_mask(s, size=(size, size)) for s in test])
            labels = np.array([s.label for s in test])
            ref_maps, ref_scores = run(dets["fp32"], arrays, args.batch)
            q = quality(ref_maps, ref_scores, masks, labels)
            print(f"| {root.name}/{category} | {len(test)} | fp32 | - | - | - | "
                  + " | ".join(f"{v:.4f}" for v in q) + " |", flush=True)
            span = (ref_maps.max(axis=(1, 2)) - ref_maps.min(axis=(1, 2)))[:, None, None]
            for d in args.dtypes:
                maps, scores = run(dets[d], arrays, args.batch)
                diff = np.abs(maps - ref_maps)
                q = quality(maps, scores, masks, labels)
                print(f"| | | {d} | {diff.max():.2e} | {(diff / span).max():.2e} | "
                      f"{np.abs(scores - ref_scores).max():.2e} | " + " | ".join(f"{v:.4f}" for v in q) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
