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


def interleaved(cases: dict[str, Callable[[], float | None]], rounds: int = 3,
                warmup: bool = True) -> dict[str, list[float]]:
    """Run every case once per round, in turn (a b c, a b c, ...), after one untimed warm-up round: a machine shared
    with other jobs slows all cases alike within a round. A case returns its own time in seconds, or None to be
    timed from outside. Returns each case's times."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds + (1 if warmup else 0)):
        for name, fn in cases.items():
            t = time.perf_counter()
            inner = fn()
            elapsed = inner if inner is not None else time.perf_counter() - t
            if r > 0 or not warmup:
                times[name].append(elapsed)
    return times


def median_spread(values: list[float]) -> str:
    """'median (min-max)' of a list of measurements."""
    v = sorted(values)
    mid = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return f"{mid:.3g} ({v[0]:.3g}-{v[-1]:.3g})"


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def ratios(a: list[float], b: list[float]) -> list[float]:
    """Per-round ratios a[i] / b[i] (rounds interleaved, so each ratio compares like with like)."""
    return [x / y for x, y in zip(a, b, strict=True)]
