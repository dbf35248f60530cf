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
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from ..errors import OfflineError, WeightsError
from ..types import PathLike
from .safe import LFS_POINTER_PREFIX, is_lfs_pointer  # noqa: F401 - public here too
from .url import url_download  # noqa: F401 - public here too
from .verify import (  # noqa: F401 - sha256_file and is_offline are public here too
    COMMIT_RE,
    check_sha256_arg,
    hint_command,
    is_offline,
    sha256_file,
    verify_file,
    version,
)

logger = logging.getLogger(__name__)

__all__ = [
    "LFS_POINTER_PREFIX",
    "hub_download",
    "hub_snapshot",
    "is_lfs_pointer",
    "is_offline",
    "sha256_file",
    "url_download",
]


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


def _fetch_command(repo_id: str, filename: Optional[str], revision: str, fetch_hint: Optional[str]) -> str:
    if fetch_hint:
        return hint_command(fetch_hint)
    return f"huggingface-cli download {repo_id}{' ' + filename if filename else ''} --revision {revision}"


def _what(repo_id: str, filename: Optional[str], revision: str) -> str:
    return f"'{filename}' from Hub repo '{repo_id}' at revision {revision}" if filename else (
        f"Hub repo '{repo_id}' at revision {revision}")


def _warn_unpinned(repo_id: str, revision: str) -> None:
    if not COMMIT_RE.fullmatch(revision):
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

    sha256 = check_sha256_arg(sha256)
    _warn_unpinned(repo_id, revision)
    offline = is_offline(local_files_only)
    hf_cache = _hf_cache_dir(cache_dir)
    source = f"'{filename}' from Hub repo '{repo_id}' at revision {revision}"

    def fetch() -> Path:
        kwargs: dict = dict(revision=revision, cache_dir=hf_cache, token=token, local_files_only=offline,
                            library_name="visualad", library_version=version())
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
        verify_file(path, source=source, sha256=sha256, size=size, on_bad=lambda: _remove_cached(path))
    except WeightsError:
        if not was_cached or offline:
            raise
        logger.warning("cached copy of %s failed verification; removed it, downloading again", source)
        path = fetch()
        verify_file(path, source=source, sha256=sha256, size=size, on_bad=lambda: _remove_cached(path))
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
    expected = {name: check_sha256_arg(digest) for name, digest in (sha256 or {}).items()}
    kwargs: dict = dict(revision=revision, cache_dir=_hf_cache_dir(cache_dir), token=token,
                        local_files_only=offline, allow_patterns=_list(allow_patterns),
                        ignore_patterns=_list(ignore_patterns),
                        library_name="visualad", library_version=version())
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
        verify_file(file, source=f"'{rel}' from Hub repo '{repo_id}' at revision {revision}",
                     sha256=expected.get(rel), size=None, on_bad=lambda f=file: _remove_cached(f))
    return folder


def _list(patterns: Union[str, Sequence[str], None]) -> Union[str, list, None]:
    return patterns if patterns is None or isinstance(patterns, str) else list(patterns)


def _iter_files(folder: Path) -> Iterable[Path]:
    for root, _dirs, files in os.walk(folder):
        for name in sorted(files):
            yield Path(root) / name
