"""The torch-free runtime (runtime/pyproject.toml): predict, regions, overlays, OpenVINO and the service on an
ONNX export, equal to what torch computed for the same images, in an environment where torch is absent."""
from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

TOL = 1e-4


def test_this_environment_has_no_torch():
    assert importlib.util.find_spec("torch") is None, "run these tests in the torch-free environment"
    assert importlib.util.find_spec("timm") is None and importlib.util.find_spec("open_clip") is None


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "visualad", *map(str, args)], capture_output=True, text=True)


def _same(rows, want):
    assert [r["path"] for r in rows] == [w["path"] for w in want]
    for r, w in zip(rows, want):
        assert abs(r["score"] - w["score"]) < TOL and r["label"] == w["label"] and r["mode"] == w["mode"]
        assert [g["area"] for g in r["regions"]] == [g["area"] for g in w["regions"]]


@pytest.mark.parametrize("mode", ["references", "head"])
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_predict_on_an_export_gives_torchs_rows(data, expected, tmp_path, mode, runtime):
    out = tmp_path / "rows.jsonl"
    proc = _cli("predict", *sorted((data / "images").iterdir()), "--model", data / "export", "--mode", mode,
                "--runtime", runtime, "--out", out, "-q")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    _same(rows, expected[mode])
    if mode == "references":
        assert any(r["label"] for r in rows) and any(r["regions"] for r in rows)  # calibrated: labels, regions


def test_regions_need_no_opencv(data, expected):
    code = f"""
import json, sys
sys.modules["cv2"] = None
from visualad.onnx import OnnxDetector
files = {sorted(str(p) for p in (data / "images").iterdir())!r}
print(json.dumps([r.to_row() for r in OnnxDetector({str(data / "export")!r}).predict(files, mode="references")]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _same(json.loads(proc.stdout.strip().splitlines()[-1]), expected["references"])


def test_overlays_and_a_model_that_needs_torch(data, tmp_path):
    proc = _cli("predict", data / "images", "--model", data / "export", "--overlays", tmp_path / "ov", "-q",
                "--out", tmp_path / "r.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "ov").iterdir())) == 6
    proc = _cli("predict", data / "images", "--model", "dinov2-s-imgfocus")
    assert proc.returncode == 1 and "torch, which is not installed" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("info")
    assert proc.returncode == 0 and "torch not installed" in proc.stdout


def test_the_service_serves_the_export(data, expected):
    from serving import post_files, request, running

    from visualad.onnx import OnnxDetector
    from visualad.serve.app import create_app

    files = sorted((data / "images").iterdir())
    with running(create_app(OnnxDetector(data / "export"))) as url:
        code, body = post_files(url + "/predict?overlay=png", [(p.name, p.read_bytes()) for p in files])
        assert code == 200
        assert np.allclose([r["score"] for r in body["results"]], [w["score"] for w in expected["references"]],
                           atol=TOL)
        assert all(r["overlay_png"] for r in body["results"])
        payload = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                               "data": [base64.b64encode(files[0].read_bytes()).decode()]}]}
        code, out = request(url + "/v2/models/visualad/infer", json.dumps(payload).encode(),
                            {"Content-Type": "application/json"}, "POST")
        assert code == 200 and abs(out["outputs"][0]["data"][0] - expected["references"][0]["score"]) < TOL
