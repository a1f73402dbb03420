"""Read and write one shard file (Parquet or HDF5) of named, typed columns. numpy/pyarrow/h5py only.

A shard holds a contiguous block of rows. Scalar columns are 1-D arrays, vector columns ``(rows, n)`` (or of any
rank: ``(rows, L, k)`` per-token top-k), and ragged columns (spec ``"ragged": true``, per-token sampled targets) are
`Ragged`: L variable-length lists per row.

Format 2 writes only types every engine reads (pyarrow, polars, DuckDB, Hugging Face datasets, h5py): float16,
float32, int16/int32/int64. A column whose values are exact in a narrower float (bfloat16, or float16 top-k values)
is written as float32 and its spec says ``"precision"``; byte-stream-split + zstd then stores the always-zero low
mantissa bytes for almost nothing. Format 1 wrote bfloat16 as its raw bits in ``uint16`` (spec dtype
``bfloat16``); `decode_bfloat16` still turns those back into float32.

Parquet encodings (format 2; DuckDB refuses byte-stream-split on FLOAT16, so float16 is PLAIN): float32 and
integer vectors BYTE_STREAM_SPLIT, float16 PLAIN, ``sample_id`` DELTA_BINARY_PACKED, everything else PLAIN;
no dictionaries; zstd level 3; statistics on ``sample_id`` only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdstore.errors import StoreFormatError
from kdstore.options import FORMATS
from kdstore.store.ragged import Ragged

EXTENSIONS = {"parquet": ".parquet", "hdf5": ".h5"}
_NUMPY_DTYPES = {
    "bool": np.bool_, "uint8": np.uint8, "int8": np.int8, "uint16": np.uint16, "int16": np.int16,
    "int32": np.int32, "int64": np.int64, "float16": np.float16, "bfloat16": np.uint16,
    "float32": np.float32, "float64": np.float64,
}


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype that holds a column of dtype `name` on disk (bfloat16 -> uint16 bits)."""
    return np.dtype(_NUMPY_DTYPES[name])


def decode_bfloat16(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits in uint16, rounding to nearest even (as torch does)."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = u + (0x7FFF + ((u >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def _check_columns(columns: dict[str, Any], specs: Sequence[dict[str, Any]]) -> int:
    rows = {len(a) for a in columns.values()}
    if len(rows) != 1:
        raise StoreFormatError(f"shard columns have different row counts: { {k: len(v) for k, v in columns.items()} }")
    for spec in specs:
        a = columns.get(spec["name"])
        if a is None:
            raise StoreFormatError(f"shard is missing column {spec['name']!r}")
        want = numpy_dtype(spec["dtype"])
        if (a.dtype != want or list(a.shape[1:]) != list(spec["shape"])
                or isinstance(a, Ragged) != bool(spec.get("ragged"))):
            raise StoreFormatError(
                f"column {spec['name']!r}: got {a.dtype}{list(a.shape[1:])}, expected {want}{spec['shape']}"
            )
    return rows.pop()


def write_shard(
    path: Path,
    columns: dict[str, Any],
    specs: Sequence[dict[str, Any]],
    *,
    fmt: str,
    row_group_rows: int,
    metadata: dict[str, Any],
) -> None:
    """Write one shard to `path` (which must not be visible to readers until renamed by the caller)."""
    _check_columns(columns, specs)
    if fmt == "parquet":
        _write_parquet(path, columns, specs, row_group_rows, metadata)
    elif fmt == "hdf5":
        _write_hdf5(path, columns, specs, row_group_rows, metadata)
    else:
        raise StoreFormatError(f"unknown storage format {fmt!r}; expected one of {FORMATS}")


def _arrow_array(a: np.ndarray | Ragged) -> Any:
    """A column as an Arrow array: (rows, L, k) -> fixed_size_list<fixed_size_list<T>[k]>[L]; a Ragged (rows, L)
    column -> fixed_size_list<list<T>>[L]."""
    import pyarrow as pa

    if isinstance(a, Ragged):
        offsets = a.offsets()
        if offsets[-1] >= 2**31:
            raise StoreFormatError(f"a ragged column holds {offsets[-1]} entries in one shard; use fewer rows per "
                                   "shard (at most 2**31 - 1 entries)")
        arr = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(np.ascontiguousarray(a.values)))
        widths = a.shape[1:]
    else:
        a = np.ascontiguousarray(a)
        arr, widths = pa.array(a.reshape(-1)), a.shape[1:]
    for width in reversed(widths):
        arr = pa.FixedSizeListArray.from_arrays(arr, width)
    return arr


def _write_parquet(
    path: Path, columns: dict[str, Any], specs: Sequence[dict[str, Any]], rg: int, meta: dict[str, Any]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays, fields, encodings = [], [], {}
    for spec in specs:
        a = columns[spec["name"]]
        arr = _arrow_array(a)
        field_meta = {b"kdstore_dtype": spec["dtype"].encode(), b"kdstore_shape": json.dumps(spec["shape"]).encode(),
                      b"kdstore_role": str(spec["role"]).encode()}
        if spec.get("precision"):
            field_meta[b"kdstore_precision"] = spec["precision"].encode()
        if spec.get("ragged"):
            field_meta[b"kdstore_ragged"] = b"true"
        fields.append(pa.field(spec["name"], arr.type, nullable=False, metadata=field_meta))
        arrays.append(arr)
        encodings[spec["name"] + ".list.element" * (a.ndim - 1)] = _parquet_encoding(spec, a.ndim)
    schema = pa.schema(fields, metadata={b"kdstore": json.dumps(meta, sort_keys=True).encode()})
    table = pa.Table.from_arrays(arrays, schema=schema)
    pq.write_table(table, path, row_group_size=rg, compression="zstd", compression_level=3, use_dictionary=False,
                   column_encoding=encodings, write_statistics=["sample_id"])


def _parquet_encoding(spec: dict[str, Any], ndim: int) -> str:
    """The Parquet encoding of a column (see the module docstring)."""
    if spec["name"] == "sample_id":
        return "DELTA_BINARY_PACKED"
    if spec["dtype"] == "float32" or (ndim > 1 and spec["dtype"] in ("int16", "int32", "int64")):
        return "BYTE_STREAM_SPLIT"
    return "PLAIN"


def _write_hdf5(
    path: Path, columns: dict[str, Any], specs: Sequence[dict[str, Any]], rg: int, meta: dict[str, Any]
) -> None:
    import h5py

    with h5py.File(path, "w", track_order=False, libver=("earliest", "v110")) as f:
        f.attrs["kdstore"] = json.dumps(meta, sort_keys=True)
        for spec in specs:
            a = columns[spec["name"]]
            chunks = (min(rg, len(a)),) + tuple(a.shape[1:])
            if isinstance(a, Ragged):  # an (rows, L) dataset of variable-length arrays
                cells = np.empty(a.lengths.size, dtype=object)
                cells[:] = a.cells()
                ds = f.create_dataset(spec["name"], shape=a.shape, dtype=h5py.vlen_dtype(a.dtype), chunks=chunks,
                                      track_times=False)
                if len(cells):
                    ds[...] = cells.reshape(a.shape)
                ds.attrs["kdstore_ragged"] = "true"
            else:
                ds = f.create_dataset(spec["name"], data=np.ascontiguousarray(a), chunks=chunks, track_times=False)
            ds.attrs["kdstore_dtype"] = spec["dtype"]
            ds.attrs["kdstore_shape"] = np.asarray(spec["shape"], dtype=np.int64)
            ds.attrs["kdstore_role"] = str(spec["role"])
            if spec.get("precision"):
                ds.attrs["kdstore_precision"] = spec["precision"]


def shard_row_groups(path: Path, fmt: str, rows: int, row_group_rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of the shard's row groups (Parquet) or chunks (HDF5)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        md = pq.ParquetFile(path).metadata
        out, start = [], 0
        for i in range(md.num_row_groups):
            n = md.row_group(i).num_rows
            out.append((start, start + n))
            start += n
        return out
    return [(s, min(s + row_group_rows, rows)) for s in range(0, rows, row_group_rows)]


def read_shard(
    path: Path, fmt: str, names: Sequence[str], row_groups: Sequence[int] | None = None, row_group_rows: int = 0
) -> dict[str, Any]:
    """Read columns `names` of a shard (all rows, or only the listed row groups) as numpy arrays."""
    try:
        if fmt == "parquet":
            return _read_parquet(path, names, row_groups)
        return _read_hdf5(path, names, row_groups, row_group_rows)
    except StoreFormatError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise StoreFormatError(
            f"cannot read {path}: {type(e).__name__}: {e}; the file is corrupted or truncated — "
            "run `kdstore verify` on the version and re-create it if it fails"
        ) from None


def _read_parquet(path: Path, names: Sequence[str], row_groups: Sequence[int] | None) -> dict[str, Any]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path, memory_map=True)
    table = (pf.read_row_groups(list(row_groups), columns=list(names)) if row_groups is not None
             else pf.read(columns=list(names)))
    out: dict[str, Any] = {}
    for name in names:
        col = table.column(name).combine_chunks()
        shape = [len(col)]
        while hasattr(col.type, "list_size"):  # nested fixed-size lists: one more axis each
            shape.append(col.type.list_size)
            col = col.flatten()
        if hasattr(col, "value_lengths"):  # variable-length lists inside: a ragged column
            lengths = col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int32).reshape(shape)
            out[name] = Ragged(col.flatten().to_numpy(zero_copy_only=False), lengths)
        else:
            out[name] = col.to_numpy(zero_copy_only=False).reshape(shape)
    return out


def _read_hdf5(path: Path, names: Sequence[str], row_groups: Sequence[int] | None, rg: int) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as f:
        out: dict[str, Any] = {}
        for name in names:
            ds = f[name]
            parts = [ds[()]] if row_groups is None else [ds[i * rg : (i + 1) * rg] for i in row_groups]
            if ds.dtype.kind == "O":  # variable-length arrays: a ragged column
                base = h5py.check_vlen_dtype(ds.dtype)
                cells = [c for p in parts for c in p.reshape(-1)]
                lengths = np.array([len(c) for c in cells], np.int32).reshape(-1, *ds.shape[1:])
                values = np.concatenate(cells).astype(base) if cells else np.empty(0, base)
                out[name] = Ragged(values, lengths)
            else:
                out[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out


def column_names(path: Path, fmt: str) -> list[str]:
    """The column names of a file, from its metadata (no data read)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    import h5py

    with h5py.File(path, "r") as f:
        return list(f.keys())


def count_rows(path: Path, fmt: str) -> int:
    """Row count from the file's own metadata (cheap; no data read)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["sample_id"].shape[0])
