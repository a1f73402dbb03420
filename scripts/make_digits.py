#!/usr/bin/env python
"""Build the embedded digits dataset shipped in ``kdstore/datasets/``.

Reads the UCI optical-digits 8x8 data (1,797 images, 10 classes) as carried by scikit-learn
(``sklearn/datasets/data/digits.csv.gz``) and writes, deterministically:

    kdstore/datasets/digits_train.parquet   (1,347 rows)
    kdstore/datasets/digits_test.parquet    (450 rows)

scikit-learn is *not* a dependency: pass either the extracted ``digits.csv.gz`` or a
scikit-learn wheel (``pip download --no-deps scikit-learn -d /tmp/skl``); the CSV is read
from the wheel with ``zipfile``.

Columns: ``image`` fixed_size_list<float32>[64] (pixel counts 0..16 divided by 16, row-major
8x8) and ``label`` int64. Row order is the sample id. Zstd, 256-row row groups, and a
``kdstore`` key in the Parquet key-value metadata describing source, license and split.

Usage:
    python scripts/make_digits.py /tmp/skl/scikit_learn-*.whl
    python scripts/make_digits.py /path/to/digits.csv.gz [--out kdstore/datasets]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CSV_MEMBER = "sklearn/datasets/data/digits.csv.gz"
N_ROWS = 1797
N_TEST = 450
SEED = 0
ROW_GROUP_SIZE = 256
# sha256 of digits.csv.gz in scikit-learn 1.x wheels (checked for 1.9.1); a mismatch only warns.
KNOWN_CSV_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"


def read_csv_gz(path: Path) -> bytes:
    """Return the raw bytes of digits.csv.gz from a .csv.gz file or a scikit-learn wheel/zip."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            try:
                return z.read(CSV_MEMBER)
            except KeyError:
                sys.exit(f"{path}: no member {CSV_MEMBER!r}; is this a scikit-learn wheel?")
    return path.read_bytes()


def parse(raw_gz: bytes) -> tuple[np.ndarray, np.ndarray]:
    data = np.loadtxt(io.StringIO(gzip.decompress(raw_gz).decode("ascii")), delimiter=",", dtype=np.int64)
    if data.shape != (N_ROWS, 65):
        sys.exit(f"unexpected digits.csv shape {data.shape}, expected ({N_ROWS}, 65)")
    pixels, labels = data[:, :64], data[:, 64]
    if pixels.min() < 0 or pixels.max() > 16 or set(labels.tolist()) != set(range(10)):
        sys.exit("unexpected value ranges in digits.csv")
    return pixels, labels


def stratified_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class seeded shuffle; test quota per class by largest remainder. Indices returned sorted."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_test / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    short = n_test - int(quota.sum())
    # largest fractional parts first; ties broken by class index (stable sort) -> deterministic
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:short]] += 1
    test: list[np.ndarray] = []
    for c, q in zip(classes, quota, strict=True):
        idx = np.flatnonzero(labels == c)
        test.append(rng.permutation(idx)[:q])
    test_idx = np.sort(np.concatenate(test))
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def write_split(path: Path, pixels: np.ndarray, labels: np.ndarray, split: dict) -> None:
    flat = pa.array((pixels.astype(np.float32) / np.float32(16.0)).reshape(-1), type=pa.float32())
    image = pa.FixedSizeListArray.from_arrays(flat, 64)
    table = pa.table({"image": image, "label": pa.array(labels.astype(np.int64), type=pa.int64())})
    meta = {
        "source": "UCI optdigits via scikit-learn digits.csv.gz",
        "license": "CC BY 4.0 (UCI)",
        "split": split,
        "shape": [8, 8],
    }
    table = table.replace_schema_metadata({b"kdstore": json.dumps(meta, sort_keys=True).encode()})
    pq.write_table(
        table,
        path,
        compression="zstd",
        row_group_size=ROW_GROUP_SIZE,
        use_dictionary=False,
        write_statistics=True,
        store_schema=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="digits.csv.gz, or a scikit-learn wheel that contains it")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "kdstore" / "datasets")
    args = ap.parse_args(argv)

    raw = read_csv_gz(args.source)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != KNOWN_CSV_SHA256:
        print(f"warning: digits.csv.gz sha256 {digest} differs from the known {KNOWN_CSV_SHA256}", file=sys.stderr)
    pixels, labels = parse(raw)
    train_idx, test_idx = stratified_split(labels, N_TEST, SEED)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, idx in (("train", train_idx), ("test", test_idx)):
        split = {
            "name": name,
            "method": "stratified by label, numpy default_rng(seed).permutation per class, "
            "largest-remainder test quota, rows kept in source order",
            "seed": SEED,
            "train_rows": int(len(train_idx)),
            "test_rows": int(len(test_idx)),
            "rows": int(len(idx)),
            "source_sha256": digest,
        }
        path = args.out / f"digits_{name}.parquet"
        write_split(path, pixels[idx], labels[idx], split)
        counts = np.bincount(labels[idx], minlength=10).tolist()
        print(f"wrote {path} rows={len(idx)} per-class={counts} bytes={path.stat().st_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
