"""What makes a directory an ONNX export of visualad (no torch here: the runtime reads it)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

from ..errors import ConfigError
from ..types import PathLike

FORMAT = "visualad-onnx"
#: 2: the features graph gives layer-normed rows per block (``ln_<block>``); 1 gave unit rows per (block, r),
#: which the NumPy core no longer takes (head mode still runs them)
FORMAT_VERSION = 2
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
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        raise ConfigError(f"{META_NAME}: format_version must be a positive whole number, got {version!r}", path)
    if version > FORMAT_VERSION:
        raise ConfigError(f"this export (format {version}) is newer than this visualad understands "
                          f"({FORMAT_VERSION}); upgrade visualad", path)
    _check_fields(meta, path)
    return meta


#: an export's sizes are those of a ViT on real images: anything outside is a broken or hostile file
MAX_IMAGE_SIZE, MAX_GRID = 4096, 512


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value: Any, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _ints(value: Any, lo: int, hi: int) -> bool:
    return (isinstance(value, list) and 0 < len(value) <= 64
            and all(_is_int(v) and lo <= v <= hi for v in value))


def _check_fields(meta: Dict[str, Any], path: PathLike) -> None:
    """Every field the runtime reads, with its type and range: a wrong one is named here, not a traceback later."""
    problems: List[str] = []
    if not _is_int(meta.get("image_size")) or not 1 <= meta["image_size"] <= MAX_IMAGE_SIZE:
        problems.append(f"image_size must be a whole number in 1..{MAX_IMAGE_SIZE}, got {meta.get('image_size')!r}")
    if not _is_int(meta.get("grid")) or not 1 <= meta["grid"] <= MAX_GRID:
        problems.append(f"grid must be a whole number in 1..{MAX_GRID}, got {meta.get('grid')!r}")
    if not _numbers(meta.get("pixel_mean"), 3):
        problems.append(f"pixel_mean must be 3 finite numbers, got {meta.get('pixel_mean')!r}")
    if not _numbers(meta.get("pixel_std"), 3) or not all(v > 0 for v in meta["pixel_std"]):
        problems.append(f"pixel_std must be 3 positive numbers, got {meta.get('pixel_std')!r}")
    if not _ints(meta.get("blocks"), 0, 1000):
        problems.append(f"blocks must be a list of block numbers, got {meta.get('blocks')!r}")
    if not _ints(meta.get("rs"), 1, 99):
        problems.append(f"rs must be a list of odd aggregation sizes, got {meta.get('rs')!r}")
    if meta.get("depth") is not None and (not _is_int(meta["depth"]) or not 1 <= meta["depth"] <= 1000):
        problems.append(f"depth must be a whole number in 1..1000, got {meta.get('depth')!r}")
    names = meta.get("features")
    # format 1 named an output per (block, r); read_meta has checked the version is a whole number
    per = len(meta["rs"]) if meta["format_version"] < 2 and isinstance(meta.get("rs"), list) else 1
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)
                                  and isinstance(meta.get("blocks"), list) and len(names) == len(meta["blocks"]) * per):
        problems.append("features must name one output per block" + (" and r" if per > 1 else ""))
    if not isinstance(meta.get("config"), dict):
        problems.append("config must be an object (the model's config.json)")
    refs = meta.get("references")
    if refs is not None and not (isinstance(refs, dict) and _is_int(refs.get("shots")) and refs["shots"] >= 1
                                 and isinstance(refs.get("digests", []), list)):
        problems.append("references must be null or an object with a positive whole number of shots")
    if problems:
        raise ConfigError(f"{META_NAME}: " + "; ".join(problems), path)
