"""The bad-input corpus for model directories: nothing a model directory holds may make a library open a file
or unpickle, broken weights and banks are refused at load (never NaN or null scores later), and a save killed
between its renames never loads as a silent mix of two models."""
from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from visualad import AnomalyDetector
from visualad.errors import ConfigError, UnknownModelError, WeightsError

COMMIT = "abcdef0123456789abcdef0123456789abcdef01"


class _Marker:
    """Unpickling this creates ``path``: the proof that something unpickled a file named by a config."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _rehash(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["files"] = {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in cfg["files"]}
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _evil_dir(tiny_detector, tmp_path):
    d = tiny_detector.save_pretrained(tmp_path / "evil")
    marker = tmp_path / "UNPICKLED"
    with open(tmp_path / "payload.pth", "wb") as fh:
        pickle.dump({"state_dict": _Marker(str(marker))}, fh)
    cfg = json.loads((d / "config.json").read_text())
    cfg["backbone_kwargs"] = {**cfg["backbone_kwargs"], "checkpoint_path": str(tmp_path / "payload.pth")}
    (d / "config.json").write_text(json.dumps(cfg))
    return d, marker


def test_a_checkpoint_path_in_a_local_config_is_refused_before_any_library_sees_it(tiny_detector, tmp_path):
    d, marker = _evil_dir(tiny_detector, tmp_path)
    with pytest.raises(ConfigError, match="backbone_kwargs: 'checkpoint_path'") as info:
        AnomalyDetector.from_pretrained(d, device="cpu")
    assert str(d / "config.json") in str(info.value)
    assert not marker.exists()


def test_a_checkpoint_path_from_the_hub_is_refused(tiny_detector, tmp_path, fake_hub):
    d, marker = _evil_dir(tiny_detector, tmp_path)
    fake_hub.add_repo("evil/model", COMMIT, {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()})
    with pytest.raises(ConfigError, match="checkpoint_path"):
        AnomalyDetector.from_pretrained(f"evil/model@{COMMIT}", device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("backbone", ["timm:local-dir:/tmp", "timm:hf-hub:evil/model", "open_clip:ViT-B-32/../../x",
                                      "open_clip:hf-hub:evil/model"])
def test_backbone_names_that_would_fetch_or_read_files_are_refused(tiny_detector, tmp_path, backbone):
    d = tiny_detector.save_pretrained(tmp_path / "m")
    _edit_config(d, backbone=backbone)
    with pytest.raises(UnknownModelError, match="unknown backbone"):
        AnomalyDetector.from_pretrained(d, device="cpu")


@pytest.mark.parametrize("field,value,match", [
    ("image_size", "abc", "image_size.*integer"), ("layers", ["x"], "layers.*integers"),
    ("sigma", float("nan"), "sigma.*finite"), ("backbone_kwargs", {"depth": "4"}, "depth.*number"),
    ("head_trained", "yes", "head_trained.*true or false"), ("files", ["model.safetensors"], "files"),
])
def test_wrong_typed_config_values_name_the_field(tiny_detector, tmp_path, field, value, match):
    d = tiny_detector.save_pretrained(tmp_path / "m")
    _edit_config(d, **{field: value})
    with pytest.raises(ConfigError, match=match) as info:
        AnomalyDetector.from_pretrained(d, device="cpu")
    assert "config.json" in str(info.value)


def test_a_config_that_is_a_folder_or_a_fifo_is_an_error_not_a_hang(tiny_detector, tmp_path):
    d = tiny_detector.save_pretrained(tmp_path / "m")
    os.unlink(d / "config.json")
    os.mkfifo(d / "config.json")  # reading it would block forever
    with pytest.raises(ConfigError, match="not a regular file"):
        AnomalyDetector.from_pretrained(d, device="cpu")
    os.unlink(d / "config.json")
    (d / "config.json").mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        AnomalyDetector.from_pretrained(d, device="cpu")


@pytest.mark.parametrize("kind,match", [("nan", "NaN or infinite"), ("inf", "NaN or infinite"),
                                        ("int64", "floating point")])
def test_broken_head_weights_are_refused_at_load(tiny_detector, tmp_path, kind, match):
    d = tiny_detector.save_pretrained(tmp_path / "m")
    state = load_file(d / "model.safetensors")
    key = sorted(state)[0]
    if kind == "int64":
        state[key] = state[key].to(torch.int64)
    else:
        state[key] = torch.full_like(state[key], float(kind))
    save_file(state, d / "model.safetensors")
    _rehash(d)
    with pytest.raises(WeightsError, match=match):
        AnomalyDetector.from_pretrained(d, device="cpu")


def _bank_dir(tiny_detector, tmp_path):
    rng = np.random.default_rng(0)
    tiny_detector.set_references([rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(2)])
    return tiny_detector.save_pretrained(tmp_path / "m")


def _rewrite_bank(d, tensors=None, metadata=None):
    from safetensors import safe_open

    path = d / "references.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    save_file(tensors if tensors is not None else load_file(path), path,
              metadata=metadata if metadata is not None else meta)
    _rehash(d)
    return json.loads(meta["visualad_references"])


@pytest.mark.parametrize("case,match", [
    ("bad metadata", "malformed reference bank"), ("missing key", "malformed reference bank"),
    ("bad key", "malformed reference bank"), ("wrong width", "wide"), ("nan", "NaN"), ("int", "float rows"),
])
def test_malformed_reference_banks_are_refused_at_load(tiny_detector, tmp_path, case, match):
    d = _bank_dir(tiny_detector, tmp_path)
    tensors = load_file(d / "references.safetensors")
    key = sorted(tensors)[0]
    if case == "bad metadata":
        _rewrite_bank(d, metadata={"visualad_references": "{not json"})
    elif case == "missing key":
        meta = _rewrite_bank(d)
        del meta["patches"]
        _rewrite_bank(d, metadata={"visualad_references": json.dumps(meta)})
    elif case == "bad key":
        _rewrite_bank(d, tensors={"nonsense": tensors[key]})
    elif case == "wrong width":
        _rewrite_bank(d, tensors={k: torch.cat([v, v], dim=1) for k, v in tensors.items()})
    elif case == "nan":
        _rewrite_bank(d, tensors={k: torch.full_like(v, float("nan")) for k, v in tensors.items()})
    else:
        _rewrite_bank(d, tensors={k: v.to(torch.int32) for k, v in tensors.items()})
    with pytest.raises(WeightsError, match=match):
        AnomalyDetector.from_pretrained(d, device="cpu")


def test_non_finite_output_is_an_error_never_a_null_score(tiny_detector):
    x = np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    with torch.no_grad():
        tiny_detector.model.encoder.anomaly_token.fill_(float("nan"))  # weights broken after loading
    res = tiny_detector.predict(x, mode="head", on_error="return")
    assert not res.ok and "NaN or infinite" in res.error and res.to_dict()["score"] is None
    with pytest.raises(WeightsError, match="NaN or infinite"):
        tiny_detector.predict(x, mode="head")


def test_a_save_killed_at_any_rename_leaves_the_old_model_or_a_clear_error(tiny_detector, tmp_path, monkeypatch):
    """Fault injection at each rename of save_pretrained over an existing model (new weights, references and
    thresholds): the directory then loads as the old model, exactly, or refuses with a message."""
    import visualad.atomic as atomic

    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
    old_dir = tiny_detector.save_pretrained(tmp_path / "old")
    old_map = AnomalyDetector.from_pretrained(old_dir, device="cpu").predict(x, mode="head").anomaly_map
    new = AnomalyDetector.from_backbone(device="cpu", pretrained_backbone=False, image_size=56, seed=7,
                                        backbone=tiny_detector.config.backbone,
                                        backbone_kwargs=tiny_detector.config.backbone_kwargs)
    new.set_references([rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(2)])
    new.config.image_threshold = 0.5
    new_map = new.predict(x, mode="head").anomaly_map
    real_replace = os.replace
    outcomes = []
    for fail_at in range(10):
        d = tmp_path / f"m{fail_at}"
        d.mkdir()
        for p in old_dir.iterdir():
            (d / p.name).write_bytes(p.read_bytes())
        calls = []

        def replace(src, dst, fail_at=fail_at, calls=calls):
            calls.append(dst)
            if len(calls) > fail_at:
                raise OSError("injected: killed before this rename")
            real_replace(src, dst)

        monkeypatch.setattr(atomic.os, "replace", replace)
        try:
            new.save_pretrained(d)
            monkeypatch.setattr(atomic.os, "replace", real_replace)
            break  # every rename done: the save completed
        except OSError:
            pass
        monkeypatch.setattr(atomic.os, "replace", real_replace)
        try:
            det = AnomalyDetector.from_pretrained(d, device="cpu")
        except WeightsError as exc:
            assert "interrupted save_pretrained" in str(exc)
            outcomes.append("refused")
            continue
        if det.config.image_threshold is None:
            assert det.references is None
            np.testing.assert_array_equal(det.predict(x, mode="head").anomaly_map, old_map)
            outcomes.append("old")
        else:  # the config was in place: only the model card was missing
            assert det.references is not None and det.config.image_threshold == 0.5
            np.testing.assert_array_equal(det.predict(x, mode="head").anomaly_map, new_map)
            outcomes.append("new")
    assert outcomes[0] == "old" and "refused" in outcomes  # every mixed directory was caught
    done = AnomalyDetector.from_pretrained(tmp_path / f"m{len(outcomes)}", device="cpu")
    assert done.config.image_threshold == 0.5 and done.references is not None
