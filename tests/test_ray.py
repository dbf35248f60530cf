"""Prediction on a local Ray (2 CPUs): every row of local predict (fp32 scores within 1e-5), an error row for a
broken file, Parquet output, and batch mode scored per folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from visualad.cli import main


@pytest.fixture(scope="module")
def local_ray():
    import ray  # the dev extra installs it: a missing ray fails here, never skips
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _tree(root):
    rng = np.random.default_rng(0)
    for folder in ("lot_a", "lot_b"):
        (root / folder).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / folder / f"p{i}.png")
    (root / "lot_a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ray_rows_equal_local_rows(local_ray, tiny_detector, tmp_path):
    model = tiny_detector.save_pretrained(tmp_path / "m")
    root = _tree(tmp_path / "in")
    common = ["--model", str(model), "--device", "cpu", "--dtype", "fp32", "--mode", "head", "-q"]
    assert main(["predict", str(root), *common, "--out", str(tmp_path / "local.jsonl"),
                 "--save-maps", str(tmp_path / "local_maps")]) == 2  # one broken file
    assert main(["predict", str(root), *common, "--engine", "ray", "--out", str(tmp_path / "ray.jsonl"),
                 "--save-maps", str(tmp_path / "ray_maps")]) == 2
    local, remote = _rows(tmp_path / "local.jsonl"), _rows(tmp_path / "ray.jsonl")
    assert [r["path"] for r in remote] == [r["path"] for r in local] and len(remote) == 11
    for a, b in zip(local, remote):
        if a["error"]:
            assert b["error"] == a["error"] and b["score"] is None and "broken.png" in b["error"]
        else:
            assert abs(a["score"] - b["score"]) < 1e-5 and b["mode"] == "head" and b["error"] is None
            assert (b["height"], b["width"]) == (40, 48)
            np.testing.assert_allclose(np.load(b["map_path"]), np.load(a["map_path"]), atol=1e-5)  # maps beside
            assert b["map_path"].replace("ray_maps", "local_maps") == a["map_path"]
    import pyarrow.parquet as pq

    assert main(["predict", str(root), *common, "--engine", "ray", "--out", str(tmp_path / "ray.parquet")]) == 2
    table = pq.read_table(tmp_path / "ray.parquet").to_pylist()
    assert [r["path"] for r in table] == [r["path"] for r in local]


def test_batch_mode_on_ray_scores_each_folder_as_one_set(local_ray, tiny_detector, tmp_path):
    model = tiny_detector.save_pretrained(tmp_path / "m")
    root = _tree(tmp_path / "in")
    (root / "lot_a" / "broken.png").unlink()
    common = ["--model", str(model), "--device", "cpu", "--dtype", "fp32", "--mode", "batch", "-q"]
    assert main(["predict", str(root), *common, "--engine", "ray", "--out", str(tmp_path / "ray.jsonl")]) == 0
    remote = {r["path"]: r for r in _rows(tmp_path / "ray.jsonl")}
    for folder in ("lot_a", "lot_b"):  # each folder alone, locally
        out = tmp_path / f"{folder}.jsonl"
        assert main(["predict", str(root / folder), *common, "--out", str(out)]) == 0
        for row in _rows(out):
            assert row["mode"] == "batch" and abs(remote[row["path"]]["score"] - row["score"]) < 1e-5
