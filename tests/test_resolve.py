"""from_pretrained's resolution: aliases, unknown names, unpublished heads, Hub repos at a pinned revision."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TIMM

from visualad import AnomalyDetector
from visualad.errors import OfflineError, UnknownModelError, WeightsError
from visualad.weights.manifest import load_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "1234567890abcdef1234567890abcdef12345678"


def test_packaged_manifest_is_the_top_level_file():
    import visualad

    packaged = Path(visualad.__file__).parent / "weights_manifest.json"
    assert json.loads(packaged.read_text()) == json.loads((REPO_ROOT / "weights_manifest.json").read_text())


def test_manifest_lists_every_alias_of_the_api_with_pins():
    m = load_manifest()
    assert m.default == "dinov2-s-imgfocus"
    assert set(m.known()) >= {"dinov2-s-imgfocus", "clip-l", "clip-l-visa", "clip-l-mvtec", "dinov2-l"}
    assert m.canonical("clip-l") == "clip-l-visa"
    for name in ("clip-l-visa", "clip-l-mvtec"):
        head = m.models[name]["head"]
        assert len(head["sha256"]) == 64 and head["size"] == 126119090 and len(head["commit"]) == 40
    assert m.models["clip-l-visa"]["head"]["sha256"].startswith("fed8ed5e")
    for pin in m.backbones.values():  # every Hub backbone is pinned to a full commit
        if pin.get("hub_repo"):
            assert len(pin["revision"]) == 40 and int(pin["revision"], 16) >= 0
    assert m.backbones["clip-l"]["sha256"].startswith("fbc415c3")
    for entry in m.models.values():
        assert entry.get("license") or entry.get("head") is None


def test_unknown_alias_lists_the_known_ones():
    with pytest.raises(UnknownModelError) as info:
        AnomalyDetector.from_pretrained("no-such-model", device="cpu")
    for name in ("dinov2-s-imgfocus", "clip-l", "dinov2-l"):
        assert name in str(info.value)


def test_a_backbone_alone_is_a_detector_in_references_and_batch_mode(fake_hub, tmp_path, monkeypatch, caplog):
    """A manifest model with no published head (like dinov2-l) is its pinned backbone alone: fetched from the
    (fake) Hub and verified once, then offline; auto never picks the untrained head, head mode says so."""
    import hashlib

    from safetensors.torch import save as st_save

    from visualad.cli import main
    from visualad.errors import ConfigError
    from visualad.model.backbones import NAMED_BACKBONES, BackboneSpec, build_backbone

    kwargs = TINY_TIMM["backbone_kwargs"]
    src = build_backbone(TINY_TIMM["backbone"], kwargs)
    blob = st_save({k: v.contiguous() for k, v in src.library_state_dict().items()})
    fake_hub.add_repo("timm/tiny-dinov2", COMMIT, {"model.safetensors": blob})
    monkeypatch.setitem(NAMED_BACKBONES, "tiny-dinov2", BackboneSpec("timm", "vit_small_patch14_dinov2", "hub", 56,
                                                                     kwargs))
    m = load_manifest()
    monkeypatch.setitem(m.backbones, "tiny-dinov2", {"hub_repo": "timm/tiny-dinov2", "revision": COMMIT,
                                                     "filename": "model.safetensors", "size": len(blob),
                                                     "sha256": hashlib.sha256(blob).hexdigest()})
    monkeypatch.setitem(m.models, "tiny-dinov2", {"backbone": "tiny-dinov2", "head": None, "status": "backbone only"})

    det = AnomalyDetector.from_pretrained("tiny-dinov2", device="cpu", dtype="fp32")
    assert det.config.head_trained is False and fake_hub.count() > 0
    for k, v in src.library_state_dict().items():
        assert torch.equal(det.model.backbone.library_state_dict()[k], v), k
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(6)]
    batch = det.predict(images)  # auto: 6 images together -> batch mode (an untrained head is never picked)
    assert [r.mode for r in batch] == ["batch"] * 6
    assert all(r.anomaly_map.shape == (56, 56) and np.isfinite(r.anomaly_map).all() for r in batch)
    with pytest.raises(ConfigError, match="untrained.*set_references.*finetune"):
        det.predict(images[0])
    refs = det.predict(images[:2], references=images[2:5])
    assert [r.mode for r in refs] == ["references"] * 2 and refs[0].pred_score > 0
    with caplog.at_level("WARNING"):
        det.predict(images[0], mode="head")
        det.predict(images[1], mode="head")
    warned = [r.getMessage() for r in caplog.records if "untrained head" in r.getMessage()]
    assert len(warned) == 1 and "finetune" in warned[0]

    n = fake_hub.count()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = AnomalyDetector.from_pretrained("tiny-dinov2", device="cpu", dtype="fp32")
    assert fake_hub.count() == n  # the backbone came from the cache
    np.testing.assert_array_equal(again.predict(images)[3].anomaly_map, batch[3].anomaly_map)
    assert main(["download", "tiny-dinov2"]) == 0


def test_a_wrong_backbone_pin_is_refused(fake_hub, monkeypatch):
    from visualad.model.backbones import NAMED_BACKBONES, BackboneSpec

    fake_hub.add_repo("timm/tiny-dinov2", COMMIT, {"model.safetensors": b"not the pinned bytes"})
    monkeypatch.setitem(NAMED_BACKBONES, "tiny-dinov2", BackboneSpec("timm", "vit_small_patch14_dinov2", "hub", 56,
                                                                     TINY_TIMM["backbone_kwargs"]))
    m = load_manifest()
    monkeypatch.setitem(m.backbones, "tiny-dinov2", {"hub_repo": "timm/tiny-dinov2", "revision": COMMIT,
                                                     "filename": "model.safetensors", "sha256": "0" * 64})
    monkeypatch.setitem(m.models, "tiny-dinov2", {"backbone": "tiny-dinov2", "head": None, "status": "backbone only"})
    with pytest.raises(WeightsError, match="sha256"):
        AnomalyDetector.from_pretrained("tiny-dinov2", device="cpu")


def test_hub_repo_at_a_pinned_revision_downloads_and_then_works_offline(fake_hub, tiny_detector, tmp_path,
                                                                       monkeypatch):
    d = tiny_detector.save_pretrained(tmp_path / "src")
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    fake_hub.add_repo("org/tiny", COMMIT, files)
    x = np.random.default_rng(0).integers(0, 255, size=(60, 40, 3), dtype=np.uint8)
    expected = tiny_detector.predict(x, mode="head")

    det = AnomalyDetector.from_pretrained(f"org/tiny@{COMMIT}", device="cpu")
    np.testing.assert_array_equal(det.predict(x, mode="head").anomaly_map, expected.anomaly_map)
    n = fake_hub.count()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = AnomalyDetector.from_pretrained("org/tiny", revision=COMMIT, device="cpu")
    assert fake_hub.count() == n  # served from the cache
    np.testing.assert_array_equal(again.predict(x, mode="head").anomaly_map, expected.anomaly_map)
    with pytest.raises(OfflineError, match="visualad download"):
        AnomalyDetector.from_pretrained(f"org/other@{COMMIT}", device="cpu")


def test_push_to_hub_then_from_pretrained_at_the_returned_commit(fake_hub, tiny_detector):
    tiny_detector.calibrate([np.full((56, 56, 3), 120, dtype=np.uint8)] * 3, mode="head")
    commit = tiny_detector.push_to_hub("org/pushed")
    assert len(commit) == 40
    files = fake_hub.repos["org/pushed"][commit]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert b"visualad" in files["README.md"]
    det = AnomalyDetector.from_pretrained(f"org/pushed@{commit}", device="cpu")
    assert det.config.image_threshold == tiny_detector.config.image_threshold
    x = np.random.default_rng(1).integers(0, 255, size=(56, 56, 3), dtype=np.uint8)
    np.testing.assert_array_equal(det.predict(x, mode="head").anomaly_map, tiny_detector.predict(x, mode="head").anomaly_map)
