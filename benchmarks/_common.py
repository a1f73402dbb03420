"""Shared helpers for the benchmarks: synthetic MNIST-shaped data, a 1200-1200 teacher, timing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from kdstore.students import MLP


def make_transfer(path: Path, rows: int, width: int = 784, classes: int = 10, seed: int = 0) -> Path:
    """A labeled Parquet transfer set of `rows` x `width` float32 inputs (MNIST-shaped, synthetic)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, width)).astype(np.float32)
    y = rng.integers(0, classes, rows)
    x = (centers[y] + 1.5 * rng.normal(size=(rows, width)).astype(np.float32)).astype(np.float32)
    t = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), width), "label": y.astype(np.int64)})
    pq.write_table(t, path, row_group_size=4096)
    return path


def make_teacher(path: Path, sizes: list[int], seed: int = 0) -> str:
    """Random-weight MLP teacher saved as safetensors; returns its --teacher spec."""
    torch.manual_seed(seed)
    m = MLP(sizes)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return f"mlp:{'-'.join(map(str, sizes))}@{path}"


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Minimum wall time of `repeats` calls (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
