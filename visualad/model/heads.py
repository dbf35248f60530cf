"""The trained per-layer heads: SCA sharpens the two tokens, SAF recalibrates the patches (method doc §3, §4)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SCA(nn.Module):
    """Spatial-Aware Cross-Attention for one layer.

    ``m`` learned anchor queries attend (one head, scale 1/sqrt(C)) over the layer's patches, whose keys carry
    a learned 1-D position table; a sigmoid gate driven by each token mixes the anchor summaries, and the
    result is added to the token with a learned residual scale. Queries, keys and values do not depend on the
    token, so they are computed once for all tokens (the authors compute them once per token; in eval mode
    the result is identical, in training the attention dropout mask is shared by the two tokens).
    """

    def __init__(self, dim: int, num_anchors: int = 4, max_patches: int = 1536, dropout: float = 0.1,
                 res_scale_init: float = 0.01) -> None:
        super().__init__()
        self.anchor_queries = nn.Parameter(torch.randn(num_anchors, dim) * 0.02)
        self.pos_encoding = nn.Parameter(torch.randn(1, max_patches, dim) * 0.02)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(dim, eps=1e-5)
        self.k_norm = nn.LayerNorm(dim, eps=1e-5)
        self.gate = nn.Linear(dim, num_anchors)
        self.out_proj = nn.Linear(dim, dim)
        self.res_scale = nn.Parameter(torch.tensor([res_scale_init]))
        self.dropout = nn.Dropout(dropout)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, C], patches [B, N, C] -> enhanced tokens [B, T, C]."""
        n = patches.shape[1]
        if n > self.pos_encoding.shape[1]:
            raise ValueError(f"{n} patches exceed the SCA position table ({self.pos_encoding.shape[1]} rows)")
        q = self.q_norm(self.q_proj(self.anchor_queries))  # [m, C]
        k = self.k_norm(self.k_proj(patches + self.pos_encoding[:, :n]))  # [B, N, C]
        v = self.v_proj(patches)  # [B, N, C]
        att = torch.softmax(torch.einsum("mc,bnc->bmn", q, k) / math.sqrt(q.shape[-1]), dim=-1)
        z = torch.bmm(self.dropout(att), v)  # [B, m, C] anchor summaries
        g = torch.sigmoid(self.gate(tokens))  # [B, T, m] token-driven gate
        o = self.dropout(self.out_proj(torch.bmm(g, z)))  # gated sum over anchors, not normalised
        return tokens + self.res_scale * o


class SAF(nn.Module):
    """Self-Alignment Function: a 2-layer GELU MLP, no residual, mapping a layer's patches towards the tokens."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )
        for i in (0, 3):
            nn.init.xavier_uniform_(self.mlp[i].weight)
            nn.init.zeros_(self.mlp[i].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def contrast_map(patches: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """cos(p, anomaly) - cos(p, normal) per patch: patches [B, N, C], tokens [B, 2, C] -> [B, N] in [-2, 2]."""
    p = F.normalize(patches, dim=-1, eps=1e-8)
    t = F.normalize(tokens, dim=-1, eps=1e-8)
    sims = torch.bmm(p, t.transpose(1, 2))  # [B, N, 2]
    return sims[..., 0] - sims[..., 1]
