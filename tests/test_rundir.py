"""The run directory on its own: resume checks, metrics truncation, the done marker written last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdstore.errors import ConfigError
from kdstore.rundir import RunDir, RunResult, run_id


def result(rid: str) -> RunResult:
    return RunResult(rid, "kd", 4.0, 0.9, 2, 0.5, 5, 1.2, 0.9, 1.0, [0.5, 0.5], {"parameters": 3})


def test_run_id() -> None:
    assert run_id("kd", 4.0, 0.9) == "kd-T4-a0.9"
    assert run_id("topk", 2.5, 1.0) == "topk-T2.5-a1"
    assert run_id("hard", 4.0, 0.9) == run_id("hard", 1.0, 0.0) == "hard"


def test_prepare_resume_and_refusals(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.prepare({"config": {"lr": 0.1, "epochs": 2}, "device": "cpu"}, resume=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"] == {"lr": 0.1, "epochs": 2}
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        rd.prepare({"config": {"lr": 0.1, "epochs": 2}}, resume=False)
    rd.prepare({"config": {"lr": 0.1, "epochs": 2}}, resume=True)  # same options: fine
    with pytest.raises(ConfigError, match=r"started with other settings \(epochs, lr\); rerun with the same"):
        rd.prepare({"config": {"lr": 0.2, "epochs": 3}}, resume=True)


def test_prepare_unwritable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"--out .*file/run: cannot create it"):
        RunDir(tmp_path / "file" / "run").prepare({"config": {}}, resume=False)


def test_truncate_metrics_drops_only_that_runs_lines_past_the_checkpoint(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.truncate_metrics("kd-T4-a0.9", 1)  # no metrics yet: nothing to do
    for run, epoch in [("hard", 1), ("hard", 2), ("kd-T4-a0.9", 1), ("kd-T4-a0.9", 2), ("kd-T4-a0.9", 3)]:
        rd.append_metrics({"run": run, "epoch": epoch})
    rd.truncate_metrics("kd-T4-a0.9", 1)
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(ln["run"], ln["epoch"]) for ln in lines] == [("hard", 1), ("hard", 2), ("kd-T4-a0.9", 1)]
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_then_finish(tmp_path: Path) -> None:
    rd, rid = RunDir(tmp_path), "kd-T4-a0.9"
    rd.start(rid)
    assert rd.result(rid) is None and rd.load_checkpoint(rid, torch.device("cpu")) is None
    w = {"layer.weight": torch.arange(6.0).reshape(2, 3)}
    rd.save_checkpoint(rid, {"model": w, "epoch": 0, "epoch_seconds": [0.5]})
    state = rd.load_checkpoint(rid, torch.device("cpu"))
    assert state is not None and state["epoch"] == 0 and torch.equal(state["model"]["layer.weight"], w["layer.weight"])
    assert rd.result(rid) is None  # a checkpoint is not a finished point
    rd.finish(rid, w, {"student": "mlp:3-2"}, result(rid))
    assert rd.result(rid) == result(rid)
    assert not (rd.point(rid) / "checkpoint.pt").exists()
    assert torch.equal(load_file(str(rd.point(rid) / "student.safetensors"))["layer.weight"], w["layer.weight"])
    assert json.loads((rd.point(rid) / "student.json").read_text()) == {"student": "mlp:3-2"}
