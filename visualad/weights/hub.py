"""The download layer: every byte of weights visualad fetches goes through here.

Why a layer of its own: downloads must be pinned (a Hub commit or a sha256), verified before anything loads them,
refused when they are Git LFS pointer files instead of weights, honour offline mode without touching the network,
and never leave a corrupt or half-written file in a cache where a later run would pick it up. Model code never
talks to the network directly; it asks for a path here.

Hub files go through ``huggingface_hub`` (its cache, ``HF_HOME``, ``HF_ENDPOINT``, token). Other files (the authors'
GitHub release, which redirects to GitHub's LFS media host) go through :func:`url_download`, cached under
``<visualad cache>/downloads/<sha256>/<filename>``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, Optional, Sequence, Union

from ..errors import OfflineError, WeightsError
from ..paths import cache_dir as visualad_cache_dir
from ..types import PathLike
from .safe import LFS_POINTER_PREFIX, is_lfs_pointer

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "true", "yes", "on"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VISUALAD_OFFLINE")
#: Seconds without data before a plain URL download gives up (``VISUALAD_DOWNLOAD_TIMEOUT`` overrides).
DEFAULT_TIMEOUT = 60.0

__all__ = [
    "LFS_POINTER_PREFIX",
    "hub_download",
    "hub_snapshot",
    "is_lfs_pointer",
    "is_offline",
    "sha256_file",
    "url_download",
]


# --------------------------------------------------------------------------------------------------- helpers
def is_offline(local_files_only: Optional[bool] = None) -> bool:
    """Whether the network must not be used.

    True if ``local_files_only`` is true, or ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` / ``VISUALAD_OFFLINE``
    is set to 1/true/yes. The variables are read at call time (``huggingface_hub`` reads its own once at import,
    which would miss a variable set later); if ``huggingface_hub`` itself was imported in offline mode it refuses
    every request anyway, so that counts too.
    """
    if local_files_only:
        return True
    if any(os.environ.get(var, "").strip().lower() in _TRUE for var in _OFFLINE_VARS):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(constants is not None and getattr(constants, "HF_HUB_OFFLINE", False))


def sha256_file(path: PathLike) -> str:
    """The hex sha256 of a file, read in chunks so multi-GB weights never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _lfs_pointer_fields(head: bytes) -> str:
    """``oid sha256:..., size ...`` from a pointer's text, for the error message."""
    fields = {}
    for line in head.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(" ")
        fields[key] = value.strip()
    bits = [f"{k} {fields[k]}" for k in ("oid", "size") if k in fields]
    return f" ({', '.join(bits)})" if bits else ""


def _lfs_pointer_message(source: str, head: bytes) -> str:
    return (
        f"{source} is a Git LFS pointer file{_lfs_pointer_fields(head)}, not the weights it points to. "
        "The repository stores the real file with Git LFS and this copy holds only the pointer text (a clone "
        "made without git-lfs, a mirror that copied the pointer, or a raw URL that does not resolve LFS). "
        "Download the real file: run `git lfs install && git lfs pull` in a clone, or use the release/media URL "
        "of the file, or `visualad download <name>` for a known model."
    )


def _check_sha256_arg(sha256: Optional[str]) -> Optional[str]:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:"):]
    if not _SHA256_RE.fullmatch(value):
        raise ValueError(f"sha256 must be 64 hex characters, got {sha256!r}")
    return value


def _version() -> str:
    try:
        from .._version import __version__

        return str(__version__)
    except Exception:  # pragma: no cover - partially initialised package
        return "0"


def _read_head(path: PathLike, n: int = 512) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


# ---------------------------------------------------------------------------------- verification markers
def _marker_file() -> Path:
    return visualad_cache_dir() / "verified"


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _verified_before(path: Path, sha256: str, marker: Path) -> bool:
    """A verified file is re-hashed only when its size/mtime/inode changed (hashing 1 GB on every load is slow)."""
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        return record.get("sha256") == sha256 and record.get("path") == str(path) and record.get("stat") == _stat_key(path)
    except (OSError, ValueError):
        return False


def _record_verified(path: Path, sha256: str, marker: Path) -> None:
    from ..atomic import atomic_write_json

    try:
        atomic_write_json(marker, {"sha256": sha256, "path": str(path), "stat": _stat_key(path)})
    except OSError as exc:  # a read-only cache only costs a re-hash next time
        logger.debug("could not record verification of %s: %s", path, exc)


# ------------------------------------------------------------------------------------------ Hugging Face Hub
def _hf_cache_dir(cache_dir: Optional[PathLike]) -> str:
    """The Hub cache folder, resolved now (``huggingface_hub`` resolves ``HF_HOME``/``HF_HUB_CACHE`` at import)."""
    if cache_dir is not None:
        return os.fspath(Path(cache_dir).expanduser())
    if os.environ.get("HF_HUB_CACHE"):
        return os.fspath(Path(os.environ["HF_HUB_CACHE"]).expanduser())
    if os.environ.get("HF_HOME"):
        return os.fspath(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hf_endpoint() -> Optional[str]:
    """``HF_ENDPOINT`` read now (``huggingface_hub`` reads it at import); None means the library default."""
    value = os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def _hint_command(fetch_hint: str) -> str:
    """``fetch_hint`` is a model name (``clip-l``) or already a whole command (``visualad download clip-l``)."""
    hint = fetch_hint.strip()
    return hint if " " in hint else f"visualad download {hint}"


def _fetch_command(repo_id: str, filename: Optional[str], revision: str, fetch_hint: Optional[str]) -> str:
    if fetch_hint:
        return _hint_command(fetch_hint)
    return f"huggingface-cli download {repo_id}{' ' + filename if filename else ''} --revision {revision}"


def _what(repo_id: str, filename: Optional[str], revision: str) -> str:
    return f"'{filename}' from Hub repo '{repo_id}' at revision {revision}" if filename else (
        f"Hub repo '{repo_id}' at revision {revision}")


def _warn_unpinned(repo_id: str, revision: str) -> None:
    if not _COMMIT_RE.fullmatch(revision):
        logger.warning(
            "revision %r of %s is not a full 40-character commit: the download is not pinned and may change "
            "under you; pin a commit for reproducible results", revision, repo_id)


def _map_hub_error(exc: BaseException, *, repo_id: str, filename: Optional[str], revision: str, offline: bool,
                   fetch_hint: Optional[str]) -> WeightsError:
    """Turn a ``huggingface_hub``/transport exception into a WeightsError/OfflineError that says what to do."""
    from huggingface_hub import utils as hfu

    what = _what(repo_id, filename, revision)
    cmd = _fetch_command(repo_id, filename, revision, fetch_hint)
    offline_cls = getattr(hfu, "OfflineModeIsEnabled", ())
    if offline or isinstance(exc, offline_cls):
        return OfflineError(
            f"{what} is not in the local cache and network access is disabled (local_files_only=True or "
            f"HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE/VISUALAD_OFFLINE is set). Fetch it once with network access: "
            f"`{cmd}`, then retry.")
    if isinstance(exc, hfu.RevisionNotFoundError):
        return WeightsError(
            f"revision {revision} does not exist in Hub repo '{repo_id}' (needed for {filename or 'the snapshot'}). "
            "Check the pinned commit; if the repo was rewritten, upgrade visualad or pass a valid revision.")
    if isinstance(exc, getattr(hfu, "GatedRepoError", ())):
        return WeightsError(
            f"Hub repo '{repo_id}' is gated: accept its terms on the Hub, then log in (`huggingface-cli login`) "
            "or pass token=/set HF_TOKEN.")
    if isinstance(exc, hfu.RepositoryNotFoundError):
        return WeightsError(
            f"Hub repo '{repo_id}' was not found (it does not exist, or it is private and no valid token was "
            "sent: log in with `huggingface-cli login` or pass token=/set HF_TOKEN).")
    if isinstance(exc, hfu.LocalEntryNotFoundError):
        if exc.__class__.__name__ == "IncompleteSnapshotError" or isinstance(exc.__cause__, offline_cls):
            return OfflineError(f"{what} is not fully in the local cache and the Hub cannot be used: {exc} "
                                f"Fetch it with `{cmd}`.")
        return WeightsError(
            f"could not reach the Hub ({_hf_endpoint() or 'https://huggingface.co'}) to fetch {what}, and it is not "
            f"in the local cache. Check the connection, proxy and HF_ENDPOINT, or fetch it elsewhere with `{cmd}`. "
            f"({exc})")
    if isinstance(exc, hfu.EntryNotFoundError):
        return WeightsError(f"file '{filename}' does not exist in Hub repo '{repo_id}' at revision {revision}.")
    if isinstance(exc, hfu.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return WeightsError(f"the Hub answered HTTP {status} while fetching {what}: {exc}")
    return WeightsError(f"download of {what} failed or was interrupted ({type(exc).__name__}: {exc}); nothing was "
                        f"kept in the cache. Retry, or fetch it with `{cmd}`.")


def _remove_cached(pointer: Path) -> None:
    """Delete a cached Hub file: the blob it points to and the snapshot entry, so nothing corrupt is reused."""
    targets = []
    with contextlib.suppress(OSError):
        targets.append(pointer.resolve())
    targets.append(pointer)
    for target in targets:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        logger.debug("removed %s from the cache", target)


def git_blob_sha1(path: PathLike) -> str:
    """Git's object id of a file: sha1 over ``blob <size>\\0`` and the bytes (the Hub's ETag of small files)."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())  # noqa: S324 - git's id, not security
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_hub_digest(path: Path, source: str, fail: Any) -> None:
    """A Hub file with no pin of ours is checked against the digest the Hub stated for it, which
    huggingface_hub keeps as the blob's name: the LFS sha256 (64 hex) or, for small files, the git sha1 (40)."""
    blob = path.resolve()
    name = blob.name
    if blob.parent.name != "blobs" or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", name):
        return  # not in a Hub cache layout: nothing stated to check against
    marker = _marker_file() / f"hub-{name}"
    if _verified_before(blob, name, marker):
        return
    actual = sha256_file(blob) if len(name) == 64 else git_blob_sha1(blob)
    if actual != name:
        fail(f"{source}: the file does not match the digest the Hub stated for it ({name}; got {actual}). The "
             "download is corrupted; it was removed from the cache, retry.")
    _record_verified(blob, name, marker)


def _verify_file(path: Path, *, source: str, sha256: Optional[str], size: Optional[int],
                 on_bad: Any = None) -> None:
    """Refuse LFS pointers; check size then sha256. ``on_bad()`` runs before raising (cache cleanup)."""
    def fail(message: str) -> None:
        if on_bad is not None:
            on_bad()
        raise WeightsError(message, path=None)

    head = _read_head(path)
    actual_size = path.stat().st_size
    if head.startswith(LFS_POINTER_PREFIX) and actual_size < 1024:
        fail(_lfs_pointer_message(source, head))
    if size is not None and actual_size != size:
        fail(f"{source}: size mismatch: expected {size} bytes, got {actual_size} bytes. The download is "
             "incomplete or not the pinned file; it was removed from the cache, retry.")
    if sha256 is None:
        _verify_hub_digest(path, source, fail)
        return
    marker = _marker_file() / sha256
    resolved = path.resolve()
    if _verified_before(resolved, sha256, marker):
        return
    actual = sha256_file(path)
    if actual != sha256:
        fail(f"{source}: sha256 mismatch: expected {sha256}, got {actual} ({actual_size} bytes). The file is "
             "corrupted or not the pinned one; it was removed from the cache, retry.")
    _record_verified(resolved, sha256, marker)


def hub_download(
    repo_id: str,
    filename: str,
    *,
    revision: str,
    cache_dir: Optional[PathLike] = None,
    local_files_only: Optional[bool] = None,
    token: Union[str, bool, None] = None,
    sha256: Optional[str] = None,
    size: Optional[int] = None,
    fetch_hint: Optional[str] = None,
) -> Path:
    """Fetch one file of a Hub repo at a pinned ``revision`` (a 40-char commit) and verify it.

    Uses ``huggingface_hub.hf_hub_download`` (its cache, token and endpoint). Raises :class:`OfflineError` when
    offline and not cached, :class:`WeightsError` for a missing repo/revision/file, a network failure, an LFS
    pointer, or a size/sha256 mismatch (the corrupt file is removed from the cache first).
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    sha256 = _check_sha256_arg(sha256)
    _warn_unpinned(repo_id, revision)
    offline = is_offline(local_files_only)
    hf_cache = _hf_cache_dir(cache_dir)
    source = f"'{filename}' from Hub repo '{repo_id}' at revision {revision}"

    def fetch() -> Path:
        kwargs: dict = dict(revision=revision, cache_dir=hf_cache, token=token, local_files_only=offline,
                            library_name="visualad", library_version=_version())
        endpoint = _hf_endpoint()
        if endpoint:
            kwargs["endpoint"] = endpoint
        try:
            return Path(hf_hub_download(repo_id, filename, **kwargs))
        except (KeyboardInterrupt, SystemExit, ValueError, TypeError) as exc:
            if type(exc).__name__ == "HFValidationError":
                raise WeightsError(f"invalid Hub repo id or filename for {source}: {exc}") from exc
            raise
        except Exception as exc:
            raise _map_hub_error(exc, repo_id=repo_id, filename=filename, revision=revision, offline=offline,
                                 fetch_hint=fetch_hint) from exc

    was_cached = False
    with contextlib.suppress(Exception):
        was_cached = isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache, revision=revision), str)
    path = fetch()
    try:
        _verify_file(path, source=source, sha256=sha256, size=size, on_bad=lambda: _remove_cached(path))
    except WeightsError:
        if not was_cached or offline:
            raise
        logger.warning("cached copy of %s failed verification; removed it, downloading again", source)
        path = fetch()
        _verify_file(path, source=source, sha256=sha256, size=size, on_bad=lambda: _remove_cached(path))
    logger.debug("%s -> %s", source, path)
    return path


def hub_snapshot(
    repo_id: str,
    *,
    revision: str,
    allow_patterns: Union[str, Sequence[str], None] = None,
    ignore_patterns: Union[str, Sequence[str], None] = None,
    cache_dir: Optional[PathLike] = None,
    local_files_only: Optional[bool] = None,
    token: Union[str, bool, None] = None,
    sha256: Optional[Mapping[str, str]] = None,
    required: Optional[Sequence[str]] = None,
    fetch_hint: Optional[str] = None,
) -> Path:
    """Fetch a Hub repo folder (``config.json`` + ``model.safetensors``) at a pinned ``revision``.

    Same errors as :func:`hub_download`. ``sha256`` maps file names in the repo to their expected digest; those
    files and the ``required`` ones must be present, so an offline cache that holds only part of a snapshot is
    reported as :class:`OfflineError` here instead of failing later in the loader. Every fetched file is checked
    for Git LFS pointer text.
    """
    from huggingface_hub import snapshot_download

    _warn_unpinned(repo_id, revision)
    offline = is_offline(local_files_only)
    expected = {name: _check_sha256_arg(digest) for name, digest in (sha256 or {}).items()}
    kwargs: dict = dict(revision=revision, cache_dir=_hf_cache_dir(cache_dir), token=token,
                        local_files_only=offline, allow_patterns=_list(allow_patterns), ignore_patterns=_list(ignore_patterns),
                        library_name="visualad", library_version=_version())
    endpoint = _hf_endpoint()
    if endpoint:
        kwargs["endpoint"] = endpoint
    try:
        folder = Path(snapshot_download(repo_id, **kwargs))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        if type(exc).__name__ == "HFValidationError":
            raise WeightsError(f"invalid Hub repo id '{repo_id}': {exc}") from exc
        raise _map_hub_error(exc, repo_id=repo_id, filename=None, revision=revision, offline=offline,
                             fetch_hint=fetch_hint) from exc

    missing = [p for p in list(required or []) + list(expected) if not (folder / p).is_file()]
    if missing:
        cmd = _fetch_command(repo_id, None, revision, fetch_hint)
        cls = OfflineError if offline else WeightsError
        raise cls(f"Hub repo '{repo_id}' at revision {revision} is missing {', '.join(sorted(set(missing)))} "
                  f"{'in the local cache' if offline else 'in the repo'}. "
                  + (f"Fetch it with network access: `{cmd}`." if offline else "Check the repo and revision."))
    for file in _iter_files(folder):
        rel = file.relative_to(folder).as_posix()
        _verify_file(file, source=f"'{rel}' from Hub repo '{repo_id}' at revision {revision}",
                     sha256=expected.get(rel), size=None, on_bad=lambda f=file: _remove_cached(f))
    return folder


def _list(patterns: Union[str, Sequence[str], None]) -> Union[str, list, None]:
    return patterns if patterns is None or isinstance(patterns, str) else list(patterns)


def _iter_files(folder: Path) -> Iterable[Path]:
    for root, _dirs, files in os.walk(folder):
        for name in sorted(files):
            yield Path(root) / name


# ------------------------------------------------------------------------------------------- plain URLs
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
    digest = _check_sha256_arg(sha256)
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
        hint = (f"`{_hint_command(fetch_hint)}`" if fetch_hint
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
            raise WeightsError(_lfs_pointer_message(f"the file at {url}", head))
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
    _record_verified(target.resolve(), digest, marker)
    logger.info("downloaded %s (%d bytes) -> %s", url, actual_size, target)
    return target


def _cached_ok(target: Path, digest: str, size: Optional[int], marker: Path) -> bool:
    actual_size = target.stat().st_size
    if size is not None and actual_size != size:
        return False
    if _verified_before(target.resolve(), digest, marker):
        return True
    if sha256_file(target) != digest:
        return False
    _record_verified(target.resolve(), digest, marker)
    return True


def _stream(url: str, fh: IO[bytes], *, name: str, size: Optional[int], progress: bool, by_hand: str) -> tuple:
    """Copy ``url`` into ``fh``; return (sha256, byte count, first bytes). Raises WeightsError on any failure."""
    request = urllib.request.Request(url, headers={"User-Agent": f"visualad/{_version()}",
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
                    chunk = response.read(_CHUNK)
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
