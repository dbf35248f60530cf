"""weights_manifest.json: the model aliases, their backbones' pinned sources and their heads' sources."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Dict, Optional

from ..errors import UnknownModelError, VisualADError

MANIFEST_NAME = "weights_manifest.json"


@dataclass(frozen=True)
class Manifest:
    default: str
    models: Dict[str, Dict[str, Any]]
    aliases: Dict[str, str]
    backbones: Dict[str, Dict[str, Any]]

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def known(self) -> list:
        return sorted(set(self.models) | set(self.aliases))

    def entry(self, name: Optional[str]) -> Dict[str, Any]:
        """The entry of an alias; an unknown one is an error that lists the known ones."""
        key = self.canonical(name or self.default)
        if key not in self.models:
            raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(self.known())}")
        return {"name": key, **self.models[key]}


@functools.lru_cache(maxsize=1)
def load_manifest() -> Manifest:
    """The manifest shipped inside the package (a copy of the repository's top-level file)."""
    try:
        data = json.loads(resources.files("visualad").joinpath(MANIFEST_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise VisualADError(f"the package's {MANIFEST_NAME} is missing or broken: {exc}") from exc
    return Manifest(default=data["default"], models=data["models"], aliases=data.get("aliases", {}),
                    backbones=data.get("backbones", {}))
