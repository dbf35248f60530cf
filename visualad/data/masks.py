"""The one mask pipeline (datasets, evaluate, calibrate): read, binarise ``> 0``, check the size, resize.

Resizing follows the authors' recipe exactly: the 0/255 uint8 mask is resized with PIL bilinear (what
torchvision's ``Resize`` does on a PIL mask) and thresholded at ``> 127`` (their ``ToTensor() > 0.5``).
"""
from __future__ import annotations

import os
import stat
from typing import Any, Optional, Tuple

import numpy as np

from ..errors import DatasetError


def binarise(im: Any) -> np.ndarray:
    """``> 0`` on any mask encoding: a PIL image of mode "1" (bool), grey, 16-bit, palette or colour (max over
    the colour channels, alpha ignored), or an array (H, W) / (H, W, C)."""
    if isinstance(im, np.ndarray):
        arr = im if im.ndim == 2 else im[..., :3].max(axis=-1) if im.ndim == 3 else im
    else:
        mode = im.mode
        if mode == "P":
            im = im.convert("RGB")
            mode = "RGB"
        arr = np.asarray(im)
        if arr.ndim == 3:
            channels = 1 if mode in ("LA", "La") else 3  # ignore alpha
            arr = arr[..., :channels].max(axis=-1)
    if arr.ndim != 2:
        raise ValueError(f"unsupported mask shape {arr.shape}")
    return arr > 0


def read_mask(source: Any, image_hw: Optional[Tuple[int, int]] = None, image: Optional[str] = None) -> np.ndarray:
    """A boolean mask from a file path or an array; with ``image_hw`` its size must equal the image's.

    A size mismatch is a :class:`DatasetError` naming both files, never a silent resize."""
    from PIL import Image

    path = None
    if isinstance(source, np.ndarray):
        try:
            mask = binarise(source)
        except ValueError as exc:
            raise DatasetError(f"cannot use mask array: {exc}") from exc
    else:
        path = os.fspath(source)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open forever
                raise ValueError("not a regular file")
            with Image.open(path) as im:
                im.load()
                mask = binarise(im)
        except (OSError, ValueError) as exc:  # PIL raises OSError/UnidentifiedImageError, ValueError
            raise DatasetError(f"cannot read mask: {exc}", path) from exc
    if image_hw is not None and mask.shape != tuple(image_hw):
        raise DatasetError(f"mask {path or '<array>'} is {mask.shape[0]}x{mask.shape[1]} (HxW) but image "
                           f"{image or '<input>'} is {image_hw[0]}x{image_hw[1]}", path)
    return mask


def resize_mask(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize a boolean mask to ``size`` (H, W) the authors' way (PIL bilinear on 0/255, then ``> 127``)."""
    from PIL import Image

    if tuple(size) == mask.shape:
        return mask
    im255 = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    return np.asarray(im255.resize((size[1], size[0]), resample=Image.BILINEAR)) > 127
