"""The default model's outputs on ../shared/data match the golden values recorded by tests/record_baseline.py
(head mode: scores and an 8 x 8 summary of each map), within tolerances that follow the dtype: fp32 tight
(1e-4: what other CPU kernels or a thread count move), bf16 by its precision at the scale of the map (0.02:
a few units in the last place of 8 mantissa bits at values up to 1). Values, not float bits: the test holds
on any CPU and torch build, and a real change of the model moves them far more."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from record_baseline import VARIANTS, shared_test_images, summary

BASELINE = json.loads((Path(__file__).parent / "data" / "default_model_baseline.json").read_text())
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
#: every image in one variant; every n-th in the others (bf16 without native support is slow on many CPUs, and
#: a change of the model moves every image): the suite stays within its time
STRIDE = {"fp32_model_size": 1, "fp32_original_size": 4, "bf16_model_size": 8}


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_default_model_matches_the_golden_outputs(shared_data, key):
    from visualad import AnomalyDetector

    dtype, at_model_size = VARIANTS[key]
    tol = TOLERANCE[dtype]
    paths = shared_test_images(shared_data)
    expected = BASELINE[key]
    assert sorted(expected) == paths and len(paths) == BASELINE["images"] == 200
    paths = paths[::STRIDE[key]]
    det = AnomalyDetector.from_pretrained(device="cpu", dtype=dtype)
    results = det.predict_iter([shared_data / p for p in paths], batch_size=BASELINE["batch_size"],
                               on_error="raise", at_model_size=at_model_size, mode="head")
    worst_score = worst_map = 0.0
    for rel, res in zip(paths, results):
        row = expected[rel]
        assert list(res.anomaly_map.shape) == row["shape"], rel
        worst_score = max(worst_score, abs(res.pred_score - row["score"]))
        worst_map = max(worst_map, float(np.abs(np.asarray(summary(res.anomaly_map)) - row["summary"]).max()))
    assert worst_score <= tol and worst_map <= tol, (worst_score, worst_map)


def test_the_tolerances_catch_a_real_change_of_the_model(shared_data):
    """The head's weights scaled by 1% move the outputs well past the fp32 tolerance."""
    import torch

    from visualad import AnomalyDetector

    det = AnomalyDetector.from_pretrained(device="cpu", dtype="fp32")
    with torch.no_grad():
        for _, p in det.model.head_parameters():
            p.mul_(1.01)
    rel = shared_test_images(shared_data)[0]
    got = next(iter(det.predict_iter([shared_data / rel], at_model_size=True, mode="head")))
    row = BASELINE["fp32_model_size"][rel]
    moved = max(abs(got.pred_score - row["score"]),
                float(np.abs(np.asarray(summary(got.anomaly_map)) - row["summary"]).max()))
    assert moved > 10 * TOLERANCE["fp32"], moved
