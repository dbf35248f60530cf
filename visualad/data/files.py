"""Finding image files: one extension list and one folder walker for predict, calibrate, datasets and the CLI."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Set

from .. import settings
from ..errors import InvalidImageError
from ..types import PathLike

logger = logging.getLogger(__name__)


def is_image_name(name: str) -> bool:
    """A visible file whose extension is in ``settings.IMAGE_EXTENSIONS`` (case-insensitive)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in {
        e.lower() for e in settings.IMAGE_EXTENSIONS}


def iter_image_files(folder: PathLike, recursive: bool = True) -> Iterator[Path]:
    """Yield the image files under ``folder`` in sorted (depth-first, by name) order.

    Files are matched by :func:`is_image_name`; names starting with "." are skipped. Symlinked directories
    are followed, but each real directory is walked at most once, so symlink loops terminate. An entry with an
    image's name that is not a readable regular file (a dangling link, a link loop, a FIFO) is yielded too,
    for the reader to report. A generator: a folder of a million files is never listed whole.
    """
    root = Path(folder)
    if not root.exists():
        raise InvalidImageError("folder not found", path=os.fspath(root))
    if not root.is_dir():
        raise InvalidImageError("not a folder", path=os.fspath(root))
    visited: Set[str] = set()

    def walk(directory: Path) -> Iterator[Path]:
        real = os.path.realpath(directory)
        if real in visited:
            logger.debug("skipping %s: already visited (symlink loop or duplicate)", directory)
            return
        visited.add(real)
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            logger.warning("cannot list folder %s: %s", directory, e)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                if recursive:
                    yield from walk(Path(entry.path))
            elif is_image_name(entry.name):
                # also a dangling link, a link loop or a FIFO by an image's name: the reader says which (it
                # stats before it opens), so a batch reports it instead of losing it
                yield Path(entry.path)

    return walk(root)
