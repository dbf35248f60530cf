"""The one image-input layer used by every entry point of visualad.

Every input (file path, PIL image, NumPy array, torch tensor) goes through :func:`load_image`,
which returns an ``(H, W, 3) uint8`` RGB array in displayed orientation or raises a typed
:class:`~visualad.errors.InvalidImageError` naming the input and the reason. Conversions are
explicit and documented (``docs/input-handling.md``) instead of relying on Pillow's
``convert("RGB")``, which saturates 16-bit and float images and silently drops alpha.
"""
from __future__ import annotations

import io
import logging
import os
import stat
import struct
import sys
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from visualad import settings
from visualad.errors import ImageTooLargeError, InvalidImageError

from ..types import PathLike

logger = logging.getLogger(__name__)

#: Anything :func:`load_image` accepts (a torch tensor is accepted too; torch is imported lazily).
ImageSource = Union[PathLike, Image.Image, np.ndarray, Any]

_EXIF_ORIENTATION = 0x0112
_UINT16_MAX = 65535
_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1


@dataclass
class LoadedImage:
    """A validated image: ``array`` is ``(H, W, 3) uint8`` RGB, as displayed (EXIF applied)."""

    array: np.ndarray
    path: Optional[str]
    name: str

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])


# --------------------------------------------------------------------------------------------
# errors


def _fail(reason: str, path: Optional[str], name: str) -> InvalidImageError:
    """An InvalidImageError naming the file (``path``) or, for in-memory inputs, its ``name``."""
    if path is not None:
        return InvalidImageError(reason, path=path)
    return InvalidImageError(f"{name}: {reason}")


def _check_size(width: int, height: int, path: Optional[str], name: str) -> None:
    """Refuse zero-size images and images above ``settings.MAX_IMAGE_PIXELS``, before decoding."""
    if width <= 0 or height <= 0:
        raise _fail(f"zero-size image ({width}x{height} pixels, width x height)", path, name)
    limit = int(settings.MAX_IMAGE_PIXELS)
    pixels = int(width) * int(height)
    if pixels > limit:
        reason = (
            f"image is {width}x{height} = {pixels:,} pixels, above "
            f"visualad.settings.MAX_IMAGE_PIXELS = {limit:,}; refused before decoding "
            "(possible decompression bomb). Downscale or tile the image first, or raise "
            "visualad.settings.MAX_IMAGE_PIXELS if you trust it"
        )
        if path is not None:
            raise ImageTooLargeError(reason, path=path)
        raise ImageTooLargeError(f"{name}: {reason}")


# --------------------------------------------------------------------------------------------
# Pillow's own decompression-bomb limit is replaced by ours while visualad decodes a file.

_pil_lock = threading.Lock()
_pil_users = 0
_pil_saved_limit: Optional[int] = None


@contextmanager
def _pil_limit_disabled() -> Iterator[None]:
    """Set ``PIL.Image.MAX_IMAGE_PIXELS = None`` while decoding; restore it afterwards.

    Pillow checks its global limit inside ``Image.open`` (warning above ~89 MP, refusing above
    ~179 MP), i.e. before we could apply ``settings.MAX_IMAGE_PIXELS``; our own check runs right
    after the header is read. Reference-counted so that threads loading images in parallel do
    not serialise on a lock or restore the value too early.
    """
    global _pil_users, _pil_saved_limit
    with _pil_lock:
        if _pil_users == 0:
            _pil_saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pil_users += 1
    try:
        yield
    finally:
        with _pil_lock:
            _pil_users -= 1
            if _pil_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_saved_limit


_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    TypeError,
    KeyError,
)


# --------------------------------------------------------------------------------------------
# public API


def load_image(source: ImageSource, name: Optional[str] = None) -> LoadedImage:
    """Read and validate one image of any supported kind into ``(H, W, 3) uint8`` RGB.

    ``source`` is a path (str / PathLike), a ``PIL.Image.Image``, a NumPy array (HxW, HxWx1,
    HxWx3, HxWx4) or a torch tensor (HxW, CxHxW, 1xCxHxW with C in 1, 3, 4). ``name`` labels
    in-memory inputs in error messages (e.g. ``"<array 3>"``); a file is labelled by its path.
    Raises :class:`InvalidImageError` (or :class:`ImageTooLargeError`) naming input and reason.
    """
    if isinstance(source, LoadedImage):
        return source
    if isinstance(source, (str, os.PathLike)):
        return _load_path(source, name)
    if isinstance(source, Image.Image):
        label = name or str(getattr(source, "filename", "") or "<PIL image>")
        return _from_pil(source, path=None, name=label)
    if isinstance(source, np.ndarray):
        label = name or "<array>"
        arr = _validate_array(source, path=None, name=label)
        return LoadedImage(_to_rgb8(arr, path=None, name=label), None, label)
    if _is_tensor(source):
        label = name or "<tensor>"
        return LoadedImage(_tensor_to_rgb8(source, label), None, label)
    if isinstance(source, bytes):
        raise _fail("raw bytes are not accepted; pass a path, PIL image, array or tensor",
                    None, name or "<bytes>")
    raise _fail(
        f"unsupported input type {type(source).__module__}.{type(source).__qualname__}; "
        "expected a path, PIL.Image, numpy.ndarray or torch.Tensor",
        None,
        name or "<input>",
    )


def expand_inputs(inputs: Any) -> List[Any]:
    """Flatten one input or a list/tuple of inputs into a list of single-image sources.

    A 4-D torch tensor (B, C, H, W) or a 4-D NumPy array (B, H, W, C) -- also inside a list --
    becomes its B images. A path stays one item (folders are expanded elsewhere). Nested
    lists are refused: they are ambiguous with pixel data.
    """
    if isinstance(inputs, (list, tuple)):
        items: Iterable[Any] = inputs
    elif isinstance(inputs, Iterator):
        items = list(inputs)
    else:
        items = [inputs]
    out: List[Any] = []
    for i, item in enumerate(items):
        if isinstance(item, (list, tuple)):
            raise _fail("nested list/tuple of inputs; pass a flat list", None, f"<input {i}>")
        if _is_tensor(item) and item.ndim == 4:
            out.extend(item.unbind(0))
        elif isinstance(item, np.ndarray) and item.ndim == 4:
            out.extend(item[j] for j in range(item.shape[0]))
        else:
            out.append(item)
    return out


def image_digest(square: np.ndarray) -> str:
    """Identity of a preprocessed image: lets calibration score a reference against the others only, and
    orders a batch-mode set by content."""
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(square).tobytes()).hexdigest()


def resize_to_square(array: np.ndarray, size: int) -> np.ndarray:
    """The model's preprocessing resize: PIL bicubic to ``(size, size)``, aspect ratio not kept.

    This is what the authors' transforms do (``Resize((size, size), BICUBIC)`` on a PIL image),
    so the features match theirs. Returns ``(size, size, 3) uint8``.
    """
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 \
            or array.shape[2] != 3:
        raise ValueError(
            f"resize_to_square expects an (H, W, 3) uint8 array, got "
            f"{getattr(array, 'shape', None)} {getattr(array, 'dtype', type(array).__name__)}"
        )
    if int(size) != size or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    size = int(size)
    image = Image.fromarray(np.ascontiguousarray(array))
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(resized, dtype=np.uint8)


def resize_map(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """Map a model-resolution ``(h, w)`` map back to ``(height, width)`` (bilinear, float32).

    Uses ``cv2.resize(INTER_LINEAR)`` (half-pixel centres, like torch ``align_corners=False``);
    returns an exact copy when the size already matches.
    """
    m = np.asarray(m)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"resize_map expects a non-empty (h, w) map, got shape {m.shape}")
    if int(height) != height or int(width) != width or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive integers, got {height!r}, {width!r}")
    height, width = int(height), int(width)
    m = m.astype(np.float32, copy=False)
    if m.shape == (height, width):
        return m.copy()
    import cv2  # local: keep `import visualad` light

    out = cv2.resize(np.ascontiguousarray(m), (width, height), interpolation=cv2.INTER_LINEAR)
    return out.reshape(height, width).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# files and PIL images


def _load_path(source: PathLike, name: Optional[str]) -> LoadedImage:
    path = os.fspath(source)
    label = name or path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidImageError("file not found", path=path) from None
    except OSError as e:
        raise InvalidImageError(f"cannot access file: {e.strerror or e}", path=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidImageError(
            "is a folder, not an image file (use iter_image_files for folders)", path=path
        )
    if not stat.S_ISREG(st.st_mode):
        raise InvalidImageError("not a regular file", path=path)
    if st.st_size == 0:
        raise InvalidImageError("empty file (0 bytes)", path=path)

    image = _open(path, path, label)
    with image:
        loaded = _from_pil(image, path=path, name=label)
    logger.debug("loaded %s: %dx%d", path, loaded.width, loaded.height)
    return loaded


def _open(fp: Any, path: Optional[str], name: str) -> Image.Image:
    """Read the header only (Pillow's bomb limit replaced by ours) and check the size before any decode."""
    with _pil_limit_disabled():
        try:
            image = Image.open(fp)
        except UnidentifiedImageError:
            raise _fail("not an image, or a format/variant Pillow cannot read (e.g. multi-channel float TIFF)",
                        path, name) from None
        except PermissionError:
            raise _fail("permission denied", path, name) from None
        except _DECODE_ERRORS as e:
            raise _fail(f"cannot read image header: {e}", path, name) from None
    try:
        _check_size(image.size[0], image.size[1], path, name)
    except InvalidImageError:
        image.close()
        raise
    return image


def open_encoded(data: bytes, name: str) -> Image.Image:
    """An encoded image held in memory (an upload), its header read and its size checked, not yet decoded: the
    caller learns what the decode will cost (``image.size``) before paying it. Decode with :func:`load_image`."""
    if not data:
        raise _fail("empty file (0 bytes)", None, name)
    return _open(io.BytesIO(data), None, name)


def _from_pil(image: Image.Image, path: Optional[str], name: str) -> LoadedImage:
    width, height = image.size
    _check_size(width, height, path, name)  # the header only has been read so far
    try:
        with _pil_limit_disabled():
            image.load()  # force the full decode of the first frame: truncation shows up here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if path is not None:
            raise ImageTooLargeError(f"image too large: {e}", path=path) from None
        raise ImageTooLargeError(f"{name}: image too large: {e}") from None
    except _DECODE_ERRORS as e:
        text = str(e)
        if "truncated" in text.lower() or isinstance(e, EOFError):
            reason = f"truncated or corrupt image file ({text or type(e).__name__})"
        else:
            reason = f"cannot decode image: {text or type(e).__name__}"
        raise _fail(reason, path, name) from None
    if image.size != (width, height):  # a GIF frame may extend the canvas
        _check_size(image.size[0], image.size[1], path, name)
    orientation = _exif_orientation(image)
    arr = _pil_to_array(image, path, name)
    rgb = _to_rgb8(arr, path, name)
    rgb = _apply_orientation(rgb, orientation)
    return LoadedImage(np.ascontiguousarray(rgb), path, name)


def _exif_orientation(image: Image.Image) -> int:
    """EXIF (or XMP, which Pillow folds into getexif) orientation 1..8; 1 when absent/invalid."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
        value = int(value)
    except Exception as e:  # malformed EXIF must not make an otherwise good image unreadable
        logger.debug("ignoring unreadable EXIF: %s", e)
        return 1
    return value if 1 <= value <= 8 else 1


def _apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Same transforms as ``PIL.ImageOps.exif_transpose``, on an (H, W, C) array."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return arr[:, ::-1]
    if orientation == 3:  # ROTATE_180
        return arr[::-1, ::-1]
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return arr[::-1]
    if orientation == 5:  # TRANSPOSE
        return arr.swapaxes(0, 1)
    if orientation == 6:  # ROTATE_270 (90 degrees clockwise)
        return np.rot90(arr, -1)
    if orientation == 7:  # TRANSVERSE
        return arr.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:  # ROTATE_90 (90 degrees counter-clockwise)
        return np.rot90(arr, 1)
    return arr


def _tiff_sample_info(image: Image.Image) -> Tuple[Optional[int], int]:
    """(bits per sample, TIFF SampleFormat) of a TIFF; (None, 1) for other formats."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return None, 1
    bits = tags.get(258)
    fmt = tags.get(339, 1)
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    if isinstance(fmt, tuple):
        fmt = fmt[0] if fmt else 1
    return (int(bits) if bits is not None else None), int(fmt)


def _pil_to_array(image: Image.Image, path: Optional[str], name: str) -> np.ndarray:
    """Pixels as an array whose dtype carries the scale: uint8, uint16, bool or float32."""
    mode = image.mode
    if mode in ("RGB", "RGBA", "L"):
        return np.asarray(image)
    if mode == "1":
        return np.asarray(image, dtype=bool)
    if mode == "LA" or mode == "PA" or mode == "RGBa":
        return np.asarray(image.convert("RGBA"))
    if mode == "P":
        has_alpha = "transparency" in image.info or (
            image.palette is not None and image.palette.mode == "RGBA"
        )
        return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    if mode in ("RGBX", "CMYK", "YCbCr", "HSV"):
        return np.asarray(image.convert("RGB"))
    if mode.startswith("I;16") and mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(image).astype(np.uint16)  # native byte order
    if mode == "I":
        return _int32_image_to_uint16_or_float(np.asarray(image), image, path, name)
    if mode == "F":
        return np.asarray(image, dtype=np.float32)
    raise _fail(f"unsupported image mode {mode!r}", path, name)


def _int32_image_to_uint16_or_float(
    values: np.ndarray, image: Image.Image, path: Optional[str], name: str
) -> np.ndarray:
    """Pillow mode "I": 32-bit TIFF samples use the 32-bit range, anything else is 16-bit."""
    bits, sample_format = _tiff_sample_info(image)
    if bits == 32 and sample_format == 1:  # unsigned 32-bit, stored by Pillow as int32
        u = values.astype(np.int32, copy=False).view(np.uint32).astype(np.uint64)
        return ((u * 255 + _UINT32_MAX // 2) // _UINT32_MAX).astype(np.uint8)
    mn, mx = int(values.min()), int(values.max())
    if bits == 32:  # signed 32-bit: the non-negative range [0, 2**31-1] maps to [0, 255]
        if mn < 0:
            raise _fail(
                f"32-bit signed integer image has negative values (min {mn}); "
                "intensity images must be >= 0", path, name)
        v = values.astype(np.int64)
        return ((v * 255 + _INT32_MAX // 2) // _INT32_MAX).astype(np.uint8)
    if mn < 0 or mx > _UINT16_MAX:
        raise _fail(
            f"32-bit integer image (mode 'I') with values in [{mn}, {mx}], outside the 16-bit "
            f"range [0, {_UINT16_MAX}] it is read as", path, name)
    return values.astype(np.uint16)


# --------------------------------------------------------------------------------------------
# arrays and tensors


def _validate_array(arr: np.ndarray, path: Optional[str], name: str) -> np.ndarray:
    """Check the layout (HxW, HxWx1/3/4) and dtype of a user array; return HxW or HxWxC."""
    kind = arr.dtype.kind
    if kind not in "buif":
        raise _fail(
            f"unsupported dtype {arr.dtype}; use uint8 (0-255), uint16 (0-65535), bool or "
            "float (0-1)", path, name)
    if arr.ndim == 2:
        pass
    elif arr.ndim == 3:
        channels = arr.shape[2]
        if channels not in (1, 3, 4):
            hint = ""
            if arr.shape[0] in (1, 3, 4):
                hint = " (it looks channels-first; NumPy images are HxWxC: use arr.transpose(1, 2, 0))"
            raise _fail(
                f"unsupported shape {arr.shape}: expected HxW, HxWx1, HxWx3 or HxWx4{hint}",
                path, name)
    elif arr.ndim == 4:
        raise _fail(
            f"4-D array {arr.shape} is a batch; pass it as a batch (expand_inputs / a list) "
            "or index one image", path, name)
    else:
        raise _fail(
            f"unsupported shape {arr.shape}: expected HxW, HxWx1, HxWx3 or HxWx4", path, name)
    _check_size(int(arr.shape[1]), int(arr.shape[0]), path, name)
    if kind in "iu" and arr.dtype not in (np.uint8, np.uint16):
        mn, mx = int(arr.min()), int(arr.max())
        if mn < 0 or mx > 255:
            raise _fail(
                f"integer array of dtype {arr.dtype} with values in [{mn}, {mx}]: only uint8 "
                "(0-255) and uint16 (0-65535) are unambiguous; cast explicitly, e.g. "
                "arr.astype(np.uint16) for 16-bit data", path, name)
        arr = arr.astype(np.uint8)
    return arr


def _to_rgb8(arr: np.ndarray, path: Optional[str], name: str) -> np.ndarray:
    """uint8 / uint16 / bool / float [0,1] HxW[xC] -> HxWx3 uint8, alpha composited."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 2:  # only reachable for odd PIL modes
        raise _fail(f"unsupported channel count {arr.shape[2]}", path, name)
    alpha = arr[:, :, 3:4] if arr.shape[2] == 4 else None
    color = arr[:, :, :3] if arr.shape[2] == 4 else arr
    background = _background()

    if arr.dtype == np.uint8:
        if alpha is None:
            out = color
        else:
            a = alpha.astype(np.uint32)
            out = (color.astype(np.uint32) * a + background.astype(np.uint32) * (255 - a)
                   + 127) // 255
    elif arr.dtype == np.bool_ and alpha is None:
        out = color.astype(np.uint8) * np.uint8(255)
    elif arr.dtype == np.uint16 and alpha is None:
        out = (color.astype(np.uint32) * 255 + _UINT16_MAX // 2) // _UINT16_MAX
    else:
        unit = _to_unit_float(arr, path, name)
        a = unit[:, :, 3:4] if alpha is not None else None
        c = unit[:, :, :3] if alpha is not None else unit
        if a is not None:
            c = c * a + (background.astype(unit.dtype) / 255) * (1 - a)
        out = np.rint(c * 255)
    out = out.astype(np.uint8, copy=False)
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    if out is arr or not out.flags.writeable or not out.flags.c_contiguous:
        out = np.array(out, dtype=np.uint8, order="C")
    return out


def _to_unit_float(arr: np.ndarray, path: Optional[str], name: str) -> np.ndarray:
    """Scale to float in [0, 1] by the dtype's range; floats are checked (finite, in [0, 1])."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / _UINT16_MAX
    f = arr.astype(np.float64 if arr.dtype == np.float64 else np.float32, copy=False)
    finite = np.isfinite(f)
    if not finite.all():
        n_nan = int(np.isnan(f).sum())
        n_inf = int(f.size - finite.sum()) - n_nan
        raise _fail(f"image contains non-finite values ({n_nan} NaN, {n_inf} Inf)", path, name)
    mn, mx = float(f.min()), float(f.max())
    tol = float(settings.FLOAT_RANGE_TOLERANCE)
    if mn < -tol or mx > 1 + tol:
        hint = ""
        if mx > 1 + tol and mn >= 0 and mx <= 255:
            hint = " (0-255 data? divide by 255 or pass uint8)"
        elif mn < 0:
            hint = " (normalised data? pass it before normalisation)"
        raise _fail(
            f"float values must lie in [0, 1], found [{mn:.6g}, {mx:.6g}]{hint}", path, name)
    if mn < 0 or mx > 1:
        logger.debug("%s: clipping float values [%g, %g] to [0, 1]", path or name, mn, mx)
        f = np.clip(f, 0, 1)
    return f


def _background() -> np.ndarray:
    bg = np.asarray(settings.ALPHA_BACKGROUND)
    if bg.shape != (3,) or bg.dtype.kind not in "iu" or bg.min() < 0 or bg.max() > 255:
        raise ValueError(
            "visualad.settings.ALPHA_BACKGROUND must be three integers in 0..255, got "
            f"{settings.ALPHA_BACKGROUND!r}")
    return bg.astype(np.uint8).reshape(1, 1, 3)


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor cannot exist unless torch was imported
    return torch is not None and isinstance(obj, torch.Tensor)


def _tensor_to_rgb8(tensor: Any, name: str) -> np.ndarray:
    """CxHxW / 1xCxHxW / HxW tensor (float [0,1], uint8, bool, ...) -> HxWx3 uint8."""
    import torch

    t = tensor.detach()
    shape = tuple(t.shape)
    if t.is_complex():
        raise _fail(f"unsupported dtype {t.dtype}", None, name)
    if t.ndim == 4:
        if shape[0] != 1:
            raise _fail(
                f"tensor of shape {shape} is a batch of {shape[0]} images; pass it as a batch "
                "(expand_inputs / a list) or index one image", None, name)
        t = t[0]
    if t.ndim == 3:
        if shape[-3] not in (1, 3, 4):
            hint = ""
            if shape[-1] in (1, 3, 4):
                hint = " (it looks channels-last; tensors are CxHxW: use t.permute(2, 0, 1))"
            raise _fail(
                f"unsupported tensor shape {shape}: expected CxHxW or 1xCxHxW with C in "
                f"1, 3, 4{hint}", None, name)
    elif t.ndim != 2:
        raise _fail(
            f"unsupported tensor shape {shape}: expected CxHxW or 1xCxHxW with C in 1, 3, 4",
            None, name)
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    try:
        arr = t.cpu().numpy()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        raise _fail(f"cannot read tensor ({t.dtype}, {t.device}): {e}", None, name) from None
    if arr.ndim == 3:
        arr = arr.transpose(1, 2, 0)
    arr = _validate_array(arr, path=None, name=name)
    return _to_rgb8(arr, path=None, name=name)
