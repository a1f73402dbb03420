"""MUNGE: synthetic transfer sets for model compression.

Implements the MUNGE procedure of Bucilua, Caruana and Niculescu-Mizil (2006), "Model
compression", KDD: every example ``e`` is paired with its nearest neighbour ``e'`` among the
*other* examples; then, attribute by attribute and with probability ``p``, the value of ``e`` is
replaced by that of ``e'``.  A swapped continuous attribute is then redrawn from
``Normal(e'.a, |e.a - e'.a| / s)``, so a larger ``s`` keeps synthetic values closer to real ones.

Distances follow the paper: continuous attributes are standardised to zero mean and unit standard
deviation and compared with squared Euclidean distance; each categorical attribute (string,
dictionary or bool column) adds 0 when equal and 1 when different.  Neighbours are found with
``torch.cdist`` in ``block_size x block_size`` tiles, so memory stays bounded for 100k+ rows.

This module never prints or exits; bad options raise ConfigError, bad data or files InputError.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from kdstore.errors import ConfigError, InputError, arg
from kdstore.store.files import atomic_path, sha256_file  # sha256_file re-exported: the one file hasher

__all__ = [
    "METADATA_KEY",
    "MungeConfig",
    "munge",
    "nearest_neighbours",
    "read_table",
    "write_synthetic",
    "read_generator_metadata",
    "sha256_file",
]

METADATA_KEY = b"kdstore"
SUPPORTED_EXTENSIONS = (".parquet", ".csv")
_SUPPORTED_TYPES = "numeric (int/float), bool, string/categorical (string or dictionary)"


@dataclass(frozen=True)
class MungeConfig:
    """Settings of one MUNGE run; field names match the CLI options (--multiplier, --p, ...)."""

    multiplier: int = 1
    p: float = 0.5
    s: float = 1.0
    seed: int = 0
    block_size: int = 4096
    label_column: str | None = None
    exclude_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def _int(name: str, value: Any, minimum: int) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ConfigError(f"--{name} must be an integer >= {minimum}, got {value!r}")

        _int("multiplier", self.multiplier, 1)
        _int("seed", self.seed, 0)
        _int("block-size", self.block_size, 1)
        if not isinstance(self.p, (int, float)) or isinstance(self.p, bool) or not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"{arg('p')} must be in [0, 1], got {self.p!r}")
        if not isinstance(self.s, (int, float)) or isinstance(self.s, bool) or not (0.0 < self.s < math.inf):
            raise ConfigError(f"{arg('s')} must be a finite number > 0, got {self.s!r}")
        if isinstance(self.exclude_columns, str):
            raise ConfigError("exclude_columns must be a sequence of column names, not a single string")
        for name, cast in (("multiplier", int), ("seed", int), ("block_size", int), ("p", float), ("s", float)):
            object.__setattr__(self, name, cast(getattr(self, name)))  # plain Python types (JSON-safe)
        object.__setattr__(self, "exclude_columns", tuple(self.exclude_columns))


@dataclass
class _Encoded:
    """Attribute columns split into standardised continuous values and categorical codes."""

    names: list[str]                      # attribute columns, in table order
    types: dict[str, pa.DataType]
    cont_names: list[str]
    cont: np.ndarray                      # (N, dc) float64, original units
    cont_std: np.ndarray                  # (N, dc) float64, standardised
    cat_names: list[str]
    codes: np.ndarray                     # (N, dk) int64
    vocab: dict[str, pa.Array]            # categorical column -> its distinct values


def _is_categorical(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        v = t.value_type
        return pa.types.is_string(v) or pa.types.is_large_string(v) or pa.types.is_integer(v) or pa.types.is_boolean(v)
    return pa.types.is_boolean(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or _is_string_view(t)


def _is_string_view(t: pa.DataType) -> bool:
    return bool(getattr(pa.types, "is_string_view", lambda _: False)(t))


def _is_continuous(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _attribute_names(table: pa.Table, config: MungeConfig) -> list[str]:
    columns = table.column_names
    listing = ", ".join(columns)
    if config.label_column is not None and config.label_column not in columns:
        raise ConfigError(f"{arg('label_column')} {config.label_column!r} is not a column of the table; columns: "
                          f"{listing}")
    for name in config.exclude_columns:
        if name not in columns:
            raise ConfigError(f"{arg('exclude_columns')} {name!r} is not a column of the table; columns: {listing}")
    dropped = set(config.exclude_columns) | {config.label_column}
    names = [c for c in columns if c not in dropped]
    if not names:
        raise ConfigError(f"no attribute columns are left after {arg('label_column')}/{arg('exclude_columns')}; keep "
                          "at least one")
    return names


def _encode(table: pa.Table, config: MungeConfig) -> _Encoded:
    if table.num_rows == 0 or table.num_columns == 0:
        raise InputError(f"the table is empty ({table.num_rows} rows, {table.num_columns} columns); "
                         "MUNGE needs at least 2 rows")
    if table.num_rows < 2:
        raise InputError("the table has 1 row; MUNGE needs at least 2 rows (each example is paired "
                         "with its nearest neighbour among the others)")
    names = _attribute_names(table, config)
    types = {n: table.schema.field(n).type for n in names}
    for n in names:
        t = types[n]
        if not (_is_continuous(t) or _is_categorical(t)):
            raise InputError(f"column {n!r} has type {t}, which MUNGE cannot use; supported types are "
                             f"{_SUPPORTED_TYPES}; drop it or pass {arg('exclude_columns')} {n}")
        nulls = table.column(n).null_count
        if nulls:
            raise InputError(f"column {n!r} has {nulls} missing values (nulls); MUNGE needs complete rows: "
                             f"drop or impute those rows first, or pass {arg('exclude_columns')} {n}")

    n_rows = table.num_rows
    cont_names = [n for n in names if _is_continuous(types[n])]
    cat_names = [n for n in names if not _is_continuous(types[n])]
    cont = np.empty((n_rows, len(cont_names)), dtype=np.float64)
    for j, n in enumerate(cont_names):
        col = table.column(n).to_numpy().astype(np.float64)
        bad = ~np.isfinite(col)
        if bad.any():
            raise InputError(f"column {n!r} has {int(bad.sum())} NaN or infinite values; MUNGE needs complete "
                             f"rows: drop or impute those rows first, or pass {arg('exclude_columns')} {n}")
        cont[:, j] = col
    mean = cont.mean(axis=0)
    sd = cont.std(axis=0)
    for j, n in enumerate(cont_names):
        if not sd[j] > 0:
            raise InputError(f"column {n!r} is constant (standard deviation 0), so it cannot be standardised "
                             f"and carries no information; pass {arg('exclude_columns')} {n}")
    cont_std = (cont - mean) / np.where(sd > 0, sd, 1.0)

    codes = np.empty((n_rows, len(cat_names)), dtype=np.int64)
    vocab: dict[str, pa.Array] = {}
    for j, n in enumerate(cat_names):
        arr = table.column(n).combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        elif _is_string_view(arr.type):
            arr = arr.cast(pa.large_string())
        encoded = pc.dictionary_encode(arr)
        codes[:, j] = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        vocab[n] = encoded.dictionary
    return _Encoded(names, types, cont_names, cont, cont_std, cat_names, codes, vocab)


def _nearest(enc: _Encoded, block_size: int) -> np.ndarray:
    """Index of each row's nearest other row; ties go to the lowest index, independent of block_size."""
    n_rows = enc.cont.shape[0]
    x = torch.from_numpy(np.ascontiguousarray(enc.cont_std))
    c = torch.from_numpy(np.ascontiguousarray(enc.codes))
    dc, dk = x.shape[1], c.shape[1]
    # Categorical mismatches = dk - matches, and matches are a dot product of one-hot rows: one matrix product
    # per tile instead of dk memory-bound comparisons. Small integer counts are exact in float64, so the
    # distances (and neighbours) are the same for any blocking.
    onehot = _one_hot(c) if dk else None
    result = np.empty(n_rows, dtype=np.int64)
    with torch.no_grad():
        for q0 in range(0, n_rows, block_size):
            q1 = min(q0 + block_size, n_rows)
            best = torch.full((q1 - q0,), math.inf, dtype=torch.float64)
            best_idx = torch.zeros(q1 - q0, dtype=torch.int64)
            for r0 in range(0, n_rows, block_size):
                r1 = min(r0 + block_size, n_rows)
                # Direct (not matmul) mode: each distance depends only on its pair, so any blocking
                # gives the same numbers, and identical rows are at distance exactly 0.
                if dc:
                    d = torch.cdist(x[q0:q1], x[r0:r1], compute_mode="donot_use_mm_for_euclid_dist").square_()
                else:
                    d = torch.zeros(q1 - q0, r1 - r0, dtype=torch.float64)
                if onehot is not None:
                    d += dk - onehot[q0:q1] @ onehot[r0:r1].T
                lo, hi = max(q0, r0), min(q1, r1)
                if lo < hi:  # a row is never its own neighbour
                    idx = torch.arange(lo, hi)
                    d[idx - q0, idx - r0] = math.inf
                val, arg = d.min(dim=1)  # first minimum on ties
                better = val < best      # strict: earlier tiles win ties
                best = torch.where(better, val, best)
                best_idx = torch.where(better, arg + r0, best_idx)
            result[q0:q1] = best_idx.numpy()
    return result


def _one_hot(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) integer codes -> (N, sum of vocabulary sizes) float64 one-hot, one block per column."""
    parts = [torch.nn.functional.one_hot(codes[:, k] - codes[:, k].min(), -1).to(torch.float64)
             for k in range(codes.shape[1])]
    return torch.cat(parts, dim=1)


def nearest_neighbours(table: pa.Table, config: MungeConfig | None = None) -> np.ndarray:
    """Index (int64, length N) of each example's nearest neighbour among the other examples.

    Uses the paper's distance on the attribute columns (label and excluded columns ignored).
    """
    config = config or MungeConfig()
    return _nearest(_encode(table, config), config.block_size)


def _to_arrow(values: np.ndarray, t: pa.DataType) -> pa.Array:
    if pa.types.is_integer(t):
        info = np.iinfo(t.to_pandas_dtype())
        values = np.clip(np.rint(values), info.min, info.max)
    return pa.array(values.astype(t.to_pandas_dtype()), type=t)


def munge(table: pa.Table, config: MungeConfig | None = None) -> pa.Table:
    """Return ``multiplier * N`` synthetic rows (round-major: round 0's N rows first).

    Row ``r * N + i`` is generated from example ``i`` and its nearest neighbour. Output columns are
    the attribute columns in input order and with input types; the label and excluded columns are
    dropped (synthetic rows are unlabeled: a teacher labels them).
    """
    config = config or MungeConfig()
    enc = _encode(table, config)
    nn = _nearest(enc, config.block_size)
    rng = np.random.default_rng(config.seed)
    n_rows, dc, dk = enc.cont.shape[0], len(enc.cont_names), len(enc.cat_names)
    a_cont, b_cont = enc.cont, enc.cont[nn]
    sd = np.abs(a_cont - b_cont) / config.s
    a_cat, b_cat = enc.codes, enc.codes[nn]
    rounds: list[pa.Table] = []
    for _ in range(config.multiplier):
        swap = rng.random((n_rows, dc + dk)) < config.p
        noise = rng.standard_normal((n_rows, dc))
        new_cont = np.where(swap[:, :dc], b_cont + noise * sd, a_cont)
        new_cat = np.where(swap[:, dc:], b_cat, a_cat)
        arrays: dict[str, pa.Array] = {}
        for j, name in enumerate(enc.cont_names):
            arrays[name] = _to_arrow(new_cont[:, j], enc.types[name])
        for j, name in enumerate(enc.cat_names):
            t = enc.types[name]
            idx = pa.array(new_cat[:, j], type=t.index_type if pa.types.is_dictionary(t) else pa.int64())
            if pa.types.is_dictionary(t):
                arrays[name] = pa.DictionaryArray.from_arrays(idx, enc.vocab[name], ordered=t.ordered)
            else:
                arrays[name] = pc.take(enc.vocab[name], idx).cast(t)
        rounds.append(pa.table({n: arrays[n] for n in enc.names}))
    return pa.concat_tables(rounds).combine_chunks()


def read_table(path: str | os.PathLike[str]) -> pa.Table:
    """Read a Parquet or CSV file; string values in CSV files are stripped of surrounding whitespace."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise InputError(f"{p}: unsupported file extension {p.suffix!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}")
    if not p.is_file():
        raise InputError(f"{p}: no such file (expected a {', '.join(SUPPORTED_EXTENSIONS)} file)")
    try:
        if ext == ".parquet":
            return pq.read_table(p)
        table = pacsv.read_csv(p)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{p}: cannot read as {ext[1:]}: {e}") from e
    for i, field in enumerate(table.schema):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            table = table.set_column(i, field, pc.utf8_trim_whitespace(table.column(i)))
    return table


def write_synthetic(
    table: pa.Table,
    path: str | os.PathLike[str],
    *,
    parent_path: str | os.PathLike[str],
    parent_sha256: str,
    config: MungeConfig,
) -> None:
    """Write a synthetic table as Parquet, atomically, recording how it was generated."""
    out = Path(path)
    if out.suffix.lower() != ".parquet":
        raise ConfigError(f"{arg('out')} {out}: the output must be a .parquet file")
    info = {
        "generator": "munge",
        "settings": {"multiplier": config.multiplier, "p": config.p, "s": config.s, "seed": config.seed},
        "parent": {"path": str(parent_path), "sha256": parent_sha256},
        "rows": table.num_rows,
    }
    metadata = dict(table.schema.metadata or {})
    metadata[METADATA_KEY] = json.dumps(info, sort_keys=True).encode()
    table = table.replace_schema_metadata(metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)


def read_generator_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The generator record written by write_synthetic, or None when the file has none.

    Other kdstore files use the same b"kdstore" key for other records; only a JSON object with a
    "generator" entry counts as a generator record.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        metadata = pq.read_metadata(p).metadata or {}
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{p}: cannot read Parquet metadata: {e}") from e
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except ValueError as e:
        raise InputError(f"{p}: the {METADATA_KEY.decode()!r} metadata is not valid JSON: {e}") from e
    if not isinstance(info, dict) or "generator" not in info:
        return None
    return info
