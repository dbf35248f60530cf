"""Operating points on real data: ask for a false-alarm rate, calibrate on some normal images, then measure the
rate on normal images held out and the recall on the defective ones.

    python benchmarks/operating_points.py [--splits 10] [--shots 8] [--rates 0.05 0.1]

Settings fixed before any number was seen: the default model, references mode with ``--shots`` references
drawn from a category's normal images (train/good and test/good pooled), the rest of its normals split in two
halves (calibration, held out), ``--splits`` random splits; every category of ../shared/data with normal
images. Per category and rate: the calibration size n, the rate asked, the expected rate of the order
statistic, the measured false-alarm rate on the held-out normals (pooled over splits), the mean 95% bound, and
the mean recall on all of the category's defective test images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visualad import AnomalyDetector  # noqa: E402
from visualad.data.datasets import load_dataset  # noqa: E402
from visualad.operating import false_alarm_threshold  # noqa: E402


def category_images(root: Path) -> Dict[str, Dict[str, List[Path]]]:
    """{category: {"train_normal": [...], "test_normal": [...], "defective": [...]}} of the categories with
    normal and defective images, each list in the dataset's (sorted) order (benchmarks/self_threshold.py too)."""
    out: Dict[str, Dict[str, List[Path]]] = {}
    for split in ("train", "test"):
        try:
            dataset = load_dataset(root, split=split)
        except Exception:  # noqa: BLE001 - a dataset without this split
            continue
        for category, samples in dataset.by_category().items():
            entry = out.setdefault(category, {"train_normal": [], "test_normal": [], "defective": []})
            for s in samples:
                entry["defective" if s.label else f"{split}_normal"].append(Path(s.image_path))
    return {c: e for c, e in out.items() if (e["train_normal"] or e["test_normal"]) and e["defective"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--splits", type=int, default=10)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.1])
    args = ap.parse_args()
    det = AnomalyDetector.from_pretrained(device="cpu")
    print(f"default model, {det.dtype_name}, references mode with {args.shots} references, {args.splits} splits")
    print("| category | normals (cal / held out) | defective | asked | expected | measured on held-out normals "
          "| 95% bound (mean) | recall (mean) | too few normals |")
    print("|---|---|---|---|---|---|---|---|---|")
    for category, imgs in sorted(category_images(args.data).items()):
        normal, defective = sorted(imgs["train_normal"] + imgs["test_normal"]), sorted(imgs["defective"])
        per_rate = {r: {"flagged": 0, "held": 0, "expected": [], "bound": [], "recall": [], "warned": 0}
                    for r in args.rates}
        n_cal = n_held = 0
        for split in range(args.splits):
            order = np.random.default_rng(split).permutation(len(normal))
            refs = [normal[i] for i in order[:args.shots]]
            rest = [normal[i] for i in order[args.shots:]]
            cal, held = rest[:len(rest) // 2], rest[len(rest) // 2:]
            n_cal, n_held = len(cal), len(held)
            det.set_references(refs)
            scores = [r.pred_score for r in det.predict_iter(cal + held + defective, mode="references",
                                                             at_model_size=True)]
            s_cal = np.asarray(scores[:len(cal)])
            s_held = np.asarray(scores[len(cal):len(cal) + len(held)])
            s_def = np.asarray(scores[len(cal) + len(held):])
            for rate, acc in per_rate.items():
                point = false_alarm_threshold(s_cal, rate, s_def)
                acc["flagged"] += int((s_held >= point.threshold).sum())
                acc["held"] += len(s_held)
                acc["expected"].append(point.expected_rate)
                acc["bound"].append(point.rate_bound)
                acc["recall"].append(point.recall)
                acc["warned"] += point.warning is not None
        for rate, acc in per_rate.items():
            measured = acc["flagged"] / max(acc["held"], 1)
            print(f"| {category} | {len(normal)} ({n_cal} / {n_held}) | {len(defective)} | {rate:.0%} | "
                  f"{np.mean(acc['expected']):.1%} | {measured:.1%} ({acc['flagged']} of {acc['held']}) | "
                  f"{np.mean(acc['bound']):.1%} | {np.mean(acc['recall']):.1%} | "
                  f"{acc['warned']} of {args.splits} |")


if __name__ == "__main__":
    main()
