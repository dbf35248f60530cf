"""Where visualad keeps converted weights: ``$VISUALAD_CACHE``, else ``$HF_HOME/visualad``,
else ``$XDG_CACHE_HOME/visualad``, else ``~/.cache/visualad``."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("VISUALAD_CACHE"):
        return Path(os.environ["VISUALAD_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "visualad"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "visualad"
