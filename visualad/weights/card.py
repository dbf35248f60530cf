"""The model card (README.md) written next to config.json and model.safetensors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write_text
from ..config import VisualADConfig


def model_card(config: VisualADConfig, n_params: Optional[int] = None) -> str:
    meta = config.metadata or {}
    lines = [
        "---",
        "library_name: visualad",
        f"license: {meta.get('license_id', 'other')}",
        "tags: [anomaly-detection, zero-shot, visualad]",
        "---",
        f"# VisualAD head on `{config.backbone}`",
        "",
        "Trained tokens, SCA and SAF of VisualAD (CVPR 2026) for zero-shot anomaly detection; the frozen backbone "
        "is fetched separately. Load it with `visualad.AnomalyDetector.from_pretrained(<this directory or repo>)`.",
        "",
        f"- backbone: `{config.backbone}`, input {config.image_size} px, layers {list(config.layers or [])}",
        f"- trained parameters: {n_params:,}" if n_params is not None else "- trained parameters: unknown",
        f"- training data: {meta.get('training_data', 'not recorded')}",
        f"- licence: {meta.get('license', 'not recorded')}",
        f"- calibrated: {'yes' if config.image_threshold is not None else 'no'}",
    ]
    if meta.get("metrics"):
        lines += ["", "## Metrics", "", "```json", json.dumps(meta["metrics"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def write_model_card(directory: Path, config: VisualADConfig, n_params: Optional[int] = None) -> None:
    atomic_write_text(Path(directory) / "README.md", model_card(config, n_params))
