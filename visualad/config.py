"""The one config of a VisualAD model: everything needed to rebuild it, JSON-serialisable.

Defaults are the paper's (CLIP ViT-L/14 at 518 px, method doc §11 "Key constants"); sizes that depend on
the backbone (layers, image size, SCA position rows) are resolved once the backbone is known, so a saved
config is always explicit.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from .errors import ConfigError

SCHEMA_VERSION = 1


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
    # scoring (method doc §5)
    sigma: float = 4.0
    topk_ratio: float = 0.01
    # calibration (filled by calibrate(); None = uncalibrated)
    image_threshold: Optional[float] = None
    pixel_threshold: Optional[float] = None
    score_stats: Optional[Dict[str, float]] = None
    # free-form provenance: training data, licence, metrics
    metadata: Dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)
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

    def save(self, path: Union[str, Path]) -> None:
        from .atomic import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "VisualADConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("config.json not found", path) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config.json is corrupted or truncated ({exc})", path) from None
        return cls.from_dict(data, path)
