"""Columns whose cells hold variable-length lists (per-token sampled targets): `Ragged`. numpy only.

A ragged column of spec shape ``[L]`` (and ``"ragged": true``) holds, per row, L lists of varying length: position
``(r, l)`` owns ``lengths[r, l]`` consecutive entries of the flat ``values``, positions in row-major order. Parquet
stores it as ``fixed_size_list<list<T>>[L]`` (DuckDB UNNESTs it into per-position lists, polars explodes it), HDF5
as an ``(rows, L)`` dataset of variable-length ``T`` arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Ragged:
    """Per row, `lengths.shape[1:]` positions, each a variable-length list; `values` flat in row-major order."""

    values: np.ndarray  # (E,)
    lengths: np.ndarray  # (rows, L) integer, sum == E

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.values.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """(rows, L): the fixed part of the shape (each cell is a list)."""
        return tuple(self.lengths.shape)

    @property
    def ndim(self) -> int:
        return self.lengths.ndim + 1

    def offsets(self) -> np.ndarray:
        """int64 (rows * L + 1,): position i owns values[offsets[i]:offsets[i + 1]]."""
        return np.concatenate([[0], np.cumsum(self.lengths.reshape(-1), dtype=np.int64)])

    def row_offsets(self) -> np.ndarray:
        """int64 (rows + 1,): row r owns values[row_offsets[r]:row_offsets[r + 1]]."""
        per_row = self.lengths.reshape(len(self), -1).sum(axis=1, dtype=np.int64)
        return np.concatenate([[0], np.cumsum(per_row)])

    def __getitem__(self, key: slice) -> Ragged:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a Ragged column is sliced by contiguous rows only (ragged[a:b])")
        a, b, _ = key.indices(len(self))
        b = max(a, b)
        ro = self.row_offsets()
        return Ragged(self.values[ro[a]:ro[b]], self.lengths[a:b])

    def astype(self, dtype: Any) -> Ragged:
        return Ragged(self.values.astype(dtype), self.lengths)

    def cells(self) -> list[np.ndarray]:
        """Every position's list, row-major (for writers that store one array per cell)."""
        off = self.offsets()
        return [self.values[off[i]:off[i + 1]] for i in range(len(off) - 1)]


def concat(parts: Sequence[np.ndarray | Ragged]) -> np.ndarray | Ragged:
    """Rows of several blocks of one column, in order (numpy arrays or Ragged)."""
    if parts and isinstance(parts[0], Ragged):
        rs = [p for p in parts if isinstance(p, Ragged)]
        return Ragged(np.concatenate([r.values for r in rs]), np.concatenate([r.lengths for r in rs]))
    return np.concatenate(parts)  # type: ignore[arg-type]


def empty(dtype: np.dtype[Any], shape: Sequence[int], ragged: bool) -> np.ndarray | Ragged:
    """Zero rows of a column."""
    if ragged:
        return Ragged(np.empty(0, dtype), np.zeros((0, *shape), np.int32))
    return np.empty((0, *shape), dtype=dtype)
