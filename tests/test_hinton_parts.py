"""Fast checks of the pieces of `benchmarks/hinton_mnist.py` that the slow end-to-end test does not pin down."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks._hinton_data import jitter, jittered_copies
from benchmarks._hinton_report import report

ROOT = Path(__file__).resolve().parents[1]


def test_the_script_imports_its_parts() -> None:
    """The script, loaded as a file (as `python benchmarks/hinton_mnist.py` does), finds its parts."""
    spec = importlib.util.spec_from_file_location("hinton_mnist", ROOT / "benchmarks" / "hinton_mnist.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_args(["--quick"]).student_epochs == 5


def tiny_mnist(path: Path, rows: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Random 28x28 'digits' with ink only inside a 4-pixel margin (as MNIST's), written like prepare_mnist."""
    rng = np.random.default_rng(0)
    x = np.zeros((rows, 28, 28), np.float32)
    x[:, 4:24, 4:24] = rng.random((rows, 20, 20), dtype=np.float32)
    y = rng.integers(0, 10, rows)
    flat = pa.array(x.reshape(-1), pa.float32())
    pq.write_table(pa.table({"image": pa.FixedSizeListArray.from_arrays(flat, 784), "label": pa.array(y)}), path)
    return x, y


def test_jitter_shifts_each_image_by_its_offset() -> None:
    x = torch.zeros(2, 784)
    x[0, 14 * 28 + 14] = 1.0  # one lit pixel at (14, 14)
    x[1, 5 * 28 + 20] = 1.0  # and at (5, 20)
    d = torch.tensor([[0, 4], [2, 1]])  # (dy, dx) = d - 2: image 0 by (-2, 0), image 1 by (+2, -1)
    out = jitter(x, 2, d).view(2, 28, 28)
    assert out[0].nonzero().tolist() == [[16, 14]]  # output (r, c) reads input (r + dy, c + dx)
    assert out[1].nonzero().tolist() == [[3, 21]]
    assert torch.equal(jitter(x, 0, d), x)


def test_jittered_copies_keeps_rows_labels_and_ink(tmp_path: Path) -> None:
    x, y = tiny_mnist(tmp_path / "train.parquet")
    dst = jittered_copies(tmp_path / "train.parquet", tmp_path / "aug.parquet", copies=3, pixels=2, seed=1)
    t = pq.read_table(dst)
    assert t.num_rows == 4 * len(x)
    got = np.asarray(t.column("image").combine_chunks().flatten()).reshape(-1, 28, 28)
    assert np.array_equal(t.column("label").to_numpy(), np.tile(y, 4))
    assert np.array_equal(got[: len(x)], x)  # the originals first, unchanged
    # a shift of <= 2 pixels moves the ink inside the margin: nothing is lost, and the copies differ
    np.testing.assert_allclose(got.sum(axis=(1, 2)), np.tile(x.sum(axis=(1, 2)), 4), rtol=1e-5)
    assert not np.array_equal(got[len(x) :], np.tile(x, (3, 1, 1)))
    again = jittered_copies(tmp_path / "train.parquet", tmp_path / "aug2.parquet", copies=3, pixels=2, seed=1)
    assert pq.read_table(again).equals(t)  # seeded: the same set on every run


def _run(name: str, loss: str, errors: int, student: str = "mlp:784-800-800-10") -> dict:
    return {"name": name, "run": "hard" if loss == "hard" else "kd-T20-a0.9", "loss": loss, "student": student,
            "eval_errors": errors, "eval_accuracy": 1 - errors / 10_000, "alpha": 0.0 if loss == "hard" else 0.9,
            "temperature": 1.0 if loss == "hard" else 20.0, "top_k": None, "epochs": 8}


def test_report_measures_gaps_against_the_plain_baseline() -> None:
    res = {"teacher": {"test_errors": 72}, "test_rows": 10_000, "train_rows": 60_000, "aug_copies": 4,
           "runs": [_run("800-hard", "hard", 136), _run("800-kd-a0.9", "kd", 100),
                    _run("aug-800-hard", "hard", 84), _run("aug-800-kd", "kd", 75)]}
    table = report(res)
    assert "800-800 kd-T20-a0.9                          74     100     99.00      56.2%" in table
    assert "95.3% / 75.0%" in table  # vs the plain hard student (136), vs hard labels on the jittered set (84)
    assert res["runs"][1]["gap_closed"] == pytest.approx((136 - 100) / (136 - 72))
