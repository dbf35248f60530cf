"""An independent, deliberately literal re-implementation of the authors' inference (method doc §1-§5).

It shares no code with ``visualad.model``: it reads the authors' checkpoint dict with *their* key names,
runs an open_clip image tower by calling its own modules (``conv1``, ``ln_pre``, each resblock, ``ln_post``),
computes SCA separately for each token (Q/K/V twice, as the authors do), applies SAF to the whole sequence
and slices ``[:, 3:]``, upsamples EVERY layer to the image size before summing, smooths each map on the
host with ``scipy.ndimage.gaussian_filter`` and takes the mean of the top ceil(1%) pixels. Slow on purpose:
it is the yardstick the package is compared against.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def _sca_params(ckpt: Mapping[str, Any], layer: int) -> Dict[str, torch.Tensor]:
    prefix = f"layer_attentions.layer_{layer}."
    return {k[len(prefix):]: v.float() for k, v in ckpt["cross_attn"].items() if k.startswith(prefix)}


def _sca_one_token(p: Dict[str, torch.Tensor], token: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """SpatialBottleneckAttention for ONE token t [B, C] over one layer's patches [B, N, C] (doc §3.3)."""
    b, n, c = patches.shape
    anchors = p["anchor_queries"].unsqueeze(0).expand(b, -1, -1)  # [B, m, C]
    q = F.layer_norm(anchors @ p["q_proj.weight"].T, (c,), p["q_norm.weight"], p["q_norm.bias"], eps=1e-5)
    k = F.layer_norm((patches + p["pos_encoding"][:, :n, :]) @ p["k_proj.weight"].T, (c,),
                     p["k_norm.weight"], p["k_norm.bias"], eps=1e-5)
    v = patches @ p["v_proj.weight"].T
    att = torch.softmax((q @ k.transpose(1, 2)) / math.sqrt(c), dim=-1)  # [B, m, N]; dropout is off at test
    z_anchors = att @ v  # [B, m, C]
    gate = torch.sigmoid(token @ p["gate.0.weight"].T + p["gate.0.bias"])  # [B, m]
    z = (gate.unsqueeze(-1) * z_anchors).sum(dim=1)  # [B, C]
    out = z @ p["out_proj.weight"].T + p["out_proj.bias"]
    return token + p["res_scale"] * out


def _saf(ckpt: Mapping[str, Any], layer: int, x: torch.Tensor) -> torch.Tensor:
    """FeatureTransformMLP: Linear -> exact GELU -> (Dropout) -> Linear -> (Dropout) (doc §4)."""
    w = ckpt["layer_transforms"][f"layer_{layer}"]
    h = F.gelu(x @ w["mlp.0.weight"].float().T + w["mlp.0.bias"].float())
    return h @ w["mlp.3.weight"].float().T + w["mlp.3.bias"].float()


@torch.no_grad()
def reference_layer_maps(ckpt: Mapping[str, Any], visual: torch.nn.Module, images: torch.Tensor,
                         use_checkpoint_ln_post: bool = False) -> Dict[int, torch.Tensor]:
    """Per-layer maps upsampled to the input size: {layer: [B, S, S]} (doc §2 pseudo-code and §5)."""
    visual = visual.eval()
    features_list = [int(x) for x in ckpt["features_list"]]
    b, _, size, _ = images.shape
    # patch embedding
    x = visual.conv1(images)  # [B, C, g, g]
    c, gh, gw = x.shape[1], x.shape[2], x.shape[3]
    x = x.reshape(b, c, gh * gw).permute(0, 2, 1)  # [B, N, C]
    # positions: CLS row kept, the native grid resized bilinearly to (gh, gw)
    pos = visual.positional_embedding
    side = int(round(math.sqrt(pos.shape[0] - 1)))
    grid = pos[1:].reshape(1, side, side, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(gh * gw, c)
    cls_pos = pos[0:1]
    # [t_a, t_n, CLS, patches], both tokens at the CLS position
    t_a = ckpt["anomaly_token"].float().reshape(1, 1, c).expand(b, 1, c)
    t_n = ckpt["normal_token"].float().reshape(1, 1, c).expand(b, 1, c)
    cls = visual.class_embedding.reshape(1, 1, c).expand(b, 1, c)
    x = torch.cat([t_a, t_n, cls, x], dim=1)
    x = x + torch.cat([cls_pos, cls_pos, cls_pos, patch_pos], dim=0).unsqueeze(0)
    x = visual.ln_pre(x)
    # the frozen blocks, called as modules, collecting the 1-based layers of features_list
    collected = {}
    for i, block in enumerate(visual.transformer.resblocks, start=1):
        x = block(x)
        if i in features_list:
            collected[i] = x
    if use_checkpoint_ln_post:
        def ln_post(t: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(t, (c,), ckpt["ln_post_weight"].float(), ckpt["ln_post_bias"].float(),
                                eps=visual.ln_post.eps)
    else:
        ln_post = visual.ln_post
    tok_a = ln_post(x[:, 0])
    tok_n = ln_post(x[:, 1])
    maps = {}
    for layer in features_list:
        h = ln_post(collected[layer])  # all tokens
        patches = h[:, 3:, :]
        aligned = _saf(ckpt, layer, h)[:, 3:, :]
        p = _sca_params(ckpt, layer)
        a_l = _sca_one_token(p, tok_a, patches)
        n_l = _sca_one_token(p, tok_n, patches)
        s = (F.cosine_similarity(aligned, a_l.unsqueeze(1), dim=-1, eps=1e-8)
             - F.cosine_similarity(aligned, n_l.unsqueeze(1), dim=-1, eps=1e-8))  # [B, N]
        s = s.reshape(b, 1, gh, gw)
        maps[layer] = F.interpolate(s, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return maps


def reference_predict(ckpt: Mapping[str, Any], visual: torch.nn.Module, images: torch.Tensor,
                      use_checkpoint_ln_post: bool = False, sigma: float = 4.0,
                      topk_ratio: float = 0.01) -> Tuple[np.ndarray, np.ndarray]:
    """Smoothed fused maps [B, S, S] (float32, host) and top-1% mean scores [B] for normalised images."""
    maps = reference_layer_maps(ckpt, visual, images, use_checkpoint_ln_post)
    fused = sum(maps.values()).cpu().numpy().astype(np.float32)  # SUM over layers, at full size
    smoothed = np.stack([gaussian_filter(m, sigma=sigma) for m in fused]).astype(np.float32)
    k = math.ceil(topk_ratio * smoothed.shape[1] * smoothed.shape[2])
    scores = np.array([np.sort(m.ravel())[-k:].mean() for m in smoothed], dtype=np.float32)
    return smoothed, scores
