"""Record the default model's scores and map digests on ../shared/data (run once, on a chosen commit).

    python tests/record_baseline.py > tests/data/default_model_baseline.json

test_baseline.py compares today's code with the file bit for bit: a refactor must not move a single value.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import shared_data_root  # noqa: E402


def shared_test_images(root: Path) -> list:
    """Every test image of every category (sorted relative paths)."""
    from visualad.data.datasets import load_dataset

    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        ds = load_dataset(sub, split="test")
        out += [str(s.image_path.relative_to(root)) for s in ds.samples]
    return sorted(out)


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def record(dtype: str, paths: list, root: Path, at_model_size: bool) -> dict:
    from visualad import AnomalyDetector

    det = AnomalyDetector.from_pretrained(device="cpu", dtype=dtype)
    rows = {}
    for rel, res in zip(paths, det.predict_iter([root / p for p in paths], batch_size=8, on_error="raise",
                                                at_model_size=at_model_size)):
        rows[rel] = {"score": float(res.pred_score).hex(), "map_sha256": digest(res.anomaly_map),
                     "shape": list(res.anomaly_map.shape)}
    return rows


def main() -> None:
    root = shared_data_root()
    paths = shared_test_images(root)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = {"commit": commit, "images": len(paths), "batch_size": 8,
           "fp32_model_size": record("fp32", paths, root, True),
           "bf16_model_size": record("bf16", paths, root, True),
           "fp32_original_size": record("fp32", paths, root, False)}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
