"""ONNX export directories are input too: each malformed one ends in one line naming the file and the reason, a
non-zero exit and no traceback (``visualad predict --model EXPORT``), and a graph whose outputs have the wrong
shape is an error, never a score."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visualad.cli import main

SIZE = 56  # the tiny model's


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny export with three references, written once; each test corrupts a copy."""
    from conftest import TINY_TIMM

    from visualad import AnomalyDetector

    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    det = AnomalyDetector.from_backbone(device="cpu", pretrained_backbone=False, image_size=SIZE, **TINY_TIMM)
    det.set_references([rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(3)])
    out = det.export_onnx(root / "x")
    img = root / "a.png"
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(img)
    return out, img


def _copy(export, tmp_path) -> Path:
    return Path(shutil.copytree(export[0], tmp_path / "x"))


def _predict(model: Path, img: Path, capsys, mode: str) -> str:
    rc = main(["predict", str(img), "--model", str(model), "--mode", mode, "-q"])
    err = capsys.readouterr().err.strip()
    assert rc != 0, "a broken export must not give a score"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _graph(outputs_of_images, inits=(), domains=(), names=("maps", "scores")):
    """A head graph: input ``images``, outputs ``names`` made by the given nodes."""
    from onnx import TensorProto, helper

    g = helper.make_graph(outputs_of_images, "g",
                          [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]
                             + [helper.make_opsetid(d, 1) for d in domains]).SerializeToString()


def _weight(external=None, dims=(4,)):
    from onnx import TensorProto

    t = TensorProto()
    t.name, t.data_type = "w", TensorProto.FLOAT
    t.dims.extend(dims)
    if external is None:
        t.raw_data = b"\0" * 16  # far less than the dims say
    else:
        t.data_location = TensorProto.EXTERNAL
        for k, v in external.items():
            e = t.external_data.add()
            e.key, e.value = k, v
    return t


def _w_graph(weight):
    from onnx import helper

    return _graph([helper.make_node("Identity", ["w"], ["maps"]),
                   helper.make_node("ReduceMean", ["images"], ["scores"], keepdims=0)], [weight])


def _head_cases():
    from onnx import helper

    return {
        "random bytes": (lambda d: np.random.default_rng(1).bytes(5000), "head.onnx: onnxruntime cannot load it"),
        "unknown op": (lambda d: _graph([helper.make_node("NoSuchOp", ["images"], ["maps", "scores"],
                                                          domain="com.evil")], domains=["com.evil"]),
                       "head.onnx: onnxruntime cannot load it"),
        "external data outside": (lambda d: _w_graph(_weight({"location": "../../../etc/passwd", "offset": "0",
                                                              "length": "16"})), "escapes model directory"),
        "external data past the file": (lambda d: (d / "w.bin").write_bytes(b"\0" * 64) and _w_graph(
            _weight({"location": "w.bin", "offset": "0", "length": str(1 << 38)}, dims=(1 << 18, 1 << 18))),
                                        "head.onnx: onnxruntime cannot load it"),
        "oversize initializer": (lambda d: _w_graph(_weight(dims=(1 << 20, 1 << 20))), "exceeds"),
        "wrong names": (lambda d: _graph([helper.make_node("Split", ["images"], ["a", "b"], axis=1, num_outputs=2)],
                                         names=("a", "b")),
                        "head.onnx takes"),
    }


@pytest.mark.parametrize("case", ["random bytes", "unknown op", "external data outside",
                                  "external data past the file", "oversize initializer", "wrong names"])
def test_a_broken_graph_is_one_line_naming_the_file(export, tmp_path, capsys, case):
    d = _copy(export, tmp_path)
    make, reason = _head_cases()[case]
    (d / "head.onnx").write_bytes(make(d))
    err = _predict(d, export[1], capsys, "head")
    assert reason in err and str(d) in err, err


def test_a_graph_that_is_a_symlink_out_of_the_directory_is_refused(export, tmp_path, capsys):
    d = _copy(export, tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(d / "head.onnx", outside)
    (d / "head.onnx").symlink_to(outside)
    assert "head.onnx is a symbolic link" in _predict(d, export[1], capsys, "head")


def test_external_data_through_a_symlink_inside_the_directory_is_refused(export, tmp_path, capsys):
    d = _copy(export, tmp_path)
    (tmp_path / "secret.bin").write_bytes(b"secret-data-1234")
    (d / "w.bin").symlink_to(tmp_path / "secret.bin")  # inside by name, outside in fact
    (d / "head.onnx").write_bytes(_w_graph(_weight({"location": "w.bin", "offset": "0", "length": "16"})))
    assert "w.bin is a symbolic link" in _predict(d, export[1], capsys, "head")


def test_a_graph_with_outputs_of_the_wrong_shape_is_an_error_not_a_score(export, tmp_path, capsys):
    """A valid graph whose maps are 5x5 and whose scores are 2-D: refused when it runs."""
    from onnx import helper

    d = _copy(export, tmp_path)
    (d / "head.onnx").write_bytes(_graph([
        helper.make_node("Slice", ["images", "s", "e", "ax"], ["sl"]),
        helper.make_node("ReduceMean", ["sl", "a1"], ["maps"], keepdims=0),
        helper.make_node("ReduceMean", ["images", "a23"], ["scores"], keepdims=0)],
        [helper.make_tensor(n, 7, [len(v)], v) for n, v in (("s", [0, 0, 0]), ("e", [1, 5, 5]), ("ax", [1, 2, 3]),
                                                             ("a1", [1]), ("a23", [2, 3]))]))
    err = _predict(d, export[1], capsys, "head")
    assert "head.onnx gave an output of shape [1, 5, 5], not [1, 56, 56]" in err, err


_META_CASES = {
    "image_size text": ("image_size", "56", "image_size must be a whole number"),
    "image_size huge": ("image_size", 10**9, "image_size must be a whole number in 1..4096"),
    "grid negative": ("grid", -1, "grid must be a whole number"),
    "mean of two": ("pixel_mean", [0.5, 0.5], "pixel_mean must be 3 finite numbers"),
    "std zero": ("pixel_std", [0, 0, 0], "pixel_std must be 3 positive numbers"),
    "blocks object": ("blocks", {"a": 1}, "blocks must be a list"),
    "format version text": ("format_version", "one", "format_version must be a positive whole number"),
    "format version future": ("format_version", 99, "newer than this visualad understands"),
    "config list": ("config", [], "config must be an object"),
    "references shots": ("references", {"shots": "3"}, "references must be null or an object"),
    "features count": ("features", ["ln_1", "ln_2", "ln_3"], "features must name one output per block"),
}


@pytest.mark.parametrize("case", sorted(_META_CASES))
def test_metadata_of_the_wrong_type_or_range_names_the_field(export, tmp_path, capsys, case):
    d = _copy(export, tmp_path)
    field, value, reason = _META_CASES[case]
    meta = json.loads((d / "visualad_onnx.json").read_text())
    meta[field] = value
    (d / "visualad_onnx.json").write_text(json.dumps(meta))
    err = _predict(d, export[1], capsys, "head")
    assert reason in err and "visualad_onnx.json" in err or "newer" in reason and reason in err, err


def _npz(arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("case,reason", [
    ("random bytes", "references.npz cannot be read"),
    ("object array", "references.npz cannot be read"),
    ("wrong shape", "not float [3 x 16, C]"),
    ("missing array", "references.npz cannot be read"),
    ("not finite", "not finite"),
    ("other feature size", "the references hold features of size 7"),
])
def test_malformed_references_are_one_line(export, tmp_path, capsys, case, reason):
    d = _copy(export, tmp_path)
    with np.load(d / "references.npz") as npz:
        arrays = dict(npz)
    first = sorted(arrays)[0]
    if case == "random bytes":
        (d / "references.npz").write_bytes(np.random.default_rng(2).bytes(3000))
    else:
        if case == "object array":
            arrays[first] = np.array([{"a": 1}] * 3, dtype=object)
        elif case == "wrong shape":
            arrays[first] = arrays[first][:5]
        elif case == "missing array":
            del arrays[first]
        elif case == "not finite":
            arrays[first][0, 0] = np.nan
        else:
            arrays = {k: np.ones((v.shape[0], 7), np.float32) for k, v in arrays.items()}
        (d / "references.npz").write_bytes(_npz(arrays))
    assert reason in _predict(d, export[1], capsys, "references")
