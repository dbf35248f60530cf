"""VisualAD(nn.Module): normalised images [B, 3, S, S] -> per-layer maps, fused heat map and image score.

One forward serves prediction, evaluation and training; training only turns dropout and gradients on.
The module knows nothing of files, the Hub or the command line.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from ..config import VisualADConfig
from ..errors import WeightsError
from . import scoring
from .backbones import Backbone
from .heads import SAF, SCA, contrast_map
from .tokens import NUM_TOKENS, TokenInsertedViT

BACKBONE_PREFIX = "encoder.backbone."


@dataclass
class VisualADOutput:
    """What one forward gives: per-layer maps on the patch grid and the last layer's enhanced tokens."""

    layer_maps: torch.Tensor  # [B, L, g, g], each in [-2, 2]
    tokens: torch.Tensor  # [B, 2, C]: (anomaly, normal) after the last chosen layer's SCA
    patch_features: Tuple[torch.Tensor, ...]  # per layer [B, N, C], final-normed, before SAF


class VisualAD(nn.Module):
    """The frozen backbone with the trained tokens, SCA and SAF; ``config`` must be resolved."""

    def __init__(self, config: VisualADConfig, backbone: Backbone) -> None:
        super().__init__()
        if config.layers is None or config.image_size is None or config.sca_max_patches is None:
            raise ValueError("VisualAD needs a resolved config (VisualADConfig.resolved)")
        self.config = config
        d = backbone.embed_dim
        self.encoder = TokenInsertedViT(backbone, config.layers, config.token_init_scale)
        # A trained copy of the final norm (paper), or None: the backbone's own, frozen (the authors' test script)
        self.final_norm = copy.deepcopy(backbone.final_norm).requires_grad_(True) if config.train_final_norm else None
        hidden = int(round(d * config.saf_hidden_ratio))
        self.sca = nn.ModuleDict({
            f"layer_{l}": SCA(d, config.num_anchors, config.sca_max_patches, config.sca_dropout,
                              config.sca_res_scale_init)
            for l in config.layers
        })
        self.saf = nn.ModuleDict({f"layer_{l}": SAF(d, hidden, config.saf_dropout) for l in config.layers})
        self.grid = config.image_size // backbone.patch_size
        # the backbone's input normalisation, as buffers so that .to() moves them (not saved: they are the
        # backbone's constants, not trained)
        self.register_buffer("pixel_mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)

    @property
    def backbone(self) -> Backbone:
        return self.encoder.backbone

    def train(self, mode: bool = True) -> "VisualAD":
        super().train(mode)
        self.backbone.eval()  # frozen: never in training mode
        return self

    # --- forward -----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> VisualADOutput:
        b = images.shape[0]
        layer_outs, last = self.encoder(images)
        norm = self.final_norm if self.final_norm is not None else self.backbone.final_norm
        tokens = norm(last[:, :NUM_TOKENS])
        start = self.encoder.prefix_len
        maps, feats = [], []
        enhanced = tokens
        for layer, h in zip(self.config.layers, layer_outs):
            patches = norm(h[:, start:])
            key = f"layer_{layer}"
            enhanced = self.sca[key](tokens, patches)
            aligned = self.saf[key](patches)
            with torch.autocast(device_type=images.device.type, enabled=False):
                s = contrast_map(aligned.float(), enhanced.float())
            maps.append(s.view(b, self.grid, self.grid))
            feats.append(patches)
        return VisualADOutput(torch.stack(maps, dim=1), enhanced, tuple(feats))

    def backbone_features(self, images: torch.Tensor, layers: Sequence[int]) -> List[torch.Tensor]:
        """Patch features [B, N, C] of the frozen backbone alone at ``layers``: no inserted tokens, its own
        final norm; blocks past the deepest layer are not run. The few-shot memory bank compares these: in
        the model's forward the learned tokens share attention with the patches and shift their features,
        differently for every trained head (measured in docs/few-shot.md)."""
        outs, _ = self.encoder(images, with_tokens=False, layers=layers)
        by_layer = dict(zip(sorted(set(layers)), outs))
        start = self.backbone.num_prefix_tokens
        return [self.backbone.final_norm(by_layer[layer][:, start:]) for layer in layers]

    def fused_map(self, out: VisualADOutput, smooth: bool = True) -> torch.Tensor:
        """Sum of the upsampled layer maps [B, S, S], Gaussian-smoothed for prediction.

        Bilinear upsampling is linear, so the layers are summed on the grid and upsampled once; this
        equals the authors' upsample-then-sum up to float rounding.
        """
        return self.grid_to_map(out.layer_maps.sum(dim=1), smooth=smooth)

    def grid_to_map(self, grid: torch.Tensor, smooth: bool = True) -> torch.Tensor:
        """A patch-grid map [B, g, g] upsampled (bilinear) to the input size [B, S, S], then smoothed."""
        raw = scoring.upsample(grid[:, None], self.config.image_size)[:, 0]
        return scoring.gaussian_blur(raw, self.config.sigma) if smooth else raw

    def image_score(self, fused: torch.Tensor) -> torch.Tensor:
        """Top-1% mean of each map [B, S, S] -> [B]."""
        pixels = int(fused.shape[-2]) * int(fused.shape[-1])  # ints from the shape: also while tracing
        return scoring.topk_mean(fused, scoring.topk_count(self.config.topk_ratio, pixels))

    @torch.inference_mode()
    def predict_maps(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Smoothed fused maps [B, S, S] (float32) and image scores [B] for normalised images."""
        fused = self.fused_map(self(images), smooth=True)
        return fused, self.image_score(fused)

    # --- the trained parameters only ---------------------------------------------------------------
    def head_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if not name.startswith(BACKBONE_PREFIX):
                yield name, p

    def head_state_dict(self) -> Dict[str, torch.Tensor]:
        """What save_pretrained writes: tokens, SCA, SAF (and the final norm when it is trained)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(BACKBONE_PREFIX)}

    def load_head_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "weights") -> None:
        """Strict load that names missing and unexpected keys and shape mismatches."""
        own = self.head_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise WeightsError(f"head weights do not match the config: missing keys {missing}, "
                               f"unexpected keys {unexpected}", source)
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise WeightsError(f"head tensor {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}",
                                   source)
            if not v.is_floating_point():
                raise WeightsError(f"head tensor {k} is {v.dtype}; trained weights are floating point", source)
            if not bool(torch.isfinite(v).all()):
                raise WeightsError(f"head tensor {k} holds NaN or infinite values: the weights are broken "
                                   "(a diverged training run?)", source)
        self.load_state_dict(dict(state), strict=False)  # keys checked above; the backbone keeps its weights
