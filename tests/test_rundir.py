"""The run directory on its own: resume checks, metrics truncation, the done marker written last."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdstore.errors import ConfigError
from kdstore.rundir import RunDir, RunResult, over_seeds, run_id


def result(rid: str) -> RunResult:
    return RunResult(rid, "kd", 4.0, 0.9, 2, 0.5, 5, 1.2, 0.9, 1.0, [0.5, 0.5], {"parameters": 3})


def test_run_id() -> None:
    assert run_id("kd", 4.0, 0.9) == "kd-T4-a0.9"
    assert run_id("topk", 2.5, 1.0) == "topk-T2.5-a1"
    assert run_id("hard", 4.0, 0.9) == run_id("hard", 1.0, 0.0) == "hard"
    assert run_id("kd", 20.0, 0.9, seed=2) == "kd-T20-a0.9-s2" and run_id("mse", 1.0, 1.0, seed=0) == "mse-s0"


def test_over_seeds_golden() -> None:
    rs = [RunResult(f"kd-T4-a0.9-s{s}", "kd", 4.0, 0.9, 2, acc, err, None, agree, 1.0, seed=s)
          for s, acc, err, agree in [(0, 0.90, 10, 0.95), (1, 0.88, 12, 0.93), (2, 0.92, 8, 0.97)]]
    rs.append(RunResult("kd-T8-a0.9-s0", "kd", 8.0, 0.9, 2, 0.5, 50, None, 0.6, 1.0, seed=0))
    g4, g8 = over_seeds(rs)
    assert g4["seeds"] == [0, 1, 2] and g4["temperature"] == 4.0 and g4["alpha"] == 0.9
    assert g4["eval_errors_mean"] == pytest.approx(10.0) and g4["eval_errors_sd"] == pytest.approx(2.0)
    assert g4["eval_accuracy_mean"] == pytest.approx(0.90) and g4["eval_accuracy_sd"] == pytest.approx(0.02)
    assert g4["teacher_agreement_sd"] == pytest.approx(0.02)
    assert "eval_nll_mean" not in g4  # not measured (no --eval NLL here): left out, not zero
    assert g8["seeds"] == [0] and g8["eval_errors_mean"] == 50 and g8["eval_errors_sd"] == 0.0


def test_result_json_of_an_older_run_reads_as_seed_0(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.start("kd")
    old = {k: v for k, v in result("kd").__dict__.items() if k != "seed"}
    (rd.point("kd") / "result.json").write_text(json.dumps(old))
    got = rd.result("kd")
    assert got is not None and got.seed == 0 and got.eval_errors == 5


def test_prepare_resume_and_refusals(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.prepare({"config": {"lr": 0.1, "epochs": 2}, "device": "cpu"}, resume=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"] == {"lr": 0.1, "epochs": 2}
    with pytest.raises(ConfigError, match="already holds a run; pass resume"):
        rd.prepare({"config": {"lr": 0.1, "epochs": 2}}, resume=False)
    rd.prepare({"config": {"lr": 0.1, "epochs": 2}}, resume=True)  # same options: fine
    with pytest.raises(ConfigError, match=r"started with other settings \(epochs, lr\); rerun with the same"):
        rd.prepare({"config": {"lr": 0.2, "epochs": 3}}, resume=True)


def test_prepare_unwritable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"out .*file/run: cannot create it"):
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
