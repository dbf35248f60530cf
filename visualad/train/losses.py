"""The paper's training losses (method doc §6.2), vectorised and on the device.

``L = Σ_layers (focal + dice) + BCE(top-1% mean of the raw fused map, label) + token hinge``, all weights 1.
Everything is computed in float32 whatever the autocast dtype of the forward, because the per-pixel
probabilities live in a narrow band ([0.119, 0.881], the sigmoid of a bounded cosine difference) where
bf16 rounding would swamp the gradients.

``seg_weight`` (one 0/1 per image) lets an anomalous image without a pixel mask still teach the image
logit while staying out of focal and dice; with every weight 1 the formulas are exactly the authors'.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..model import scoring


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5,
               weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """AnomalyCLIP's focal loss on the 2-channel map ``[1-p, p]`` with alpha 1 for both classes.

    prob, target: [B, H, W] (target 0/1). The one-hot target is clamped to ``[smooth, 1-smooth]``,
    ``pt = Σ_c onehot_c·prob_c + smooth`` and the loss ``-(1-pt)^γ·log(pt)`` is averaged over all pixels
    (of the images whose ``weight`` is 1 when given). Written without a one-hot tensor: the anomaly
    channel's clamped target is ``q = smooth + t·(1-2·smooth)`` and the normal one's is ``1-q``.
    """
    p = prob.float()
    q = target.float() * (1.0 - 2.0 * smooth) + smooth
    pt = (1.0 - q) * (1.0 - p) + q * p + smooth
    loss = -torch.pow(1.0 - pt, gamma) * torch.log(pt)
    return _masked_mean(loss.flatten(1).mean(dim=1), weight)


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
              weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary dice on the anomaly channel: ``1 - mean_b (2Σpg + s) / (Σp + Σg + s)`` (prob, target [B, H, W])."""
    p = prob.float().flatten(1)
    g = target.float().flatten(1)
    dice = (2.0 * (p * g).sum(dim=1) + smooth) / (p.sum(dim=1) + g.sum(dim=1) + smooth)
    return _masked_mean(1.0 - dice, weight)


def image_bce(fused_raw: torch.Tensor, labels: torch.Tensor, topk_ratio: float = 0.01) -> torch.Tensor:
    """BCE-with-logits of the top-k mean of the unsmoothed fused map [B, H, W] against the labels [B]."""
    k = scoring.topk_count(topk_ratio, fused_raw[0].numel())
    logits = scoring.topk_mean(fused_raw.float(), k)
    return F.binary_cross_entropy_with_logits(logits, labels.float())


def token_hinge(tokens: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """``mean_b max(0, cos(a, n) + margin)`` on the SCA-enhanced tokens [B, 2, C]: zero once cos <= -margin."""
    t = tokens.float()
    cos = F.cosine_similarity(t[:, 0], t[:, 1], dim=-1, eps=1e-8)
    return torch.relu(cos + margin).mean()


def visualad_loss(layer_maps: torch.Tensor, tokens: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                  image_size: int, topk_ratio: float = 0.01, gamma: float = 2.0, focal_smooth: float = 1e-5,
                  dice_smooth: float = 1.0, margin: float = 0.5, w_focal: float = 1.0, w_dice: float = 1.0,
                  w_bce: float = 1.0, w_hinge: float = 1.0,
                  seg_weight: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """All terms of the training loss for one batch.

    layer_maps [B, L, g, g] (the raw cosine differences), tokens [B, 2, C], masks [B, S, S] (0/1),
    labels [B]. Each layer is upsampled (bilinear, unsmoothed) before its sigmoid; the image logit uses
    the sum of the upsampled layers, as the authors do. Returns ``total`` plus ``focal`` and ``dice``
    (summed over layers), ``bce`` and ``hinge`` for logging.
    """
    up = scoring.upsample(layer_maps, image_size)  # [B, L, S, S] float32
    prob = torch.sigmoid(up)
    focal = up.new_zeros(())
    dice = up.new_zeros(())
    for layer in range(up.shape[1]):
        focal = focal + focal_loss(prob[:, layer], masks, gamma, focal_smooth, seg_weight)
        dice = dice + dice_loss(prob[:, layer], masks, dice_smooth, seg_weight)
    bce = image_bce(up.sum(dim=1), labels, topk_ratio)
    hinge = token_hinge(tokens, margin)
    total = w_focal * focal + w_dice * dice + w_bce * bce + w_hinge * hinge
    return {"total": total, "focal": focal, "dice": dice, "bce": bce, "hinge": hinge}


def _masked_mean(per_image: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over images, or over the images with weight 1 (0 when there are none), without a host sync."""
    if weight is None:
        return per_image.mean()
    w = weight.to(per_image.dtype)
    return (per_image * w).sum() / w.sum().clamp_min(1.0)
