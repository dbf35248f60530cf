"""from_pretrained's name resolution: a local directory, a manifest alias, or ``org/repo[@revision]``."""
from __future__ import annotations

import logging
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import UnknownModelError, WeightsError
from ..layout import MODEL_FILES, WEIGHTS_NAME
from ..types import PathLike
from .manifest import load_manifest

logger = logging.getLogger(__name__)

_REPO = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


def resolve_model_dir(name_or_path: Optional[PathLike], *, revision: Optional[str] = None,
                      cache_dir: Optional[PathLike] = None, local_files_only: Optional[bool] = None,
                      token: Optional[str] = None) -> Path:
    """A local directory holding config.json and model.safetensors for ``name_or_path``."""
    if name_or_path is not None and Path(name_or_path).is_dir():
        return Path(name_or_path)
    name = None if name_or_path is None else os.fspath(name_or_path)
    manifest = load_manifest()
    if name is None or manifest.canonical(name) in manifest.models:
        return _from_entry(manifest.entry(name), revision, cache_dir, local_files_only, token)
    if _REPO.match(name):
        repo, _, rev = name.partition("@")
        return _from_hub(repo, revision or rev or None, cache_dir, local_files_only, token, hint=name)
    raise UnknownModelError(
        f"{name!r} is neither a directory, a known model nor 'org/repo[@revision]'; "
        f"known models: {', '.join(manifest.known())}"
    )


def headless_backbone(name_or_path: Optional[PathLike]) -> Optional[str]:
    """The backbone of a manifest model that has no published head (it runs in references and batch mode);
    None for anything else."""
    if name_or_path is None or Path(name_or_path).is_dir():
        return None
    manifest = load_manifest()
    key = manifest.canonical(os.fspath(name_or_path))
    entry = manifest.models.get(key)
    if entry is None or entry.get("head"):
        return None
    return entry["backbone"]


def _from_entry(entry: Dict[str, Any], revision: Optional[str], cache_dir: Optional[PathLike],
                local_files_only: Optional[bool], token: Optional[str]) -> Path:
    head = entry.get("head") or {}
    kind = head.get("type")
    name = entry["name"]
    if entry.get("status") == "not-published" or not kind:
        raise WeightsError(entry.get("message") or f"model {name!r} has no published head yet")
    if kind == "package":
        path = Path(str(resources.files("visualad").joinpath(head["path"])))
        if not (path / WEIGHTS_NAME).is_file():
            raise WeightsError(f"model {name!r} should ship inside the package at {path}, but it is missing; "
                               "reinstall visualad", path)
        return path
    if kind == "hub":
        return _from_hub(head["repo"], revision or head["revision"], cache_dir, local_files_only, token, hint=name)
    if kind == "official":
        from .official import official_model_dir

        return official_model_dir(name, entry, cache_dir=cache_dir, local_files_only=local_files_only)
    raise WeightsError(f"model {name!r}: unknown head source type {kind!r} in the manifest")


def _from_hub(repo: str, revision: Optional[str], cache_dir: Optional[PathLike], local_files_only: Optional[bool],
              token: Optional[str], hint: str) -> Path:
    from .hub import hub_snapshot

    if revision is None:
        logger.warning("%s: no revision given; using 'main', which is not pinned", repo)
    return Path(hub_snapshot(repo, revision=revision or "main", allow_patterns=MODEL_FILES, cache_dir=cache_dir,
                             local_files_only=local_files_only, token=token, required=MODEL_FILES[:2],
                             fetch_hint=f"visualad download {hint}"))

