"""Converting the authors' checkpoints: every writer's key layout, refusals, and parity with a literal
re-implementation of their inference (tests/reference_visualad.py) on a tiny open_clip tower."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP
from reference_visualad import reference_predict

from visualad.modes.head import HeadMode
from visualad import AnomalyDetector
from visualad.errors import OfflineError, WeightsError
from visualad.weights.official import (
    convert_official,
    official_model_dir,
    official_to_head_state,
    read_official_checkpoint,
)
from visualad.weights.safe import load_safetensors

LAYERS = [1, 3, 4]  # a subset of the 4 tiny blocks, so the layer mapping is exercised
CKPT_SIZE = 96  # the checkpoint's image_size: a 6x6 grid from the tower's native 4x4, as 518 from 336
MAX_PATCHES = 40  # SCA position rows (36 used at 96 px)


# --- a checkpoint in the authors' exact layout (method doc §6.5) ----------------------------------------------
def make_official_checkpoint(dim: int, layers, *, anchors: int = 4, max_patches: int = 1536, hidden=None,
                             image_size: int = 518, seed: int = 0, writer: str = "current",
                             empty: bool = False) -> dict:
    """Random tensors under the authors' key names; ``writer="old"`` adds the pre-7943842 extras."""
    g = torch.Generator().manual_seed(seed)
    hidden = hidden or dim

    def rnd(*shape, scale=1.0, offset=0.0):
        if empty:
            return torch.empty(*shape)
        return torch.randn(*shape, generator=g) * scale + offset

    s = dim ** -0.5
    cross = {}
    transforms = {}
    for layer in layers:
        p = f"layer_attentions.layer_{layer}."
        cross.update({
            p + "anchor_queries": rnd(anchors, dim),
            p + "pos_encoding": rnd(1, max_patches, dim, scale=0.3),
            p + "q_proj.weight": rnd(dim, dim, scale=s),
            p + "k_proj.weight": rnd(dim, dim, scale=s),
            p + "v_proj.weight": rnd(dim, dim, scale=s),
            p + "q_norm.weight": rnd(dim, scale=0.1, offset=1.0),
            p + "q_norm.bias": rnd(dim, scale=0.1),
            p + "k_norm.weight": rnd(dim, scale=0.1, offset=1.0),
            p + "k_norm.bias": rnd(dim, scale=0.1),
            p + "gate.0.weight": rnd(anchors, dim, scale=s),
            p + "gate.0.bias": rnd(anchors, scale=0.5),
            p + "out_proj.weight": rnd(dim, dim, scale=s),
            p + "out_proj.bias": rnd(dim, scale=0.1),
            p + "res_scale": rnd(1, scale=0.1, offset=0.5),
        })
        transforms[f"layer_{layer}"] = {
            "mlp.0.weight": rnd(hidden, dim, scale=s), "mlp.0.bias": rnd(hidden, scale=0.1),
            "mlp.3.weight": rnd(dim, hidden, scale=hidden ** -0.5), "mlp.3.bias": rnd(dim, scale=0.1),
        }
    ckpt = {
        "anomaly_token": rnd(dim, scale=0.5),
        "normal_token": rnd(dim, scale=0.5),
        "ln_post_weight": rnd(dim, scale=0.3, offset=1.0),
        "ln_post_bias": rnd(dim, scale=0.3),
        "features_list": list(layers),
        "image_size": image_size,
        "epoch": 1,
        "backbone": "ViT-L/14@336px",
        "layer_transforms": transforms,
        "transform_type": "mlp",
        "cross_attn": cross,
        "cross_attn_config": {"num_anchors": anchors, "dropout": 0.1, "res_scale_init": 0.01},
    }
    if writer == "old":
        ckpt.update(token_insert_layer=0, proj=None, use_1024_dim=True,
                    transform_config={"type": "mlp", "hidden_ratio": 1.0, "dropout": 0.1})
        ckpt["cross_attn_config"] = dict(ckpt["cross_attn_config"], apply_to_layer24=True)
    return ckpt


def tiny_tower(seed: int = 0) -> torch.nn.Module:
    """The tiny open_clip image tower of TINY_CLIP, with random weights (layer norms too)."""
    import open_clip
    from open_clip.model import _build_vision_tower

    torch.manual_seed(seed)
    cfg = open_clip.get_model_config("ViT-B-32")
    tower = _build_vision_tower(cfg["embed_dim"], dict(cfg["vision_cfg"], **TINY_CLIP["backbone_kwargs"]))
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return tower.eval()


def save_clip_state(tower: torch.nn.Module, path) -> None:
    """A full-CLIP-style state dict (``visual.*`` keys plus a text-tower key the loader must skip)."""
    from safetensors.torch import save_file

    sd = {f"visual.{k}": v.detach().clone().contiguous() for k, v in tower.state_dict().items()}
    sd["token_embedding.weight"] = torch.zeros(8, 4)
    save_file(sd, str(path))


DIM = TINY_CLIP["backbone_kwargs"]["width"]
TINY_OVERRIDES = {"backbone_kwargs": TINY_CLIP["backbone_kwargs"]}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A checkpoint file, the tower it runs on, its weights file and the default conversion."""
    root = tmp_path_factory.mktemp("official")
    ckpt = make_official_checkpoint(DIM, LAYERS, max_patches=MAX_PATCHES, image_size=CKPT_SIZE, seed=1)
    ckpt_path = root / "CLIP.pth"
    torch.save(ckpt, ckpt_path)
    tower = tiny_tower()
    bb_path = root / "open_clip_model.safetensors"
    save_clip_state(tower, bb_path)
    out = convert_official(ckpt_path, root / "converted", backbone=TINY_CLIP["backbone"],
                           backbone_weights=bb_path, **TINY_OVERRIDES)
    return {"root": root, "ckpt": ckpt, "ckpt_path": ckpt_path, "tower": tower, "bb_path": bb_path, "dir": out}


def _images(n: int = 2, size: int = CKPT_SIZE, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- parity ----------------------------------------------------------------------------------------------------
def test_converted_model_matches_the_reference_implementation(tiny_setup):
    det = AnomalyDetector.from_pretrained(tiny_setup["dir"], device="cpu")
    cfg = det.config
    assert cfg.image_size == CKPT_SIZE and list(cfg.layers) == LAYERS
    assert cfg.sca_max_patches == MAX_PATCHES and cfg.num_anchors == 4 and cfg.saf_hidden_ratio == 1.0
    assert cfg.train_final_norm is False
    x = _images()
    maps, scores = det.model.predict_maps(x)
    ref_maps, ref_scores = reference_predict(tiny_setup["ckpt"], tiny_setup["tower"], x)
    assert maps.shape == ref_maps.shape == (2, CKPT_SIZE, CKPT_SIZE)
    assert np.abs(maps.numpy() - ref_maps).max() < 1e-4
    assert np.abs(scores.numpy() - ref_scores).max() < 1e-4
    assert ref_maps.std() > 1e-2 and abs(ref_scores[0] - ref_scores[1]) > 1e-4  # not a degenerate comparison


def test_parity_through_forward_images_at_the_model_input(tiny_setup):
    """The uint8 path: the detector's own normalisation, then the same numbers as the reference."""
    det = AnomalyDetector.from_pretrained(tiny_setup["dir"], device="cpu", dtype="fp32")
    arrays = [np.random.default_rng(i).integers(0, 256, (CKPT_SIZE, CKPT_SIZE, 3), dtype=np.uint8) for i in (0, 1)]
    maps, scores = det.engine.score_arrays(arrays, HeadMode())
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(det.model.backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(det.model.backbone.std).view(1, 3, 1, 1)
    ref_maps, ref_scores = reference_predict(tiny_setup["ckpt"], tiny_setup["tower"], (x - mean) / std)
    assert np.abs(maps - ref_maps).max() < 1e-4
    assert np.abs(scores - ref_scores).max() < 1e-4


def test_converted_directory_contents_and_provenance(tiny_setup):
    d = tiny_setup["dir"]
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "backbone.safetensors", "config.json",
                                                   "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert d.stat().st_mode & 0o777 == 0o777 & ~umask  # like mkdir, not mkdtemp's 0700
    state = load_safetensors(d / "model.safetensors")
    assert not any(k.startswith(("final_norm.", "encoder.backbone.")) for k in state)  # ln_post not loaded
    assert torch.equal(state["sca.layer_3.gate.weight"],
                       tiny_setup["ckpt"]["cross_attn"]["layer_attentions.layer_3.gate.0.weight"])
    meta = json.loads((d / "config.json").read_text())["metadata"]
    import hashlib

    assert meta["source_sha256"] == hashlib.sha256(tiny_setup["ckpt_path"].read_bytes()).hexdigest()
    assert meta["backbone"] == TINY_CLIP["backbone"] and meta["ln_post"].startswith("pretrained")
    assert "LICENSE" in meta["license"] and meta["source_epoch"] == 1
    bb = load_safetensors(d / "backbone.safetensors")  # the tower alone, in open_clip's own naming
    assert "conv1.weight" in bb and not any(k.startswith(("visual.", "token_embedding")) for k in bb)
    assert torch.equal(bb["conv1.weight"], tiny_tower().conv1.weight)
    assert not list(tiny_setup["root"].glob(".converted*"))  # no temporary directory left behind


def test_converted_backbone_file_is_listed_and_verified_at_load(tiny_setup, tmp_path):
    import shutil

    d = shutil.copytree(tiny_setup["dir"], tmp_path / "copy")
    files = json.loads((d / "config.json").read_text())["files"]
    assert sorted(files) == ["backbone.safetensors", "model.safetensors"]
    import hashlib

    assert files["backbone.safetensors"] == hashlib.sha256((d / "backbone.safetensors").read_bytes()).hexdigest()
    AnomalyDetector.from_pretrained(d, device="cpu")  # loads as written
    raw = bytearray((d / "backbone.safetensors").read_bytes())
    raw[-1] ^= 0xFF  # one byte of a weight changed
    (d / "backbone.safetensors").write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="backbone.safetensors does not match the digest"):
        AnomalyDetector.from_pretrained(d, device="cpu")


def test_load_final_norm_uses_the_checkpoint_ln_post(tiny_setup, tmp_path):
    out = convert_official(tiny_setup["ckpt_path"], tmp_path / "with-ln", backbone=TINY_CLIP["backbone"],
                           backbone_weights=tiny_setup["bb_path"], load_final_norm=True, **TINY_OVERRIDES)
    det = AnomalyDetector.from_pretrained(out, device="cpu")
    assert det.config.train_final_norm is True
    state = load_safetensors(out / "model.safetensors")
    assert torch.equal(state["final_norm.weight"], tiny_setup["ckpt"]["ln_post_weight"])
    assert json.loads((out / "config.json").read_text())["metadata"]["ln_post"].startswith("checkpoint")
    x = _images()
    maps, scores = det.model.predict_maps(x)
    ref_maps, ref_scores = reference_predict(tiny_setup["ckpt"], tiny_setup["tower"], x, use_checkpoint_ln_post=True)
    assert np.abs(maps.numpy() - ref_maps).max() < 1e-4
    assert np.abs(scores.numpy() - ref_scores).max() < 1e-4
    default_maps, _ = reference_predict(tiny_setup["ckpt"], tiny_setup["tower"], x)
    assert np.abs(ref_maps - default_maps).max() > 1e-2


def test_converting_into_an_existing_directory_replaces_its_files(tiny_setup, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "backbone.safetensors").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    convert_official(tiny_setup["ckpt_path"], out, backbone=TINY_CLIP["backbone"], **TINY_OVERRIDES)
    assert not (out / "backbone.safetensors").exists()  # a stale backbone from another conversion is dropped
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".model*"))


# --- key variants ----------------------------------------------------------------------------------------------
def _variant(ckpt: dict, kind: str) -> dict:
    c = dict(ckpt)
    if kind == "old":
        c.update(token_insert_layer=0, proj=None, use_1024_dim=True, transform_config={"type": "mlp"},
                 something_new={"x": 1})
        c["cross_attn_config"] = dict(c["cross_attn_config"], apply_to_layer24=True)
    elif kind == "dataparallel":
        c["cross_attn"] = {"module." + k: v for k, v in c["cross_attn"].items()}
        c["layer_transforms"] = {k: {"module." + n: t for n, t in v.items()} for k, v in c["layer_transforms"].items()}
    elif kind == "no-prefix":
        c["cross_attn"] = {k[len("layer_attentions."):]: v for k, v in c["cross_attn"].items()}
    elif kind == "flat-transforms":
        c["layer_transforms"] = {f"{k}.{n}": t for k, v in c["layer_transforms"].items() for n, t in v.items()}
    elif kind == "no-config":
        del c["cross_attn_config"], c["features_list"], c["epoch"], c["backbone"]
    return c


@pytest.mark.parametrize("kind", ["current", "old", "dataparallel", "no-prefix", "flat-transforms", "no-config"])
def test_every_writer_variant_converts_to_the_same_head(kind, tmp_path):
    base = make_official_checkpoint(DIM, LAYERS, max_patches=MAX_PATCHES, image_size=CKPT_SIZE, seed=2)
    path = tmp_path / "CLIP.pth"
    torch.save(_variant(base, kind), path)  # through the real file: weights_only must accept every writer's types
    state, overrides = official_to_head_state(read_official_checkpoint(path))
    ref_state, ref_overrides = official_to_head_state(base)
    assert sorted(state) == sorted(ref_state)
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    if kind == "no-config":
        ref_overrides = {k: v for k, v in ref_overrides.items() if k not in ("sca_dropout", "sca_res_scale_init")}
    assert overrides == ref_overrides
    assert overrides["layers"] == tuple(LAYERS) and overrides["image_size"] == CKPT_SIZE
    assert overrides["train_final_norm"] is False and "final_norm.weight" not in state


def test_old_writer_checkpoint_converts_and_loads(tiny_setup, tmp_path):
    path = tmp_path / "old.pth"
    torch.save(_variant(tiny_setup["ckpt"], "old"), path)
    out = convert_official(path, tmp_path / "old", backbone=TINY_CLIP["backbone"],
                           backbone_weights=tiny_setup["bb_path"], **TINY_OVERRIDES)
    det = AnomalyDetector.from_pretrained(out, device="cpu")
    maps, _ = det.model.predict_maps(_images(1))
    ref, _ = reference_predict(tiny_setup["ckpt"], tiny_setup["tower"], _images(1))
    assert np.abs(maps.numpy() - ref).max() < 1e-4


# --- refusals --------------------------------------------------------------------------------------------------
def test_missing_keys_are_named():
    ckpt = make_official_checkpoint(DIM, LAYERS, max_patches=MAX_PATCHES, image_size=CKPT_SIZE)
    del ckpt["normal_token"]
    del ckpt["cross_attn"]["layer_attentions.layer_3.gate.0.bias"]
    del ckpt["layer_transforms"]["layer_4"]["mlp.3.weight"]
    with pytest.raises(WeightsError) as info:
        official_to_head_state(ckpt)
    msg = str(info.value)
    assert "normal_token" in msg
    assert "layer_attentions.layer_3.gate.0.bias" in msg
    assert "layer_4" in msg and "mlp.3.weight" in msg
    assert "layer_1" not in msg  # only what is missing


def test_missing_ln_post_is_an_error_only_when_asked_for():
    ckpt = make_official_checkpoint(DIM, LAYERS, max_patches=MAX_PATCHES)
    del ckpt["ln_post_weight"], ckpt["ln_post_bias"]
    official_to_head_state(ckpt)  # default: not needed
    with pytest.raises(WeightsError, match="ln_post_weight.*ln_post_bias"):
        official_to_head_state(ckpt, load_final_norm=True)


def test_missing_layer_is_named():
    ckpt = make_official_checkpoint(DIM, LAYERS, max_patches=MAX_PATCHES)
    ckpt["features_list"] = LAYERS + [5]
    with pytest.raises(WeightsError, match=r"layer_attentions\.layer_5\.anchor_queries"):
        official_to_head_state(ckpt)


def test_layers_that_disagree_with_the_checkpoint_are_refused(tiny_setup, tmp_path):
    with pytest.raises(WeightsError, match="trained on layers"):
        convert_official(tiny_setup["ckpt_path"], tmp_path / "x", backbone=TINY_CLIP["backbone"],
                         layers=[2, 3, 4], **TINY_OVERRIDES)
    assert not (tmp_path / "x").exists()


def test_wrong_backbone_weights_are_refused_and_nothing_is_written(tiny_setup, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(WeightsError, match="missing keys"):
        convert_official(tiny_setup["ckpt_path"], tmp_path / "out", backbone=TINY_CLIP["backbone"],
                         backbone_weights=bad, **TINY_OVERRIDES)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_lfs_pointer_is_refused(tmp_path):
    path = tmp_path / "CLIP.pth"
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:"
                     b"fed8ed5e0973e9adb53a2c91e066eb5ba3f9a42fbf80f115a26998629d1f0a5b\nsize 126119090\n")
    with pytest.raises(WeightsError, match="Git LFS pointer") as info:
        read_official_checkpoint(path)
    assert str(path) in str(info.value)


_UNPICKLED = []


class _Payload:
    """Would run code if a full unpickle ever happened."""

    def __reduce__(self):
        return (_UNPICKLED.append, ("ran",))


def test_unsafe_pickle_is_refused_without_fallback(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"anomaly_token": _Payload()}, fh, protocol=2)
    torch.save({"anomaly_token": torch.zeros(2), "x": _Payload()}, tmp_path / "evil2.pth")
    _UNPICKLED.clear()
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(WeightsError, match="weights_only=True") as info:
            read_official_checkpoint(p)
        assert str(p) in str(info.value)
    assert _UNPICKLED == []


def test_garbage_and_missing_files_are_weights_errors(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00\x01not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="junk.pth"):
        read_official_checkpoint(junk)
    with pytest.raises(WeightsError, match="not found"):
        read_official_checkpoint(tmp_path / "nope.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="dict"):
        read_official_checkpoint(tmp_path / "list.pth")


def test_reading_a_pickle_logs_a_warning(tiny_setup, caplog):
    with caplog.at_level("WARNING", logger="visualad.weights.official"):
        read_official_checkpoint(tiny_setup["ckpt_path"])
    assert any("pickle" in r.getMessage() for r in caplog.records)


# --- download through the manifest path (fake GitHub/LFS host on 127.0.0.1) ------------------------------------
def test_official_model_dir_downloads_converts_and_caches(tiny_setup, fake_hub, tmp_path):
    import hashlib
    import shutil

    from visualad.weights import resolve

    data = tiny_setup["ckpt_path"].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    url = fake_hub.add_url("7HHHHH/VisualAD/raw/abc/weight/train_on_visa/CLIP.pth", data)
    entry = {
        "name": "tiny-official",
        "backbone": TINY_CLIP["backbone"],
        "head": {"type": "official", "url": url, "sha256": sha, "size": len(data), "repo": "7HHHHH/VisualAD",
                 "commit": "abc", "path": "weight/train_on_visa/CLIP.pth"},
        "config": {"backbone": TINY_CLIP["backbone"], "image_size": CKPT_SIZE, "layers": LAYERS,
                   "train_final_norm": False, **TINY_OVERRIDES},
        "license": "test licence",
    }
    cache = tmp_path / "cache"
    # offline and not cached: a clear error, nothing written
    with pytest.raises(OfflineError):
        official_model_dir("tiny-official", entry, cache_dir=cache, local_files_only=True)
    assert not (cache / "converted").exists() or not any((cache / "converted").iterdir())

    out = resolve._from_entry(entry, None, cache, None, None)  # the manifest's "official" dispatch
    assert out == cache / "converted" / f"tiny-official-{sha[:12]}"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert [p.name for p in (cache / "converted").iterdir()] == [out.name]  # no temporary directory left
    meta = json.loads((out / "config.json").read_text())["metadata"]
    assert meta["source_sha256"] == sha and meta["source_url"] == url and meta["license"] == "test licence"
    state, _ = official_to_head_state(tiny_setup["ckpt"])
    saved = load_safetensors(out / "model.safetensors")
    assert sorted(saved) == sorted(state) and all(torch.equal(saved[k], state[k]) for k in state)

    # cached: no request at all, even offline
    n = fake_hub.count()
    assert official_model_dir("tiny-official", entry, cache_dir=cache, local_files_only=True) == out
    assert fake_hub.count() == n

    # a backbone file slipped in beside the config is not in its digest list: refused, never loaded unchecked
    shutil.copy(tiny_setup["dir"] / "backbone.safetensors", out / "backbone.safetensors")
    with pytest.raises(WeightsError, match="not listed in config.json"):
        AnomalyDetector.from_pretrained(out, device="cpu")


def test_official_model_dir_refuses_a_corrupted_download(tiny_setup, fake_hub, tmp_path):
    import hashlib

    data = tiny_setup["ckpt_path"].read_bytes()
    url = fake_hub.add_url("x/CLIP.pth", data, mode="corrupt")
    entry = {"name": "t", "backbone": TINY_CLIP["backbone"],
             "head": {"type": "official", "url": url, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)},
             "config": {"backbone": TINY_CLIP["backbone"], **TINY_OVERRIDES}}
    with pytest.raises(WeightsError, match="sha256"):
        official_model_dir("t", entry, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "converted").exists() or not any((tmp_path / "cache" / "converted").iterdir())


# --- the real configuration ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_vit_l_head_has_the_papers_parameter_count_and_maps_from_the_checkpoint():
    det = AnomalyDetector.from_backbone("clip-l", device="cpu", pretrained_backbone=False)
    model = det.model
    assert model.config.image_size == 518 and model.config.layers == (6, 12, 18, 24)
    assert model.config.sca_max_patches == 1536
    assert sum(p.numel() for _, p in model.head_parameters()) == 31_522_836  # method doc §6.4
    # a full-size checkpoint (shapes only) maps exactly onto the head, ln_post included
    ckpt = make_official_checkpoint(1024, [6, 12, 18, 24], empty=True)
    state, overrides = official_to_head_state(ckpt, load_final_norm=True)
    own = model.head_state_dict()
    assert sorted(state) == sorted(own)
    assert all(tuple(state[k].shape) == tuple(own[k].shape) for k in own)
    assert sum(v.numel() for v in state.values()) == 31_522_836
    assert overrides == {"layers": (6, 12, 18, 24), "num_anchors": 4, "sca_max_patches": 1536,
                         "saf_hidden_ratio": 1.0, "train_final_norm": True, "image_size": 518,
                         "sca_dropout": 0.1, "sca_res_scale_init": 0.01}
    for v in state.values():
        v.zero_()  # torch.empty may hold NaN bit patterns, which the loader refuses
    model.load_head_state_dict(state)
