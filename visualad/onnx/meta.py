"""What makes a directory an ONNX export of visualad (no torch here: the runtime reads it)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from ..errors import ConfigError
from ..types import PathLike

FORMAT = "visualad-onnx"
FORMAT_VERSION = 1
META_NAME = "visualad_onnx.json"


def is_export(path: PathLike) -> bool:
    return (Path(path) / META_NAME).is_file()


def read_meta(path: PathLike) -> Dict[str, Any]:
    """The metadata of an export directory; a typed error for anything else."""
    file = Path(path) / META_NAME
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"not a visualad ONNX export ({META_NAME} is missing)", path) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{META_NAME} cannot be read: {exc}", path) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"not a visualad ONNX export ({META_NAME} has no format {FORMAT!r})", path)
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ConfigError(f"this export (format {meta.get('format_version')}) is newer than this visualad "
                          f"understands ({FORMAT_VERSION}); upgrade visualad", path)
    return meta
