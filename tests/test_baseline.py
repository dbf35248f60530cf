"""The default model's maps and scores on ../shared/data are bit-identical to those recorded on commit 8eb35f1
(before the engine refactor) by tests/record_baseline.py: a refactor must not move a single value."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from record_baseline import digest, shared_test_images

BASELINE = json.loads((Path(__file__).parent / "data" / "default_model_baseline.json").read_text())


@pytest.mark.parametrize("dtype,key,at_model_size", [("fp32", "fp32_model_size", True),
                                                      ("bf16", "bf16_model_size", True),
                                                      ("fp32", "fp32_original_size", False)])
def test_default_model_is_bit_identical_to_the_recorded_baseline(shared_data, dtype, key, at_model_size):
    from visualad import AnomalyDetector

    paths = shared_test_images(shared_data)
    expected = BASELINE[key]
    assert sorted(expected) == paths and len(paths) == BASELINE["images"] == 200
    det = AnomalyDetector.from_pretrained(device="cpu", dtype=dtype)
    results = det.predict_iter([shared_data / p for p in paths], batch_size=BASELINE["batch_size"],
                               on_error="raise", at_model_size=at_model_size, mode="head")
    mismatched = []
    for rel, res in zip(paths, results):
        row = expected[rel]
        got = {"score": float(res.pred_score).hex(), "map_sha256": digest(res.anomaly_map),
               "shape": list(res.anomaly_map.shape)}
        if got != row:
            mismatched.append(rel)
    assert not mismatched, f"{len(mismatched)} of {len(paths)} differ, e.g. {mismatched[:3]}"
