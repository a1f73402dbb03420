"""Sweep points trained together (kdstore.grouped): each point as if trained alone, resume across group sizes,
the group size's limits, evaluation and checkpoint cadence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kdstore.errors import ConfigError
from kdstore.grouped import StudentGroup, point_optimizer_state, stack_optimizer_states
from kdstore.students import build_model
from kdstore.training import TrainConfig, Trainer
from tests.conftest import Data
from tests.helpers import (
    FIX,
    assert_clean_error,
    assert_runs_match,
    cli,
    max_diff,
    metrics_lines,
    run_label,
    run_weights,
)

STUDENT = "mlp:8-16-5"
SWEEP = ["--loss", "hard,kd", "-T", "1,4", "--alpha", "0.5", "--seed", "0,1"]  # 6 points, 2 batch orders
RUNS = ["hard-s0", "hard-s1", "kd-T1-a0.5-s0", "kd-T1-a0.5-s1", "kd-T4-a0.5-s0", "kd-T4-a0.5-s1"]

# Why this tolerance. A grouped point computes the same sums as the point alone, but the batched matmuls may add
# the products in another order: float32 rounding, ~1e-7 relative per operation, on weights of order 0.1-1. Adam
# turns each gradient into a step of about lr = 1e-3 per weight whatever its scale, so rounding in a gradient moves
# a weight by far less than a step; after 12 steps of this small problem the grouped weights differ from the
# separate ones by <= 3e-8 (measured, memory and stream). 1e-6 leaves 30x for other BLAS libraries and stays 1000x
# below what the test must catch: one step taken with another point's batch, targets or loss moves weights by
# ~1e-3 (a check below confirms that the points of the sweep differ from each other by far more than this).
WEIGHT_ATOL = 1e-6
LOSS_RTOL = 1e-5  # the per-epoch mean loss: a sum of ~100 rounded terms of order 1


@pytest.fixture(scope="module")
def store(data: Data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_label(data.teacher_pt, data.parquet, tmp_path_factory.mktemp("grouped") / "store", "pq",
                     top_k=3).path.parent  # type: ignore[no-any-return]


def train(targets: Path | str, out: Path, *extra: Any, epochs: int = 3, student: str = STUDENT) -> Any:
    r = cli(["train", "--targets", targets, "--student", student, "--epochs", epochs, "--batch-size", 25,
             "--device", "cpu", "--quiet", "--out", out, *extra])
    return r


def ok(result: Any) -> Any:
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())  # type: ignore[no-any-return]


def assert_same_runs(grouped: Path, alone: Path) -> None:
    """Every point of `grouped` equals the point of `alone` up to the tolerances above."""
    assert_runs_match(grouped, alone, RUNS, WEIGHT_ATOL, LOSS_RTOL)
    for g, a in zip(summary(grouped)["runs"], summary(alone)["runs"], strict=True):
        assert g["run"] == a["run"]
        assert g["eval_nll"] == pytest.approx(a["eval_nll"], rel=LOSS_RTOL)
        # argmax decisions: a flip would need a logit margin below ~1e-6 on one of 100 rows
        assert (g["eval_errors"], g["teacher_agreement"]) == (a["eval_errors"], a["teacher_agreement"])


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_grouped_sweep_trains_each_point_as_if_alone(data: Data, store: Path, tmp_path: Path, mode: str) -> None:
    grouped, alone = tmp_path / "grouped", tmp_path / "alone"
    ok(train(store, grouped, *SWEEP, "--data", mode, "--eval", data.parquet))
    ok(train(store, alone, *SWEEP, "--data", mode, "--eval", data.parquet, "--group-size", "1"))
    assert json.loads((grouped / "config.json").read_text())["grouping"]["group_size"] == 6
    assert json.loads((alone / "config.json").read_text())["grouping"]["group_size"] == 1
    assert [r["run"] for r in summary(grouped)["runs"]] == RUNS
    assert_same_runs(grouped, alone)
    # the tolerance separates points: any two points of the sweep differ by far more than it
    w = {run: run_weights(alone, run) for run in RUNS}
    assert min(max_diff(w[a], w[b]) for a in RUNS for b in RUNS if a < b) > 100 * WEIGHT_ATOL


def test_groups_smaller_than_the_sweep(data: Data, store: Path, tmp_path: Path) -> None:
    grouped, alone = tmp_path / "grouped", tmp_path / "alone"
    ok(train(store, grouped, *SWEEP, "--eval", data.parquet, "--group-size", "4"))  # a group of 4, then one of 2
    ok(train(store, alone, *SWEEP, "--eval", data.parquet, "--group-size", "1"))
    assert_same_runs(grouped, alone)


def test_an_interrupted_group_resumes_in_any_group_size(data: Data, store: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    clean, out, mixed = tmp_path / "clean", tmp_path / "run", tmp_path / "mixed"
    ok(train(store, clean, *SWEEP, "--eval", data.parquet))
    real = Trainer.loss
    calls: list[int] = []

    def flaky(self: Trainer, *a: Any, **kw: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 6 * (4 + 4 + 2):  # 6 points, 4 steps an epoch: in the middle of epoch 3
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    for run_dir in (out, mixed):
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(Trainer, "loss", flaky)
            assert_clean_error(train(store, run_dir, *SWEEP, "--eval", data.parquet), r"interrupted")
        assert {e for _, e in metrics_lines(run_dir)} == {1, 2}
        assert all((run_dir / "runs" / run / "checkpoint.pt").is_file() for run in RUNS)
    ok(train(store, out, *SWEEP, "--eval", data.parquet, "--resume"))
    for run in RUNS:  # resumed grouped: the same operations as the clean run, so the same bits
        assert max_diff(run_weights(out, run), run_weights(clean, run)) == 0.0, run
    got = metrics_lines(out)
    assert got == {k: {**v, "seconds": got[k]["seconds"]} for k, v in metrics_lines(clean).items()}
    # the checkpoints are per point, as an ungrouped run writes them: they resume one point at a time too
    ok(train(store, mixed, *SWEEP, "--eval", data.parquet, "--resume", "--group-size", "1"))
    assert_same_runs(mixed, clean)
    assert not list(mixed.rglob("checkpoint.pt"))


def test_optimizer_state_round_trips_through_a_group() -> None:
    models = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        models.append(build_model(STUDENT))
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in models]
    for m, o in zip(models, opts, strict=True):
        m(torch.randn(4, 8)).sum().backward()
        o.step()
    group = StudentGroup(models)
    stacked = torch.optim.Adam(group.parameters(), lr=1e-2)
    stacked.load_state_dict(stack_optimizer_states([o.state_dict() for o in opts]))
    for i, o in enumerate(opts):
        mine, back = o.state_dict(), point_optimizer_state(stacked.state_dict(), i, 4)
        assert mine["param_groups"] == back["param_groups"]
        for idx, entry in mine["state"].items():
            assert entry.keys() == back["state"][idx].keys()
            assert all(torch.equal(entry[k], back["state"][idx][k]) for k in entry)
        assert all(torch.equal(v, models[i].state_dict()[k]) for k, v in group.state(i).items())


def test_students_that_cannot_be_stacked_train_one_by_one(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "bn"
    ok(train(store, out, "-T", "1,4", student=f"{FIX}:bn_student", epochs=1))
    grouping = json.loads((out / "config.json").read_text())["grouping"]
    assert grouping["group_size"] == 1 and "buffers" in grouping["why"]
    assert_clean_error(train(store, tmp_path / "bn2", "-T", "1,4", "--group-size", "2",
                             student=f"{FIX}:bn_student", epochs=1),
                       r"^Error: --group-size 2: tests.fixtures_models:bn_student cannot train as a group: the "
                       r"student has buffers .*; use --group-size 1$")


@pytest.mark.parametrize(("extra", "match"), [
    (["--group-size", "0"], r"--group-size 0: must be >= 1 \(1 trains the points one at a time\) or auto"),
    (["--eval-every", "0"], r"--eval-every 0: must be >= 1"),
    (["--checkpoint-every", "0"], r"--checkpoint-every 0: must be >= 1"),
])
def test_bad_group_size_and_cadence(store: Path, tmp_path: Path, extra: list[str], match: str) -> None:
    assert_clean_error(train(store, tmp_path / "run", *extra), match)


def test_group_size_must_be_a_number_or_auto(store: Path, tmp_path: Path) -> None:
    r = train(store, tmp_path / "run", "--group-size", "many")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "Error: Invalid value for '--group-size': 'many': expected a whole number of points or auto" in r.output


def test_eval_and_checkpoint_cadence(data: Data, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdstore.rundir import RunDir

    saved: list[tuple[str, int]] = []
    real = RunDir.save_checkpoint

    def spy(self: RunDir, rid: str, state: dict[str, Any]) -> None:
        saved.append((rid, state["epoch"] + 1))
        real(self, rid, state)

    monkeypatch.setattr(RunDir, "save_checkpoint", spy)
    out = tmp_path / "run"
    ok(train(store, out, "-T", "1,4", "--eval", data.parquet, "--eval-every", "2",
             "--checkpoint-every", "3", epochs=5))
    m = metrics_lines(out)
    assert sorted(e for (_, e), line in m.items() if "eval_accuracy" in line) == [2, 2, 4, 4, 5, 5]
    assert sorted(e for _, e in saved) == [3, 3, 5, 5]
    assert len(m) == 10 and all(line["train_loss"] > 0 for line in m.values())


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_grouped_points_replay_stored_views_as_alone(tmp_path: Path, mode: str) -> None:
    from kdstore.training import TrainConfig
    from tests.test_augment import _image_transfer
    from tests.test_views_train import _label

    path = _label(_image_transfer(tmp_path), tmp_path / "s")  # 60 samples x 3 stored views
    results = {}
    for size in (None, 1):
        out = tmp_path / f"run-{size}"
        cfg = TrainConfig(targets=str(path), student="mlp:64-32-64", out=str(out), losses=("hard", "kd"),
                          temperatures=(1.0, 4.0), alphas=(1.0,), epochs=2, batch_size=16, device="cpu",
                          data_mode=mode, val_fraction=0.2, seeds=(0, 1), group_size=size)
        trainer = Trainer(cfg)
        assert trainer.group_size == (6 if size is None else 1)
        results[size] = {r.run: r for r in trainer.run()}
    assert list(results[None]) == list(results[1])
    for run, r in results[None].items():
        assert max_diff(run_weights(tmp_path / "run-None", run), run_weights(tmp_path / "run-1", run)) < WEIGHT_ATOL
        assert (r.val_errors, r.teacher_agreement) == (results[1][run].val_errors, results[1][run].teacher_agreement)


@pytest.mark.parametrize(("mode", "student"), [("memory", STUDENT), ("stream", STUDENT),
                                              ("memory", f"{FIX}:exact_teacher_b")])
def test_agreement_counted_in_the_last_epoch(store: Path, tmp_path: Path, mode: str, student: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """--agreement last-epoch counts the teacher agreement on the last epoch's training batches, grouped or alone.
    At lr 1e-12 no weight moves (Adam's steps are below float32 resolution), so the count must equal the exact
    pass of --agreement final over every transfer row, for students that agree with the teacher on a third (the
    MLP) and on a sixth (exact_teacher_b) of the rows: a count over some of the rows, or of another point's outputs,
    would not."""
    counted: list[int] = []
    real = Trainer.counts_agreement

    def spy(self: Trainer, epoch: int) -> bool:
        if real(self, epoch):
            counted.append(epoch)
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "counts_agreement", spy)
    runs = {}
    for name, extra in {"last": [], "alone": ["--group-size", "1"], "final": ["--agreement", "final"]}.items():
        counted.clear()
        ok(train(store, tmp_path / name, *SWEEP, "--lr", "1e-12", "--data", mode, *extra, epochs=2,
                 student=student))
        assert counted == ([] if name == "final" else [1] * (1 if name == "last" else 6))  # epoch 2 only
        runs[name] = summary(tmp_path / name)["runs"]
    assert json.loads((tmp_path / "last" / "config.json").read_text())["grouping"]["group_size"] == 6
    for last, alone, final in zip(runs["last"], runs["alone"], runs["final"], strict=True):
        assert last["teacher_agreement"] == alone["teacher_agreement"] == final["teacher_agreement"], last["run"]
        assert last["extra"]["teacher_agreement_over"] == "the last epoch's batches, as trained"
        assert final["extra"]["teacher_agreement_over"] == "the transfer set, final weights"
    assert runs["last"][0]["teacher_agreement"] == {STUDENT: 0.33, f"{FIX}:exact_teacher_b": 0.16}[student]


def test_bad_agreement(store: Path, tmp_path: Path) -> None:
    r = train(store, tmp_path / "run", "--agreement", "sometimes")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "Invalid value for '--agreement': 'sometimes' is not one of 'last-epoch', 'final'" in r.output
    with pytest.raises(ConfigError, match=r"^agreement 'sometimes': expected one of last-epoch, final$"):
        TrainConfig(targets=str(store), student=STUDENT, out=str(tmp_path / "x"), agreement="sometimes")
