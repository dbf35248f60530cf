"""Model directories (visualad.store): save, load, strict keys, corrupt files, overrides."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from visualad import AnomalyDetector
from visualad.errors import ConfigError, WeightsError


def test_save_load_roundtrip_is_exact(tiny_detector, tmp_path):
    x = np.random.default_rng(0).integers(0, 255, size=(56, 56, 3), dtype=np.uint8)
    with torch.no_grad():
        for p in tiny_detector.model.head_parameters():
            p[1].add_(torch.randn_like(p[1]) * 0.01)  # not the init values
    before = tiny_detector.predict(x, mode="head")
    tiny_detector.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["README.md", "backbone.safetensors", "config.json", "model.safetensors"]
    loaded = AnomalyDetector.from_pretrained(tmp_path / "m", device="cpu")
    after = loaded.predict(x, mode="head")
    assert after.pred_score == before.pred_score
    np.testing.assert_array_equal(after.anomaly_map, before.anomaly_map)
    # only the trained parameters are saved
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "m" / "model.safetensors")
    assert not any(k.startswith("encoder.backbone.") for k in saved)
    assert set(saved) == set(dict(tiny_detector.model.head_parameters()))


def _rehash(d):
    """Record the current digests in config.json, as a consistent save of these files would."""
    import hashlib

    cfg = json.loads((d / "config.json").read_text())
    cfg["files"] = {name: hashlib.sha256((d / name).read_bytes()).hexdigest() for name in cfg["files"]}
    (d / "config.json").write_text(json.dumps(cfg))


def test_strict_loading_names_missing_and_unexpected_keys(tiny_detector, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tiny_detector.save_pretrained(tmp_path / "m")
    state = load_file(d / "model.safetensors")
    state.pop("encoder.normal_token")
    state["sca.layer_9.extra"] = torch.zeros(1)
    save_file(state, d / "model.safetensors")
    with pytest.raises(WeightsError, match="does not match the digest config.json records"):
        AnomalyDetector.from_pretrained(d, device="cpu")
    _rehash(d)
    with pytest.raises(WeightsError, match=r"encoder\.normal_token.*sca\.layer_9\.extra"):
        AnomalyDetector.from_pretrained(d, device="cpu")


def test_corrupted_files_and_newer_schema_give_clear_errors(tiny_detector, tmp_path):
    d = tiny_detector.save_pretrained(tmp_path / "m")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    _rehash(d)
    with pytest.raises(WeightsError, match="corrupted or truncated"):
        AnomalyDetector.from_pretrained(d, device="cpu")
    (d / "model.safetensors").write_bytes(raw)
    _rehash(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "schema_version": 99}))
    with pytest.raises(ConfigError, match="newer"):
        AnomalyDetector.from_pretrained(d, device="cpu")
    (d / "config.json").write_text(json.dumps(cfg)[:40])
    with pytest.raises(ConfigError, match="corrupted or truncated"):
        AnomalyDetector.from_pretrained(d, device="cpu")


def test_image_size_override_beyond_trained_sca_table_is_refused(tiny_detector, tmp_path):
    d = tiny_detector.save_pretrained(tmp_path / "m")
    big = 14 * 40  # 1600 patches > the 1536-row table
    with pytest.raises(ConfigError, match="SCA position table"):
        AnomalyDetector.from_pretrained(d, device="cpu", image_size=big)
