"""Quality of every scoring mode on ../shared/data: head, references (K = 1, 4, 16) and batch (all test images,
and seeded subsets of N = 16 and 32), image AUROC / pixel AUROC / AUPRO at each image's original resolution.

    python benchmarks/modes.py [--data ../shared/data] [--dtype fp32] [--subset-draws 3]
                               [--features fp32 fp16 fp16-products ...]

Settings (block 7 of 12, r = 1 and 3, interval fraction 0.1, image score = max, 224 px) were chosen on these
four categories before this script was written (docs/batch-zero-shot.md); nothing here tunes them. References
are drawn from each category's train/good exactly as ``visualad eval --shots K`` draws them (seed 42).
Prints a Markdown table for docs/modes.md. ``--features``: the same table with the nearest-neighbour
features kept in each dtype (and with "-products", their nearest candidates picked by a product in that half
dtype, "fp16-bf16-products": fp16 rows, bf16 products), the forward staying in ``--dtype``, then the largest
difference of any metric from the first one's, per mode and category (docs/modes.md, "Precision").
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visualad import AnomalyDetector, metrics  # noqa: E402
from visualad.data.datasets import load_dataset, load_mask  # noqa: E402
from visualad.modes import knn  # noqa: E402
from visualad.modes.batch import BatchMode  # noqa: E402
from visualad.tasks.references import draw_references  # noqa: E402

#: --features: the dtype the nearest-neighbour features are kept in, and the half product that picks their
#: nearest candidates on the CPU (as CUDA's fp16 does; None: fp32 products). References mode keeps fp32 rows and
#: picks its candidates alike whenever the features are half
FEATURES = {"fp32": (torch.float32, None), "fp16": (torch.float16, None), "bf16": (torch.bfloat16, None),
            "fp16-products": (torch.float16, torch.float16), "bf16-products": (torch.bfloat16, torch.bfloat16),
            "fp16-bf16-products": (torch.float16, torch.bfloat16)}
CATEGORIES = {"tire": "mvtec_3d_ad_tire_rgb", "cookie": "lookout_cookies", "hazelnut": "mvtec_ad_reduced",
              "transistor": "mvtec_ad_reduced"}


def score(det: AnomalyDetector, samples: List[Any], mode: Any) -> Dict[str, float]:
    results = list(det.predict_iter([s.image_path for s in samples], batch_size=8, on_error="raise", mode=mode))
    labels = np.array([s.label for s in samples])
    img = metrics.image_metrics(np.array([r.pred_score for r in results]), labels)
    maps = [r.anomaly_map for r in results]
    masks = [load_mask(s, size=m.shape) for s, m in zip(samples, maps)]
    pix = metrics.pixel_metrics(maps, masks)
    return {"i": img["auroc"], "p": pix["auroc"], "pro": pix["aupro"]}


def table(det: AnomalyDetector, data: Path, subset_draws: int) -> Dict[str, Dict[str, Dict[str, float]]]:
    rows: Dict[str, Dict[str, Dict[str, float]]] = {}
    t0 = time.perf_counter()
    for cat, ds_name in CATEGORIES.items():
        test = [s for s in load_dataset(data / ds_name, split="test").samples if s.category == cat]
        train = load_dataset(data / ds_name, split="train")
        rows.setdefault("head", {})[cat] = score(det, test, "head")
        for k in (1, 4, 16):
            refs = draw_references(train, cat, k, seed=42)
            det.set_references(refs)
            rows.setdefault(f"references K={k}", {})[cat] = score(det, test, "references")
            det.clear_references()
        rows.setdefault("batch, all test images", {})[cat] = score(det, test, BatchMode())
        for n in (16, 32):
            draws = []
            for d in range(subset_draws):
                sub = random.Random(f"{d}:{cat}:{n}").sample(test, min(n, len(test)))
                if len({s.label for s in sub}) < 2:
                    continue
                draws.append(score(det, sub, BatchMode()))
            rows.setdefault(f"batch, N={n} ({subset_draws} draws)", {})[cat] = {
                k: float(np.mean([d[k] for d in draws])) for k in ("i", "p", "pro")}
        print(f"{cat} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--subset-draws", type=int, default=3, help="seeded draws per subset size N")
    ap.add_argument("--features", nargs="+", default=None, choices=sorted(FEATURES),
                    help="tables with the nearest-neighbour features kept in each dtype (\"-products\": candidates "
                         "picked by a half product, CUDA's rule, emulated on this CPU: slow), then differences "
                         "from the first")
    args = ap.parse_args()
    det = AnomalyDetector.from_pretrained(device="cpu", dtype=args.dtype)
    cats = list(CATEGORIES)
    tables = {}
    t0 = time.perf_counter()
    for name in args.features or [None]:
        if name is not None:
            det.engine.feature_dtype, product = FEATURES[name]
            knn.HALF_PRODUCTS = {"cuda": torch.float16, **({"cpu": product} if product else {})}
        rows = tables[name] = table(det, args.data, args.subset_draws)
        print(f"\n{args.dtype} forward, features {name}:" if name else "")
        print("| mode | " + " | ".join(cats) + " | mean |")
        print("|---" * (len(cats) + 2) + "|")
        for mode, per in rows.items():
            cells = [f"{per[c]['i']:.3f} / {per[c]['p']:.3f} / {per[c]['pro']:.3f}" for c in cats]
            mean = {k: np.mean([per[c][k] for c in cats]) for k in ("i", "p", "pro")}
            print(f"| {mode} | " + " | ".join(cells)
                  + f" | **{mean['i']:.3f} / {mean['p']:.3f} / {mean['pro']:.3f}** |", flush=True)
    names = list(tables)
    for name in names[1:]:  # the largest |difference| of image AUROC, pixel AUROC or AUPRO from the first
        print(f"\nfeatures {name} against {names[0]}: the largest difference of any metric")
        print("| mode | " + " | ".join(cats) + " |")
        print("|---" * (len(cats) + 1) + "|")
        for mode, per in tables[name].items():
            diffs = [max(abs(per[c][k] - tables[names[0]][mode][c][k]) for k in ("i", "p", "pro")) for c in cats]
            print(f"| {mode} | " + " | ".join(f"{d:.4f}" for d in diffs) + " |")
    print(f"\n{args.dtype}, {det.config.image_size} px, {time.perf_counter() - t0:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()
