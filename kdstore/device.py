"""Pick the torch device and autocast precision from `--device` / `--precision`, and the optimizer kernel for it."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from typing import Any

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


def fused_optimizer(cls: type[torch.optim.Optimizer], params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """`cls(params, **kwargs)` with PyTorch's fused kernel (one kernel per step for all parameters) where the
    parameters' device and dtype have one, else its default (foreach) implementation.

    The math is the same; the results differ from the foreach kernel's by float rounding (~1e-8 on Adam's weights).
    On the CPU the fused step of Adam on the 784-800-800-10 student takes a quarter of the foreach step's time, a
    quarter of a training step (docs/benchmarks.md, #18); on CUDA it saves kernel launches.
    """
    groups = list(params)
    try:
        return cls(groups, fused=True, **kwargs)  # type: ignore[call-arg]
    except (RuntimeError, ValueError, TypeError):  # a device, dtype or torch version without the fused kernel
        return cls(groups, **kwargs)


def keep_heap_between_steps(device: torch.device) -> None:
    """On a CPU with glibc, stop freed heap memory from going back to the OS between training steps.

    Each step frees its gradients and allocates them again. glibc returns a free chunk at the top of the heap to the
    OS once it exceeds the trim threshold, which follows the largest block freed so far, so the stacked gradients
    of a grouped sweep (25 MB for five 800-800 points) were unmapped every step and the next step's matmuls paid
    the page faults: a grouped epoch took 1.06-1.17x the plain loop's at 60,000 rows, 0.98x with the heap kept (#18,
    docs/benchmarks.md). This keeps up to 1 GiB free at the top of the heap and serves blocks under 64 MiB from it.
    Process-wide and once; what PyTorch's own allocators do on GPUs. ``KDSTORE_MALLOC=default`` leaves glibc as it
    is; other C libraries are left alone.
    """
    global _HEAP_KEPT
    if _HEAP_KEPT or device.type != "cpu" or os.environ.get("KDSTORE_MALLOC") == "default":
        return
    _HEAP_KEPT = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    mallopt(_M_MMAP_THRESHOLD, 64 << 20)


_HEAP_KEPT = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
