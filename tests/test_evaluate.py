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
