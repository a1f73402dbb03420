"""Language-model sweep points trained together (#18 for LM students, kdstore.lm_group_training): each point as if
trained alone, groups split where the stored targets differ, resume across group sizes, what is not grouped and
why, and the stacked student's tied embedding and head."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kdstore.grouped import StudentGroup, point_optimizer_state, stack_optimizer_states
from kdstore.lm_students import build_lm_student
from kdstore.lm_training import LMTrainer
from tests import lm_fixtures as lf
from tests.helpers import assert_clean_error, assert_runs_match, cli, max_diff, run_weights

TRAIN = ["--student", "gpt:1-16-2", "--epochs", "2", "--batch-size", "8", "--val-fraction", "0.25", "--quiet"]
SWEEP = ["--loss", "topk,sampled", "-T", "1,2", "--seed", "0,1"]  # 8 points: two groups of 4 (top-k, draws)
RUNS = [f"{loss}-T{t}-a1-s{s}" for loss in ("topk", "sampled") for t in (1, 2) for s in (0, 1)]

# Why this tolerance: as for the classification groups (tests/test_grouped.py), a grouped point computes the same
# sums in another order inside the batched matmuls: float32 rounding of ~1e-7 per operation, which AdamW's steps
# of about lr = 1e-3 per weight do not amplify; after 2 epochs of this small problem the weights differ by <= 6e-7
# (measured), while one step with another point's batch, targets or temperature moves them by ~1e-3.
WEIGHT_ATOL = 1e-5
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lm_grouped")
    r = cli(["label", "--teacher", "tests.lm_fixtures:sharp_bigram", "--transfer", lf.write_corpus(d), "--out",
             d / "s", "--name", "news", "--seq-len", "16", "--top-k", "8", "--sample", "12", "--batch-size", "4",
             "--shard-rows", "10", "--row-group-rows", "3", "--quiet"])
    assert r.exit_code == 0, r.output
    return d / "s" / "news"


def train(store: Path, out: Path, *extra: Any) -> Any:
    r = cli(["train", "--targets", store, "--out", out, *SWEEP, *TRAIN, *extra])
    return r


def ok(r: Any) -> Any:
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def assert_same_runs(grouped: Path, alone: Path) -> None:
    assert_runs_match(grouped, alone, RUNS, WEIGHT_ATOL, LOSS_RTOL, keys=("train_loss", "val_nll"))
    sg, sa = (json.loads((d / "summary.json").read_text())["runs"] for d in (grouped, alone))
    assert [r["run"] for r in sg] == [r["run"] for r in sa] == RUNS
    for g, a in zip(sg, sa, strict=True):
        assert g["val_nll"] == pytest.approx(a["val_nll"], rel=LOSS_RTOL)
        assert g["extra"]["train_tokens"] == a["extra"]["train_tokens"]


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_grouped_lm_sweep_trains_each_point_as_if_alone(store: Path, tmp_path: Path, mode: str) -> None:
    grouped, alone = tmp_path / "grouped", tmp_path / "alone"
    ok(train(store, grouped, "--group-size", "8", "--data", mode))
    ok(train(store, alone, "--group-size", "1", "--data", mode))
    assert json.loads((grouped / "config.json").read_text())["grouping"]["group_size"] == 8
    assert_same_runs(grouped, alone)
    w = {run: run_weights(alone, run) for run in RUNS}  # the tolerance separates the points
    assert min(max_diff(w[a], w[b]) for a in RUNS for b in RUNS if a < b) > 100 * WEIGHT_ATOL


def test_groups_never_mix_stored_targets_and_keep_the_sweep_order(store: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from kdstore import lm_group_training

    sizes: list[list[str]] = []
    real = lm_group_training.train_group

    def spy(tr: Any, points: Any, progress: Any) -> Any:
        sizes.append([tr.cfg.run_id(p) for p in points])
        return real(tr, points, progress)

    monkeypatch.setattr(lm_group_training, "train_group", spy)
    ok(train(store, tmp_path / "g3", "--group-size", "3"))
    # top-k points 0-2, then point 3 alone (a group of one takes the one-point loop), draws 4-6, then 7 alone
    assert sizes == [RUNS[0:3], RUNS[4:7]]
    assert [r["run"] for r in json.loads((tmp_path / "g3" / "summary.json").read_text())["runs"]] == RUNS


def test_an_interrupted_lm_group_resumes_in_any_group_size(store: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    clean, cut, mixed = tmp_path / "clean", tmp_path / "cut", tmp_path / "mixed"
    ok(train(store, clean, "--group-size", "4"))
    calls, real = {"n": 0}, LMTrainer.end_epoch

    def dies(self: LMTrainer, *a: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4 + 2:  # the first group's epoch 1 checkpointed, then its epoch 2 in the middle
            raise KeyboardInterrupt
        real(self, *a, **kw)

    for out in (cut, mixed):
        calls["n"] = 0
        with monkeypatch.context() as m:
            m.setattr(LMTrainer, "end_epoch", dies)
            assert_clean_error(train(store, out, "--group-size", "4"), r"interrupted")
    ok(train(store, cut, "--group-size", "4", "--resume"))
    for run in RUNS:  # resumed in the same group size: the same operations, so the same bits
        assert max_diff(run_weights(cut, run), run_weights(clean, run)) == 0.0, run
    ok(train(store, mixed, "--group-size", "1", "--resume"))  # per-point checkpoints resume one point at a time
    assert_same_runs(mixed, clean)


def test_auto_groups_lm_students_on_a_gpu_only(store: Path, tmp_path: Path) -> None:
    ok(train(store, tmp_path / "auto", "--device", "cpu"))
    grouping = json.loads((tmp_path / "auto" / "config.json").read_text())["grouping"]
    assert grouping["group_size"] == 1 and grouping["why"].startswith("on a CPU, auto trains LM students one at")


def test_what_does_not_group(store: Path, tmp_path: Path) -> None:
    hf = f"hf:{lf.hf_dir()}"  # a Hugging Face Llama: rotary buffers, a stacked forward cannot update them per point
    r = cli(["train", "--targets", store, "--out", tmp_path / "hf", "--student", hf, "--group-size", "2", *SWEEP,
             "--epochs", "1", "--quiet"])
    assert_clean_error(r, rf"^Error: --group-size 2: {hf} cannot train as a group: the student has buffers .*; use "
                          r"--group-size 1$")
    assert not (tmp_path / "hf").exists()
    assert_clean_error(train(store, tmp_path / "bad", "--group-size", "0"),
                       r"--group-size 0: must be >= 1 \(1 trains the points one at a time\) or auto")


def test_a_stacked_gpt_keeps_its_tied_head_and_two_adamw_groups() -> None:
    models = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        models.append(build_lm_student("gpt:1-16-2", 64, 16))
    ids = torch.randint(0, 64, (2, 16))
    group = StudentGroup(models)
    out = group(ids, shared=True)
    for i, m in enumerate(models):  # the head is the embedding: the stacked forward must use it under both names
        assert torch.allclose(out[i], m(ids), atol=1e-5)
        assert torch.equal(group.state(i)["head.weight"], m.state_dict()["tok.weight"])
    opts = [torch.optim.AdamW([{"params": [p for p in m.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                               {"params": [p for p in m.parameters() if p.ndim < 2], "weight_decay": 0.0}])
            for m in models]
    for m, o in zip(models, opts, strict=True):
        m(ids).sum().backward()
        o.step()
    stacked = stack_optimizer_states([o.state_dict() for o in opts])
    sizes = [len(g["params"]) for g in opts[0].state_dict()["param_groups"]]
    assert [len(g["params"]) for g in stacked["param_groups"]] == [3 * n for n in sizes]
    for i, o in enumerate(opts):
        mine, back = o.state_dict(), point_optimizer_state(stacked, i, sizes)
        assert mine["param_groups"] == back["param_groups"]
        assert mine["state"].keys() == back["state"].keys()
        for idx, entry in mine["state"].items():
            assert all(torch.equal(entry[k], back["state"][idx][k]) for k in entry)
