"""ONNX export and the torch-free runtime: parity with torch at each image's original size in every mode,
batch sizes 1 and 8 through one graph, calibrated labels, the CLI, and a run with torch (and OpenCV) blocked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CLIP

from visualad import AnomalyDetector
from visualad.cli import main
from visualad.errors import ConfigError
from visualad.onnx import OnnxDetector
from visualad.onnx.runtime import resize_bilinear

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (REPO / "examples" / "images").iterdir() if p.suffix in (".png", ".jpg"))
TOL = 1e-4


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    det = AnomalyDetector.from_pretrained(device="cpu", dtype="fp32")
    out = det.export_onnx(tmp_path_factory.mktemp("onnx") / "default")
    return det, out


def _close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.anomaly_map.shape == y.anomaly_map.shape
        assert np.abs(x.anomaly_map - y.anomaly_map).max() < TOL, x.image_path
        assert abs(x.pred_score - y.pred_score) < TOL and x.mode == y.mode


def test_default_model_parity_in_every_mode_at_original_size(default_export, shared_data):
    det, out = default_export
    onnx = OnnxDetector(out)
    images = [str(p) for p in EXAMPLES]
    for batch_size in (1, 8):  # one graph, dynamic batch
        _close(det.predict(images, mode="head", batch_size=batch_size),
               onnx.predict(images, mode="head", batch_size=batch_size))
    refs = sorted((shared_data / "mvtec_ad_reduced/hazelnut/train/good").iterdir())[:3]
    det.set_references(refs + refs[:1], calibrate=True)  # held-out references scored from each bank's rows
    onnx.set_references(refs + refs[:1], calibrate=True)  # (a copy of a reference is left out by both)
    assert det.references.shots == onnx.references.shots == 3
    assert abs(det.config.image_threshold - onnx.config.image_threshold) < TOL
    _close(det.predict(images, mode="references"), onnx.predict(images, mode="references"))
    det.clear_references()
    det.config.image_threshold = det.config.pixel_threshold = det.config.score_stats = None
    # batch mode: a set of 8 with compare_with >= 7, where the partners do not depend on the shuffle
    lot = images + [str(p) for p in refs]
    _close(det.predict(lot, mode="batch"), onnx.predict(lot, mode="batch"))
    with pytest.raises(ConfigError, match="at least 4"):
        onnx.predict(images[:3], mode="batch")


def test_clip_backbone_parity_and_calibrated_labels(tmp_path):
    det = AnomalyDetector.from_backbone(device="cpu", dtype="fp32", pretrained_backbone=False, image_size=64,
                                        **TINY_CLIP)
    rng = np.random.default_rng(0)
    det.calibrate([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)], mode="head")
    onnx = OnnxDetector(det.export_onnx(tmp_path / "clip"))
    x = [rng.integers(0, 256, (90, 70, 3), dtype=np.uint8) for _ in range(3)]
    a, b = det.predict(x, mode="head"), onnx.predict(x, mode="head")
    _close(a, b)
    assert [r.pred_label for r in a] == [r.pred_label for r in b] and b[0].threshold == a[0].threshold


def test_exported_references_travel_with_the_directory(tiny_detector, tmp_path):
    tiny_detector.to("cpu", "fp32")  # parity is an fp32 claim
    rng = np.random.default_rng(1)
    tiny_detector.set_references([rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(3)])
    onnx = OnnxDetector(tiny_detector.export_onnx(tmp_path / "e"))
    x = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(2)]
    _close(tiny_detector.predict(x, mode="auto"), onnx.predict(x, mode="auto"))  # auto: the references
    assert onnx.predict(x[0]).mode == "references"


def test_an_export_of_format_one_runs_its_head_and_says_to_export_again_for_the_rest(tiny_detector, tmp_path):
    """Format 1 gave unit rows per (block, r): its head still runs; the modes that need the rows say what to do."""
    tiny_detector.to("cpu", "fp32")
    out = tiny_detector.export_onnx(tmp_path / "e")
    meta = json.loads((out / "visualad_onnx.json").read_text())
    assert meta["format_version"] == 2 and meta["features"] == [f"ln_{b}" for b in meta["blocks"]]
    meta.update(format_version=1, features=[f"f_{b}_{r}" for b in meta["blocks"] for r in meta["rs"]])
    (out / "visualad_onnx.json").write_text(json.dumps(meta))
    onnx = OnnxDetector(out)
    rng = np.random.default_rng(2)
    x = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(4)]
    _close(tiny_detector.predict(x, mode="head"), onnx.predict(x, mode="head"))
    with pytest.raises(ConfigError, match="export"):
        onnx.predict(x, mode="batch")
    meta["references"] = {"shots": 2, "digests": ["a", "b"]}
    (out / "visualad_onnx.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="format 1"):
        OnnxDetector(out)


def test_numpy_resize_matches_opencv():
    import cv2

    m = np.random.default_rng(2).random((16, 16), dtype=np.float32)
    for h, w in ((256, 256), (768, 576), (7, 30), (16, 16)):
        np.testing.assert_allclose(resize_bilinear(m, h, w), cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR),
                                   atol=1e-6)


def test_the_runtime_runs_with_torch_and_opencv_blocked(default_export, tmp_path):
    det, out = default_export
    want = det.predict([str(p) for p in EXAMPLES[:2]], mode="head")
    code = f"""
import sys, json
sys.modules["torch"] = None  # any import of torch (or OpenCV) now fails
sys.modules["cv2"] = None
from visualad.onnx import OnnxDetector
res = OnnxDetector({str(out)!r}).predict({[str(p) for p in EXAMPLES[:2]]!r}, mode="head")
print(json.dumps([[r.pred_score, float(r.anomaly_map.sum()), list(r.anomaly_map.shape)] for r in res]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for (score, total, shape), r in zip(got, want):
        assert abs(score - r.pred_score) < TOL and shape == list(r.anomaly_map.shape)
        assert abs(total - float(r.anomaly_map.sum())) < TOL * r.anomaly_map.size


def test_cli_exports_and_predicts_from_an_export(tiny_detector, tmp_path, capsys):
    model = tiny_detector.save_pretrained(tmp_path / "m")
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "x"), "-q"]) == 0
    assert {p.name for p in (tmp_path / "x").iterdir()} >= {"head.onnx", "features.onnx", "grid_to_map.onnx",
                                                             "visualad_onnx.json"}
    img = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(img)
    for m, out in ((model, tmp_path / "t.jsonl"), (tmp_path / "x", tmp_path / "o.jsonl")):
        assert main(["predict", str(img), "--model", str(m), "--device", "cpu", "--dtype", "fp32", "--mode", "head",
                     "--out", str(out), "-q"]) == 0
    torch_row, onnx_row = (json.loads(p.read_text()) for p in (tmp_path / "t.jsonl", tmp_path / "o.jsonl"))
    assert abs(torch_row["score"] - onnx_row["score"]) < TOL and onnx_row["height"] == 40


def test_openvino_runs_the_export_as_onnxruntime_does_in_every_mode(default_export, shared_data, tmp_path,
                                                                    capsys):
    """The OpenVINO backend is the same predictor over another engine: parity with onnxruntime within 1e-4 in
    head, references and batch mode, and the CLI's --runtime openvino."""
    _, out = default_export
    ort_det, ov_det = OnnxDetector(out), OnnxDetector(out, runtime="openvino")
    assert ov_det.backend.platform == "openvino" and ov_det.backend.device_name == "openvino:CPU"
    images = [str(p) for p in EXAMPLES]
    for batch_size in (1, 8):
        _close(ort_det.predict(images, mode="head", batch_size=batch_size),
               ov_det.predict(images, mode="head", batch_size=batch_size))
    refs = sorted((shared_data / "mvtec_ad_reduced/hazelnut/train/good").iterdir())[:3]
    for d in (ort_det, ov_det):
        d.set_references(refs)
    _close(ort_det.predict(images, mode="references"), ov_det.predict(images, mode="references"))
    lot = images + [str(p) for p in refs]
    _close(ort_det.predict(lot, mode="batch"), ov_det.predict(lot, mode="batch"))
    rows = {}
    for runtime in ("onnxruntime", "openvino"):
        target = tmp_path / f"{runtime}.jsonl"
        assert main(["predict", *images[:2], "--model", str(out), "--runtime", runtime, "--mode", "head",
                     "--out", str(target), "-q"]) == 0
        rows[runtime] = [json.loads(line)["score"] for line in target.read_text().splitlines()]
    assert np.allclose(rows["onnxruntime"], rows["openvino"], atol=TOL)
    with pytest.raises(ConfigError, match="runtime must be one of"):
        OnnxDetector(out, runtime="tensorrt")
