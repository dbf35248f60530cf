"""Plain URL downloads (the authors' GitHub release, which redirects to its LFS media host): pinned by sha256,
streamed to a temporary file with a bounded read timeout, verified, then renamed into
``<visualad cache>/downloads/<sha256>/<filename>``."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any, Optional

from ..errors import OfflineError, WeightsError
from ..paths import cache_dir as visualad_cache_dir
from ..types import PathLike
from .safe import LFS_POINTER_PREFIX
from .verify import (
    CHUNK,
    check_sha256_arg,
    hint_command,
    is_offline,
    lfs_pointer_message,
    record_verified,
    sha256_file,
    verified_before,
    version,
)

logger = logging.getLogger(__name__)

#: Seconds without data before a plain URL download gives up (``VISUALAD_DOWNLOAD_TIMEOUT`` overrides).
DEFAULT_TIMEOUT = 60.0


def _safe_filename(url: str, filename: Optional[str]) -> str:
    name = filename or Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    if name in ("", ".", "..") or name.startswith("."):
        name = "download" if name in ("", ".", "..") else name.lstrip(".") or "download"
    return name


def _timeout() -> float:
    try:
        return float(os.environ.get("VISUALAD_DOWNLOAD_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


def _progress_bar(total: Optional[int], name: str, progress: bool) -> Any:
    if not (progress and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, leave=False)


def _remove_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()  # only when empty
            else:
                path.unlink()


def url_download(
    url: str,
    *,
    sha256: str,
    size: Optional[int] = None,
    filename: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    local_files_only: Optional[bool] = None,
    fetch_hint: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Fetch a non-Hub file pinned by ``sha256`` into ``<cache>/downloads/<sha256>/<filename>``.

    Keyed by the digest, so a cache hit needs no network at all (re-verified by size, and by sha256 until a
    ``.verified`` marker records it). Redirects are followed (GitHub raw -> LFS media host). The body is streamed
    into a temporary file next to the target while hashing and only renamed into place when size and sha256
    match; any failure leaves nothing behind and raises :class:`WeightsError` (or :class:`OfflineError` when the
    network may not be used and the file is not cached).
    """
    digest = check_sha256_arg(sha256)
    if digest is None:
        raise ValueError("url_download needs the expected sha256 of the file")
    name = _safe_filename(url, filename)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else visualad_cache_dir()
    folder = folder / "downloads" / digest
    target = folder / name
    marker = folder / ".verified"
    offline = is_offline(local_files_only)

    if target.is_file():
        if _cached_ok(target, digest, size, marker):
            logger.debug("cache hit %s -> %s", url, target)
            return target
        logger.warning("cached %s failed verification; removing it", target)
        _remove_quietly(target, marker)

    if offline:
        hint = (f"`{hint_command(fetch_hint)}`" if fetch_hint
                else f"`curl -L -o {target} {url}` (sha256 {digest})")
        raise OfflineError(
            f"'{name}' (sha256 {digest}) is not in the local cache at {target} and network access is disabled "
            f"(local_files_only=True or HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE/VISUALAD_OFFLINE is set). "
            f"Fetch it once with network access: {hint}, then retry. Source: {url}")

    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            actual_digest, actual_size, head = _stream(url, fh, name=name, size=size, progress=progress,
                                                       by_hand=f"on a machine with access: `curl -L -o {name} "
                                                               f"{url}`, then copy it to {target} (checked "
                                                               f"against sha256 {digest} on use)")
            fh.flush()
            os.fsync(fh.fileno())
        if head.startswith(LFS_POINTER_PREFIX) and actual_size < 1024 and actual_digest != digest:
            raise WeightsError(lfs_pointer_message(f"the file at {url}", head))
        if size is not None and actual_size != size:
            raise WeightsError(f"download of {url} has the wrong size: expected {size} bytes, got {actual_size}.")
        if actual_digest != digest:
            raise WeightsError(f"download of {url} failed verification: expected sha256 {digest}, got "
                               f"{actual_digest} ({actual_size} bytes). Nothing was cached; retry, and report it "
                               "if it persists.")
        os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp, folder)
        raise
    record_verified(target.resolve(), digest, marker)
    logger.info("downloaded %s (%d bytes) -> %s", url, actual_size, target)
    return target


def _cached_ok(target: Path, digest: str, size: Optional[int], marker: Path) -> bool:
    actual_size = target.stat().st_size
    if size is not None and actual_size != size:
        return False
    if verified_before(target.resolve(), digest, marker):
        return True
    if sha256_file(target) != digest:
        return False
    record_verified(target.resolve(), digest, marker)
    return True


def _stream(url: str, fh: IO[bytes], *, name: str, size: Optional[int], progress: bool, by_hand: str) -> tuple:
    """Copy ``url`` into ``fh``; return (sha256, byte count, first bytes). Raises WeightsError on any failure."""
    request = urllib.request.Request(url, headers={"User-Agent": f"visualad/{version()}",
                                                   "Accept-Encoding": "identity"})
    digest = hashlib.sha256()
    count = 0
    head = b""
    try:
        with urllib.request.urlopen(request, timeout=_timeout()) as response:  # follows redirects
            length_header = response.headers.get("Content-Length")
            promised = int(length_header) if length_header and length_header.isdigit() else None
            limit = size if size is not None else promised
            bar = _progress_bar(limit, name, progress)
            try:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    if len(head) < 512:
                        head += chunk[: 512 - len(head)]
                    digest.update(chunk)
                    fh.write(chunk)
                    count += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                    if size is not None and count > size:
                        raise WeightsError(f"download of {url} has the wrong size: expected {size} bytes, the server "
                                       f"sent more (Content-Length {promised}). Nothing was cached.")
            finally:
                if bar is not None:
                    bar.close()
            if promised is not None and count != promised:
                raise WeightsError(f"download of {url} was interrupted: expected {promised} bytes "
                                   f"(Content-Length), got {count}. Nothing was cached; retry.")
    except WeightsError:
        raise
    except urllib.error.HTTPError as exc:
        raise WeightsError(f"download of {url} failed: HTTP {exc.code} {exc.reason}.") from exc
    except urllib.error.URLError as exc:
        raise WeightsError(f"could not reach {url}: {exc.reason}. Check the connection and proxy "
                           f"(HTTPS_PROXY), or fetch the file by hand {by_hand}.") from exc
    except Exception as exc:  # IncompleteRead, reset connection, timeout
        raise WeightsError(f"download of {url} was interrupted after {count} bytes"
                           f"{f' of {size}' if size is not None else ''}: {type(exc).__name__}: {exc}. "
                           "Nothing was cached; retry.") from exc
    return digest.hexdigest(), count, head
