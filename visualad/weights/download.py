"""``visualad download NAME``: fetch and verify everything a model needs, so an offline site can run it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..config import VisualADConfig
from ..layout import CONFIG_NAME
from .resolve import headless_backbone, resolve_model_dir
from .sources import backbone_state_dict

logger = logging.getLogger(__name__)


def download_model(name: Optional[str], revision: Optional[str] = None,
                   token: Optional[str] = None) -> Optional[Path]:
    """Resolve the head (downloading or converting it once) and pre-fetch its backbone; returns the model dir,
    or None for a model that is a backbone alone (no published head)."""
    backbone = headless_backbone(name)
    if backbone is not None:
        backbone_state_dict(backbone, token=token)
        logger.info("%s: backbone %s cached (no head: references and batch mode)", name, backbone)
        return None
    model_dir = resolve_model_dir(name, revision=revision, token=token)
    config = VisualADConfig.load(model_dir / CONFIG_NAME)
    backbone_state_dict(config.backbone, model_dir=model_dir, pretrained=config.backbone_pretrained, token=token)
    logger.info("%s: head in %s, backbone %s cached", name, model_dir, config.backbone)
    return model_dir
