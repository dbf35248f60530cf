"""The torch-free runtime's tests: they run in an environment built from runtime/pyproject.toml (no torch), on
data that tests_torch_free/make_export.py made with torch beforehand ($VISUALAD_TORCH_FREE_DATA). .ci/run
does both; these tests fail, never skip, when either is missing."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # serving.py: the stdlib HTTP helpers


@pytest.fixture(scope="session")
def data() -> Path:
    root = os.environ.get("VISUALAD_TORCH_FREE_DATA")
    assert root and (Path(root) / "expected.json").is_file(), (
        "set VISUALAD_TORCH_FREE_DATA to a folder made by tests_torch_free/make_export.py")
    return Path(root)


@pytest.fixture(scope="session")
def expected(data: Path) -> dict:
    return json.loads((data / "expected.json").read_text())
