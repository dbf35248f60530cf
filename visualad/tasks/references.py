"""Building a reference bank from normal images with the engine (references mode)."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch

from ..errors import ConfigError, DatasetError
from ..modes import knn
from ..modes.references import ReferenceBank, build_bank, image_digest
from ..runtime.engine import Engine

logger = logging.getLogger(__name__)


def build_references(engine: Engine, items: Sequence[Any], batch_size: int = 8,
                     blocks: Optional[Sequence[int]] = None, rs: Sequence[int] = knn.DEFAULT_R) -> ReferenceBank:
    """The bank of these normal images: the frozen backbone's features at the mode's blocks, LNAMD per r."""
    if not items:
        raise ConfigError("references mode needs at least one reference image")
    model = engine.model
    depth = model.backbone.depth
    blocks = tuple(blocks) if blocks else knn.blocks_for_depth(depth)
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise ConfigError(f"blocks {bad} are outside the backbone's 1..{depth}")

    def features():
        for chunk in engine.read(items, batch_size, on_error="raise", label="reference"):
            feats = engine.backbone_features(engine.to_batch([x.square for x in chunk]), blocks)
            for i, x in enumerate(chunk):
                yield image_digest(x.square), [f[i:i + 1].float() for f in feats]

    with torch.inference_mode():
        bank = build_bank(features(), blocks, rs, engine.image_size)
    bank.to(engine.device)
    logger.info("reference bank: %d images, blocks %s, r %s, %.1f MB", bank.shots, blocks, tuple(rs),
                bank.nbytes / 2**20)
    return bank


def draw_references(train: Any, category: str, shots: int, seed: int = 42) -> List[Path]:
    """K normal images of a category's train split (a loaded dataset), drawn with a fixed seed: what
    ``visualad eval --shots K`` uses, and the benchmarks with it (never from the test split)."""
    pool = [s.image_path for s in train.samples if s.category == category and s.label == 0]
    if not pool:
        raise DatasetError(f"{category}: --shots needs normal images in its train split")
    rng = random.Random(f"{seed}:{category}")
    return sorted(rng.sample(pool, min(shots, len(pool))))
