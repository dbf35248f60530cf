"""The two learnable tokens and the forward over the frozen blocks that carries them (method doc §2).

Sequence: ``[t_anomaly, t_normal, CLS, registers..., patches]``; both tokens get the CLS position, the
attention is full and unmasked, and the chosen layers' outputs are collected before the final norm.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbones import Backbone

NUM_TOKENS = 2


class TokenInsertedViT(nn.Module):
    """Owns the anomaly and normal tokens; runs a frozen backbone with them inserted at the input."""

    def __init__(self, backbone: Backbone, layers: Sequence[int], init_scale: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(layers)
        d = backbone.embed_dim
        self.anomaly_token = nn.Parameter(torch.randn(d) * d**-0.5 * init_scale)
        self.normal_token = nn.Parameter(torch.randn(d) * d**-0.5 * init_scale)
        self.gradient_checkpointing = False

    @property
    def prefix_len(self) -> int:
        """Tokens before the first patch: the two inserted ones, CLS and registers."""
        return NUM_TOKENS + self.backbone.num_prefix_tokens

    def forward(self, images: torch.Tensor, with_tokens: bool = True,
                layers: Optional[Sequence[int]] = None) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """images [B, 3, H, W] (normalised) -> (outputs of the chosen blocks [B, S, C], last block run [B, S, C]).

        With ``with_tokens=False`` the backbone runs unchanged (the plain backbone: parity with the library,
        few-shot features). ``layers`` (default the chosen ones) picks other blocks; the blocks after the
        deepest one asked for are not run.
        """
        bb = self.backbone
        seq, token_pos = bb.embed(images)
        if with_tokens:
            tokens = torch.stack([self.anomaly_token, self.normal_token]) + token_pos
            seq = torch.cat([tokens.to(seq.dtype).expand(seq.shape[0], -1, -1), seq], dim=1)
        x = bb.pre_norm(seq)
        wanted = set(self.layers if layers is None else layers)
        depth = bb.depth if layers is None else max(wanted)
        outs = []
        for i in range(depth):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(bb.run_block, i, x, use_reentrant=False)
            else:
                x = bb.run_block(i, x)
            if i + 1 in wanted:
                outs.append(x)
        return outs, x
