"""From per-layer patch maps to the fused heat map and the image score, on the model's device.

The Gaussian smoothing reproduces ``scipy.ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=4)``
(the authors' host-side blur) as two separable convolutions with the same kernel and edge rule.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

_KERNELS: Dict[Tuple[float, torch.device, torch.dtype], torch.Tensor] = {}


def gaussian_kernel(sigma: float, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scipy's 1-D Gaussian: radius int(4 * sigma + 0.5), weights exp(-x^2 / 2 sigma^2), normalised."""
    key = (float(sigma), device, dtype)
    if key not in _KERNELS:
        radius = int(4.0 * sigma + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        w = torch.exp(-0.5 * (x / sigma) ** 2)
        _KERNELS[key] = (w / w.sum()).to(device=device, dtype=dtype)
    return _KERNELS[key]


def _reflect_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of scipy's 'reflect' padding (d c b a | a b c d | d c b a), valid for any radius."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Smooth maps [B, H, W] exactly as scipy's gaussian_filter with mode='reflect'.

    Always float32, also inside a bf16/fp16 autocast region: autocast would run the convolutions in 16 bits
    and quantise the final map to ~3 significant digits (measured: most of the bf16-vs-fp32 map error).
    """
    if sigma <= 0:
        return maps
    w = gaussian_kernel(sigma, maps.device)
    r = (w.numel() - 1) // 2
    b, h, wd = maps.shape
    with torch.autocast(device_type=maps.device.type, enabled=False):
        x = maps.float().unsqueeze(1)
        x = x.index_select(3, _reflect_index(wd, r, maps.device))
        x = F.conv2d(x, w.view(1, 1, 1, -1))
        x = x.index_select(2, _reflect_index(h, r, maps.device))
        x = F.conv2d(x, w.view(1, 1, -1, 1))
    return x.squeeze(1)


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of [B, L, g, g] grids to [B, L, size, size], in float32."""
    with torch.autocast(device_type=maps.device.type, enabled=False):
        return F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False)


def topk_mean(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest values of each map [B, H, W] -> [B]."""
    return maps.flatten(1).topk(k, dim=1).values.mean(dim=1)


def topk_count(ratio: float, n_pixels: int) -> int:
    return max(1, math.ceil(round(ratio * n_pixels, 6)))
