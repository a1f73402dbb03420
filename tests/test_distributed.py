"""Scale-out: sharded labeling (--shard I/N and torchrun) and DDP training (torchrun, gloo, 2 CPU processes)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import FIX, SMALL_ARGS, assert_clean_error, cli, data_bytes, run_label, subprocess_env

LABEL_ARGS = ["--top-k", "3", *SMALL_ARGS]


def _label(data, out: Path, *extra: str) -> object:  # type: ignore[no-untyped-def]
    return cli(["label", "--teacher", data.teacher_pt, "--transfer", data.parquet, "--out", out, "--name", "ds",
                *LABEL_ARGS, *extra])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "kdstore", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("n", [2, 3])
def test_shard_jobs_give_the_same_bytes_as_one_job(data, tmp_path: Path, n: int) -> None:
    assert _label(data, tmp_path / "one").exit_code == 0
    for i in range(n):
        r = _label(data, tmp_path / "many", "--shard", f"{i}/{n}")
        assert r.exit_code == 0, r.output
        if i < n - 1:
            assert "the job that completes the last file commits" in r.output
            assert not (tmp_path / "many" / "ds" / "v1").exists()  # nothing visible before the last shard
    assert "wrote" in r.output
    assert data_bytes(tmp_path / "many" / "ds" / "v1") == data_bytes(tmp_path / "one" / "ds" / "v1")
    m = json.loads((tmp_path / "many" / "ds" / "v1" / "manifest.json").read_text())
    assert m["labeling"]["world_size"] == n
    assert not list((tmp_path / "many" / "ds").glob(".staging*"))  # locks and staging gone after commit


def test_a_failed_job_is_redone_by_a_rerun_with_any_world_size(data, tmp_path: Path) -> None:
    """Job 0 of 3 finished, jobs 1 and 2 'died': a single-process rerun redoes only the missing files."""
    assert _label(data, tmp_path / "s", "--shard", "0/3").exit_code == 0
    r = _label(data, tmp_path / "s")
    assert r.exit_code == 0, r.output
    assert "resumed 1 shard(s)" in r.output
    assert _label(data, tmp_path / "ref").exit_code == 0
    assert data_bytes(tmp_path / "s" / "ds" / "v1") == data_bytes(tmp_path / "ref" / "ds" / "v1")


def test_same_shard_of_the_same_run_twice_at_once_is_refused(data, tmp_path: Path) -> None:
    import fcntl
    import hashlib  # noqa: F401  (documents that the lock name derives from the run key)

    assert _label(data, tmp_path / "s", "--shard", "0/2").exit_code == 0
    locks_dir = tmp_path / "s" / "ds"
    staging = next(p for p in locks_dir.glob(".staging-*") if p.is_dir())
    lock = locks_dir / f"{staging.name}.shard-1-of-2.lock"
    with open(lock, "w") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # another job holds shard 1 of 2
        r = _label(data, tmp_path / "s", "--shard", "1/2")
        assert_clean_error(r, "another kdstore process is writing")
    assert not (locks_dir / "v1").exists()
    assert _label(data, tmp_path / "s", "--shard", "1/2").exit_code == 0
    assert (locks_dir / "v1" / "manifest.json").exists()


def test_bad_shard_option(data, tmp_path: Path) -> None:
    for bad in ("3/3", "a/b", "1/0"):
        r = _label(data, tmp_path / "s", "--shard", bad)
        assert r.exit_code == 2 and "--shard" in r.output


def test_torchrun_labeling_is_byte_identical(data, tmp_path: Path) -> None:
    assert _label(data, tmp_path / "one").exit_code == 0
    p = _torchrun(2, ["label", "--teacher", data.teacher_pt, "--transfer", data.parquet, "--out", tmp_path / "tr",
                      "--name", "ds", *LABEL_ARGS], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert data_bytes(tmp_path / "tr" / "ds" / "v1") == data_bytes(tmp_path / "one" / "ds" / "v1")


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_ddp_training_matches_one_process(data, tmp_path: Path, mode: str) -> None:
    """2 gloo processes with the same global batch land in the 1-process accuracy band (in memory: the same run)."""
    assert _label(data, tmp_path / "s").exit_code == 0
    args = ["train", "--targets", tmp_path / "s" / "ds", "--student", "mlp:8-32-5",
            "-T", "2", "--epochs", "4", "--batch-size", "16", "--eval", data.parquet, "--device", "cpu",
            "--data", mode, "--quiet"]
    one = cli([*args, "--out", tmp_path / "one"])
    assert one.exit_code == 0, one.output
    p = _torchrun(2, [*args, "--out", tmp_path / "two"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("kd-T2-a0.9") == 1  # rank 0 alone prints the table
    r1 = json.loads((tmp_path / "one" / "summary.json").read_text())["runs"][0]
    r2 = json.loads((tmp_path / "two" / "summary.json").read_text())["runs"][0]
    assert r2["extra"]["world_size"] == 2
    if mode == "memory":
        assert r2["eval_accuracy"] == pytest.approx(r1["eval_accuracy"], abs=0.02)
    else:
        assert abs(r2["eval_accuracy"] - r1["eval_accuracy"]) <= 0.15
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # one line per epoch, written by rank 0 only


def test_ddp_resumes_a_checkpoint(data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted mid-epoch (checkpoint of epoch 1 on disk), then resumed by 2 torchrun processes."""
    from kdstore.training import Trainer

    assert _label(data, tmp_path / "s").exit_code == 0
    args = ["train", "--targets", tmp_path / "s" / "ds", "--student", "mlp:8-32-5", "-T", "2", "--epochs", "3",
            "--batch-size", "16", "--eval", data.parquet, "--device", "cpu", "--quiet", "--out", tmp_path / "run"]
    real, calls = Trainer.loss, []

    def flaky(self, *a, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 7 + 3:  # 7 steps per epoch (100 rows / 16): stop inside epoch 2
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(Trainer, "loss", flaky)
    assert cli(args).exit_code != 0
    monkeypatch.setattr(Trainer, "loss", real)
    assert (tmp_path / "run" / "runs" / "kd-T2-a0.9" / "checkpoint.pt").is_file()
    p = _torchrun(2, [*args, "--resume"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    result = json.loads((tmp_path / "run" / "runs" / "kd-T2-a0.9" / "result.json").read_text())
    assert result["extra"]["world_size"] == 2 and result["eval_accuracy"] is not None


def test_ddp_training_with_a_hint_matches_one_process(data, tmp_path: Path) -> None:
    """FitNets hints under DDP: the hint regressors live inside the DDP-wrapped module (their gradients are
    all-reduced), so 2 processes land where 1 does."""
    run_label(f"{FIX}:tiny_teacher@{data.weights}", data.parquet, tmp_path / "s", "feat", top_k=3, features=("0",),
              feature_rank=4)
    args = ["train", "--targets", tmp_path / "s" / "feat", "--student", "mlp:8-32-5", "--hint", "0:layers.0",
            "-T", "2", "--epochs", "4", "--batch-size", "16", "--eval", data.parquet, "--device", "cpu",
            "--data", "memory", "--quiet"]
    one = cli([*args, "--out", tmp_path / "one"])
    assert one.exit_code == 0, one.output
    p = _torchrun(2, [*args, "--out", tmp_path / "two"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    r1, r2 = (json.loads((tmp_path / d / "summary.json").read_text())["runs"][0] for d in ("one", "two"))
    assert r2["extra"]["world_size"] == 2
    assert r2["eval_accuracy"] == pytest.approx(r1["eval_accuracy"], abs=0.02)
