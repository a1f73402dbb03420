"""Slow: `benchmarks/hinton_mnist.py --quick` on real MNIST runs end to end and prints its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"


@pytest.mark.slow
def test_hinton_quick(tmp_path: Path) -> None:
    if not all((DATA / f).exists() for f in ("mnist_train.parquet", "mnist_train_no3.parquet", "mnist_test.parquet")):
        pytest.skip("no MNIST Parquet files; run `python benchmarks/prepare_mnist.py` first")
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hinton_mnist.py"), "--quick", "--threads", "2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== Hinton et al. 2015, MNIST" in proc.stdout
    for row in ("teacher 1200-1200", "800-800 hard", "800-800 kd-T20-a0.9", "800-800 mse", "300-300 kd-T20-a0.9",
                "30-30 kd-T3-a0.9", "omitted 3s", "3-bias +3.5"):
        assert row in proc.stdout, row
    res = json.loads((out / "hinton_results.json").read_text())
    assert res["train_rows"] == 10_000 and res["test_rows"] == 10_000
    assert {r["run"] for r in res["runs"]} >= {"hard", "mse", "kd-T1-a0.9", "kd-T20-a0.9", "kd-T20-a1", "topk-T20-a0.9"}
    assert all(0 <= r["eval_errors"] <= 10_000 for r in res["runs"])
    assert res["teacher"]["test_errors"] < 2000  # a few epochs on 10k rows: far better than chance (9000)
    assert res["no3"]["paper_bias"]["bias"] == 3.5
    assert (out / "hinton_errors_vs_T.png").stat().st_size > 0
