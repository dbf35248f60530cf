"""Device and precision rules: which device "auto" means, which dtype "auto" means there, and autocast."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Union

import torch

from ..errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """"auto" = cuda, then mps, then cpu; a device that is not there is a ConfigError, not a traceback later."""
    if str(device) != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"device {device!r} is not a device name (auto, cpu, cuda, cuda:1, mps)") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu "
                              "or auto")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has bf16 matrix instructions (x86 AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo).

    Without them PyTorch emulates bf16 on the CPU, which is slower than fp32, so "auto" keeps fp32 there.
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def dtype_name(dtype: torch.dtype) -> str:
    """The short name the API takes ("fp32", "bf16", "fp16")."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def resolve_dtype(dtype: Union[str, torch.dtype], device: torch.device) -> torch.dtype:
    """"auto" = bf16 on CUDA; on the CPU bf16 where it has native bf16 instructions, else fp32.

    bf16 on such a CPU ran the default model 1.5-1.9x faster and moved every metric on shared/data by at most
    0.005 (benchmarks/precision.py, docs/speed.md); ``dtype="fp32"`` gives the exact fp32 maps.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def feature_dtype_for(requested: Union[str, torch.dtype], dtype: torch.dtype) -> torch.dtype:
    """The dtype a set's nearest-neighbour features are kept in, for an engine asked for ``requested`` and
    running in ``dtype``: fp16 under "auto" and for a bf16 or fp16 engine (half the memory; fp16 moved batch
    mode's metrics by at most 0.002, bf16's 8-bit mantissa by up to 0.005: docs/modes.md); fp32 only when fp32
    is asked for by name, which keeps the exact function."""
    if requested == "auto" or dtype in (torch.bfloat16, torch.float16):
        return torch.float16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """The autocast region of a forward in ``dtype`` (nothing for fp32)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
