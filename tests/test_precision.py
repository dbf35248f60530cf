"""Device and dtype choice (visualad.runtime.precision)."""
from __future__ import annotations

import pytest
import torch

from visualad.errors import ConfigError


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_is_bf16_only_on_cuda_and_cpus_with_native_bf16(monkeypatch, native, expected):
    import visualad.runtime.precision as D

    monkeypatch.setattr(D, "cpu_has_native_bf16", lambda: native)
    assert D.resolve_dtype("auto", torch.device("cpu")) == expected
    assert D.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert D.resolve_dtype("auto", torch.device("mps")) == torch.float32
    assert D.resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    with pytest.raises(ConfigError, match="dtype must be"):
        D.resolve_dtype("int8", torch.device("cpu"))


def test_cpu_bf16_flag_is_read_from_cpuinfo(tmp_path):
    import visualad.runtime.precision as D

    for flags, expected in (("fpu sse avx512f avx512_bf16", True), ("fpu sse amx_bf16 amx_tile", True),
                            ("fpu sse avx512f", False)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert D.cpu_has_native_bf16(str(info)) is expected
