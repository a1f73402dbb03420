"""Pick the torch device and autocast precision from `--device` / `--precision`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kdstore.errors import ConfigError, arg
from kdstore.options import PRECISIONS


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available else CPU; `cuda` without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{arg('device')} {name}: CUDA is not available on this machine; use {arg('device')} "
                              "auto or cpu")
        return torch.device(name)
    raise ConfigError(f"{arg('device')} {name!r} is not understood; expected auto, cpu, cuda or cuda:N")


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` -> bf16 autocast on CUDA, fp32 on CPU."""
    if name not in PRECISIONS:
        raise ConfigError(f"{arg('precision')} {name!r}: expected one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(f"{arg('precision')} fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return name


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast context for `precision` ("fp32" does nothing)."""
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
