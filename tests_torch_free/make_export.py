"""Make what the torch-free tests read (run with torch, in the main environment): a small calibrated export
with references, a few test images, and the rows torch gives for them (fp32), in one folder.

    python tests_torch_free/make_export.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import TINY_TIMM  # noqa: E402

from visualad import AnomalyDetector  # noqa: E402

SIZE = 56


def main(out: Path) -> None:
    rng = np.random.default_rng(0)
    det = AnomalyDetector.from_backbone(device="cpu", dtype="fp32", pretrained_backbone=False, image_size=SIZE,
                                        **TINY_TIMM)
    normal = lambda: rng.integers(90, 130, (SIZE, SIZE, 3), dtype=np.uint8)  # noqa: E731
    det.set_references([normal() for _ in range(4)])
    det.calibrate([normal() for _ in range(8)], mode="references", percentile=90, pixel_percentile=99)
    det.export_onnx(out / "export")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        img = rng.integers(90, 130, (70, 50, 3), dtype=np.uint8)
        if i % 2:  # a bright defect
            img[20:40, 10:30] = 255
        Image.fromarray(img).save(images / f"{i}.png")
    files = sorted(str(p) for p in images.iterdir())
    expected = {mode: [r.to_row() for r in det.predict(files, mode=mode)] for mode in ("references", "head")}
    (out / "expected.json").write_text(json.dumps(expected))
    print(f"torch-free test data written to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
