"""Verification of downloaded weights: digests (sha256, git blob sha1), sizes, Git LFS pointer files, the
offline switch, and markers that remember a file already verified (so a cached file is not hashed again)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

from ..errors import WeightsError
from ..paths import cache_dir as visualad_cache_dir
from ..types import PathLike
from .safe import LFS_POINTER_PREFIX


logger = logging.getLogger(__name__)

CHUNK = 1 << 20
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "true", "yes", "on"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VISUALAD_OFFLINE")


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
        for chunk in iter(lambda: fh.read(CHUNK), b""):
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


def lfs_pointer_message(source: str, head: bytes) -> str:
    return (
        f"{source} is a Git LFS pointer file{_lfs_pointer_fields(head)}, not the weights it points to. "
        "The repository stores the real file with Git LFS and this copy holds only the pointer text (a clone "
        "made without git-lfs, a mirror that copied the pointer, or a raw URL that does not resolve LFS). "
        "Download the real file: run `git lfs install && git lfs pull` in a clone, or use the release/media URL "
        "of the file, or `visualad download <name>` for a known model."
    )


def check_sha256_arg(sha256: Optional[str]) -> Optional[str]:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:"):]
    if not _SHA256_RE.fullmatch(value):
        raise ValueError(f"sha256 must be 64 hex characters, got {sha256!r}")
    return value


def version() -> str:
    try:
        from .._version import __version__

        return str(__version__)
    except Exception:  # pragma: no cover - partially initialised package
        return "0"


def _read_head(path: PathLike, n: int = 512) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _marker_file() -> Path:
    return visualad_cache_dir() / "verified"


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def verified_before(path: Path, sha256: str, marker: Path) -> bool:
    """A verified file is re-hashed only when its size/mtime/inode changed (hashing 1 GB on every load is slow)."""
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        return (record.get("sha256") == sha256 and record.get("path") == str(path)
                and record.get("stat") == _stat_key(path))
    except (OSError, ValueError):
        return False


def record_verified(path: Path, sha256: str, marker: Path) -> None:
    from ..atomic import atomic_write_json

    try:
        atomic_write_json(marker, {"sha256": sha256, "path": str(path), "stat": _stat_key(path)})
    except OSError as exc:  # a read-only cache only costs a re-hash next time
        logger.debug("could not record verification of %s: %s", path, exc)


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
    if verified_before(blob, name, marker):
        return
    actual = sha256_file(blob) if len(name) == 64 else git_blob_sha1(blob)
    if actual != name:
        fail(f"{source}: the file does not match the digest the Hub stated for it ({name}; got {actual}). The "
             "download is corrupted; it was removed from the cache, retry.")
    record_verified(blob, name, marker)


def verify_file(path: Path, *, source: str, sha256: Optional[str], size: Optional[int],
                 on_bad: Any = None) -> None:
    """Refuse LFS pointers; check size then sha256. ``on_bad()`` runs before raising (cache cleanup)."""
    def fail(message: str) -> None:
        if on_bad is not None:
            on_bad()
        raise WeightsError(message, path=None)

    head = _read_head(path)
    actual_size = path.stat().st_size
    if head.startswith(LFS_POINTER_PREFIX) and actual_size < 1024:
        fail(lfs_pointer_message(source, head))
    if size is not None and actual_size != size:
        fail(f"{source}: size mismatch: expected {size} bytes, got {actual_size} bytes. The download is "
             "incomplete or not the pinned file; it was removed from the cache, retry.")
    if sha256 is None:
        _verify_hub_digest(path, source, fail)
        return
    marker = _marker_file() / sha256
    resolved = path.resolve()
    if verified_before(resolved, sha256, marker):
        return
    actual = sha256_file(path)
    if actual != sha256:
        fail(f"{source}: sha256 mismatch: expected {sha256}, got {actual} ({actual_size} bytes). The file is "
             "corrupted or not the pinned one; it was removed from the cache, retry.")
    record_verified(resolved, sha256, marker)


def hint_command(fetch_hint: str) -> str:
    """``fetch_hint`` is a model name (``clip-l``) or already a whole command (``visualad download clip-l``)."""
    hint = fetch_hint.strip()
    return hint if " " in hint else f"visualad download {hint}"
