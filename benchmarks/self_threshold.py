"""References that set their own threshold (``set_references(calibrate=True)``, what ``visualad predict
--references`` does): the false-alarm rate and recall that threshold gives on parts it never saw, for K = 1, 2
and 5 references.

    python benchmarks/self_threshold.py [--data ../shared/data] [--shots 1 2 5]

Settings fixed before any number was seen: the default model; per category with normal training images, the
references are its first K train/good images (sorted by name); the normals measured are its test/good images
plus its train/good images from the 6th on (the same normals for every K); the defects are all its test
defects. The threshold is the self-calibration's: each reference scored against the others (leave-one-out), a
threshold for 5% false alarms or above every reference when they are too few. With K = 1 there is no other
reference: the reference against itself outside each patch's 3x3 neighbourhood (that stand-in is what this
measures; ``set_references`` no longer uses it, docs/modes.md "One reference").
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from operating_points import category_images  # noqa: E402 - this folder is on the path when run as a script
from visualad import AnomalyDetector  # noqa: E402
from visualad.predictor import SELF_CALIBRATION_RATE  # noqa: E402

REFERENCE_POOL = 5  # train/good images that may be references; the rest are measured as normals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5])
    args = ap.parse_args()
    if max(args.shots) > REFERENCE_POOL:
        raise SystemExit(f"--shots at most {REFERENCE_POOL}")
    logging.disable(logging.WARNING)  # the under-19 warning fires for every K here
    det = AnomalyDetector.from_pretrained("dinov2-s-imgfocus", device="cpu", dtype="fp32")
    print("| category | K | threshold | normals: max / median score | false alarms | recall |")
    print("|---|---|---|---|---|---|")
    for root in sorted(p for p in args.data.iterdir() if p.is_dir()):
        for category, images in category_images(root).items():
            train = images["train_normal"]
            if len(train) <= REFERENCE_POOL:
                continue
            normals = images["test_normal"] + train[REFERENCE_POOL:]
            for k in args.shots:
                refs = train[:k]
                det.set_references(refs)
                det.calibrate(refs, mode="references", false_alarm_rate=SELF_CALIBRATION_RATE)
                good = det.predict(normals, mode="references")
                bad = det.predict(images["defective"], mode="references")
                scores = sorted(r.pred_score for r in good)
                alarms = sum(bool(r.pred_label) for r in good)
                found = sum(bool(r.pred_label) for r in bad)
                print(f"| {category} | {k} | {good[0].threshold:.3f} | {scores[-1]:.3f} / "
                      f"{scores[len(scores) // 2]:.3f} | {alarms / len(good):.2f} ({alarms} of {len(good)}) | "
                      f"{found / len(bad):.2f} ({found} of {len(bad)}) |", flush=True)


if __name__ == "__main__":
    main()
