"""Type aliases shared by the package (one definition instead of one per module)."""
from __future__ import annotations

import os
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]
