"""Typed errors: every failure a user can cause is a subclass of :class:`VisualADError`.

They carry the offending path (when there is one) so that batch jobs can report and go on.
"""
from __future__ import annotations

import os
from typing import Optional

from .types import PathLike


class VisualADError(Exception):
    """Base class of every error raised on purpose by visualad."""

    def __init__(self, message: str, path: Optional[PathLike] = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.reason = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InvalidImageError(VisualADError, ValueError):
    """An input cannot be turned into an image: empty, truncated, wrong mode, shape, dtype or values."""


class ImageTooLargeError(InvalidImageError):
    """The image has more pixels than ``visualad.settings.MAX_IMAGE_PIXELS``; refused before decoding."""


class DatasetError(VisualADError, ValueError):
    """A dataset tree or metadata file is malformed (missing mask, size mismatch, path outside the root)."""


class ConfigError(VisualADError, ValueError):
    """A config is invalid, corrupted, or written by a newer schema than this version understands."""


class WeightsError(VisualADError):
    """Weights are missing, corrupted, of the wrong shape, not safetensors, or fail verification."""


class OfflineError(WeightsError):
    """A file is needed that is not cached and the network may not be used."""


class UnknownModelError(VisualADError, KeyError):
    """An alias or backbone name is not known; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return Exception.__str__(self)
