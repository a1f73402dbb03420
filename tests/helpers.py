"""Shared helpers for the tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

REPO_ROOT = Path(__file__).resolve().parent.parent
FIX = "tests.fixtures_models"
SMALL = {"shard_rows": 40, "row_group_rows": 16, "batch_size": 16, "top_k": 3}
SMALL_ARGS = ["--shard-rows", "40", "--row-group-rows", "16", "--batch-size", "16", "--quiet", "--device", "cpu"]


def label_config(teacher: str | Path | list[str], transfer: str | Path, out: str | Path, name: str = "ds",
                 **kw: Any) -> Any:
    """A LabelConfig with the small test settings (3 shards of 40/40/20 rows, row groups of 16)."""
    from kdstore.labeling import LabelConfig

    teachers = tuple(map(str, teacher)) if isinstance(teacher, list) else (str(teacher),)
    opts = {**SMALL, "device": "cpu", **kw}
    return LabelConfig(teachers=teachers, transfer=str(transfer), out=str(out), name=name, **opts)


def run_label(*args: Any, progress: Any = None, **kw: Any) -> Any:
    from kdstore.labeling import label

    return label(label_config(*args, **kw), progress=progress)


def cli(args: list[str], **kw: Any) -> Result:
    """Invoke `kdstore ARGS` in-process."""
    from kdstore.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def assert_clean_error(result: Result, match: str) -> str:
    """A failed command: exit code != 0, exactly one output line starting 'Error:', matching `match`, no traceback."""
    import re

    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"crashed: {result.exception!r}\n{result.output}"
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
    return lines[0]


def data_bytes(version_dir: Path) -> dict[str, bytes]:
    """{file name: bytes} of every file under version_dir/data."""
    return {p.name: p.read_bytes() for p in sorted((Path(version_dir) / "data").iterdir())}


def all_bytes(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def versions_of(dataset_dir: Path) -> list[str]:
    """Names of the vN directories under a dataset directory."""
    d = Path(dataset_dir)
    return sorted(p.name for p in d.glob("v*")) if d.is_dir() else []


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a `kdstore` subprocess that can import tests.fixtures_models."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: see conftest.py
    env.update(extra)
    return env


def kdstore_command() -> list[str]:
    """argv prefix that runs the `kdstore` console script (or its entry point if the script is not on PATH)."""
    for script in (Path(sys.executable).parent / "kdstore", shutil.which("kdstore")):  # beside python: no pyenv shim
        if script and Path(script).is_file():
            return [str(script)]
    return [sys.executable, "-c", "import sys; from kdstore.cli import main; sys.exit(main())"]


# -- comparing two run directories (grouped sweeps against the same points trained alone) ------------------------------
def run_weights(out: Path, run: str) -> dict[str, Any]:
    """A finished point's saved student (RUN/runs/RUN_ID/student.safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(out / "runs" / run / "student.safetensors"))


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def metrics_lines(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """RUN/metrics.jsonl by (run id, epoch)."""
    import json

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {(x["run"], x["epoch"]): x for x in lines}


def assert_runs_match(a: Path, b: Path, runs: list[str], atol: float, rtol: float,
                      keys: tuple[str, ...] = ("train_loss",)) -> None:
    """Every point of run directory `a` has `b`'s weights (to `atol`) and metrics lines (`keys`, to `rtol`)."""
    import pytest

    for run in runs:
        assert max_diff(run_weights(a, run), run_weights(b, run)) < atol, run
    ma, mb = metrics_lines(a), metrics_lines(b)
    assert ma.keys() == mb.keys()
    for key, line in ma.items():
        for k in keys:
            assert line[k] == pytest.approx(mb[key][k], rel=rtol), (key, k)
