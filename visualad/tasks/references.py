"""Which normal images serve as references in evaluation (``--shots K``): drawn from the train split."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, List

from ..errors import DatasetError


def draw_references(train: Any, category: str, shots: int, seed: int = 42) -> List[Path]:
    """K normal images of a category's train split (a loaded dataset), drawn with a fixed seed: what
    ``visualad eval --shots K`` uses, and the benchmarks with it (never from the test split)."""
    pool = [s.image_path for s in train.samples if s.category == category and s.label == 0]
    if not pool:
        raise DatasetError(f"{category}: --shots needs normal images in its train split")
    rng = random.Random(f"{seed}:{category}")
    return sorted(rng.sample(pool, min(shots, len(pool))))
