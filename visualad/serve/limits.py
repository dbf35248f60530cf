"""What one request may cost the service, enforced while it arrives: bytes while the body streams (every route,
chunked or not), images per request, and the pixels being decoded across all requests at once (a 97 KB PNG can
claim 10000 x 10000 pixels: about 1 GiB to decode).

No web framework beyond Starlette's multipart parser; the routes (:mod:`visualad.serve.app`) turn a
:class:`RequestError` into ``{"error": message}`` with its status.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, AsyncIterator, Iterator, List, Tuple

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from .errors import RequestError


async def bounded_stream(request: Any, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks, refused with 413 as soon as their total passes ``limit`` (nothing more is read)."""
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise RequestError(413, f"upload over the limit of {limit} bytes (--max-upload-mb)")
        yield chunk


async def read_body(request: Any, limit: int) -> bytes:
    return b"".join([chunk async for chunk in bounded_stream(request, limit)])


async def read_uploads(request: Any, limit: int, max_images: int) -> List[Tuple[str, bytes]]:
    """The ``file`` parts of a multipart/form-data body as (file name, bytes), parsed while the body streams."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise RequestError(415, "send images as multipart/form-data 'file' parts (this body is "
                                f"{ctype or 'without a content type'})")
    parser = MultiPartParser(request.headers, bounded_stream(request, limit), max_files=max_images, max_fields=16,
                             max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in str(exc):
            raise RequestError(413, f"more than {max_images} images in one request, the limit (--max-images)") from None
        raise RequestError(400, f"malformed multipart body: {exc}") from None
    try:
        files = []
        for i, part in enumerate(form.getlist("file")):
            if not isinstance(part, UploadFile):
                raise RequestError(400, f"'file' part {i + 1} has no filename: send each image as a file upload")
            files.append((part.filename or f"file{i + 1}", await part.read()))
    finally:
        await form.close()
    if not files:
        raise RequestError(400, "no 'file' parts in the request (multipart/form-data)")
    return files


class PixelBudget:
    """Pixels decoded or held by requests in flight, bounded across the whole server: a request waits (at most
    ``wait_s``) until its images fit, and one that could never fit is refused at once."""

    def __init__(self, total: int, wait_s: float = 30.0) -> None:
        self.total, self.wait_s = int(total), float(wait_s)
        self.used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        if pixels > self.total:
            raise RequestError(413, f"the images of this request hold {pixels:,} pixels, over this server's decode "
                                    f"limit of {self.total:,} pixels (--max-decode-mp); downscale or tile them")
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + pixels <= self.total, timeout=self.wait_s):
                raise RequestError(503, "the server is busy decoding other images; try again")
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()
