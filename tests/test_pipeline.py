"""One pipeline under every surface: the torch engine and onnxruntime give one answer at every set size and in
stream mode, the service serves an ONNX export as OnnxDetector answers, Ray rows are local rows, and no code
outside the registry picks a mode by its name, type or attributes."""
from __future__ import annotations

import ast
import io
import json
from pathlib import Path
from typing import List

import numpy as np
import pytest
from conftest import TINY_TIMM
from PIL import Image

from visualad import AnomalyDetector
from visualad.cli import main
from visualad.modes import MODES
from visualad.modes.partners import comparison_order
from visualad.onnx import OnnxDetector

PKG = Path(__file__).resolve().parents[1] / "visualad"
TOL = 1e-4


def _lot(n: int, seed: int = 0) -> List[np.ndarray]:
    """n images of one 'product' (a shared texture) with a small bright defect on every fifth."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (48, 48, 3))
    out = []
    for i in range(n):
        img = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
        if i % 5 == 0:
            img[10:18, 20:30] = 255
        out.append(img)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    det = _tiny()
    return det, OnnxDetector(det.export_onnx(tmp_path_factory.mktemp("export") / "e"))


def _tiny() -> AnomalyDetector:
    """A tiny random model; its random backbone comes from the global RNG, so seed it (test order must not
    change the model)."""
    import torch

    torch.manual_seed(0)
    return AnomalyDetector.from_backbone(device="cpu", dtype="fp32", pretrained_backbone=False, image_size=56,
                                         **TINY_TIMM)


def _close(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.mode == y.mode and x.anomaly_map.shape == y.anomaly_map.shape
        assert abs(x.pred_score - y.pred_score) <= TOL
        assert np.abs(x.anomaly_map - y.anomaly_map).max() <= TOL


def test_torch_and_onnx_agree_in_batch_mode_beyond_compare_with(pair):
    det, onnx = pair
    lot = _lot(80)  # 80 > compare_with + 1: the partners depend on the shared order
    _close(det.predict(lot, mode="batch", compare_with=16), onnx.predict(lot, mode="batch", compare_with=16))
    _close(det.predict(lot, mode="batch"), onnx.predict(lot, mode="batch"))


def test_torch_and_onnx_agree_in_stream_mode(pair):
    det, onnx = pair
    lot = _lot(30, seed=1)
    a, b = list(det.stream(lot, window=8, warmup=6)), list(onnx.stream(lot, window=8, warmup=6))
    assert [r.mode for r in b] == ["batch"] * 30
    _close(a, b)


def test_the_comparison_order_is_torch_free_and_independent_of_input_order():
    digests = [f"{i:03d}" for i in range(100)]
    order = comparison_order(digests, seed=3)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert comparison_order(digests[::-1], seed=3) == [99 - i for i in order]


def test_calibrated_onnx_export_labels_as_torch_and_computes_regions(tmp_path):
    det = _tiny()
    det.calibrate(_lot(20, seed=2), mode="batch", percentile=80, pixel_percentile=98)  # flags some
    onnx = OnnxDetector(det.export_onnx(tmp_path / "cal"))
    lot = _lot(20, seed=3)
    a, b = det.predict(lot), onnx.predict(lot)
    _close(a, b)
    assert [x.pred_label for x in a] == [y.pred_label for y in b] and a[0].pred_label is not None
    for x, y in zip(a, b):
        ra, rb = x.to_row()["regions"], y.to_row()["regions"]
        assert [{**r, "peak": 0} for r in ra] == [{**r, "peak": 0} for r in rb]
        assert all(abs(p["peak"] - q["peak"]) <= TOL for p, q in zip(ra, rb))
    assert any(x.to_row()["regions"] for x in b)


def test_the_service_serves_an_onnx_export_as_onnx_detector_answers(pair):
    from fastapi.testclient import TestClient

    from visualad.serve.app import create_app

    _, onnx = pair
    lot = _lot(6, seed=4)
    files = []
    for i, img in enumerate(lot):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        files.append(("file", (f"p{i}.png", buf.getvalue(), "image/png")))
    with TestClient(create_app(onnx), base_url="http://localhost") as client:  # a Host the server serves
        meta = client.get("/v2/models/visualad").json()
        got = client.post("/predict?mode=batch", files=files).json()["results"]
    assert meta["platform"] == "onnxruntime" and meta["dtype"] == "fp32"
    want = onnx.predict(lot, mode="batch")
    assert [r["path"] for r in got] == [f"p{i}.png" for i in range(6)]
    assert [r["mode"] for r in got] == ["batch"] * 6
    np.testing.assert_allclose([r["score"] for r in got], [w.pred_score for w in want], atol=1e-5)


@pytest.fixture(scope="module")
def local_ray():
    import ray  # the dev extra installs it: a missing ray fails here, never skips

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_rows_equal_local_rows_in_auto_mode_with_a_calibrated_model(local_ray, tmp_path):
    det = _tiny()
    images = _lot(40, seed=6)
    normals = [img for i, img in enumerate(images) if i % 5]  # the product's good parts (every fifth has a defect)
    det.calibrate(normals, mode="batch", percentile=50, pixel_percentile=90)  # a low threshold: some are flagged
    model = det.save_pretrained(tmp_path / "m")
    lot = tmp_path / "in" / "lot"
    lot.mkdir(parents=True)
    for i, img in enumerate(images):  # 40 images > one Ray block of 32 paths: one set all the same
        Image.fromarray(img).save(lot / f"p{i:02d}.png")
    common = ["--model", str(model), "--device", "cpu", "--dtype", "fp32", "-q"]
    assert main(["predict", str(lot), *common, "--out", str(tmp_path / "local.jsonl"),
                 "--save-maps", str(tmp_path / "local_maps")]) == 0
    assert main(["predict", str(lot), *common, "--engine", "ray", "--out", str(tmp_path / "ray.jsonl"),
                 "--save-maps", str(tmp_path / "ray_maps")]) == 0
    local = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    remote = [json.loads(line) for line in (tmp_path / "ray.jsonl").read_text().splitlines()]
    assert len(local) == len(remote) == 40
    assert any(r["label"] for r in local) and any(r["regions"] for r in local)
    for a, b in zip(local, remote):
        assert set(a) == set(b), set(a) ^ set(b)
        assert a["mode"] == b["mode"] == "batch" and a["label"] == b["label"] and a["path"] == b["path"]
        assert abs(a["score"] - b["score"]) <= TOL
        assert [(r["x"], r["y"], r["width"], r["height"], r["area"]) for r in a["regions"]] == \
               [(r["x"], r["y"], r["width"], r["height"], r["area"]) for r in b["regions"]]
        for key in ("map_path", "mask_path"):
            assert b[key].replace("ray_maps", "local_maps") == a[key]
        np.testing.assert_allclose(np.load(b["map_path"]), np.load(a["map_path"]), atol=TOL)


# --- no mode is dispatched by name outside the registry ------------------------------------------------
SCORER_METHODS = {"score", "score_set", "feed", "flush", "holdout", "blocks_for"}
MODE_NAMES = set(MODES) - {"auto"} | {"stream"}


def _mentions_scorer(node: ast.AST) -> bool:
    names = [n.id for n in ast.walk(node) if isinstance(n, ast.Name)] + \
            [n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)]
    return any("scorer" in x.lower() or x.lower() == "mode" for x in names)


def mode_dispatch(source: str) -> List[str]:
    """Places in ``source`` that pick a mode by its name, type or attributes instead of asking the scorer."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 2:
            arg = node.args[1]
            if node.func.id == "hasattr" and isinstance(arg, ast.Constant) and arg.value in SCORER_METHODS:
                found.append(ast.unparse(node))
            if node.func.id == "isinstance" and any(isinstance(n, ast.Name) and n.id.endswith("Mode")
                                                    for n in ast.walk(arg)):
                found.append(ast.unparse(node))
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = any(isinstance(s, ast.Constant) and s.value in MODE_NAMES for s in sides) or any(
                isinstance(s, (ast.Tuple, ast.List, ast.Set)) and any(
                    isinstance(e, ast.Constant) and e.value in MODE_NAMES for e in s.elts) for s in sides)
            by_attr = any(isinstance(s, ast.Attribute) and s.attr == "name" and _mentions_scorer(s) for s in sides)
            if by_attr or (named and any(_mentions_scorer(s) for s in sides)):
                found.append(ast.unparse(node))
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Attribute) and node.slice.attr == "name" \
                and _mentions_scorer(node.slice):
            found.append(ast.unparse(node))
    return found


def test_no_mode_is_dispatched_by_name_outside_the_registry():
    offenders = {}
    for path in PKG.rglob("*.py"):
        if path.parent.name == "modes":  # the modes and their registry and auto rule
            continue
        hits = mode_dispatch(path.read_text())
        if hits:
            offenders[str(path.relative_to(PKG))] = hits
    assert offenders == {}


@pytest.mark.parametrize("planted", [
    'if hasattr(scorer, "score_set"): pass',
    "if isinstance(mode, BatchMode): pass",
    'if scorer.name == "batch": pass',
    'if mode in ("references", "batch"): pass',
    'why = {"head": 1}[scorer.name]',
])
def test_the_dispatch_finder_finds_planted_dispatch(planted):
    assert mode_dispatch(planted)


def test_the_service_serves_a_calibrated_export_with_torch_and_opencv_blocked(tmp_path):
    import subprocess
    import sys

    det = _tiny()
    det.calibrate(_lot(20, seed=7), mode="batch", percentile=80, pixel_percentile=98)
    export = det.export_onnx(tmp_path / "export")
    for i, img in enumerate(_lot(8, seed=8)):
        Image.fromarray(img).save(tmp_path / f"p{i}.png")
    want = OnnxDetector(export).predict([str(tmp_path / f"p{i}.png") for i in range(8)])
    code = f"""
import sys, json
sys.modules["torch"] = None  # any import of torch (or OpenCV) now fails
sys.modules["cv2"] = None
from fastapi.testclient import TestClient
from visualad.cli import _load_detector, build_parser
from visualad.serve.app import create_app
args = build_parser().parse_args(["serve", "--model", {str(export)!r}])
files = [("file", (f"p{{i}}.png", open({str(tmp_path)!r} + f"/p{{i}}.png", "rb").read(), "image/png"))
         for i in range(8)]
with TestClient(create_app(_load_detector(args)), base_url="http://localhost") as client:
    print(json.dumps(client.post("/predict", files=files).json()["results"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["mode"] for r in rows] == ["batch"] * 8 and all(r["label"] is not None for r in rows)
    assert [r["label"] for r in rows] == [w.pred_label for w in want]
    np.testing.assert_allclose([r["score"] for r in rows], [w.pred_score for w in want], atol=1e-5)
    assert [len(r["regions"]) for r in rows] == [len(w.regions()) for w in want]
