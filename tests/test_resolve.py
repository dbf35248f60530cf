"""from_pretrained's resolution: aliases, unknown names, unpublished heads, Hub repos at a pinned revision."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

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
        assert entry.get("license") or entry["status"] == "not-published"


def test_unknown_alias_lists_the_known_ones():
    with pytest.raises(UnknownModelError) as info:
        AnomalyDetector.from_pretrained("no-such-model", device="cpu")
    for name in ("dinov2-s-imgfocus", "clip-l", "dinov2-l"):
        assert name in str(info.value)


def test_unpublished_head_says_how_to_train_it():
    with pytest.raises(WeightsError, match="not published yet.*finetune"):
        AnomalyDetector.from_pretrained("dinov2-l", device="cpu")


def test_hub_repo_at_a_pinned_revision_downloads_and_then_works_offline(fake_hub, tiny_detector, tmp_path,
                                                                       monkeypatch):
    d = tiny_detector.save_pretrained(tmp_path / "src")
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    fake_hub.add_repo("org/tiny", COMMIT, files)
    x = np.random.default_rng(0).integers(0, 255, size=(60, 40, 3), dtype=np.uint8)
    expected = tiny_detector.predict(x)

    det = AnomalyDetector.from_pretrained(f"org/tiny@{COMMIT}", device="cpu")
    np.testing.assert_array_equal(det.predict(x).anomaly_map, expected.anomaly_map)
    n = fake_hub.count()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = AnomalyDetector.from_pretrained("org/tiny", revision=COMMIT, device="cpu")
    assert fake_hub.count() == n  # served from the cache
    np.testing.assert_array_equal(again.predict(x).anomaly_map, expected.anomaly_map)
    with pytest.raises(OfflineError, match="visualad download"):
        AnomalyDetector.from_pretrained(f"org/other@{COMMIT}", device="cpu")


def test_push_to_hub_then_from_pretrained_at_the_returned_commit(fake_hub, tiny_detector):
    tiny_detector.calibrate([np.full((56, 56, 3), 120, dtype=np.uint8)] * 3)
    commit = tiny_detector.push_to_hub("org/pushed")
    assert len(commit) == 40
    files = fake_hub.repos["org/pushed"][commit]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert b"visualad" in files["README.md"]
    det = AnomalyDetector.from_pretrained(f"org/pushed@{commit}", device="cpu")
    assert det.config.image_threshold == tiny_detector.config.image_threshold
    x = np.random.default_rng(1).integers(0, 255, size=(56, 56, 3), dtype=np.uint8)
    np.testing.assert_array_equal(det.predict(x).anomaly_map, tiny_detector.predict(x).anomaly_map)
