"""Record the default model's golden outputs on ../shared/data (run once, on a chosen commit, in fp32 and bf16).

    python tests/record_baseline.py > tests/data/default_model_baseline.json

Per test image: the score and an 8 x 8 summary of the map (the mean of each of 64 equal tiles). Values, not
float bits: test_baseline.py compares them within tolerances that follow the dtype, so the check holds on any
CPU and torch build yet still catches a real change of the model.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import shared_data_root  # noqa: E402

VARIANTS = {"fp32_model_size": ("fp32", True), "bf16_model_size": ("bf16", True),
            "fp32_original_size": ("fp32", False)}


def shared_test_images(root: Path) -> list:
    """Every test image of every category (sorted relative paths)."""
    from visualad.data.datasets import load_dataset

    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        ds = load_dataset(sub, split="test")
        out += [str(s.image_path.relative_to(root)) for s in ds.samples]
    return sorted(out)


def summary(amap: np.ndarray, tiles: int = 8) -> list:
    """The mean of each of ``tiles x tiles`` equal tiles of a map (edges split as evenly as integers allow)."""
    ys = np.linspace(0, amap.shape[0], tiles + 1).astype(int)
    xs = np.linspace(0, amap.shape[1], tiles + 1).astype(int)
    return [[float(amap[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean()) for j in range(tiles)] for i in range(tiles)]


def outputs(dtype: str, at_model_size: bool, paths: list, root: Path) -> dict:
    from visualad import AnomalyDetector

    det = AnomalyDetector.from_pretrained(device="cpu", dtype=dtype)
    rows = {}
    for rel, res in zip(paths, det.predict_iter([root / p for p in paths], batch_size=8, on_error="raise",
                                                at_model_size=at_model_size, mode="head")):
        rows[rel] = {"score": float(res.pred_score), "summary": summary(res.anomaly_map),
                     "shape": list(res.anomaly_map.shape)}
    return rows


def main() -> None:
    root = shared_data_root()
    paths = shared_test_images(root)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = {"commit": commit, "images": len(paths), "batch_size": 8}
    out.update({key: outputs(dtype, at_model, paths, root) for key, (dtype, at_model) in VARIANTS.items()})
    json.dump(out, sys.stdout, sort_keys=True, separators=(",", ":"))


if __name__ == "__main__":
    main()
