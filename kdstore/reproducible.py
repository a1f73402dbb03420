"""What makes a teacher's float outputs the same bits in every process, and what a version records about it.

Labeling promises that a resumed, rerun or sharded run writes the same bytes as one uninterrupted run. On the CPU
two things beyond the inputs decide a float32 matmul's rounding, and both are fixed here:

* **memory alignment of the input batch**: MKL's SGEMM picks kernels by the address of its operands, and for small
  batches the result changes with it (measured: 2-11-row batches at 4-byte offsets differ in the last bits). A batch
  read from pyarrow or numpy has no fixed alignment, so it is copied into memory torch allocated (64-byte aligned);
  the copy costs < 0.1% of a forward.
* **the intra-op thread count**: a different number of threads splits the reductions differently (measured: 4 or 8
  threads vs 2 change about 4% of the logits of a 256-1024-1024-100 MLP in the last bit). The count of the first
  process is recorded in the staging directory and every later process (a resume, another shard job) uses it.

What cannot be fixed is the CPU's instruction set (AVX2 and AVX-512 kernels round differently) and, on a GPU, the
GPU model and CUDA/cuBLAS version; each shard records its environment, and the manifest lists the environments a
version was made in, so a reader can tell whether its float columns came from one kind of machine.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator, Sequence
from functools import cache
from typing import Any

import numpy as np
import torch


def device_input(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """`x` as a tensor on `device` in memory torch allocated (aligned), never a view of the caller's buffer."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.clone() if device.type == "cpu" else t.to(device, non_blocking=True)


@contextlib.contextmanager
def pinned_compute(threads: int, device: torch.device) -> Iterator[None]:
    """Run the block with `threads` intra-op threads (and deterministic cuDNN on a GPU); restore afterwards."""
    old_threads = torch.get_num_threads()
    old_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.set_num_threads(max(1, threads))
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old_cudnn


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, then restore the thread count.

    For the many small operations of a chunk's statistics (the fidelity's few rows, arrays of k per row): there a
    parallel region costs more than its work, and on a CPU shared with other jobs each one can wait for its second
    thread to be scheduled (measured on the 2-core machine under load: the fidelity of 2 rows of 151,936 logits took
    430 ms of CPU time with 2 threads, 15 ms with one). On one thread every reduction also has one order, whatever
    the run's pinned thread count. Elementwise results are the same on any number of threads."""
    old = torch.get_num_threads()
    if old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """What a shard's floats depend on beyond its inputs: the device (CPU model and instruction set, or the GPU and
    CUDA version), the thread count and the torch version."""
    env: dict[str, Any] = {"device": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        env.update(cpu=_cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability())
    return env


def group_environments(envs: Sequence[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The distinct environments of a version's shards (in shard order), each with the shard indices it made."""
    groups: list[dict[str, Any]] = []
    for i, env in enumerate(envs):
        if env is None:
            continue
        for g in groups:
            if g["environment"] == env:
                g["shards"].append(i)
                break
        else:
            groups.append({"environment": env, "shards": [i]})
    return groups
