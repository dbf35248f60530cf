"""Thresholds from normal images (percentile) and from labels (F1-max), persistence, labels and overlays."""
from __future__ import annotations

import numpy as np
import pytest

from visualad import AnomalyDetector
from visualad.tasks.calibrate import _percentile_of_top, f1_threshold
from visualad.errors import ConfigError


def _constant_images(values):
    return [np.full((40, 30, 3), v, dtype=np.uint8) for v in values]


@pytest.fixture
def echo_detector(tiny_detector, monkeypatch):
    """The model replaced by a known function: the map is the red channel / 255, so a constant image of value v
    scores exactly v / 255 and its pixels are all v / 255."""

    def score(arrays, mode):
        maps = np.stack([a[..., 0].astype(np.float32) / 255.0 for a in arrays])
        return maps, maps.reshape(len(arrays), -1).mean(1)

    monkeypatch.setattr(tiny_detector.engine, "prepare", list)  # the squares themselves reach score()
    monkeypatch.setattr(tiny_detector.engine, "score", score)
    return tiny_detector


def test_normal_only_threshold_is_the_stated_percentile(echo_detector):
    values = np.arange(10, 210)  # 200 normal images with scores 10/255 ... 209/255
    out = echo_detector.calibrate(_constant_images(values), percentile=99.0, mode="head")
    expected = np.percentile(values / 255.0, 99.0)
    assert out["method"] == "percentile"
    assert echo_detector.config.image_threshold == pytest.approx(expected, abs=1e-7)
    # every pixel of image i equals its score: the pixel percentile is the same percentile over pixels
    pix = np.percentile(np.repeat(values / 255.0, 56 * 56), 99.9)
    assert echo_detector.config.pixel_threshold == pytest.approx(pix, abs=1e-6)


def test_percentile_from_top_values_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=10_000)
    for q in (99.0, 99.5, 99.9, 100.0):
        keep = int(np.ceil((100 - q) / 100 * x.size)) + 1
        top = np.partition(x, x.size - keep)[-keep:]
        assert _percentile_of_top(top, x.size, q) == pytest.approx(np.percentile(x, q), abs=1e-12)


def test_labelled_threshold_is_the_f1_max_point(echo_detector):
    normals = [20, 40, 60, 80, 100, 120]
    anomalous = [90, 110, 130, 150, 170]
    out = echo_detector.calibrate(_constant_images(normals), _constant_images(anomalous), mode="head")
    assert out["method"] == "f1"
    scores = np.array(normals + anomalous) / 255.0
    labels = np.array([0] * 6 + [1] * 5)
    best = max(scores, key=lambda t: (2 * ((scores >= t) & (labels == 1)).sum()
                                      / ((scores >= t).sum() + labels.sum()), t))
    assert echo_detector.config.image_threshold == pytest.approx(best)
    assert best == pytest.approx(90 / 255)  # 5 TP + 2 FP (F1 0.833) beats 4 + 1 (0.8) and 3 + 0 (0.75)
    assert f1_threshold(scores, labels) == pytest.approx(best)


def test_thresholds_label_results_and_survive_save_load(tiny_detector, tmp_path):
    rng = np.random.default_rng(0)
    normals = [rng.integers(100, 140, size=(56, 56, 3), dtype=np.uint8) for _ in range(6)]
    test = rng.integers(0, 255, size=(70, 50, 3), dtype=np.uint8)
    before = tiny_detector.predict(test, mode="head")
    assert before.pred_label is None and before.pred_mask is None and before.normalized_score is None
    tiny_detector.calibrate(normals, mode="head")
    cfg = tiny_detector.config
    res = tiny_detector.predict(test, mode="head")
    assert res.pred_label == (res.pred_score >= cfg.image_threshold)
    assert res.pred_mask.shape == (70, 50) and res.pred_mask.dtype == bool
    np.testing.assert_array_equal(res.pred_mask, res.anomaly_map >= cfg.pixel_threshold)
    assert 0.0 <= res.normalized_score <= 1.0
    at = tiny_detector.predict(test, threshold=res.pred_score, mode="head")
    assert at.pred_label is True and at.normalized_score == pytest.approx(0.5)
    d = tiny_detector.save_pretrained(tmp_path / "cal")
    loaded = AnomalyDetector.from_pretrained(d, device="cpu")
    assert loaded.config.image_threshold == cfg.image_threshold
    assert loaded.config.pixel_threshold == cfg.pixel_threshold
    again = loaded.predict(test, mode="head")
    assert again.pred_label == res.pred_label and again.normalized_score == res.normalized_score


def test_thresholds_record_their_dtype_and_warn_once_in_another(tiny_detector, tmp_path, caplog):
    import logging

    normals = [np.random.default_rng(i).integers(100, 140, size=(56, 56, 3), dtype=np.uint8) for i in range(4)]
    tiny_detector.to("cpu", "fp32")
    tiny_detector.calibrate(normals, mode="head")
    assert tiny_detector.config.score_stats["dtype"] == "fp32"
    d = tiny_detector.save_pretrained(tmp_path / "cal")
    with caplog.at_level(logging.WARNING, logger="visualad.runtime.postprocess"):
        AnomalyDetector.from_pretrained(d, device="cpu", dtype="fp32").predict(normals[:2], mode="head")
        assert "calibrated in fp32" not in caplog.text
        other = AnomalyDetector.from_pretrained(d, device="cpu", dtype="bf16")
        other.predict(normals[:3], mode="head")
        other.predict(normals[0], mode="head")
    assert caplog.text.count("calibrated in fp32 but the model runs in bf16") == 1


def test_calibrate_refuses_bad_arguments(tiny_detector):
    with pytest.raises(ConfigError):
        tiny_detector.calibrate([], mode="head")
    with pytest.raises(ConfigError, match="f1"):
        tiny_detector.calibrate(_constant_images([1]), method="f1", mode="head")


def test_overlay_sizes_and_scales(tiny_detector):
    img = np.random.default_rng(1).integers(0, 255, size=(90, 60, 3), dtype=np.uint8)
    res = tiny_detector.predict(img, mode="head")
    ov = res.overlay()
    assert ov.size[0] == 60 and ov.size[1] > 90 and ov.mode == "RGB"  # the legend strip below the image
    assert res.overlay(legend=False).size == (60, 90)
    np.testing.assert_array_equal(np.asarray(res.overlay(alpha=0.0, legend=False)), img)
    np.testing.assert_array_equal(np.asarray(ov)[:90], np.asarray(res.overlay(legend=False)))
    with pytest.raises(ValueError, match="calibrated"):
        res.overlay(scale="calibrated")
    tiny_detector.calibrate(_constant_images([10, 20, 30]), mode="head")
    res = tiny_detector.predict(img, mode="head")
    assert res.map_range is not None
    calibrated = np.asarray(res.overlay(legend=False))  # default: calibrated scale
    np.testing.assert_array_equal(calibrated, np.asarray(res.overlay(scale=res.map_range, legend=False)))
    assert not np.array_equal(calibrated, np.asarray(res.overlay(scale="per_image", legend=False)))
