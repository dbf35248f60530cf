"""The picture in the README: a panel (image | heat map with the predicted region | ground truth) of an
example image, scored in references mode against 8 normal hazelnuts, thresholds calibrated on them.

    python examples/readme_panel.py [--data ../shared/data] [--out docs/images/panel-hazelnut-crack.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from visualad import AnomalyDetector
from visualad.data.datasets import load_dataset
from visualad.tasks.references import draw_references

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "panel-hazelnut-crack.png")
    args = ap.parse_args()
    root = args.data / "mvtec_ad_reduced"
    refs = draw_references(load_dataset(root, split="train"), "hazelnut", 8, seed=42)
    det = AnomalyDetector.from_pretrained(device="cpu", dtype="fp32")
    det.set_references(refs)
    det.calibrate(refs, mode="references")  # leave-one-out on the references themselves
    res = det.predict(REPO / "examples" / "images" / "hazelnut_crack.png", mode="references")
    truth = np.asarray(Image.open(root / "hazelnut" / "ground_truth" / "crack" / "000_mask.png").convert("L")) > 127
    args.out.parent.mkdir(parents=True, exist_ok=True)
    res.panel(mask=truth, tile=256).save(args.out)
    print(f"{args.out}: score {res.pred_score:.4f}, label {res.pred_label}, threshold {res.threshold:.4f}, "
          f"{len(res.regions())} region(s)")


if __name__ == "__main__":
    main()
