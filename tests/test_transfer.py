"""Transfer-set readers: Parquet (array or numeric columns), NPZ, NPY, HDF5; labels; fingerprints; bad files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdstore.errors import InputError
from kdstore.transfer import detect_format, open_transfer
from tests.conftest import Data, write_parquet_array


def check_reads(ts, x: np.ndarray, y: np.ndarray | None) -> None:  # type: ignore[no-untyped-def]
    """Whole-set, cross-boundary, backwards and batched reads all return the right rows."""
    xs, ys = ts.read_rows(0, ts.rows)
    assert xs.dtype == np.float32 and xs.flags.writeable
    np.testing.assert_array_equal(xs, x)
    for a, b in [(25, 65), (59, 61), (90, 100), (0, 1), (30, 60), (3, 97), (10, 11)]:  # row groups are 30 rows
        xa, ya = ts.read_rows(a, b)
        assert xa.shape == (b - a, *ts.input_shape)
        np.testing.assert_array_equal(xa, x[a:b])
        if y is None:
            assert ya is None
        else:
            assert ya.dtype == np.int64
            np.testing.assert_array_equal(ya, y[a:b])
    got = list(ts.iter_batches(16, 10, 75))
    assert [s for s, _, _ in got] == [10, 26, 42, 58, 74]
    np.testing.assert_array_equal(np.concatenate([b for _, b, _ in got]), x[10:75])
    empty, ey = ts.read_rows(7, 7)
    assert empty.shape == (0, *ts.input_shape) and (ey is None) == (y is None)
    with pytest.raises(InputError, match=r"rows \[90, 101\) out of range for 100 rows"):
        ts.read_rows(90, 101)
    with pytest.raises(InputError, match="out of range"):
        ts.read_rows(5, 4)


# --- the readers ------------------------------------------------------------------------------------------------


def test_parquet_array_column(data: Data) -> None:
    ts = open_transfer(data.parquet)
    assert (ts.format, ts.rows, ts.input_columns, ts.input_shape) == ("parquet", 100, ["x"], (8,))
    assert ts.source_dtype == "float32" and ts.label_column == "label" and ts.has_labels
    check_reads(ts, data.x, data.y)
    ts.close()


def test_parquet_numeric_columns(data: Data) -> None:
    ts = open_transfer(data.parquet_numeric)  # default: every numeric column except the label (not the string)
    assert ts.input_columns == [f"f{i}" for i in range(8)] + ["weight"] and ts.input_shape == (9,)
    assert ts.label_column == "label"
    cols = [f"f{i}" for i in range(8)]
    ts = open_transfer(data.parquet_numeric, input_columns=cols)
    assert ts.input_columns == cols and ts.input_shape == (8,)
    check_reads(ts, data.x, data.y)
    ts2 = open_transfer(data.parquet_numeric, input_columns=["f3", "f1"])
    np.testing.assert_array_equal(ts2.read_rows(0, 100)[0], data.x[:, [3, 1]])


def test_npz(data: Data) -> None:
    ts = open_transfer(data.npz)
    assert (ts.format, ts.input_columns, ts.label_column, ts.input_shape) == ("npz", ["x"], "y", (8,))
    check_reads(ts, data.x, data.y)
    ts.close()


def test_npz_compressed_images_and_integer_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (100, 2, 4), dtype=np.uint8)
    y = rng.integers(0, 3, 100).astype(np.int32)
    np.savez_compressed(tmp_path / "img.npz", images=x, labels=y)
    ts = open_transfer(tmp_path / "img.npz")
    assert ts.input_columns == ["images"] and ts.label_column == "labels"
    assert ts.input_shape == (2, 4) and ts.source_dtype == "uint8"
    check_reads(ts, x.astype(np.float32), y.astype(np.int64))
    ts.close()


def test_npy_is_unlabeled(data: Data) -> None:
    ts = open_transfer(data.npy)
    assert (ts.format, ts.input_columns, ts.label_column, ts.has_labels) == ("npy", ["<array>"], None, False)
    assert ts.describe()["kind"] == "unlabeled"
    check_reads(ts, data.x, None)
    assert not open_transfer(data.npy, label_column="none").has_labels


def test_hdf5(data: Data) -> None:
    ts = open_transfer(data.h5)
    assert (ts.format, ts.input_columns, ts.label_column, ts.input_shape) == ("hdf5", ["x"], "y", (8,))
    check_reads(ts, data.x, data.y)
    ts.close()


# --- labels -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["label", "labels", "y", "target"])
def test_label_column_detection(tmp_path: Path, data: Data, name: str) -> None:
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"inputs": pa.FixedSizeListArray.from_arrays(pa.array(data.x.reshape(-1)), 8),
                             name: pa.array(data.y.astype(np.int16))}), p)
    ts = open_transfer(p)
    assert ts.label_column == name and ts.input_columns == ["inputs"]
    np.testing.assert_array_equal(ts.read_rows(0, 100)[1], data.y)


@pytest.mark.parametrize("fmt", ["parquet", "parquet_numeric", "npz", "h5"])
@pytest.mark.parametrize("none", ["none", "NONE", "None"])
def test_label_column_none(data: Data, fmt: str, none: str) -> None:
    ts = open_transfer(getattr(data, fmt), label_column=none)
    assert ts.label_column is None and not ts.has_labels
    assert ts.read_rows(0, 10)[1] is None
    assert ts.describe()["kind"] == "unlabeled" and ts.describe()["label_column"] is None
    if fmt == "parquet_numeric":  # the label is not swallowed as an input column
        assert "label" not in ts.input_columns


def test_explicit_label_column(data: Data, tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", x=data.x, cls=data.y, y=np.zeros(100, np.int64))
    ts = open_transfer(tmp_path / "t.npz", label_column="cls")
    np.testing.assert_array_equal(ts.read_rows(0, 100)[1], data.y)
    ts.close()


# --- fingerprint and description ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "parquet_numeric", "npz", "npy", "h5"])
def test_fingerprint_is_sha256_of_the_file(data: Data, fmt: str) -> None:
    path = getattr(data, fmt)
    ts = open_transfer(path)
    assert ts.sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    d = ts.describe()
    assert d["sha256"] == ts.sha256 and d["rows"] == 100 and d["path"] == str(Path(path).resolve())
    assert d["format"] == {"parquet_numeric": "parquet", "h5": "hdf5"}.get(fmt, fmt)
    assert d["inputs"]["dtype"] == "float32" and d["generator"] is None
    ts.close()


def test_parquet_metadata_shape_and_synthetic_kind(tmp_path: Path, data: Data) -> None:
    p = tmp_path / "syn.parquet"
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(data.x.reshape(-1)), 8)})
    meta = {"generator": "munge", "settings": {"p": 0.5}, "shape": [2, 4]}
    pq.write_table(table.replace_schema_metadata({b"kdstore": json.dumps(meta).encode()}), p)
    ts = open_transfer(p)
    assert ts.input_shape == (2, 4)
    np.testing.assert_array_equal(ts.read_rows(3, 5)[0], data.x[3:5].reshape(2, 2, 4))
    d = ts.describe()
    assert d["kind"] == "synthetic" and d["generator"] == meta and d["inputs"]["shape"] == [2, 4]


def test_parquet_variable_list_type_with_equal_lengths(tmp_path: Path, data: Data) -> None:
    p = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"x": pa.array([list(r) for r in data.x], pa.list_(pa.float32()))}), p, row_group_size=30)
    ts = open_transfer(p)
    assert ts.input_shape == (8,) and not ts.has_labels
    check_reads(ts, data.x, None)


def test_detect_format() -> None:
    assert [detect_format(Path(f"a{s}")) for s in (".parquet", ".PQ", ".npz", ".npy", ".h5", ".HDF5")] == [
        "parquet", "parquet", "npz", "npy", "hdf5", "hdf5"]
    with pytest.raises(InputError, match=r"eval a.csv: unknown file type '.csv'; expected one of .*\.npz"):
        detect_format(Path("a.csv"), "eval")


# --- bad inputs ---------------------------------------------------------------------------------------------------


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"transfer .*nope.parquet: file not found; check the path"):
        open_transfer(tmp_path / "nope.parquet")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown file type '.csv'"):
        open_transfer(tmp_path / "x.csv")
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(InputError, match="file not found"):
        open_transfer(tmp_path / "dir.npz")


@pytest.mark.parametrize(("name", "fmt"),
                         [("g.parquet", "parquet"), ("g.npz", "npz"), ("g.npy", "npy"), ("g.h5", "hdf5")])
def test_corrupted_files(tmp_path: Path, name: str, fmt: str) -> None:
    (tmp_path / name).write_bytes(b"this is not a data file\n" * 10)
    with pytest.raises(InputError, match=rf"transfer .*{name}: cannot read it as {fmt}: "):
        open_transfer(tmp_path / name)


def test_empty_sets(tmp_path: Path) -> None:
    write_parquet_array(tmp_path / "e.parquet", np.zeros((0, 8), np.float32), np.zeros(0, np.int64))
    np.save(tmp_path / "e.npy", np.zeros((0, 8), np.float32))
    np.savez(tmp_path / "e.npz", x=np.zeros((0, 8), np.float32))
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f.create_dataset("x", data=np.zeros((0, 8), np.float32))
    for name in ("e.parquet", "e.npy", "e.npz", "e.h5"):
        with pytest.raises(InputError,
                           match=rf"{name}: the transfer set is empty \(0 rows\); it needs at least one row"):
            open_transfer(tmp_path / name)


def test_parquet_column_problems(tmp_path: Path, data: Data) -> None:
    x = pa.FixedSizeListArray.from_arrays(pa.array(data.x.reshape(-1)), 8)
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"x": x, "x2": x, "label": pa.array(data.y), "flabel": pa.array(data.y * 1.0)}), p)
    with pytest.raises(InputError, match=r"several array columns \['x', 'x2'\]; choose one with input_columns"):
        open_transfer(p)
    with pytest.raises(InputError, match=r"input_columns 'nope': .* has no such column; columns are \['x'"):
        open_transfer(p, input_columns=["nope"])
    with pytest.raises(InputError, match="array column 'x' cannot be combined with other columns"):
        open_transfer(p, input_columns=["x", "x2"])
    with pytest.raises(InputError, match=r"label_column 'lab': .* has no such column"):
        open_transfer(p, input_columns=["x"], label_column="lab")
    with pytest.raises(InputError, match=r"label_column 'flabel' .* has type double, expected integer class indices"):
        open_transfer(p, input_columns=["x"], label_column="flabel")
    assert open_transfer(p, input_columns=["x2"]).input_columns == ["x2"]

    s = tmp_path / "s.parquet"
    pq.write_table(pa.table({"name": pa.array(["a", "b"]), "label": pa.array([0, 1])}), s)
    with pytest.raises(InputError, match=r"no array or numeric input columns found; columns are \['name', 'label'\]"):
        open_transfer(s)
    with pytest.raises(InputError, match=r"input_columns 'name' .* has type string, expected numbers"):
        open_transfer(s, input_columns=["name"])
    sl = tmp_path / "sl.parquet"
    pq.write_table(pa.table({"x": pa.array([["a"], ["b"]], pa.list_(pa.string()))}), sl)
    with pytest.raises(InputError, match=r"input_columns 'x' .* has type list<.*string>, expected numbers"):
        open_transfer(sl)


def test_parquet_ragged_and_null_rows(tmp_path: Path) -> None:
    ragged = tmp_path / "r.parquet"
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32()))}), ragged)
    with pytest.raises(InputError, match=r"rows have different lengths \(1..2\); inputs must have one fixed shape"):
        open_transfer(ragged)
    nulls = tmp_path / "n.parquet"
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], None], pa.list_(pa.float32(), 2))}), nulls)
    with pytest.raises(InputError, match=r"input column 'x' has null rows in row group 0; remove them"):
        open_transfer(nulls)
    num = tmp_path / "num.parquet"
    pq.write_table(pa.table({"a": pa.array([1.0, None]), "b": pa.array([1.0, 2.0])}), num)
    with pytest.raises(InputError, match="input column 'a' has missing values; fill or drop them first"):
        open_transfer(num)
    nl = tmp_path / "nl.parquet"
    pq.write_table(pa.table({"a": pa.array([1.0, 2.0]), "label": pa.array([1, None], pa.int64())}), nl)
    with pytest.raises(InputError,
                       match="label_column 'label' has missing labels; drop those rows or pass label_column none"):
        open_transfer(nl)
    assert not open_transfer(nl, label_column="none").has_labels


def test_npz_problems(tmp_path: Path, data: Data) -> None:
    np.savez(tmp_path / "a.npz", a=data.x, b=data.y)
    with pytest.raises(InputError, match=r"no input array 'x'; arrays are \['a', 'b'\]; pass input_columns"):
        open_transfer(tmp_path / "a.npz")
    with pytest.raises(InputError, match=r"no input array 'c'"):
        open_transfer(tmp_path / "a.npz", input_columns=["c"])
    assert open_transfer(tmp_path / "a.npz", input_columns=["a"], label_column="b").rows == 100
    with pytest.raises(InputError, match=r"npz transfer sets take one input array, got \['a', 'b'\]"):
        open_transfer(tmp_path / "a.npz", input_columns=["a", "b"])
    with pytest.raises(InputError, match=r"label_column 'z': .* has no such array; arrays are \['a', 'b'\]"):
        open_transfer(tmp_path / "a.npz", input_columns=["a"], label_column="z")
    np.savez(tmp_path / "short.npz", x=data.x, y=data.y[:99])
    with pytest.raises(InputError, match="99 labels for 100 inputs; they must have the same length"):
        open_transfer(tmp_path / "short.npz")
    np.savez(tmp_path / "fy.npz", x=data.x, y=data.y * 1.0)
    with pytest.raises(InputError,
                       match=r"label_column 'y' in .*: dtype float64 shape \(100,\), expected 1-D integers"):
        open_transfer(tmp_path / "fy.npz")
    np.savez(tmp_path / "1d.npz", x=data.x[:, 0])
    with pytest.raises(InputError, match=r"input array 'x' has shape \(100,\); expected \(rows, features...\)"):
        open_transfer(tmp_path / "1d.npz")
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(data.x))
    with pytest.raises(InputError, match="Fortran-ordered arrays are not supported"):
        open_transfer(tmp_path / "f.npz")
    np.savez(tmp_path / "o.npz", x=np.array([[1, "a"]], dtype=object))
    with pytest.raises(InputError, match="object arrays would need pickle, which kdstore never loads"):
        open_transfer(tmp_path / "o.npz")
    np.savez(tmp_path / "s.npz", x=np.array([["a", "b"]]))
    with pytest.raises(InputError, match=r"array 'x' has dtype <U1, expected a numeric dtype"):
        open_transfer(tmp_path / "s.npz")


def test_npy_problems(tmp_path: Path, data: Data) -> None:
    with pytest.raises(InputError, match=r"label_column 'y': an .npy file holds one array \(inputs only\)"):
        open_transfer(data.npy, label_column="y")
    np.save(tmp_path / "v.npy", data.x[:, 0])
    with pytest.raises(InputError, match=r"array of shape \(100,\); expected \(rows, features...\)"):
        open_transfer(tmp_path / "v.npy")
    np.save(tmp_path / "o.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="cannot read it as npy"):
        open_transfer(tmp_path / "o.npy")
    np.save(tmp_path / "c.npy", np.zeros((3, 2), np.complex64))
    with pytest.raises(InputError, match="array has dtype complex64, expected a numeric dtype"):
        open_transfer(tmp_path / "c.npy")


def test_hdf5_problems(tmp_path: Path, data: Data) -> None:
    with h5py.File(tmp_path / "h.h5", "w") as f:
        f.create_dataset("features", data=data.x)
        f.create_dataset("y", data=data.y.reshape(50, 2))
    with pytest.raises(InputError, match=r"label_column 'y' .*: dtype int64 shape \(50, 2\), expected 1-D integers"):
        open_transfer(tmp_path / "h.h5")
    ts = open_transfer(tmp_path / "h.h5", label_column="none")
    assert ts.input_columns == ["features"] and not ts.has_labels
    ts.close()
