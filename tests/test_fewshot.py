"""Few-shot mode (visualad.fewshot): memory bank, exact NN search, fusion, persistence."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from visualad import fewshot


def _images(n: int, seed: int, size: int = 64) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _maps_scores(det, imgs):
    res = det.predict(imgs, keep_image=False)
    return np.stack([r.anomaly_map for r in res]), np.array([r.pred_score for r in res])


def test_nn_distance_chunked_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(53, 16, generator=g), dim=-1)
    brute = (1.0 - q @ b.t()).min(dim=1).values.clamp(min=0)
    via_cdist = torch.cdist(q, b).min(dim=1).values.pow(2) / 2  # |a-b|^2 = 2 - 2cos on unit vectors
    for chunk in (1, 53, 7 * 53, 10**6):  # one row per chunk ... everything at once
        got = fewshot.nn_distance(q, b, chunk_elements=chunk)
        torch.testing.assert_close(got, brute, atol=1e-6, rtol=0)
        torch.testing.assert_close(got, via_cdist, atol=1e-5, rtol=0)


def test_coreset_is_seeded_subset():
    f = torch.nn.functional.normalize(torch.randn(200, 8), dim=-1)
    a, b = fewshot.coreset(f, 20, seed=3), fewshot.coreset(f, 20, seed=3)
    assert torch.equal(a, b) and a.unique().numel() == 20
    assert fewshot.coreset(f, 500).numel() == 200


def test_no_references_is_exactly_zero_shot(tiny_detector):
    det = tiny_detector
    imgs = _images(3, 1)
    zs_maps, zs_scores = _maps_scores(det, imgs)
    det.set_references(_images(2, 2))
    fs_maps, _ = _maps_scores(det, imgs)
    assert not np.allclose(fs_maps, zs_maps)
    det.clear_references()
    m, s = _maps_scores(det, imgs)
    np.testing.assert_array_equal(m, zs_maps)
    np.testing.assert_array_equal(s, zs_scores)
    det.set_references([])  # K = 0
    assert det.references is None
    m, s = _maps_scores(det, imgs)
    np.testing.assert_array_equal(m, zs_maps)
    np.testing.assert_array_equal(s, zs_scores)


def test_predict_references_are_per_call(tiny_detector):
    det = tiny_detector
    imgs = _images(2, 3)
    zs_maps, _ = _maps_scores(det, imgs)
    res = det.predict(imgs, references=_images(2, 4))
    assert det.references is None
    assert not np.allclose(np.stack([r.anomaly_map for r in res]), zs_maps)


def test_reference_containing_the_image_gives_zero_distance(tiny_detector):
    det = tiny_detector
    imgs = _images(2, 5)
    for k_refs in ([imgs[0]], [imgs[0]] + _images(2, 6)):  # K = 1 and K = 3
        det.set_references(k_refs)
        batch = det._to_batch([fewshot_resize(det, imgs[0]), fewshot_resize(det, imgs[1])])
        comp = det.references.components(det.model, batch)
        torch.testing.assert_close(comp["few_shot_raw"][0], torch.zeros_like(comp["few_shot_raw"][0]),
                                   atol=1e-4, rtol=0)
        assert float(comp["few_shot_raw"][1].max()) > 1e-3  # an image not in the bank stays away from 0
        # predict() is the fused part of components(), from one forward
        maps, scores = det.references.predict(det.model, batch)
        torch.testing.assert_close(maps, comp["fused"])
        torch.testing.assert_close(scores, comp["fused_score"])
        assert np.isfinite([v for k, v in det.references.stats.items() if k != "mode"]).all()


def fewshot_resize(det, img):
    from visualad.data import images as imio

    return imio.resize_to_square(img, det.config.image_size)


def test_bank_round_trips_through_save_pretrained(tiny_detector, tmp_path):
    from safetensors import safe_open

    from visualad import AnomalyDetector

    det = tiny_detector
    imgs = _images(3, 7)
    det.set_references(_images(3, 8), max_patches=20)
    assert all(n == 20 for n in det.references.n_patches.values())
    maps, scores = _maps_scores(det, imgs)
    out = det.save_pretrained(tmp_path / "m")
    meta = json.loads(safe_open(str(out / "references.safetensors"), "pt").metadata()["visualad_references"])
    assert meta["bytes"] == det.references.nbytes and meta["shots"] == 3
    assert meta["feature"] == det.references.feature

    det2 = AnomalyDetector.from_pretrained(out, device="cpu")
    assert det2.references is not None
    assert det2.references.layers == det.references.layers
    for k, v in det.references.features.items():
        torch.testing.assert_close(det2.references.features[k], v, atol=0, rtol=0)
    m2, s2 = _maps_scores(det2, imgs)
    np.testing.assert_array_equal(m2, maps)
    np.testing.assert_array_equal(s2, scores)

    det2.clear_references()  # saving without references removes a stale bank
    det2.save_pretrained(out)
    assert not (out / "references.safetensors").exists()


def test_bank_options_and_errors(tiny_detector):
    det = tiny_detector
    bank = fewshot.build_bank(det, _images(2, 9), feature="saf", layers=[det.config.layers[-1]])
    assert bank.feature == "saf" and bank.layers == (det.config.layers[-1],)
    with pytest.raises(ValueError):
        fewshot.build_bank(det, _images(1, 9), feature="nope")
    with pytest.raises(ValueError):
        fewshot.build_bank(det, _images(1, 9), layers=[99])
    with pytest.raises(ValueError, match="at least one"):
        fewshot.build_bank(det, _images(1, 9), layers=[])
    assert fewshot.default_layers((3, 6, 9, 12)) == (6, 9)


def test_backbone_features_ignore_the_learned_tokens():
    """The bank's default features come from the backbone alone: editing the tokens moves the model's own
    patch features but not these; layers come back in the order asked, and no block past the deepest runs.
    (A tiny CLIP tower: the random DINOv2 one's LayerScale of 1e-5 hides the tokens' effect.)"""
    from conftest import TINY_CLIP

    from visualad import AnomalyDetector

    det = AnomalyDetector.from_backbone(device="cpu", pretrained_backbone=False, image_size=64, **TINY_CLIP)
    model = det.model
    x = torch.randn(2, 3, 64, 64)
    layers = tuple(reversed(det.config.layers[:2]))
    with torch.inference_mode():
        before = model.backbone_features(x, layers)
        own_before = model(x).patch_features
        outs, _ = model.encoder(x, with_tokens=False)
        start = model.backbone.num_prefix_tokens
        for layer, f in zip(layers, before):
            expected = model.backbone.final_norm(outs[model.config.layers.index(layer)][:, start:])
            torch.testing.assert_close(f, expected, atol=1e-6, rtol=0)
        g = torch.Generator().manual_seed(0)  # a random direction: a constant shift is removed by LayerNorm
        model.encoder.anomaly_token.add_(3 * torch.randn(model.encoder.anomaly_token.shape, generator=g))
        model.encoder.normal_token.add_(3 * torch.randn(model.encoder.normal_token.shape, generator=g))
        after = model.backbone_features(x, layers)
        own_after = model(x).patch_features
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert max(float((a - b).abs().max()) for a, b in zip(own_before, own_after)) > 1e-3

    calls = []
    run_block = model.backbone.run_block
    model.backbone.run_block = lambda i, h: calls.append(i) or run_block(i, h)
    try:
        with torch.inference_mode():
            model.backbone_features(x, layers)
    finally:
        del model.backbone.run_block
    assert calls == list(range(max(layers)))


def test_bank_schema_1_backbone_means_the_models_own_patches(tiny_detector, tmp_path):
    """Banks written before the token-free features named the model's own pre-SAF patches "backbone"."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from visualad.errors import WeightsError

    bank = fewshot.build_bank(tiny_detector, _images(2, 10), feature="patches")
    path = bank.save(tmp_path / "refs.safetensors")
    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["visualad_references"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    for schema, feature, expect in (("1", "backbone", "patches"), ("1", "saf", "saf"), ("2", "backbone", "backbone")):
        save_file(tensors, str(path), metadata={"visualad_references": json.dumps(dict(meta, schema=schema,
                                                                                        feature=feature))})
        assert fewshot.ReferenceBank.load(path).feature == expect
    save_file(tensors, str(path), metadata={"visualad_references": json.dumps(dict(meta, schema="99"))})
    with pytest.raises(WeightsError, match="schema"):
        fewshot.ReferenceBank.load(path)
