"""Reading and writing our safetensors files with clear errors (never pickle)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..atomic import atomic_write_bytes
from ..errors import WeightsError

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"


def is_lfs_pointer(path: Union[str, "os.PathLike[str]"]) -> bool:
    """True when a file is a Git LFS pointer (a clone without git-lfs) instead of the real bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX
    except (IsADirectoryError, FileNotFoundError):
        return False


def load_safetensors(path: Union[str, "os.PathLike[str]"]) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError("weights file not found", path)
    if is_lfs_pointer(path):
        raise WeightsError("this is a Git LFS pointer, not the weights: fetch the real file "
                           "(git lfs pull, or download it again)", path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"not a valid safetensors file (corrupted or truncated?): {exc}", path) from None


def save_safetensors(state: Dict[str, torch.Tensor], path: Union[str, "os.PathLike[str]"],
                     metadata: Optional[Dict[str, str]] = None) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in state.items()}, metadata=metadata))
