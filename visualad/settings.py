"""Process-wide settings of visualad's image-input layer.

They are read at call time, so a change takes effect at once::

    import visualad.settings
    visualad.settings.MAX_IMAGE_PIXELS = 250_000_000   # trust bigger files

See ``docs/input-handling.md`` for what each input kind is turned into.
"""
from __future__ import annotations

from typing import FrozenSet, Tuple

#: Largest image, in pixels (width * height), that visualad will decode. A file above it is
#: refused with :class:`visualad.errors.ImageTooLargeError` *after reading its header only*, so a
#: decompression bomb (a tiny file that inflates to gigabytes) never allocates its pixels. The
#: same limit applies to arrays and tensors. It replaces Pillow's own ``PIL.Image.MAX_IMAGE_PIXELS``
#: while visualad decodes a file (Pillow's limit neither warns nor refuses then). 100 MP holds a
#: 10000 x 10000 image; the model resizes every input to its small square input size anyway,
#: so bigger images should be downscaled or tiled before they are passed in.
MAX_IMAGE_PIXELS: int = 100_000_000

#: RGB colour (0-255 each) on which images with an alpha channel (LA, RGBA, PA, palette images
#: with transparency, HxWx4 arrays, 4-channel tensors) are composited: out = a*colour + (1-a)*bg.
#: White, like a transparent image shown on a page. Dropping alpha instead would expose
#: whatever colour happens to be stored under fully transparent pixels.
ALPHA_BACKGROUND: Tuple[int, int, int] = (255, 255, 255)

#: Float images (arrays, tensors, 32-bit float TIFF) must lie in [0, 1]. Values outside by at
#: most this much (rounding noise from resampling or normalisation) are clipped; further out
#: is an error, because it means the data is on another scale (0-255, normalised, ...).
FLOAT_RANGE_TOLERANCE: float = 1e-3

#: File extensions (lower case) that ``iter_image_files`` picks up in a folder, compared
#: case-insensitively. Only the folder walk uses them: ``load_image`` reads any file Pillow can
#: identify, whatever its name.
IMAGE_EXTENSIONS: FrozenSet[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)

# There is deliberately no minimum image side: an image smaller than the model input is simply
# upsampled by the preprocessing resize. Only zero-size images (a side of 0) are refused.
