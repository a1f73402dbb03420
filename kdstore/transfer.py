"""Transfer sets: read inputs (and labels, if any) in batches from Parquet, NPZ, NPY or HDF5; fingerprint them.

Rows are identified by their index in the file (`sample_id`). Inputs are returned as float32 arrays of shape
(n, *input_shape); labels as int64 (n,) or None. Nothing reads a whole file into memory except NPZ members
that are compressed and read out of order.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdstore.errors import InputError, arg
from kdstore.store.files import sha256_file

SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".npz": "npz", ".npy": "npy", ".h5": "hdf5", ".hdf5": "hdf5"}
_DEFAULT_LABELS = ("label", "labels", "y", "target")
_DEFAULT_INPUTS = ("x", "inputs", "input", "image", "images", "features")
_ID_COLUMNS = ("sample_id", "id", "index")
NO_LABELS = "none"


def detect_format(path: Path, option: str = "transfer") -> str:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"{arg(option)} {path}: unknown file type {path.suffix!r}; expected one of "
            f"{', '.join(sorted(SUFFIXES))} (Parquet, NPZ, NPY or HDF5)"
        )
    return fmt


@dataclass
class TransferSet:
    """An open transfer (or evaluation) set. Create with `open_transfer`."""

    path: Path
    format: str
    rows: int
    input_columns: list[str]
    input_shape: tuple[int, ...]
    source_dtype: str
    label_column: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    _reader: Any = None
    _sha256: str | None = None

    @property
    def sha256(self) -> str:
        """sha256 of the file's bytes (computed once, streamed)."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def set_sha256(self, digest: str) -> None:
        """Record a digest computed elsewhere (e.g. on a thread while the file is also being read)."""
        self._sha256 = digest

    @property
    def has_labels(self) -> bool:
        return self.label_column is not None

    @property
    def generator(self) -> dict[str, Any] | None:
        """Generator settings if this is synthetic data made by `kdstore munge` (from the file's metadata)."""
        gen = self.metadata.get("generator")
        return self.metadata if isinstance(gen, str) else None

    @property
    def chunk_starts(self) -> np.ndarray | None:
        """First rows of the units the file decodes whole (a Parquet file's row groups, then its row count), or
        None where any row range reads alone (arrays, HDF5): readers keep reads of one unit together."""
        starts = getattr(self._reader, "starts", None)
        return None if starts is None else np.asarray(starts)

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Inputs (float32, (n, *input_shape)) and labels (int64 or None) of rows [start, stop)."""
        if not 0 <= start <= stop <= self.rows:
            raise InputError(f"{self.path}: rows [{start}, {stop}) out of range for {self.rows} rows")
        if start == stop:  # the Parquet reader has no row group to take an empty slice of
            return np.zeros((0, *self.input_shape), np.float32), (np.zeros(0, np.int64) if self.has_labels else None)
        x, y = self._reader.read(start, stop)
        if not x.flags.writeable:  # memory-mapped or zip-backed: torch wants its own writable copy
            x = x.copy()
        return x.reshape((stop - start, *self.input_shape)), y

    def iter_batches(self, batch_size: int, start: int = 0,
                     stop: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """Yield (first_row, inputs, labels) batches covering rows [start, stop)."""
        stop = self.rows if stop is None else stop
        for s in range(start, stop, batch_size):
            e = min(s + batch_size, stop)
            x, y = self.read_rows(s, e)
            yield s, x, y

    def describe(self) -> dict[str, Any]:
        """The manifest's `transfer_set` entry (kind decided by labels and generator metadata)."""
        gen = self.generator
        kind = "synthetic" if gen else ("original" if self.has_labels else "unlabeled")
        return {
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "rows": self.rows,
            "format": self.format,
            "inputs": {"columns": list(self.input_columns), "shape": list(self.input_shape),
                       "dtype": self.source_dtype},
            "label_column": self.label_column,
            "kind": kind,
            "generator": gen,
        }

    def close(self) -> None:
        close = getattr(self._reader, "close", None)
        if close:
            close()


def open_transfer(
    path: str | Path,
    *,
    input_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    option: str = "transfer",
) -> TransferSet:
    """Open a transfer set.

    Args:
        path: a .parquet, .npz, .npy, .h5/.hdf5 file.
        input_columns: column(s)/array(s) holding the inputs; default: the single array column, or every numeric
            column (Parquet), or ``x`` (NPZ/HDF5).
        label_column: the integer label column; default ``label``/``y`` if present; ``"none"`` for no labels.
        option: the argument named in error messages (the CLI shows its option).

    Raises:
        InputError: missing/unreadable file, unknown columns, unsupported column types, empty set.
    """
    p = Path(path)
    fmt = detect_format(p, option)
    if not p.is_file():
        raise InputError(f"{arg(option)} {p}: file not found; check the path")
    want_labels = None if label_column is None else (None if label_column.lower() == NO_LABELS else label_column)
    no_labels = label_column is not None and label_column.lower() == NO_LABELS
    try:
        if fmt == "parquet":
            ts = _open_parquet(p, input_columns, want_labels, no_labels, option)
        elif fmt == "npy":
            ts = _open_npy(p, input_columns, want_labels, option)
        else:
            ts = _open_arrays(p, fmt, input_columns, want_labels, no_labels, option)
    except InputError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise InputError(f"{arg(option)} {p}: cannot read it as {fmt}: {type(e).__name__}: {e}") from None
    if ts.rows == 0:
        raise InputError(f"{arg(option)} {p}: the transfer set is empty (0 rows); it needs at least one row")
    return ts


# ---------------------------------------------------------------------------------------------- Parquet
def _open_parquet(p: Path, inputs: Sequence[str] | None, label: str | None, no_labels: bool,
                  option: str) -> TransferSet:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(p)
    schema = pf.schema_arrow
    names = schema.names
    meta = json.loads((schema.metadata or {}).get(b"kdstore", b"{}"))
    if label is not None and label not in names:
        raise InputError(f"{arg('label_column')} {label!r}: {p} has no such column; columns are {names}")
    # The column that would be the labels by default is never an input, even with --label-column none.
    default_label = next((c for c in _DEFAULT_LABELS if c in names), None)
    if label is None and not no_labels:
        label = default_label
    if label is not None and not pa.types.is_integer(schema.field(label).type):
        raise InputError(
            f"{arg('label_column')} {label!r} in {p} has type {schema.field(label).type}, expected integer class "
            f"indices (0..C-1); re-encode the labels or pass {arg('label_column')} none"
        )
    if inputs:
        missing = [c for c in inputs if c not in names]
        if missing:
            raise InputError(f"{arg('input_columns')} {missing[0]!r}: {p} has no such column; columns are {names}")
        cols = list(inputs)
    else:
        lists = [f.name for f in schema if pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type)
                 or pa.types.is_large_list(f.type)]
        if len(lists) > 1:
            raise InputError(f"{arg(option)} {p}: several array columns {lists}; choose one with "
                             f"{arg('input_columns')}")
        cols = lists or [f.name for f in schema if f.name not in (label, default_label) and f.name not in _ID_COLUMNS
                         and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
                              or pa.types.is_boolean(f.type))]
        if not cols:
            raise InputError(f"{arg(option)} {p}: no array or numeric input columns found; columns are {names}; "
                             f"pass {arg('input_columns')}")
    for c in cols:
        t = schema.field(c).type
        ok = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
        if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
            if len(cols) > 1:
                raise InputError(f"{arg('input_columns')}: array column {c!r} cannot be combined with other columns")
            ok = pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)
        if not ok:
            raise InputError(
                f"{arg('input_columns')} {c!r} in {p} has type {t}, expected numbers or a fixed-size array of numbers; "
                f"encode it numerically or leave it out with {arg('input_columns')}"
            )
    reader = _ParquetReader(pf, cols, label)
    width, dtype = reader.probe()
    shape: tuple[int, ...] = (width,)
    if isinstance(meta.get("shape"), list) and int(np.prod(meta["shape"])) == width:
        shape = tuple(int(s) for s in meta["shape"])
    return TransferSet(p, "parquet", pf.metadata.num_rows, cols, shape, dtype, label, meta, reader)


class _ParquetReader:
    """Random-access rows by row group, caching the last group read (sequential access is the common case)."""

    def __init__(self, pf: Any, cols: list[str], label: str | None) -> None:
        self.pf, self.cols, self.label = pf, cols, label
        md = pf.metadata
        self.starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        self._cache: tuple[int, np.ndarray, np.ndarray | None] | None = None

    def probe(self) -> tuple[int, str]:
        if self.pf.metadata.num_rows == 0:
            return 1, "float32"
        x, _ = self._group(0)
        import pyarrow as pa

        t = self.pf.schema_arrow.field(self.cols[0]).type
        vt = t.value_type if hasattr(t, "value_type") else t
        return int(x.shape[1]), str(vt.to_pandas_dtype().__name__) if not pa.types.is_boolean(vt) else "bool"

    def _group(self, g: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self._cache and self._cache[0] == g:
            return self._cache[1], self._cache[2]
        import pyarrow as pa
        import pyarrow.compute as pc

        cols = self.cols + ([self.label] if self.label else [])
        t = self.pf.read_row_group(g, columns=cols)
        n = t.num_rows
        first = t.column(self.cols[0]).combine_chunks()
        if (pa.types.is_fixed_size_list(first.type) or pa.types.is_list(first.type)
                or pa.types.is_large_list(first.type)):
            if first.null_count:
                raise InputError(f"input column {self.cols[0]!r} has null rows in row group {g}; remove them")
            if not pa.types.is_fixed_size_list(first.type):
                lengths = pc.list_value_length(first).to_numpy(zero_copy_only=False)
                if n and (lengths.min() != lengths.max()):
                    raise InputError(f"input column {self.cols[0]!r}: rows have different lengths "
                                     f"({lengths.min()}..{lengths.max()}); inputs must have one fixed shape")
            flat = first.flatten().to_numpy(zero_copy_only=False)
            x = flat.astype(np.float32, copy=False).reshape(n, -1) if n else np.zeros((0, 1), np.float32)
        else:
            parts = []
            for c in self.cols:
                col = t.column(c)
                if col.null_count:
                    raise InputError(f"input column {c!r} has missing values; fill or drop them first")
                parts.append(col.to_numpy().astype(np.float32))
            x = np.stack(parts, axis=1)
        y = None
        if self.label:
            lab = t.column(self.label)
            if lab.null_count:
                raise InputError(f"{arg('label_column')} {self.label!r} has missing labels; drop those rows or pass "
                                 f"{arg('label_column')} none to treat the set as unlabeled")
            y = lab.to_numpy().astype(np.int64)
        self._cache = (g, x, y)
        return x, y

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        g0 = int(np.searchsorted(self.starts, start, side="right") - 1)
        xs, ys = [], []
        g = g0
        while g < len(self.starts) - 1 and self.starts[g] < stop:
            x, y = self._group(g)
            a = max(start - self.starts[g], 0)
            b = min(stop, self.starts[g + 1]) - self.starts[g]
            xs.append(x[a:b])
            if y is not None:
                ys.append(y[a:b])
            g += 1
        x = np.concatenate(xs) if len(xs) != 1 else xs[0]
        return x, (np.concatenate(ys) if ys else None) if self.label else None


# ---------------------------------------------------------------------------------------------- NPY
def _open_npy(p: Path, inputs: Sequence[str] | None, label: str | None, option: str) -> TransferSet:
    if label:
        raise InputError(f"{arg('label_column')} {label!r}: an .npy file holds one array (inputs only); "
                         "use .npz with arrays x and y for labeled sets")
    arr = np.load(p, mmap_mode="r", allow_pickle=False)
    _check_numeric(arr.dtype, p, "array")
    if arr.ndim < 2:
        raise InputError(f"{arg(option)} {p}: array of shape {arr.shape}; expected (rows, features...)")
    return TransferSet(p, "npy", arr.shape[0], ["<array>"], tuple(arr.shape[1:]), str(arr.dtype), None, {},
                       _ArrayReader(arr, None))


def _check_numeric(dtype: np.dtype[Any], p: Path, what: str) -> None:
    if dtype.kind not in "biuf":
        raise InputError(f"{p}: {what} has dtype {dtype}, expected a numeric dtype (no object arrays, no pickle)")


class _ArrayReader:
    def __init__(self, x: Any, y: Any, closer: Any = None) -> None:
        self.x, self.y, self.closer = x, y, closer

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.asarray(self.x[start:stop], dtype=np.float32)
        y = None if self.y is None else np.asarray(self.y[start:stop]).astype(np.int64)
        return x, y

    def close(self) -> None:
        if self.closer is not None:
            self.closer.close()


# ---------------------------------------------------------------------------------------------- NPZ / HDF5
def _open_arrays(p: Path, fmt: str, inputs: Sequence[str] | None, label: str | None, no_labels: bool,
                 option: str) -> TransferSet:
    if fmt == "npz":
        container: Any = _NpzArrays(p)
    else:
        import h5py

        container = h5py.File(p, "r")
    keys = list(container.keys())
    if inputs and len(inputs) > 1:
        raise InputError(f"{arg('input_columns')}: {fmt} transfer sets take one input array, got {list(inputs)}")
    x_key = inputs[0] if inputs else next((k for k in _DEFAULT_INPUTS if k in keys), None)
    if x_key is None or x_key not in keys:
        raise InputError(f"{arg(option)} {p}: no input array {x_key or 'x'!r}; arrays are {keys}; pass "
                         f"{arg('input_columns')}")
    if label is not None and label not in keys:
        raise InputError(f"{arg('label_column')} {label!r}: {p} has no such array; arrays are {keys}")
    if label is None and not no_labels:
        label = next((k for k in _DEFAULT_LABELS if k in keys), None)
    x = container[x_key]
    _check_numeric(x.dtype, p, f"array {x_key!r}")
    if len(x.shape) < 2:
        raise InputError(f"{arg(option)} {p}: input array {x_key!r} has shape {x.shape}; expected (rows, features...)")
    y = None
    if label is not None:
        y = np.asarray(container[label][()] if fmt == "hdf5" else container[label])
        if y.dtype.kind not in "iu" or y.ndim != 1:
            raise InputError(f"{arg('label_column')} {label!r} in {p}: dtype {y.dtype} shape {y.shape}, expected 1-D "
                             "integers")
        if len(y) != x.shape[0]:
            raise InputError(f"{p}: {len(y)} labels for {x.shape[0]} inputs; they must have the same length")
    return TransferSet(p, fmt, x.shape[0], [x_key], tuple(int(s) for s in x.shape[1:]), str(x.dtype), label,
                       {}, _ArrayReader(x, y, container))


class _NpzArrays:
    """Arrays of an .npz read lazily: each member's rows are read by seeking in the zip stream."""

    def __init__(self, p: Path) -> None:
        self.zf = zipfile.ZipFile(p)
        self.names = {n[:-4]: n for n in self.zf.namelist() if n.endswith(".npy")}

    def keys(self) -> list[str]:
        return list(self.names)

    def __getitem__(self, key: str) -> Any:
        return _NpzMember(self.zf, self.names[key])

    def close(self) -> None:
        self.zf.close()


class _NpzMember:
    def __init__(self, zf: zipfile.ZipFile, name: str) -> None:
        self.zf, self.name = zf, name
        with zf.open(name) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            self.offset = f.tell()
        if fortran:
            raise InputError(f"{name}: Fortran-ordered arrays are not supported; save with np.ascontiguousarray")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        if self.dtype.hasobject:
            raise InputError(f"{name}: object arrays would need pickle, which kdstore never loads")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, _ = sl.indices(self.shape[0])
        with self.zf.open(self.name) as f:
            f.seek(self.offset + start * self.row_bytes)
            buf = f.read((stop - start) * self.row_bytes)
        return np.frombuffer(buf, dtype=self.dtype).reshape((stop - start, *self.shape[1:]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[0 : self.shape[0]]
        return a if dtype is None else a.astype(dtype)
