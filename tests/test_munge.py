"""MUNGE synthetic transfer sets: algorithm, validation, file round trip and CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from kdstore.cli.munge import munge_command
from kdstore.errors import ConfigError, InputError
from kdstore.munge import (
    MungeConfig,
    munge,
    nearest_neighbours,
    read_generator_metadata,
    read_table,
    sha256_file,
    write_synthetic,
)


def _table(n: int = 40, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "x": pa.array(rng.normal(size=n), type=pa.float64()),
        "f32": pa.array(rng.normal(10, 3, size=n).astype(np.float32)),
        "age": pa.array(rng.integers(18, 90, size=n), type=pa.int32()),
        "color": pa.array(rng.choice(["red", "green", "blue"], size=n)),
        "shape": pa.array(rng.choice(["sq", "tri"], size=n)).dictionary_encode(),
        "flag": pa.array(rng.random(n) < 0.5),
        "y": pa.array(rng.integers(0, 3, size=n), type=pa.int64()),
    })


def test_row_count_and_schema() -> None:
    t = _table()
    out = munge(t, MungeConfig(multiplier=3, label_column="y"))
    assert out.num_rows == 3 * t.num_rows
    assert out.column_names == ["x", "f32", "age", "color", "shape", "flag"]
    for name in out.column_names:
        assert out.schema.field(name).type == t.schema.field(name).type


def test_label_and_excluded_columns_dropped() -> None:
    out = munge(_table(), MungeConfig(label_column="y", exclude_columns=("f32",)))
    assert "y" not in out.column_names and "f32" not in out.column_names


def test_categoricals_stay_in_vocabulary() -> None:
    t = _table()
    out = munge(t, MungeConfig(multiplier=4, p=0.9, label_column="y"))
    for name in ("color", "shape", "flag"):
        assert set(out.column(name).to_pylist()) <= set(t.column(name).to_pylist())


def test_p_zero_copies_originals_every_round() -> None:
    t = _table().drop_columns(["y"])
    out = munge(t, MungeConfig(multiplier=3, p=0.0))
    n = t.num_rows
    for r in range(3):
        assert out.slice(r * n, n).equals(t.combine_chunks())


def test_large_s_keeps_values_at_original_or_neighbour() -> None:
    t = _table().drop_columns(["y"])
    cfg = MungeConfig(multiplier=2, p=0.5, s=1e6)
    out = munge(t, cfg)
    nn = nearest_neighbours(t, cfg)
    x = t.column("x").to_numpy()
    syn = out.column("x").to_numpy().reshape(2, -1)
    scale = np.abs(x - x[nn]).max()
    near_self = np.abs(syn - x) <= 1e-4 * scale
    near_nb = np.abs(syn - x[nn]) <= 1e-4 * scale
    assert (near_self | near_nb).all()
    assert near_nb.sum() > 0 and (syn != x).any()  # some swaps happened
    ages = out.column("age").to_numpy().reshape(2, -1)
    age = t.column("age").to_numpy()
    assert ((ages == age) | (ages == age[nn])).all()


def test_p_one_takes_neighbour_categoricals() -> None:
    t = _table().drop_columns(["y"])
    cfg = MungeConfig(p=1.0)
    out = munge(t, cfg)
    nn = nearest_neighbours(t, cfg)
    color = np.array(t.column("color").to_pylist())
    assert out.column("color").to_pylist() == color[nn].tolist()


def test_reproducible_with_seed() -> None:
    t = _table()
    a = munge(t, MungeConfig(multiplier=2, seed=7, label_column="y"))
    b = munge(t, MungeConfig(multiplier=2, seed=7, label_column="y"))
    c = munge(t, MungeConfig(multiplier=2, seed=8, label_column="y"))
    assert a.equals(b)
    assert not a.equals(c)


def test_nearest_neighbours_continuous_by_hand() -> None:
    # Row 0 = (0, 0). Raw Euclidean puts row 2 (0, 1) nearest (1 < 5), but 'a' spreads over hundreds
    # (sd ~316) and 'b' over {0, 1} (sd ~0.49), so standardised row 1 (5, 0) is nearest (0.016 < 2.04).
    t = pa.table({"a": [0.0, 5.0, 0.0, 500.0, -500.0], "b": [0.0, 0.0, 1.0, 0.0, 1.0]})
    nn = nearest_neighbours(t)
    assert nn.dtype == np.int64
    assert nn[0] == 1
    assert nn.tolist() == [1, 0, 4, 1, 2]  # row 2: (500/316)^2 = 2.5 to row 4 beats 4.17 to row 0


def test_nearest_neighbours_categorical_mismatch_distance() -> None:
    # Row 0 is continuous-closest to row 1 (distance ~0.06 standardised) but differs in 2 categoricals
    # (+2), while row 2 is further continuous-wise (~1.7 squared) but matches both categoricals.
    t = pa.table({
        "x": [0.0, 0.05, 1.0, 3.0],
        "c": ["a", "b", "a", "b"],
        "d": [True, False, True, False],
    })
    xs = (np.array([0.0, 0.05, 1.0, 3.0]) - 1.0125) / np.std([0.0, 0.05, 1.0, 3.0])
    d01 = (xs[0] - xs[1]) ** 2 + 2
    d02 = (xs[0] - xs[2]) ** 2
    assert d02 < d01  # hand check of the premise
    nn = nearest_neighbours(t)
    assert nn[0] == 2
    # Without the categoricals, row 1 wins.
    assert nearest_neighbours(t, MungeConfig(exclude_columns=("c", "d")))[0] == 1


def test_nearest_neighbours_all_categorical_and_ties() -> None:
    t = pa.table({"c": ["a", "a", "b", "a"]})
    # Ties go to the lowest index other than the row itself.
    assert nearest_neighbours(t).tolist() == [1, 0, 0, 0]


def test_nearest_never_self_with_duplicates() -> None:
    t = pa.table({"x": [1.0, 1.0, 2.0, 2.0, 3.0]})
    nn = nearest_neighbours(t)
    assert (nn != np.arange(5)).all()
    assert nn.tolist()[:4] == [1, 0, 3, 2]


@pytest.mark.parametrize("block", [1, 3, 7, 16])
def test_blockwise_equals_single_block(block: int) -> None:
    t = _table(n=50, seed=3)
    single = nearest_neighbours(t, MungeConfig(block_size=10_000, label_column="y"))
    assert (nearest_neighbours(t, MungeConfig(block_size=block, label_column="y")) == single).all()
    a = munge(t, MungeConfig(block_size=block, label_column="y", multiplier=2))
    b = munge(t, MungeConfig(block_size=10_000, label_column="y", multiplier=2))
    assert a.equals(b)


def test_nearest_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 3))
    c = rng.integers(0, 3, size=60)
    t = pa.table({"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2], "c": pa.array([str(v) for v in c])})
    z = (x - x.mean(0)) / x.std(0)
    d = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1) + (c[:, None] != c[None, :])
    np.fill_diagonal(d, np.inf)
    assert (nearest_neighbours(t, MungeConfig(block_size=8)) == d.argmin(1)).all()


def test_integer_columns_clip_to_range() -> None:
    t = pa.table({"u": pa.array([0, 255, 0, 255, 128], type=pa.uint8()), "x": [0.0, 1.0, 2.0, 3.0, 4.0]})
    out = munge(t, MungeConfig(multiplier=20, p=1.0, s=0.1, seed=1))
    assert out.schema.field("u").type == pa.uint8()


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"multiplier": 0}, r"--multiplier must be an integer >= 1"),
        ({"p": 1.5}, r"p must be in \[0, 1\], got 1.5"),
        ({"p": -0.1}, r"p must be in \[0, 1\]"),
        ({"s": 0.0}, r"s must be a finite number > 0"),
        ({"s": float("inf")}, r"s must be a finite number > 0"),
        ({"seed": -1}, r"--seed must be an integer >= 0"),
        ({"block_size": 0}, r"--block-size must be an integer >= 1"),
    ],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MungeConfig(**kwargs)


def test_unknown_columns() -> None:
    with pytest.raises(ConfigError, match=r"label_column 'nope' is not a column"):
        munge(_table(), MungeConfig(label_column="nope"))
    with pytest.raises(ConfigError, match=r"exclude_columns 'nope' is not a column"):
        munge(_table(), MungeConfig(exclude_columns=("nope",)))
    with pytest.raises(ConfigError, match=r"no attribute columns"):
        munge(pa.table({"y": [1, 2]}), MungeConfig(label_column="y"))


def test_data_errors() -> None:
    with pytest.raises(InputError, match=r"needs at least 2 rows"):
        munge(pa.table({"x": [1.0]}))
    with pytest.raises(InputError, match=r"empty"):
        munge(pa.table({"x": pa.array([], type=pa.float64())}))
    with pytest.raises(InputError, match=r"column 'l' has type list<.*supported types are numeric"):
        munge(pa.table({"x": [1.0, 2.0], "l": [[1], [2]]}))
    with pytest.raises(InputError, match=r"column 'ts' has type timestamp"):
        munge(pa.table({"x": [1.0, 2.0], "ts": pa.array([1, 2], type=pa.timestamp("s"))}))
    with pytest.raises(InputError, match=r"column 'b' has type binary"):
        munge(pa.table({"x": [1.0, 2.0], "b": [b"a", b"b"]}))
    with pytest.raises(InputError, match=r"column 'k' is constant.*exclude_columns k"):
        munge(pa.table({"x": [1.0, 2.0, 3.0], "k": [5, 5, 5]}))
    with pytest.raises(InputError, match=r"column 'x' has 1 missing values \(nulls\).*drop"):
        munge(pa.table({"x": [1.0, None, 3.0]}))
    with pytest.raises(InputError, match=r"column 'c' has 1 missing values"):
        munge(pa.table({"x": [1.0, 2.0, 3.0], "c": ["a", None, "b"]}))
    with pytest.raises(InputError, match=r"column 'x' has 1 NaN"):
        munge(pa.table({"x": [1.0, float("nan"), 3.0]}))


def test_excluding_bad_columns_makes_it_work() -> None:
    t = pa.table({"x": [1.0, 2.0, 3.0], "k": [5, 5, 5], "l": [[1], [2], [3]]})
    assert munge(t, MungeConfig(exclude_columns=("k", "l"))).column_names == ["x"]


# ---------------------------------------------------------------------------------------------- files
def test_read_table_parquet_and_csv(tmp_path) -> None:
    t = _table(n=5)
    pq.write_table(t, tmp_path / "t.parquet")
    assert read_table(tmp_path / "t.parquet").equals(t)
    (tmp_path / "t.csv").write_text("x,c\n1.5, red\n2.5,blue \n")
    got = read_table(tmp_path / "t.csv")
    assert got.column("c").to_pylist() == ["red", "blue"]
    assert got.column("x").to_pylist() == [1.5, 2.5]


def test_read_table_errors(tmp_path) -> None:
    with pytest.raises(InputError, match=r"missing\.parquet: no such file.*\.parquet, \.csv"):
        read_table(tmp_path / "missing.parquet")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(InputError, match=r"t\.json: unsupported file extension '\.json'; supported: \.parquet, \.csv"):
        read_table(tmp_path / "t.json")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"bad\.parquet: cannot read as parquet"):
        read_table(tmp_path / "bad.parquet")


def test_write_and_read_generator_metadata(tmp_path) -> None:
    src = tmp_path / "real.parquet"
    t = _table(n=10)
    pq.write_table(t, src)
    cfg = MungeConfig(multiplier=2, p=0.3, s=2.0, seed=4, label_column="y")
    syn = munge(t, cfg)
    out = tmp_path / "sub" / "synth.parquet"
    digest = sha256_file(src)
    write_synthetic(syn, out, parent_path=src, parent_sha256=digest, config=cfg)
    assert pq.read_table(out).equals(syn)
    assert [p.name for p in out.parent.iterdir()] == ["synth.parquet"]  # no temp file left behind
    meta = read_generator_metadata(out)
    assert meta == {
        "generator": "munge",
        "settings": {"multiplier": 2, "p": 0.3, "s": 2.0, "seed": 4},
        "parent": {"path": str(src), "sha256": digest},
        "rows": 20,
    }
    assert len(digest) == 64
    assert read_generator_metadata(src) is None
    other = tmp_path / "other.parquet"
    pq.write_table(t.replace_schema_metadata({b"kdstore": json.dumps({"source": "x"}).encode()}), other)
    assert read_generator_metadata(other) is None
    with pytest.raises(InputError, match=r"no such file"):
        read_generator_metadata(tmp_path / "nope.parquet")
    with pytest.raises(ConfigError, match=r"\.parquet file"):
        write_synthetic(syn, tmp_path / "x.csv", parent_path=src, parent_sha256=digest, config=cfg)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_munge(tmp_path) -> None:
    src = tmp_path / "real.parquet"
    pq.write_table(_table(n=12), src)
    out = tmp_path / "synth.parquet"
    result = CliRunner().invoke(munge_command, [
        "--input", str(src), "--out", str(out), "--multiplier", "3", "--label-column", "y", "--seed", "2",
    ])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"munge: 12 rows in -> 36 synthetic rows out -> {out}"
    assert pq.read_table(out).num_rows == 36
    assert read_generator_metadata(out)["settings"]["seed"] == 2


def test_cli_bad_p(tmp_path) -> None:
    src = tmp_path / "real.parquet"
    pq.write_table(_table(n=12), src)
    result = CliRunner().invoke(munge_command,
                                ["--input", str(src), "--out", str(tmp_path / "o.parquet"), "--p", "1.5"])
    assert result.exit_code != 0
    assert result.output.strip() == "Error: --p must be in [0, 1], got 1.5"
    assert "Traceback" not in result.output


def test_cli_missing_input(tmp_path) -> None:
    result = CliRunner().invoke(munge_command,
                                ["--input", str(tmp_path / "x.csv"), "--out", str(tmp_path / "o.parquet")])
    assert result.exit_code == 1
    assert "no such file" in result.output and len(result.output.strip().splitlines()) == 1


def test_supported_types_and_chunked_input_with_p_zero() -> None:
    t = pa.table({
        "h": pa.array(np.array([1, 2, 3, 4], dtype=np.float16)),
        "ls": pa.array(["a", "b", "a", "c"], type=pa.large_string()),
        "di": pa.array([1, 2, 1, 2]).dictionary_encode(),
        "sv": pa.array(["p", "q", "q", "p"]).cast(pa.string_view()),
        "i8": pa.array([-128, 127, 0, 5], type=pa.int8()),
    })
    chunked = pa.concat_tables([t, t.slice(0, 2)])
    out = munge(chunked, MungeConfig(multiplier=2, p=0.0))
    assert out.schema == chunked.schema
    assert out.slice(0, 6).to_pydict() == chunked.to_pydict()
    mixed = munge(chunked, MungeConfig(multiplier=2, p=0.8, s=0.5))
    assert mixed.schema == chunked.schema
    assert set(mixed.column("sv").to_pylist()) <= {"p", "q"}
