"""The one config of a VisualAD model: everything needed to rebuild it, JSON-serialisable.

Defaults are the paper's (CLIP ViT-L/14 at 518 px, method doc §11 "Key constants"); sizes that depend on
the backbone (layers, image size, SCA position rows) are resolved once the backbone is known, so a saved
config is always explicit.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from .errors import ConfigError

SCHEMA_VERSION = 1

#: ``backbone_kwargs`` a config may hold: architecture only (timm VisionTransformer and open_clip vision tower
#: sizes), numbers and booleans. Nothing that names a file, a URL or a pretrained source (timm's
#: ``checkpoint_path``, ``pretrained_cfg``...) can pass, so a model directory cannot make a library read a file.
BACKBONE_KWARGS = frozenset({
    "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "init_values",
    "class_token", "reg_tokens", "no_embed_class", "dynamic_img_size", "dynamic_img_pad", "num_classes",
    # open_clip vision tower
    "image_size", "layers", "width", "head_width", "quick_gelu",
})
_INT_FIELDS = ("num_anchors", "schema_version")
_OPTIONAL_INT_FIELDS = ("image_size", "sca_max_patches")
_FLOAT_FIELDS = ("sca_dropout", "sca_res_scale_init", "saf_hidden_ratio", "saf_dropout", "token_init_scale", "sigma",
                 "topk_ratio")
_OPTIONAL_FLOAT_FIELDS = ("image_threshold", "pixel_threshold")
_BOOL_FIELDS = ("backbone_pretrained", "train_final_norm", "head_trained")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_backbone_kwargs(kwargs: Any) -> None:
    """Refuse any key outside :data:`BACKBONE_KWARGS` and any value that is not a number or a boolean."""
    if not isinstance(kwargs, dict):
        raise ConfigError(f"backbone_kwargs must be an object, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if key not in BACKBONE_KWARGS:
            raise ConfigError(f"backbone_kwargs: {key!r} is not an architecture setting visualad accepts "
                              f"(allowed: {', '.join(sorted(BACKBONE_KWARGS))})")
        if not (isinstance(value, bool) or _is_number(value)):
            raise ConfigError(f"backbone_kwargs: {key!r} must be a number or a boolean, got {value!r}")


def default_layers(depth: int) -> Tuple[int, ...]:
    """Four evenly spaced 1-based block indices ending at the last block: 24 -> 6,12,18,24; 12 -> 3,6,9,12."""
    if depth < 4:
        return tuple(range(1, depth + 1))
    return tuple(depth * i // 4 for i in range(1, 5))


@dataclass
class VisualADConfig:
    """Model architecture, scoring and calibration settings (the trained weights live beside it)."""

    backbone: str = "clip-l"
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    # False: random backbone weights (tests, shape checks); save_pretrained then stores them beside the head
    backbone_pretrained: bool = True
    image_size: Optional[int] = None
    layers: Optional[Tuple[int, ...]] = None
    # SCA (method doc §3)
    num_anchors: int = 4
    sca_max_patches: Optional[int] = None
    sca_dropout: float = 0.1
    sca_res_scale_init: float = 0.01
    # SAF (method doc §4)
    saf_hidden_ratio: float = 1.0
    saf_dropout: float = 0.1
    # tokens (method doc §2): init N(0,1) * D^-0.5 * token_init_scale
    token_init_scale: float = 0.1
    # the backbone's final norm: trained with the head (paper) and then saved with it
    train_final_norm: bool = True
    # False: the head is its random initialisation (a backbone alone, or from_backbone before finetune); head
    # mode then means nothing and "auto" uses references or batch mode
    head_trained: bool = True
    # scoring (method doc §5)
    sigma: float = 4.0
    topk_ratio: float = 0.01
    # calibration (filled by calibrate(); None = uncalibrated)
    image_threshold: Optional[float] = None
    pixel_threshold: Optional[float] = None
    score_stats: Optional[Dict[str, float]] = None
    # free-form provenance: training data, licence, metrics
    metadata: Dict[str, Any] = field(default_factory=dict)
    # sha256 of each weights file saved with this config (written last): a directory whose files do not match
    # mixes two saves (one interrupted) and refuses to load
    files: Dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self._check_types()
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers or min(self.layers) < 1 or list(self.layers) != sorted(set(self.layers)):
                raise ConfigError(f"layers must be increasing 1-based block indices, got {self.layers}")
        if self.image_size is not None and int(self.image_size) <= 0:
            raise ConfigError(f"image_size must be positive, got {self.image_size}")
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ConfigError(f"topk_ratio must be in (0, 1], got {self.topk_ratio}")
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")
        if self.num_anchors < 1:
            raise ConfigError(f"num_anchors must be >= 1, got {self.num_anchors}")

    def _check_types(self) -> None:
        """JSON gives any type: refuse wrong ones here with the field's name, not deep inside torch."""
        def bad(name: str, want: str) -> ConfigError:
            return ConfigError(f"config field {name!r} must be {want}, got {getattr(self, name)!r}")

        if not isinstance(self.backbone, str) or not self.backbone:
            raise bad("backbone", "a backbone name")
        check_backbone_kwargs(self.backbone_kwargs)
        for name in _INT_FIELDS:
            if not _is_int(getattr(self, name)):
                raise bad(name, "an integer")
        for name in _OPTIONAL_INT_FIELDS:
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                raise bad(name, "an integer or null")
        for name in _FLOAT_FIELDS:
            if not _is_number(getattr(self, name)):
                raise bad(name, "a finite number")
        for name in _OPTIONAL_FLOAT_FIELDS:
            if getattr(self, name) is not None and not _is_number(getattr(self, name)):
                raise bad(name, "a finite number or null")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if self.layers is not None and (not isinstance(self.layers, (list, tuple))
                                        or not all(_is_int(x) for x in self.layers)):
            raise bad("layers", "a list of integers or null")
        if self.score_stats is not None and not isinstance(self.score_stats, dict):
            raise bad("score_stats", "an object or null")
        if not isinstance(self.metadata, dict):
            raise bad("metadata", "an object")
        if not isinstance(self.files, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.files.items()):
            raise bad("files", "an object of file names to sha256 digests")

    # --- resolution against a backbone -------------------------------------------------------------
    def resolved(self, depth: int, patch_size: int, default_image_size: int) -> "VisualADConfig":
        """A copy with every backbone-dependent size filled in and checked."""
        image_size = int(self.image_size or default_image_size)
        if image_size % patch_size:
            raise ConfigError(f"image_size {image_size} is not a multiple of the patch size {patch_size}")
        layers = self.layers or default_layers(depth)
        if max(layers) > depth:
            raise ConfigError(f"layers {layers} exceed the backbone depth {depth}")
        n_patches = (image_size // patch_size) ** 2
        max_patches = self.sca_max_patches or max(1536, n_patches)
        if max_patches < n_patches:
            raise ConfigError(
                f"sca_max_patches={max_patches} is smaller than the {n_patches} patches of a "
                f"{image_size} px input; the SCA position table cannot cover it"
            )
        return dataclasses.replace(self, image_size=image_size, layers=tuple(layers), sca_max_patches=max_patches)

    # --- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["layers"] is not None:
            d["layers"] = list(d["layers"])
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: Optional[Union[str, Path]] = None) -> "VisualADConfig":
        if not isinstance(data, dict):
            raise ConfigError("config must be a JSON object", source)
        version = data.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ConfigError(
                f"config schema_version {version!r} is newer than this visualad understands "
                f"({SCHEMA_VERSION}); upgrade visualad",
                source,
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}", source)
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"invalid config: {exc}", source) from exc
        except ConfigError as exc:
            if source is None or exc.path is not None:
                raise
            raise ConfigError(exc.reason, source) from None

    def save(self, path: Union[str, Path]) -> None:
        from .atomic import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "VisualADConfig":
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
                raise ConfigError("config.json is not a regular file", path)
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("config.json not found", path) from None
        except OSError as exc:
            raise ConfigError(f"config.json cannot be read: {exc.strerror or exc}", path) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config.json is corrupted or truncated ({exc})", path) from None
        return cls.from_dict(data, path)
