"""What a user keeps: CSV rows, saved maps and masks at each image's size, defect regions, pictures with a
legend (overlay and panel), eval pictures, the end-of-run summary, short reprs, finetune's image size and the
shots each class really used."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from visualad import AnomalyDetector, AnomalyResult
from visualad.cli import main
from visualad.rows import CSV_COLUMNS


@pytest.fixture
def calibrated_dir(tiny_detector, tmp_path):
    """A tiny model with image and pixel thresholds (head mode), so that labels, masks and regions exist."""
    rng = np.random.default_rng(5)
    tiny_detector.calibrate([rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(4)], mode="head")
    return tiny_detector.save_pretrained(tmp_path / "cal")


def _images(tmp_path, sizes=((40, 50), (70, 30))):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    return d


def test_csv_rows_have_the_jsonl_fields_and_a_header(calibrated_dir, tmp_path):
    d = _images(tmp_path)
    out = tmp_path / "r.csv"
    assert main(["predict", str(d), "--model", str(calibrated_dir), "--device", "cpu", "--mode", "head",
                 "--out", str(out), "-q"]) == 0
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS and len(rows) == 2
    for row in rows:
        assert np.isfinite(float(row["score"])) and row["label"] in ("true", "false") and row["mode"] == "head"
        assert row["error"] == "" and isinstance(json.loads(row["regions"]), list)
    assert [(int(r["height"]), int(r["width"])) for r in rows] == [(40, 50), (70, 30)]


def test_saved_maps_and_masks_have_the_original_size(calibrated_dir, tmp_path):
    d = _images(tmp_path)
    maps = tmp_path / "maps"
    out = tmp_path / "r.jsonl"
    assert main(["predict", str(d), "--model", str(calibrated_dir), "--device", "cpu", "--mode", "head",
                 "--out", str(out), "--save-maps", str(maps), "-q"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row, shape in zip(rows, [(40, 50), (70, 30)]):
        amap = np.load(row["map_path"])
        assert amap.shape == shape and amap.dtype == np.float32
        mask = np.asarray(Image.open(row["mask_path"]))
        assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}
    # png16: the row's map_range turns the 16-bit values back into the map
    out16 = tmp_path / "r16.jsonl"
    assert main(["predict", str(d / "p0.png"), "--model", str(calibrated_dir), "--device", "cpu", "--mode", "head",
                 "--out", str(out16), "--save-maps", str(tmp_path / "m16"), "--map-format", "png16", "-q"]) == 0
    row = json.loads(out16.read_text())
    lo, hi = row["map_range"]
    u16 = np.asarray(Image.open(row["map_path"])).astype(np.float64)
    np.testing.assert_allclose(lo + u16 / 65535 * (hi - lo), np.load(rows[0]["map_path"]),
                               atol=(hi - lo) / 65535 + 1e-6)


def test_regions_of_a_synthetic_defect():
    amap = np.zeros((60, 80), np.float32)
    amap[10:20, 5:15] = 0.6  # 10 x 10
    amap[40:43, 50:70] = 0.9  # 3 x 20, the hotter one
    amap[12, 7] = 0.8
    res = AnomalyResult(pred_score=0.9, anomaly_map=amap, pred_mask=amap > 0.5)
    assert res.regions() == [
        {"x": 50, "y": 40, "width": 20, "height": 3, "area": 60, "peak": pytest.approx(0.9)},
        {"x": 5, "y": 10, "width": 10, "height": 10, "area": 100, "peak": pytest.approx(0.8)},
    ]
    assert AnomalyResult(pred_score=0.1, anomaly_map=amap).regions() == []  # no pixel threshold: no regions


def test_pictures_carry_a_legend_and_panels_the_ground_truth(calibrated_dir, tmp_path):
    det = AnomalyDetector.from_pretrained(calibrated_dir, device="cpu")
    img = np.random.default_rng(3).integers(0, 256, (80, 60, 3), dtype=np.uint8)
    res = det.predict(img, mode="head")
    ov = np.asarray(res.overlay())
    assert ov.shape[1] == 60 and ov.shape[0] > 80
    np.testing.assert_array_equal(ov[:80], np.asarray(res.overlay(legend=False)))
    truth = np.zeros((80, 60), bool)
    truth[20:40, 10:30] = True
    two, three = np.asarray(res.panel(tile=100)), np.asarray(res.panel(mask=truth, tile=100))
    assert two.shape[1] == 2 * 75 + 6 and three.shape[1] == 3 * 75 + 2 * 6  # tiles of 75 x 100 px, 6 px gaps
    green = (three[:100, 2 * 81:, 1] > 200) & (three[:100, 2 * 81:, 0] < 60)
    assert green.any()  # the ground-truth contour is drawn in green in the third tile
    with pytest.raises(ValueError, match="style"):
        from visualad.viz import figure

        figure(res, style="poster")


def test_eval_writes_a_panel_per_test_image(tiny_detector, shared_data, tmp_path):
    report = tiny_detector.evaluate(shared_data / "mvtec_3d_ad_tire_rgb", progress=False, mode="head",
                                    overlays=tmp_path / "pics")
    pics = sorted(p.relative_to(tmp_path / "pics").as_posix() for p in (tmp_path / "pics").rglob("*.png"))
    assert len(pics) == report["classes"]["tire"]["n_images"]
    assert all(p.startswith("tire/") for p in pics) and any("/good/" in p for p in pics)
    w, h = Image.open(tmp_path / "pics" / pics[0]).size
    assert w > 2 * h // 2  # side by side


def test_predict_ends_with_a_summary_and_its_operating_point(calibrated_dir, tmp_path, capsys):
    d = _images(tmp_path)
    assert main(["predict", str(d), "--model", str(calibrated_dir), "--device", "cpu", "--mode", "head",
                 "--out", str(tmp_path / "r.jsonl")]) == 0
    counts, point = capsys.readouterr().err.strip().splitlines()[-2:]
    assert counts.startswith("visualad predict: 2 inputs in head mode (an untrained head, as asked), ")
    assert "flagged" in counts and "0 failed" in counts and "images/s" in counts
    decisions, _, step = point[len("visualad predict: "):].partition("; next: ")
    assert decisions.startswith("threshold at the 99.5th percentile of normal scores, calibrated on ")
    assert step.startswith("the head transfers poorly to products it never saw")
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert all(r["operating_point"] == decisions for r in rows)


def test_reprs_are_short(calibrated_dir):
    det = AnomalyDetector.from_pretrained(calibrated_dir, device="cpu")
    res = det.predict(np.zeros((300, 400, 3), np.uint8), mode="head")
    for text in (repr(det), repr(res), str(res)):
        assert len(text) < 400, text
    assert "map=300x400" in repr(res) and "mode='head'" in repr(res)
    assert "calibrated='head'" in repr(det) and "image_size=56" in repr(det)


def test_finetune_takes_an_image_size_and_the_default_is_the_base_models(tiny_detector, tmp_path):
    from test_train import _make_mvtec

    from visualad.model.backbones import parse_backbone

    assert parse_backbone("dinov2-s-imgfocus").default_image_size == 224  # the shipped head's size
    aux = _make_mvtec(tmp_path / "aux")
    report = tiny_detector.finetune(aux, image_size=28, epochs=1, batch_size=4, progress=False)
    assert tiny_detector.config.image_size == 28 and report["model"]["image_size"] == 28
    assert tiny_detector.predict(np.zeros((50, 40, 3), np.uint8), mode="head").anomaly_map.shape == (50, 40)


def test_eval_reports_the_shots_each_class_really_used(tiny_detector, shared_data, tmp_path):
    root = tmp_path / "few"
    src = shared_data / "mvtec_ad_reduced" / "hazelnut"
    shutil.copytree(src / "test", root / "hazelnut" / "test")
    shutil.copytree(src / "ground_truth", root / "hazelnut" / "ground_truth")
    (root / "hazelnut" / "train" / "good").mkdir(parents=True)
    for p in sorted((src / "train" / "good").iterdir())[:5]:
        shutil.copy(p, root / "hazelnut" / "train" / "good" / p.name)
    report = tiny_detector.evaluate(root, shots=16, progress=False)
    assert report["classes"]["hazelnut"]["shots"] == 5 and report["shots"] == 16
    assert report["classes"]["hazelnut"]["mode"] == "references"
