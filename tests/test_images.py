"""Tests of the image-input layer (visualad.data.images): every conversion, every error,
property tests over arrays, folder walking, resizing, and the decompression-bomb guard."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from hypothesis.extra import numpy as hnp
from conftest import require
from PIL import Image, ImageOps

import visualad.settings as vsettings
from visualad.data.files import iter_image_files
from visualad.data.images import (
    LoadedImage,
    expand_inputs,
    load_image,
    resize_map,
    resize_to_square,
)
from visualad.errors import ImageTooLargeError, InvalidImageError, VisualADError

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------
# helpers


def write_tiff(path: Path, arr: np.ndarray, sample_format: int) -> None:
    """Minimal little-endian baseline TIFF (uncompressed, one strip), for sample types Pillow
    cannot write itself (unsigned 32-bit, multi-channel 16-bit)."""
    arr = np.ascontiguousarray(arr)
    h, w = arr.shape[:2]
    spp = 1 if arr.ndim == 2 else arr.shape[2]
    bits = arr.dtype.itemsize * 8
    data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    n_tags = 11
    extra_off = 8 + 2 + n_tags * 12 + 4
    extra = b""

    def shorts(vals):
        nonlocal extra
        if len(vals) <= 2:
            return struct.pack("<" + "H" * len(vals), *vals).ljust(4, b"\0")
        off = extra_off + len(extra)
        extra += struct.pack("<" + "H" * len(vals), *vals)
        return struct.pack("<I", off)

    bits_v, fmt_v = shorts([bits] * spp), shorts([sample_format] * spp)
    data_off = extra_off + len(extra) + 16
    tags = [
        (256, 4, 1, struct.pack("<I", w)),
        (257, 4, 1, struct.pack("<I", h)),
        (258, 3, spp, bits_v),
        (259, 3, 1, struct.pack("<HH", 1, 0)),
        (262, 3, 1, struct.pack("<HH", 2 if spp >= 3 else 1, 0)),
        (273, 4, 1, struct.pack("<I", data_off)),
        (277, 3, 1, struct.pack("<HH", spp, 0)),
        (278, 4, 1, struct.pack("<I", h)),
        (279, 4, 1, struct.pack("<I", len(data))),
        (284, 3, 1, struct.pack("<HH", 1, 0)),
        (339, 3, spp, fmt_v),
    ]
    out = b"II*\0" + struct.pack("<IH", 8, len(tags))
    for tag, typ, cnt, val in tags:
        out += struct.pack("<HHI", tag, typ, cnt) + val
    out += struct.pack("<I", 0) + extra
    path.write_bytes(out.ljust(data_off, b"\0") + data)


def write_bomb_png(path: Path, side: int = 20000) -> None:
    """A valid 1-bit grayscale PNG of side x side zeros: ~50 MB of pixels deflate to ~50 KB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))


def rgb(*pixels):
    """A 1xN RGB uint8 array from pixel tuples."""
    return np.array([list(pixels)], dtype=np.uint8)


def gray_rgb(values):
    """A 1xN gray row replicated to RGB."""
    v = np.array([values], dtype=np.uint8)
    return np.repeat(v[:, :, None], 3, axis=2)


def save(img: Image.Image, tmp: Path, name: str, **kw) -> Path:
    p = tmp / name
    img.save(p, **kw)
    return p


# 16-bit values and their exact rounded 8-bit images: v * 255 / 65535, half rounded up
U16 = [0, 128, 257, 32767, 32768, 65535]
U16_TO_8 = [0, 0, 1, 127, 128, 255]


# ------------------------------------------------------------------------------------------
# conversion table: name -> builder(tmp_path) -> (source, expected (H, W, 3) uint8 array)


def _png_rgb(t):
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 13
    return save(Image.fromarray(a), t, "rgb.png"), a


def _bmp(t):
    a = rgb((1, 2, 3), (250, 128, 0))
    return save(Image.fromarray(a), t, "x.bmp"), a


def _webp_lossless(t):
    a = rgb((10, 200, 30), (0, 0, 0), (255, 255, 255))
    return save(Image.fromarray(a), t, "x.webp", lossless=True), a


def _jpeg(t):  # lossy: a flat colour survives exactly enough to compare with Pillow's decode
    p = save(Image.new("RGB", (16, 16), (200, 40, 90)), t, "x.jpg", quality=95)
    return p, np.asarray(Image.open(p).convert("RGB"))


def _gray_png(t):
    return save(Image.fromarray(np.array([[0, 77, 255]], np.uint8)), t, "g.png"), gray_rgb(
        [0, 77, 255])


def _one_bit(t):
    im = Image.fromarray(np.array([[True, False, True]])).convert("1")
    return save(im, t, "b.png"), gray_rgb([255, 0, 255])


def _la_png(t):
    im = Image.fromarray(np.array([[[100, 128], [100, 0], [100, 255]]], np.uint8), "LA")
    # 100 at alpha 128 on white: (100*128 + 255*127) / 255 = 177.2 -> 177
    return save(im, t, "la.png"), gray_rgb([177, 255, 100])


def _rgba_png(t):
    a = np.array([[[200, 100, 0, 128], [1, 2, 3, 0], [9, 8, 7, 255]]], np.uint8)
    return save(Image.fromarray(a), t, "rgba.png"), rgb((227, 177, 127), (255, 255, 255),
                                                        (9, 8, 7))


def _palette(t):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255])
    im.putpixel((1, 0), 1)
    return save(im, t, "p.png"), rgb((255, 0, 0), (0, 0, 255))


def _palette_transparency(t):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255])
    im.putpixel((1, 0), 1)
    return save(im, t, "pt.png", transparency=1), rgb((255, 0, 0), (255, 255, 255))


def _pa_in_memory(t):
    im = Image.new("P", (1, 1))
    im.putpalette([200, 100, 0])
    im.putalpha(128)
    assert im.mode == "PA"
    return im, rgb((227, 177, 127))


def _gif_first_frame(t):
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    p = t / "a.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    return p, np.full((4, 4, 3), (255, 0, 0), np.uint8)


def _cmyk_tiff(t):
    return save(Image.new("CMYK", (2, 1), (0, 255, 255, 0)), t, "c.tif"), rgb((255, 0, 0),
                                                                              (255, 0, 0))


def _ycbcr_in_memory(t):
    im = Image.new("YCbCr", (2, 1), (128, 90, 200))
    return im, np.asarray(im.convert("RGB"))


def _png16(t):
    return save(Image.fromarray(np.array([U16], np.uint16)), t, "g16.png"), gray_rgb(U16_TO_8)


def _tiff16(t):
    return save(Image.fromarray(np.array([U16], np.uint16)), t, "g16.tif"), gray_rgb(U16_TO_8)


def _i16b_in_memory(t):
    im = Image.frombytes("I;16B", (len(U16), 1), np.array(U16, ">u2").tobytes())
    return im, gray_rgb(U16_TO_8)


def _mode_i_in_memory(t):  # Pillow's historical container for 16-bit data: read as 16-bit
    im = Image.fromarray(np.array([U16], np.int32))
    assert im.mode == "I"
    return im, gray_rgb(U16_TO_8)


def _tiff_int32(t):
    vals = np.array([[0, 2**31 - 1, 2**30, 2**23]], np.int32)
    # v * 255 / (2**31 - 1): 0, 255, 127.50000006 -> 128, 0.996 -> 1
    return save(Image.fromarray(vals), t, "i32.tif"), gray_rgb([0, 255, 128, 1])


def _tiff_uint32(t):
    p = t / "u32.tif"
    write_tiff(p, np.array([[0, 2**32 - 1, 2**31, 2**24]], np.uint32), sample_format=1)
    return p, gray_rgb([0, 255, 128, 1])


def _tiff_float(t):
    vals = np.array([[0, 0.5, 1, 0.25, 1.0005, -0.0004]], np.float32)
    # x * 255 rounded (0.5 -> 127.5 -> 128 half-even), within-1e-3 overshoot clipped
    return save(Image.fromarray(vals), t, "f.tif"), gray_rgb([0, 128, 255, 64, 255, 0])


def _tiff_rgb16(t):  # Pillow reduces multi-channel 16-bit TIFF to 8 bits by the high byte
    p = t / "rgb16.tif"
    write_tiff(p, np.array([[[0, 30000, 65535], [257, 514, 1000]]], np.uint16), 1)
    return p, rgb((0, 117, 255), (1, 2, 3))


def _exif6(t):
    a = np.zeros((10, 20, 3), np.uint8)  # stored 20 wide, 10 high
    a[0, 0] = (255, 0, 0)  # stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    p = save(Image.fromarray(a), t, "e.png", exif=exif)
    want = np.zeros((20, 10, 3), np.uint8)
    want[0, 9] = (255, 0, 0)  # rotated 90 degrees clockwise: top-left goes to top-right
    return p, want


def _pil_rgb_in_memory(t):
    a = rgb((1, 2, 3))
    return Image.fromarray(a), a


def _np(arr, want):
    return lambda t: (arr, np.asarray(want, np.uint8))


def _tensor(tensor, want):
    return lambda t: (tensor, np.asarray(want, np.uint8))


CONVERSIONS = {
    "png_rgb": _png_rgb,
    "bmp": _bmp,
    "webp_lossless": _webp_lossless,
    "jpeg": _jpeg,
    "png_gray_L": _gray_png,
    "png_1bit": _one_bit,
    "png_LA_alpha": _la_png,
    "png_RGBA_alpha": _rgba_png,
    "png_palette": _palette,
    "png_palette_transparency": _palette_transparency,
    "pil_PA": _pa_in_memory,
    "gif_first_frame": _gif_first_frame,
    "tiff_CMYK": _cmyk_tiff,
    "pil_YCbCr": _ycbcr_in_memory,
    "png_16bit": _png16,
    "tiff_16bit": _tiff16,
    "pil_I16B": _i16b_in_memory,
    "pil_mode_I_16bit": _mode_i_in_memory,
    "tiff_int32": _tiff_int32,
    "tiff_uint32": _tiff_uint32,
    "tiff_float32": _tiff_float,
    "tiff_rgb16_high_byte": _tiff_rgb16,
    "png_exif_orientation_6": _exif6,
    "pil_rgb": _pil_rgb_in_memory,
    "np_HW_uint8": _np(np.array([[0, 9]], np.uint8), gray_rgb([0, 9])),
    "np_HW1_uint8": _np(np.array([[[0], [9]]], np.uint8), gray_rgb([0, 9])),
    "np_HW3_uint8": _np(rgb((1, 2, 3)), rgb((1, 2, 3))),
    "np_HW4_uint8": _np(np.array([[[200, 100, 0, 128]]], np.uint8), rgb((227, 177, 127))),
    "np_uint16": _np(np.array([U16], np.uint16), gray_rgb(U16_TO_8)),
    "np_bool": _np(np.array([[True, False]]), gray_rgb([255, 0])),
    "np_float16": _np(np.array([[0, 0.5, 1]], np.float16), gray_rgb([0, 128, 255])),
    "np_float32_rgb": _np(np.array([[[0, 0.25, 1]]], np.float32), rgb((0, 64, 255))),
    "np_float64": _np(np.array([[0.1, 0.9]], np.float64), gray_rgb([26, 230])),
    "np_float_clip_within_tol": _np(np.array([[-0.0009, 1.0009]]), gray_rgb([0, 255])),
    "np_float_rgba": _np(np.array([[[1.0, 0.0, 0.0, 0.5]]], np.float32), rgb((255, 128, 128))),
    "np_int64_in_uint8_range": _np(np.array([[0, 255]], np.int64), gray_rgb([0, 255])),
    "np_non_contiguous": _np(np.zeros((4, 6, 3), np.uint8)[::2, ::2], np.zeros((2, 3, 3))),
    "tensor_CHW_float": _tensor(torch.tensor([[[0.0, 1.0]], [[0.5, 0.0]], [[1.0, 0.25]]]),
                                rgb((0, 128, 255), (255, 0, 64))),
    "tensor_1CHW_uint8": _tensor(torch.tensor([[[[7]], [[8]], [[9]]]], dtype=torch.uint8),
                                 rgb((7, 8, 9))),
    "tensor_1HW": _tensor(torch.tensor([[[0.0, 1.0]]]), gray_rgb([0, 255])),
    "tensor_HW": _tensor(torch.tensor([[0.0, 1.0]]), gray_rgb([0, 255])),
    "tensor_4ch_alpha": _tensor(torch.tensor([[[1.0]], [[0.0]], [[0.0]], [[0.5]]]),
                                rgb((255, 128, 128))),
    "tensor_bfloat16": _tensor(torch.tensor([[[0.0, 1.0]]], dtype=torch.bfloat16),
                               gray_rgb([0, 255])),
    "tensor_bool": _tensor(torch.tensor([[True, False]]), gray_rgb([255, 0])),
    "tensor_requires_grad": _tensor(torch.ones(3, 1, 1, requires_grad=True), rgb((255,) * 3)),
}


@pytest.mark.parametrize("case", sorted(CONVERSIONS))
def test_conversion(case, tmp_path):
    source, want = CONVERSIONS[case](tmp_path)
    got = load_image(source)
    assert isinstance(got, LoadedImage)
    assert got.array.dtype == np.uint8 and got.array.ndim == 3 and got.array.shape[2] == 3
    assert got.array.flags.c_contiguous and got.array.flags.writeable
    np.testing.assert_array_equal(got.array, want)
    assert (got.height, got.width) == want.shape[:2]
    if isinstance(source, Path):
        assert got.path == str(source) and got.name == str(source)
    else:
        assert got.path is None


def test_input_array_is_not_aliased():
    a = rgb((1, 2, 3))
    got = load_image(a).array
    got[0, 0, 0] = 99
    assert a[0, 0, 0] == 1


def test_names_and_path_like(tmp_path):
    p, want = _png_rgb(tmp_path)
    got = load_image(str(p))
    np.testing.assert_array_equal(got.array, want)
    assert load_image(np.zeros((2, 2), np.uint8), name="<array 3>").name == "<array 3>"
    assert load_image(np.zeros((2, 2), np.uint8)).name == "<array>"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation, tmp_path):
    a = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = save(Image.fromarray(a), tmp_path, "o.png", exif=exif)
    want = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    np.testing.assert_array_equal(load_image(p).array, want)


def test_alpha_background_setting(monkeypatch):
    monkeypatch.setattr(vsettings, "ALPHA_BACKGROUND", (0, 0, 0))
    got = load_image(np.array([[[200, 100, 0, 128]]], np.uint8)).array
    # on black: c * 128 / 255
    np.testing.assert_array_equal(got, rgb((100, 50, 0)))


# ------------------------------------------------------------------------------------------
# error table: name -> builder(tmp_path) -> (source, exception type, reason substring)


def _truncated_png(t):
    a = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    p = save(Image.fromarray(a), t, "full.png")
    q = t / "trunc.png"
    q.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return q


def _truncated_jpeg(t):
    a = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    p = save(Image.fromarray(a), t, "full.jpg")
    q = t / "trunc.jpg"
    q.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return q


def _text_file(t):
    p = t / "notes.png"
    p.write_text("this is not an image")
    return p


def _empty(t):
    p = t / "empty.png"
    p.write_bytes(b"")
    return p


def _negative_int32_tiff(t):
    return save(Image.fromarray(np.array([[-5, 3]], np.int32)), t, "neg.tif")


ERRORS = {
    "file_not_found": (lambda t: t / "missing.png", InvalidImageError, "file not found"),
    "empty_file": (_empty, InvalidImageError, "empty file"),
    "folder": (lambda t: t, InvalidImageError, "folder"),
    "truncated_png": (_truncated_png, InvalidImageError, "truncated"),
    "truncated_jpeg": (_truncated_jpeg, InvalidImageError, "truncated"),
    "not_an_image": (_text_file, InvalidImageError, "not an image"),
    "negative_int32_tiff": (_negative_int32_tiff, InvalidImageError, "negative"),
    "unsupported_mode": (lambda t: Image.new("LAB", (2, 2)), InvalidImageError,
                         "unsupported image mode"),
    "pil_zero_size": (lambda t: Image.new("RGB", (0, 4)), InvalidImageError, "zero-size"),
    "pil_mode_I_out_of_16bit": (lambda t: Image.fromarray(np.array([[70000]], np.int32)),
                                InvalidImageError, "16-bit range"),
    "np_nan": (lambda t: np.array([[0.5, np.nan]]), InvalidImageError, "NaN"),
    "np_inf": (lambda t: np.array([[0.5, np.inf]], np.float32), InvalidImageError, "Inf"),
    "np_HW2": (lambda t: np.zeros((4, 4, 2), np.uint8), InvalidImageError, "unsupported shape"),
    "np_CHW": (lambda t: np.zeros((3, 8, 8), np.uint8), InvalidImageError, "channels-first"),
    "np_4d": (lambda t: np.zeros((2, 4, 4, 3), np.uint8), InvalidImageError, "batch"),
    "np_1d": (lambda t: np.zeros(5, np.uint8), InvalidImageError, "unsupported shape"),
    "np_complex": (lambda t: np.zeros((2, 2), complex), InvalidImageError, "dtype complex"),
    "np_object": (lambda t: np.zeros((2, 2), object), InvalidImageError, "dtype object"),
    "np_int64_out_of_range": (lambda t: np.array([[0, 300]], np.int64), InvalidImageError,
                              "[0, 300]"),
    "np_int_negative": (lambda t: np.array([[-1, 3]], np.int16), InvalidImageError, "[-1, 3]"),
    "np_float_above_1": (lambda t: np.array([[0, 255.0]]), InvalidImageError, "[0, 1]"),
    "np_float_below_0": (lambda t: np.array([[-0.5, 0.5]]), InvalidImageError, "[0, 1]"),
    "np_zero_size": (lambda t: np.zeros((0, 5, 3), np.uint8), InvalidImageError, "zero-size"),
    "tensor_5_channels": (lambda t: torch.zeros(5, 8, 8), InvalidImageError,
                          "unsupported tensor shape"),
    "tensor_HWC": (lambda t: torch.zeros(8, 8, 3), InvalidImageError, "channels-last"),
    "tensor_batch_2": (lambda t: torch.zeros(2, 3, 4, 4), InvalidImageError, "batch of 2"),
    "tensor_5d": (lambda t: torch.zeros(1, 1, 3, 4, 4), InvalidImageError, "tensor shape"),
    "tensor_normalised": (lambda t: torch.full((3, 2, 2), -1.5), InvalidImageError, "[0, 1]"),
    "tensor_nan": (lambda t: torch.full((3, 2, 2), float("nan")), InvalidImageError, "NaN"),
    "tensor_complex": (lambda t: torch.zeros(3, 2, 2, dtype=torch.complex64),
                       InvalidImageError, "dtype"),
    "unsupported_type": (lambda t: {"a": 1}, InvalidImageError, "unsupported input type"),
    "raw_bytes": (lambda t: b"\x89PNG", InvalidImageError, "raw bytes"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error(case, tmp_path):
    build, exc_type, reason = ERRORS[case]
    source = build(tmp_path)
    with pytest.raises(exc_type) as info:
        load_image(source, name="<input 7>")
    err = info.value
    assert isinstance(err, VisualADError) and isinstance(err, ValueError)
    message = str(err)
    assert reason in message
    if isinstance(source, Path):  # a file is named by its path
        assert err.path == str(source) and str(source) in message
    else:  # an in-memory input by its name
        assert "<input 7>" in message


def test_too_large_refused_before_decoding(tmp_path, monkeypatch):
    p = save(Image.new("RGB", (20, 10)), tmp_path, "x.png")
    monkeypatch.setattr(vsettings, "MAX_IMAGE_PIXELS", 199)
    with pytest.raises(ImageTooLargeError) as info:
        load_image(p)
    msg = str(info.value)
    assert str(p) in msg and "20x10" in msg and "MAX_IMAGE_PIXELS" in msg
    assert info.value.path == str(p)
    with pytest.raises(ImageTooLargeError, match="<array>"):
        load_image(np.zeros((10, 20), np.uint8))
    with pytest.raises(ImageTooLargeError):
        load_image(torch.zeros(3, 10, 20))
    monkeypatch.setattr(vsettings, "MAX_IMAGE_PIXELS", 200)  # exactly at the limit is fine
    assert load_image(p).array.shape == (10, 20, 3)


def test_pillow_global_limit_does_not_interfere(tmp_path, monkeypatch):
    p = save(Image.new("RGB", (20, 10)), tmp_path, "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60)  # Pillow: warn > 60, refuse > 120
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        assert load_image(p).array.shape == (10, 20, 3)
    assert Image.MAX_IMAGE_PIXELS == 60  # restored


def test_pillow_limit_restored_after_parallel_loads(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    paths = [save(Image.new("RGB", (30, 20), (i, 0, 0)), tmp_path, f"{i}.png") for i in range(16)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(lambda p: load_image(p).array[0, 0, 0], paths * 4))
    assert out == list(range(16)) * 4
    assert Image.MAX_IMAGE_PIXELS == 100


def test_decompression_bomb_header_only(tmp_path, monkeypatch):
    """A 20000x20000 (400 MP) PNG of ~50 KB is refused from its header: fast, flat memory.

    Pillow's own limit is off while visualad opens files, so only our guard stands here."""
    bomb = tmp_path / "bomb.png"
    write_bomb_png(bomb)
    assert bomb.stat().st_size < 1_000_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(bomb) as im:  # it is a genuine, decodable PNG
        assert im.size == (20000, 20000) and im.mode == "1"
    script = textwrap.dedent(
        """
        import json, resource, sys, time, tracemalloc
        from visualad.data.images import load_image
        from visualad.errors import ImageTooLargeError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            load_image(sys.argv[1])
            message = None
        except ImageTooLargeError as e:
            message = str(e)
        seconds = time.perf_counter() - t0
        traced = tracemalloc.get_traced_memory()[1]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(dict(message=message, seconds=seconds, traced=traced,
                              rss_growth_kb=after - before)))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["message"] is not None, "bomb was decoded instead of refused"
    assert "20000x20000" in result["message"] and "MAX_IMAGE_PIXELS" in result["message"]
    assert str(bomb) in result["message"]
    assert result["seconds"] < 1.0
    assert result["traced"] < 50 * 2**20
    assert result["rss_growth_kb"] < 50 * 1024


# ------------------------------------------------------------------------------------------
# property tests over arrays

_DTYPES = st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.bool_])


@st.composite
def _arrays(draw):
    h, w = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    channels = draw(st.sampled_from([None, 1, 3, 4]))
    dtype = np.dtype(draw(_DTYPES))
    shape = (h, w) if channels is None else (h, w, channels)
    if dtype.kind == "f":
        elements = st.one_of(
            st.floats(0, 1, width=dtype.itemsize * 8),
            st.floats(-0.0078125, 1.0078125, width=dtype.itemsize * 8),  # exact in f32
            st.sampled_from([np.nan, np.inf, -np.inf]),
        )
        return draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(hnp.arrays(dtype, shape))


_PROPS = hsettings(max_examples=150, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_PROPS
@given(_arrays())
def test_property_arrays_give_rgb8_or_typed_error(arr):
    try:
        out = load_image(arr).array
    except VisualADError:
        assert arr.dtype.kind == "f"  # only out-of-range / non-finite floats may fail
        finite = np.isfinite(arr)
        assert not finite.all() or arr.min() < -1e-3 or arr.max() > 1 + 1e-3
        return
    assert out.shape == (arr.shape[0], arr.shape[1], 3) and out.dtype == np.uint8
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        np.testing.assert_array_equal(out, arr)
    if arr.dtype.kind == "f" and (arr.ndim == 2 or arr.shape[2] in (1, 3)):
        want = np.rint(np.clip(arr.astype(np.float64), 0, 1) * 255)
        want = np.broadcast_to(want.reshape(arr.shape[0], arr.shape[1], -1), out.shape)
        assert np.abs(out.astype(int) - want).max() <= 1  # float32 vs float64 rounding


@_PROPS
@given(_arrays())
def test_property_tensors_match_arrays(arr):
    if arr.ndim == 2:
        tensor = torch.from_numpy(arr.copy())
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    if arr.dtype == np.uint16 and not hasattr(torch, "uint16"):
        return
    try:
        want = load_image(arr).array
    except VisualADError:
        with pytest.raises(VisualADError):
            load_image(tensor)
        return
    np.testing.assert_array_equal(load_image(tensor).array, want)


def test_uint16_scaling_is_exact_and_monotonic():
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = load_image(v).array[:, :, 0].ravel().astype(int)
    exact = np.floor(np.arange(65536) * 255 / 65535 + 0.5).astype(int)
    np.testing.assert_array_equal(out, exact)
    assert (np.diff(out) >= 0).all() and out[0] == 0 and out[-1] == 255


# ------------------------------------------------------------------------------------------
# expand_inputs


def test_expand_inputs():
    t = torch.zeros(4, 3, 5, 6)
    assert len(expand_inputs(t)) == 4 and expand_inputs(t)[0].shape == (3, 5, 6)
    assert len(expand_inputs([t, torch.zeros(2, 3, 5, 6), torch.zeros(3, 5, 6)])) == 7
    arr = np.zeros((3, 5, 6, 3), np.uint8)
    assert [x.shape for x in expand_inputs(arr)] == [(5, 6, 3)] * 3
    assert expand_inputs("a/b.png") == ["a/b.png"]
    assert expand_inputs(Path("dir")) == [Path("dir")]
    assert expand_inputs(("a.png", "b.png")) == ["a.png", "b.png"]
    assert expand_inputs(iter(["a.png"])) == ["a.png"]
    assert expand_inputs([]) == []
    single = np.zeros((5, 6, 3), np.uint8)
    assert len(expand_inputs(single)) == 1 and expand_inputs(single)[0] is single
    with pytest.raises(InvalidImageError, match="nested"):
        expand_inputs([["a.png"]])
    for item in expand_inputs([t, arr, single]):  # every item is loadable on its own
        assert load_image(item).array.shape[2] == 3


# ------------------------------------------------------------------------------------------
# iter_image_files


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_iter_image_files(tmp_path):
    root = tmp_path / "data"
    a = _touch(root / "a.PNG")
    b = _touch(root / "b.jpg")
    _touch(root / "notes.txt")
    _touch(root / ".hidden.png")
    _touch(root / ".cache" / "c.png")
    d = _touch(root / "sub" / "d.TIFF")
    e = _touch(root / "sub" / "deeper" / "e.webp")
    f = _touch(root / "z.gif")
    assert list(iter_image_files(root)) == [a, b, d, e, f]
    assert list(iter_image_files(root, recursive=False)) == [a, b, f]
    assert list(iter_image_files(str(root))) == [a, b, d, e, f]


def test_iter_image_files_symlink_loops(tmp_path):
    root = tmp_path / "data"
    a = _touch(root / "a.png")
    b = _touch(root / "sub" / "b.png")
    outside = _touch(tmp_path / "outside" / "o.png")
    try:
        os.symlink(root, root / "sub" / "loop")  # loop back to the root
        os.symlink(root / "sub", root / "sub2")  # second route to the same folder
        os.symlink(tmp_path / "outside", root / "x_link")  # a folder outside, followed once
    except (OSError, NotImplementedError):
        require(False, "symlinks not supported here")
    files = list(iter_image_files(root))
    assert files == [a, b, root / "x_link" / outside.name]


def test_iter_image_files_lists_unreadable_entries_for_the_reader_to_report(tmp_path):
    """A dangling link, a link loop and a FIFO by an image's name are listed, not dropped, and reading each is a
    clear error without blocking (a batch reports them as failed rows)."""
    root = tmp_path / "data"
    good = root / "a.png"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    try:
        os.symlink(tmp_path / "gone.png", root / "b_dangling.png")
        os.symlink("c_loop.png", root / "c_loop.png")  # a -> a
        os.mkfifo(root / "d_fifo.png")  # opening it would block forever
    except (OSError, NotImplementedError, AttributeError):
        require(False, "symlinks and FIFOs not supported here")
    os.symlink(tmp_path / "gone", root / "e_dangling_notes.txt")  # not an image's name: not listed
    files = list(iter_image_files(root))
    assert files == [good, root / "b_dangling.png", root / "c_loop.png", root / "d_fifo.png"]
    assert load_image(good).width == 8
    for name, reason in [("b_dangling.png", "file not found"), ("c_loop.png", "cannot access file"),
                         ("d_fifo.png", "not a regular file")]:
        with pytest.raises(InvalidImageError, match=reason) as err:
            load_image(root / name)
        assert name in str(err.value)


def test_read_mask_refuses_a_fifo_without_blocking(tmp_path):
    import threading

    from visualad.data.masks import read_mask
    from visualad.errors import DatasetError

    try:
        os.mkfifo(tmp_path / "m.png")
    except (OSError, AttributeError):
        require(False, "FIFOs not supported here")
    caught: list = []

    def read() -> None:
        try:
            read_mask(tmp_path / "m.png")
        except DatasetError as e:
            caught.append(str(e))

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "read_mask blocked on a FIFO"
    assert len(caught) == 1 and "not a regular file" in caught[0] and "m.png" in caught[0]


def test_iter_image_files_errors(tmp_path):
    with pytest.raises(InvalidImageError, match="folder not found"):
        list(iter_image_files(tmp_path / "missing"))
    f = _touch(tmp_path / "a.png")
    with pytest.raises(InvalidImageError, match="not a folder"):
        list(iter_image_files(f))


# ------------------------------------------------------------------------------------------
# resizing


def test_resize_to_square_matches_pil_bicubic():
    a = np.random.default_rng(1).integers(0, 256, (30, 70, 3), dtype=np.uint8)
    got = resize_to_square(a, 32)
    want = np.asarray(Image.fromarray(a).resize((32, 32), Image.BICUBIC))
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(resize_to_square(a[:, :30], 30), a[:, :30])  # identity
    assert resize_to_square(np.zeros((1, 1, 3), np.uint8), 14).shape == (14, 14, 3)  # upsample
    with pytest.raises(ValueError):
        resize_to_square(np.zeros((4, 4), np.uint8), 8)
    with pytest.raises(ValueError):
        resize_to_square(np.zeros((4, 4, 3), np.uint8), 0)


def test_resize_map():
    m = np.random.default_rng(2).random((37, 37)).astype(np.float32)
    same = resize_map(m, 37, 37)
    np.testing.assert_array_equal(same, m)
    assert same is not m and same.dtype == np.float32
    up = resize_map(m, 100, 60)
    want = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(100, 60),
                                           mode="bilinear", align_corners=False)[0, 0].numpy()
    assert up.shape == (100, 60) and up.dtype == np.float32
    np.testing.assert_allclose(up, want, atol=1e-5)
    for h, w in [(1, 5000), (5000, 1), (3, 20000), (1, 1)]:
        out = resize_map(m, h, w)
        assert out.shape == (h, w) and np.isfinite(out).all()
        assert out.min() >= m.min() - 1e-6 and out.max() <= m.max() + 1e-6
    assert resize_map(np.ones((1, 1), np.float64), 4, 7).tolist() == [[1.0] * 7] * 4
    with pytest.raises(ValueError):
        resize_map(np.zeros((2, 2, 2)), 4, 4)
    with pytest.raises(ValueError):
        resize_map(m, 0, 4)


def test_full_pipeline_non_square(tmp_path):
    a = np.random.default_rng(3).integers(0, 256, (30, 90, 3), dtype=np.uint8)
    loaded = load_image(save(Image.fromarray(a), tmp_path, "wide.png"))
    x = resize_to_square(loaded.array, 16)
    score_map = x[:, :, 0].astype(np.float32) / 255
    back = resize_map(score_map, loaded.height, loaded.width)
    assert back.shape == (30, 90)
