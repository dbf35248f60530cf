"""evaluate(): every category of a dataset, the api.md report format, NaN -> null, both resolutions."""
from __future__ import annotations

import json
import math

import numpy as np

from visualad.tasks.evaluate import format_table

ROW_KEYS = {"n_images", "n_anomalous", "image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap",
            "pixel_f1_max", "pixel_aupro"}


def test_evaluate_all_shared_data_with_polyp_sets_without_normals(tiny_detector, shared_data, tmp_path):
    out = tmp_path / "report.json"
    report = tiny_detector.evaluate(shared_data, out=out, batch_size=16, progress=False)
    assert set(report["classes"]) == {"hazelnut", "transistor", "tire", "cookie", "kvasir_seg/colon_polyp",
                                      "cvc_clinicdb/colon_polyp"}
    for name, row in report["classes"].items():
        assert ROW_KEYS <= set(row)
        assert 0.0 <= row["pixel_auroc"] <= 1.0 and 0.0 <= row["pixel_aupro"] <= 1.0
        if "polyp" in name:  # no normal images: image metrics undefined
            assert row["n_images"] == row["n_anomalous"] == 40
            assert math.isnan(row["image_auroc"])
        else:
            assert 0.0 <= row["image_auroc"] <= 1.0
    assert any("no normal images" in n for n in report["notes"])
    saved = json.loads(out.read_text())  # strict JSON: NaN written as null
    assert saved["classes"]["kvasir_seg/colon_polyp"]["image_auroc"] is None
    assert saved["image_size"] == 56 and saved["resolution"] == "model"
    polyp_mean = np.nanmean([r["image_auroc"] for r in report["classes"].values()])
    assert report["mean"]["image_auroc"] == polyp_mean
    assert "-" in format_table(report)


def test_evaluate_at_original_resolution_scores_each_image_at_its_size(tiny_detector, shared_data):
    model_res = tiny_detector.evaluate(shared_data / "mvtec_3d_ad_tire_rgb", progress=False)
    orig = tiny_detector.evaluate(shared_data / "mvtec_3d_ad_tire_rgb", at_original_resolution=True,
                                  aupro_variant="zsad", progress=False)
    assert orig["resolution"] == "original" and orig["aupro"].startswith("zsad")
    a, b = model_res["classes"]["tire"], orig["classes"]["tire"]
    assert a["image_auroc"] == b["image_auroc"]  # the image score does not depend on the map's resolution
    assert a["pixel_auroc"] != b["pixel_auroc"] and abs(a["pixel_auroc"] - b["pixel_auroc"]) < 0.05


def test_recall_at_false_alarms_by_hand():
    from visualad.metrics import recall_at_false_alarms

    # 20 normals 0..19; anomalies 5, 17.5, 18.5, 19, 30
    scores = np.r_[np.arange(20.0), [5.0, 17.5, 18.5, 19.0, 30.0]]
    labels = np.r_[np.zeros(20), np.ones(5)]
    # 5% of 20 normals: 1 may be flagged, so the threshold lies just above the 2nd highest normal (18)
    assert recall_at_false_alarms(scores, labels, 0.05) == 3 / 5  # 18.5, 19 and 30; a tie with 19 counts
    assert recall_at_false_alarms(scores, labels, 0.01) == 1 / 5  # none may be flagged: above 19, only 30
    assert recall_at_false_alarms(scores, labels, 0.10) == 4 / 5  # two may: above 17
    assert math.isnan(recall_at_false_alarms(scores[:20], labels[:20], 0.05))


def test_eval_rows_per_defect_type_match_a_hand_count(tiny_detector, tmp_path):
    """A small MVTec-style set (6 good, 3 'scratch', 2 'dent' with masks): each defect's row is that defect
    against the good images, with the metrics computed by hand from the scores of predict in the same mode."""
    from PIL import Image

    from visualad import metrics

    rng = np.random.default_rng(5)
    root = tmp_path / "toy" / "widget"
    layout = {"good": 6, "scratch": 3, "dent": 2}
    paths = {}
    for defect, n in layout.items():
        for i in range(n):
            img = rng.integers(80, 120, (56, 56, 3), dtype=np.uint8)
            if defect != "good":
                img[10:30, 10:30] = 250 if defect == "scratch" else 0
                mask = np.zeros((56, 56), np.uint8)
                mask[10:30, 10:30] = 255
                (root / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "ground_truth" / defect / f"{i:03d}_mask.png")
            (root / "test" / defect).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "test" / defect / f"{i:03d}.png")
            paths.setdefault(defect, []).append(root / "test" / defect / f"{i:03d}.png")
    report = tiny_detector.evaluate(tmp_path / "toy", mode="head", progress=False, format="mvtec")
    row = report["classes"]["widget"]
    assert row["mode"] == "head" and set(row["defects"]) == {"scratch", "dent"}
    score = {str(p): tiny_detector.predict(p, mode="head").pred_score for ps in paths.values() for p in ps}
    good = [score[str(p)] for p in paths["good"]]
    for defect in ("scratch", "dent"):
        d = row["defects"][defect]
        assert d["n_images"] == 6 + layout[defect] and d["n_anomalous"] == layout[defect]
        bad = [score[str(p)] for p in paths[defect]]
        s, y = np.r_[good, bad], np.r_[np.zeros(6), np.ones(len(bad))]
        assert abs(d["image_auroc"] - metrics.image_metrics(s, y)["auroc"]) < 1e-9
        # 5% of 6 normals: none may be flagged, so a defect counts when it scores above every good image
        assert d["recall_at_5pct_fa"] == np.mean(np.asarray(bad) > max(good))
    assert row["n_images"] == 11 and abs(row["image_auroc"] - metrics.image_metrics(
        [score[str(p)] for ps in paths.values() for p in ps], np.r_[np.zeros(6), np.ones(5)])["auroc"]) < 1e-9
    table = format_table(report)
    assert "  scratch" in table and "  dent" in table and "R@1%FA" in table and "head" in table


def test_batch_mode_below_chance_is_said_with_a_way_out(tiny_detector, tmp_path):
    """Defects that are the majority and alike (a logical anomaly, in effect): batch mode ranks them as the
    normal ones, and the report says so and points to references."""
    from PIL import Image

    rng = np.random.default_rng(6)
    root = tmp_path / "toy" / "lot"
    for defect, n in (("good", 4), ("missing", 12)):
        (root / "test" / defect).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) if defect == "good" else np.full(
                (56, 56, 3), 128, np.uint8)
            Image.fromarray(img).save(root / "test" / defect / f"{i:03d}.png")
    report = tiny_detector.evaluate(tmp_path / "toy", mode="batch", progress=False, format="mvtec")
    row = report["classes"]["lot"]
    assert row["mode"] == "batch" and row["image_auroc"] < 0.5
    [note] = [n for n in report["notes"] if "below chance" in n]
    assert "below chance" in note and "--shots" in note and note in format_table(report)
