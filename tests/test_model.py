"""The network computes the method's function: backbone parity, sizes, ranges, scoring, save/load."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP, TINY_TIMM

from visualad.config import VisualADConfig, default_layers
from visualad.errors import ConfigError
from visualad.model import VisualAD, build_backbone, scoring
from visualad.model.tokens import TokenInsertedViT


def _timm_reference(vit, x, indices):
    out = vit.forward_intermediates(x, indices=indices, return_prefix_tokens=True, norm=False,
                                    output_fmt="NLC", intermediates_only=True)
    return [torch.cat([prefix, spatial], dim=1) for spatial, prefix in out]


@pytest.mark.parametrize("model", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
@pytest.mark.parametrize("size", [56, 84])  # native grid 4x4, and resized to 6x6
def test_timm_forward_without_tokens_matches_forward_intermediates(model, size):
    torch.manual_seed(0)
    bb = build_backbone(f"timm:{model}", {"depth": 4, "embed_dim": 48, "num_heads": 3, "img_size": 56})
    enc = TokenInsertedViT(bb, (1, 2, 3, 4))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours, last = enc(x, with_tokens=False)
        ref = _timm_reference(bb.vit, x, [0, 1, 2, 3])
    assert bb.num_prefix_tokens == (5 if "reg4" in model else 1)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape == (2, bb.num_prefix_tokens + (size // 14) ** 2, 48)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(last, ref[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [64, 96])  # native grid 4x4, and resized to 6x6
def test_open_clip_forward_without_tokens_matches_visual_tower(size):
    import open_clip
    from open_clip.model import _build_vision_tower

    torch.manual_seed(0)
    bb = build_backbone(TINY_CLIP["backbone"], TINY_CLIP["backbone_kwargs"])
    enc = TokenInsertedViT(bb, (1, 2, 3, 4))
    # the library's own tower at `size`, with the same weights and our (bilinear) resized positions
    cfg = open_clip.get_model_config("ViT-B-32")
    ref_tower = _build_vision_tower(cfg["embed_dim"], dict(cfg["vision_cfg"], **{**TINY_CLIP["backbone_kwargs"],
                                                                               "image_size": size}))
    sd = bb.visual.state_dict()
    sd["positional_embedding"] = _bilinear_positions(sd["positional_embedding"], 4, size // 16)
    ref_tower.load_state_dict(sd)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours, _ = enc(x, with_tokens=False)
        ref = ref_tower.forward_intermediates(x, indices=[0, 1, 2, 3], output_fmt="NLC", intermediates_only=True,
                                              output_extra_tokens=True)
    for a, spatial, prefix in zip(ours, ref["image_intermediates"], ref["image_intermediates_prefix"]):
        torch.testing.assert_close(a, torch.cat([prefix, spatial], dim=1), atol=1e-5, rtol=0)


def _bilinear_positions(pos, old, new):
    """The authors' resize (method doc §1.1): bilinear, align_corners=False, no antialias, CLS row kept."""
    grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(new, new), mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], grid[0].flatten(1).T])


def test_open_clip_positions_are_resized_bilinearly_and_tokens_get_the_cls_one():
    bb = build_backbone(TINY_CLIP["backbone"], TINY_CLIP["backbone_kwargs"])
    zeros = torch.zeros(1, 3, 96, 96)
    with torch.no_grad():
        seq, token_pos = bb.embed(zeros)
        patches = bb.visual.conv1(zeros).flatten(2)[0].T
    pos = _bilinear_positions(bb.visual.positional_embedding.detach(), 4, 6)
    torch.testing.assert_close(seq[0, 1:] - patches, pos[1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(token_pos, bb.visual.positional_embedding[0])


def test_tokens_are_inserted_before_cls_with_the_cls_position():
    torch.manual_seed(0)
    bb = build_backbone(TINY_TIMM["backbone"], TINY_TIMM["backbone_kwargs"])
    enc = TokenInsertedViT(bb, (4,))
    seen = {}
    bb.vit.norm_pre.register_forward_hook(lambda m, i, o: seen.setdefault("seq", i[0]))
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        enc(x)
    seq = seen["seq"]
    assert seq.shape[1] == 2 + 1 + 16
    cls_pos = bb.vit.pos_embed[0, 0]
    torch.testing.assert_close(seq[0, 0], enc.anomaly_token + cls_pos)
    torch.testing.assert_close(seq[0, 1], enc.normal_token + cls_pos)
    torch.testing.assert_close(seq[0, 2], bb.vit.cls_token[0, 0] + cls_pos)


def test_clip_l_518_has_the_papers_trainable_parameter_count():
    with torch.device("meta"):
        bb = build_backbone("clip-l")
        cfg = VisualADConfig(backbone="clip-l").resolved(bb.depth, bb.patch_size, 518)
        model = VisualAD(cfg, bb)
    assert cfg.layers == (6, 12, 18, 24) and cfg.image_size == 518 and cfg.sca_max_patches == 1536
    assert bb.embed_dim == 1024 and bb.depth == 24
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 31_522_836
    assert sum(p.numel() for _, p in model.head_parameters()) == 31_522_836


def test_default_layers_scale_with_depth():
    assert default_layers(24) == (6, 12, 18, 24)
    assert default_layers(12) == (3, 6, 9, 12)
    assert default_layers(4) == (1, 2, 3, 4)


def test_map_ranges_and_topk_count(tiny_detector):
    model = tiny_detector.model
    # push the maps to their extremes: random tokens far apart
    with torch.no_grad():
        model.encoder.anomaly_token.normal_(0, 5)
        model.encoder.normal_token.copy_(-model.encoder.anomaly_token)
    x = torch.randn(3, 3, 56, 56) * 3
    with torch.no_grad():
        out = model(x)
        raw = model.fused_map(out, smooth=False)
    n_layers = len(model.config.layers)
    assert out.layer_maps.shape == (3, n_layers, 4, 4)
    assert out.layer_maps.abs().max() <= 2 + 1e-6
    assert raw.shape == (3, 56, 56)
    assert raw.abs().max() <= 2 * n_layers + 1e-5
    assert scoring.topk_count(0.01, 518 * 518) == 2684 == math.ceil(0.01 * 518 * 518)
    assert scoring.topk_count(0.01, 56 * 56) == 32
    assert scoring.topk_count(0.01, 100 * 100) == 100  # exact multiple: no round-off to 101


def test_fused_map_equals_upsample_each_layer_then_sum(tiny_detector):
    model = tiny_detector.model
    with torch.no_grad():
        out = model(torch.randn(2, 3, 56, 56))
        per_layer = scoring.upsample(out.layer_maps, 56).sum(dim=1)
        fused = model.fused_map(out, smooth=False)
    torch.testing.assert_close(fused, per_layer, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape,sigma", [((2, 56, 56), 4.0), ((1, 20, 31), 4.0), ((1, 9, 9), 2.5), ((1, 64, 48), 1.0)])
def test_gaussian_blur_equals_scipy(shape, sigma):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    maps = rng.normal(size=shape).astype(np.float32)
    ours = scoring.gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    for m, o in zip(maps, ours):
        np.testing.assert_allclose(o, gaussian_filter(m, sigma=sigma), atol=1e-5, rtol=0)


def test_blur_and_upsample_stay_float32_inside_bf16_autocast():
    """Autocast would run the blur's convolutions in bf16 and quantise the map to ~3 digits."""
    grids = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 5
    exact = scoring.gaussian_blur(scoring.upsample(grids, 56)[:, 0], 4.0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = scoring.gaussian_blur(scoring.upsample(grids, 56)[:, 0], 4.0)
    assert under.dtype == torch.float32
    assert torch.equal(under, exact)


def test_image_score_is_topk_mean_of_smoothed_map(tiny_detector):
    model = tiny_detector.model
    x = torch.randn(2, 3, 56, 56)
    fused, scores = model.predict_maps(x)
    k = scoring.topk_count(0.01, 56 * 56)
    expected = torch.sort(fused.flatten(1), dim=1, descending=True).values[:, :k].mean(1)
    torch.testing.assert_close(scores, expected)


def test_config_checks():
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        VisualADConfig(image_size=100).resolved(12, 14, 518)
    with pytest.raises(ConfigError, match="exceed the backbone depth"):
        VisualADConfig(layers=(3, 13)).resolved(12, 14, 518)
    with pytest.raises(ConfigError, match="SCA position table"):
        VisualADConfig(image_size=560, sca_max_patches=1536).resolved(24, 14, 518)
    with pytest.raises(ConfigError, match="unknown config keys"):
        VisualADConfig.from_dict({"bogus": 1})
