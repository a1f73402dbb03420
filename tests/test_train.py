"""`kdstore train`: outputs, every loss, top-k-only and unlabeled stores, resume, learning, bad input."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdstore import soft_targets
from kdstore.store import Version
from kdstore.students import build_model
from kdstore.training import Trainer
from tests import fixtures_models as fm
from tests.conftest import Data, write_parquet_array
from tests.helpers import FIX, assert_clean_error, cli, run_label

STUDENT = "mlp:8-16-5"


@pytest.fixture(scope="module")
def stores(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_stores")
    store = root / "store"
    gone = Path(shutil.copy(data.parquet, root / "gone.parquet"))
    out = {
        "pq": run_label(data.teacher_pt, data.parquet, store, "pq", top_k=3).path.parent,
        "nolog": run_label(data.teacher_pt, data.parquet, store, "nolog", top_k=3, keep_logits=False).path.parent,
        "k0": run_label(data.teacher_pt, data.parquet, store, "k0", top_k=None).path.parent,
        "unl": run_label(data.teacher_pt, data.parquet, store, "unl", top_k=3, label_column="none").path.parent,
        "gone": run_label(data.teacher_pt, gone, store, "gone", top_k=None).path.parent,
        "root": root,
    }
    gone.unlink()
    return out


def train(targets: Path | str, out: Path, *extra: Any, student: str = STUDENT, epochs: int = 2) -> Any:
    return cli(["train", "--targets", targets, "--student", student, "--epochs", epochs, "--batch-size", 25,
                "--device", "cpu", "--quiet", "--out", out, *extra])


def ok(result: Any) -> Any:
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())  # type: ignore[no-any-return]


def load_student(out: Path, run: str, spec: str = STUDENT) -> torch.nn.Module:
    from safetensors.torch import load_file

    model = build_model(spec)
    model.load_state_dict(load_file(str(out / "runs" / run / "student.safetensors")))
    return model.eval()


def weights(out: Path, run: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "runs" / run / "student.safetensors"))


# --- outputs --------------------------------------------------------------------------------------------------------


def test_sweep_writes_every_output(data: Data, stores: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = ok(train(stores["pq"], out, "-T", "1,4", "--alpha", "0.5", "--eval", data.parquet))
    assert "sweep.png" in r.output.splitlines()[-1]
    lines = r.output.splitlines()
    assert lines[0].split()[:3] == ["run", "T", "alpha"] and lines[1].startswith("kd-T1-a0.5")
    assert lines[2].startswith("kd-T4-a0.5") and lines[4].startswith("teacher t0: ")
    assert lines[3] == ("agree%: top-1 agreement with the teacher, over the last epoch's batches, as trained "
                        "(--agreement final: a pass of the final weights over the transfer set)")

    config = json.loads((out / "config.json").read_text())
    assert config["config"]["temperatures"] == [1.0, 4.0] and config["config"]["alphas"] == [0.5]
    assert config["targets"] == f"{stores['pq']}@v1" and config["source"] == "logits" and config["mode"] == "memory"

    m = metrics(out)  # the two points train as one group: their lines alternate, epoch by epoch
    assert [(x["run"], x["epoch"]) for x in m] == [("kd-T1-a0.5", 1), ("kd-T4-a0.5", 1), ("kd-T1-a0.5", 2),
                                                   ("kd-T4-a0.5", 2)]
    assert all(math.isfinite(x["train_loss"]) and 0 <= x["eval_accuracy"] <= 1 for x in m)

    s = summary(out)
    assert s["targets"] == f"{stores['pq']}@v1" and s["student"] == STUDENT and "t0" in s["teacher"]
    assert [run["run"] for run in s["runs"]] == ["kd-T1-a0.5", "kd-T4-a0.5"]
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    for run in s["runs"]:
        assert run["loss"] == "kd" and run["alpha"] == 0.5 and run["epochs"] == 2 and len(run["epoch_seconds"]) == 2
        assert run["eval_errors"] == round(100 * (1 - run["eval_accuracy"]))
        assert math.isfinite(run["eval_nll"]) and 0 <= run["teacher_agreement"] <= 1
        # the saved student loads into build_model(spec) and reproduces the reported accuracy
        with torch.no_grad():
            pred = load_student(out, run["run"])(x).argmax(1)
        assert int((pred != y).sum()) == run["eval_errors"]
        meta = json.loads((out / "runs" / run["run"] / "student.json").read_text())
        assert meta["student"] == STUDENT and meta["num_classes"] == 5 and meta["temperature"] == run["temperature"]
        assert sorted(p.name for p in (out / "runs" / run["run"]).iterdir()) == [
            "result.json", "student.json", "student.safetensors"]  # the checkpoint is gone once a run is done
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("store", "extra", "run", "source"),
    [("pq", ["--loss", "hard"], "hard", "logits"),
     ("pq", ["--loss", "ls", "--smoothing", "0.2"], "ls", "logits"),
     ("pq", ["--loss", "mse"], "mse", "logits"),
     ("pq", ["--loss", "mse", "--no-zero-mean"], "mse", "logits"),
     ("pq", ["--loss", "topk", "--top-k", "2", "-T", "2", "--alpha", "0.7"], "topk-T2-a0.7", "topk"),
     ("pq", ["--loss", "topk", "--tail", "drop", "-T", "2"], "topk-T2-a0.9", "topk"),
     ("pq", ["--loss", "kd", "-T", "3", "--alpha", "0", "--optimizer", "sgd", "--schedule", "constant"],
      "kd-T3-a0", "logits"),
     ("pq", ["--loss", "kd", "--data", "stream", "--num-workers", "2"], "kd-T4-a0.9", "logits"),
     ("k0", ["--loss", "topk", "--top-k", "2", "--alpha", "1"], "topk-T4-a1", "logits"),  # top-k from full logits
     ("nolog", ["--loss", "kd", "-T", "2"], "kd-T2-a0.9", "topk"),  # soft targets rebuilt from the stored top-k
     ("nolog", ["--loss", "topk", "--data", "stream"], "topk-T4-a0.9", "topk")],
)
def test_every_loss_runs(stores: dict[str, Path], tmp_path: Path, store: str, extra: list[str], run: str,
                         source: str) -> None:
    out = tmp_path / "run"
    ok(train(stores[store], out, *extra))
    assert [r["run"] for r in summary(out)["runs"]] == [run]
    assert json.loads((out / "config.json").read_text())["source"] == source
    m = metrics(out)
    assert len(m) == 2 and all(math.isfinite(x["train_loss"]) for x in m)
    assert all(torch.isfinite(v).all() for v in weights(out, run).values())


@pytest.mark.parametrize("extra", [["--loss", "kd", "--alpha", "1"], ["--loss", "mse"],
                                   ["--loss", "topk", "--alpha", "1", "-T", "1,2"]])
def test_unlabeled_store_trains_without_hard_labels(stores: dict[str, Path], tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "run"
    ok(train(stores["unl"], out, *extra, epochs=1))
    assert all(math.isfinite(x["train_loss"]) for x in metrics(out))


def test_kd_from_topk_only_store_uses_rebuilt_targets(stores: dict[str, Path]) -> None:
    from kdstore.targets import log_soft_targets_topk
    from kdstore.training import TrainConfig

    t = Trainer(TrainConfig(targets=str(stores["nolog"]), student=STUDENT, out="unused", losses="kd", device="cpu"))
    batch = t.data.to_memory()
    got = soft_targets.batch_log_probs(batch, 2.0, t.plan, t.weights)
    v, i, lse, t = batch["topk_values"][:, 0], batch["topk_indices"][:, 0], batch["lse"][:, 0], batch["tail"][:, 0]
    torch.testing.assert_close(got, log_soft_targets_topk(v, i, lse, 5, 2.0, "uniform", t))
    assert not Path("unused").exists()


# --- resume ---------------------------------------------------------------------------------------------------------


def test_interrupt_then_resume_matches_a_clean_run(data: Data, stores: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["-T", "1,4", "--alpha", "0.5", "--eval", data.parquet, "--group-size", "1"]  # grouped: test_grouped.py
    clean, out = tmp_path / "clean", tmp_path / "run"
    ok(train(stores["pq"], clean, *args, epochs=3))

    real = Trainer.loss
    calls: list[int] = []

    def flaky(self: Trainer, *a: Any, **kw: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 12 + 4 + 2:  # 4 steps per epoch: run 1 done, run 2 in the middle of epoch 2
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "loss", flaky)
        assert_clean_error(train(stores["pq"], out, *args, epochs=3),
                           rf"^Error: interrupted; finished epochs are checkpointed in {out}: rerun the same command "
                           r"with --resume to continue$")
    assert ([(x["run"], x["epoch"]) for x in metrics(out)]
            == [("kd-T1-a0.5", e) for e in (1, 2, 3)] + [("kd-T4-a0.5", 1)])
    assert (out / "runs" / "kd-T4-a0.5" / "checkpoint.pt").is_file()
    assert [r["run"] for r in summary(out)["runs"]] == ["kd-T1-a0.5"]

    assert_clean_error(train(stores["pq"], out, *args, epochs=3),
                       rf"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
    assert_clean_error(train(stores["pq"], out, *args, "--resume", "--lr", "0.01", epochs=3),
                       rf"--resume: {out} was started with other settings \(lr\); rerun with the same options")
    assert_clean_error(train(stores["pq"], out, *args, "--resume", epochs=4),
                       r"started with other settings \(epochs\)")

    r = ok(train(stores["pq"], out, *args, "--resume", epochs=3))
    assert "kd-T4-a0.5" in r.output
    got, want = metrics(out), metrics(clean)
    assert [(x["run"], x["epoch"]) for x in got] == [(x["run"], x["epoch"]) for x in want]  # no line twice
    for a, b in zip(got, want, strict=True):
        assert ((a["train_loss"], a["eval_accuracy"], a["eval_nll"])
                == (b["train_loss"], b["eval_accuracy"], b["eval_nll"]))
    for a, b in zip(summary(out)["runs"], summary(clean)["runs"], strict=True):
        for key in ("run", "eval_accuracy", "eval_errors", "eval_nll", "teacher_agreement"):
            assert a[key] == b[key], key
        wa, wb = weights(out, a["run"]), weights(clean, b["run"])
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list(out.rglob("checkpoint.pt"))
    # resuming a finished run trains nothing and changes nothing
    ok(train(stores["pq"], out, *args, "--resume", epochs=3))
    assert metrics(out) == got


def test_learning_distilled_student_agrees_with_the_teacher(data: Data, stores: dict[str, Path],
                                                            tmp_path: Path) -> None:
    out = tmp_path / "run"
    spec = "mlp:8-64-5"
    ok(train(stores["unl"], out, "-T", "1", "--alpha", "1", "--lr", "0.01", "--schedule", "constant",
             student=spec, epochs=40))
    run = summary(out)["runs"][0]
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        teacher = fm.tiny_teacher()(x).argmax(1)
        student = load_student(out, run["run"], spec)(x).argmax(1)
        torch.manual_seed(0)
        untrained = build_model(spec)(x).argmax(1)
    agree = float((student == teacher).float().mean())
    assert agree >= 0.95 and run["teacher_agreement"] == pytest.approx(agree, abs=0.02)  # stored logits are fp16
    assert float((untrained == teacher).float().mean()) < 0.6
    # at T = 1, alpha = 1 the loss is CE(teacher, student) = KL + the teacher's entropy: the KL part nearly vanishes
    entropy = Version(stores["unl"]).manifest["statistics"]["teachers"]["t0"]["mean_entropy_nats"]
    losses = [m["train_loss"] - entropy for m in metrics(out)]
    assert losses[-1] < 0.05 * losses[0]


# --- bad input: one 'Error:' line, nothing written ------------------------------------------------------------------


def _bad_transfer(d: Data, tmp: Path) -> Path:
    x = d.x.copy()
    x[0, 0] += 1
    return write_parquet_array(tmp / "other.parquet", x, d.y)


BAD: dict[str, tuple[Any, list[str], str]] = {
    "store not found": (lambda s, d, t: t / "nostore" / "ds", [], r"--targets .*nostore/ds: no dataset directory"),
    "version not found": (lambda s, d, t: f"{s['pq']}@v9", [], r"--targets .*pq@v9: version v9 not found; pq has v1$"),
    "transfer missing": (lambda s, d, t: s["gone"], [],
                         r"transfer set .*gone.parquet \(recorded in .*gone@v1\) not found; pass --transfer PATH"),
    "transfer fingerprint": (lambda s, d, t: s["pq"], ["--transfer", "OTHER"],
                             r"--transfer .*other.parquet: sha256 .* differs from .* recorded in .*pq@v1"),
    "student classes": (lambda s, d, t: s["pq"], ["--student", "mlp:8-3"],
                        r"--student mlp:8-3: outputs \(3,\) classes, but the store has 5; make its last size 5"),
    "student input size": (lambda s, d, t: s["pq"], ["--student", "mlp:6-5"],
                           r"--student mlp:6-5: forward failed on inputs of shape \(2, 8\)"),
    "student import": (lambda s, d, t: s["pq"], ["--student", "no_such_pkg_kdstore.mod:factory"],
                       r"cannot import module 'no_such_pkg_kdstore.mod' .*ModuleNotFoundError"),
    "student factory missing": (lambda s, d, t: s["pq"], ["--student", f"{FIX}:no_such_factory"],
                                rf"'{FIX}:no_such_factory': module '{FIX}' has no callable 'no_such_factory'"),
    "temperature 0": (lambda s, d, t: s["pq"], ["-T", "0"], r"--temperature 0.0: must be > 0"),
    "temperature -1": (lambda s, d, t: s["pq"], ["--temperature", "-1"], r"--temperature -1.0: must be > 0"),
    "alpha 1.5": (lambda s, d, t: s["pq"], ["--alpha", "1.5"], r"--alpha 1.5: must be in \[0, 1\]"),
    "seed -1": (lambda s, d, t: s["pq"], ["--seed", "-1"], r"--seed -1: must be >= 0"),
    "seed repeated": (lambda s, d, t: s["pq"], ["--seed", "0,1,0"], r"--seed 0,1,0: a seed is repeated; give each"),
    "unlabeled kd alpha 0.5": (lambda s, d, t: s["unl"], ["--loss", "kd", "--alpha", "0.5"],
                               r"unl@v1 is unlabeled .*hard-label terms need labels; use --loss kd with --alpha 1"),
    "unlabeled hard": (lambda s, d, t: s["unl"], ["--loss", "hard"], r"unl@v1 is unlabeled"),
    "unlabeled topk alpha 0.5": (lambda s, d, t: s["unl"], ["--loss", "topk", "--alpha", "0.5"],
                                 r"unl@v1 is unlabeled"),
    "mse on top-k only": (lambda s, d, t: s["nolog"], ["--loss", "mse"],
                          r"nolog@v1 stores only top-k targets, no full logits; this needs full logits"),
    "top-k above stored": (lambda s, d, t: s["pq"], ["--loss", "topk", "--top-k", "4"],
                           r"--top-k 4: .*pq@v1 stores top-3; use a k <= 3"),
    "top-k above classes": (lambda s, d, t: s["k0"], ["--loss", "topk", "--top-k", "7"],
                            r"--top-k 7: .*k0@v1 has 5 classes; use a k <= 5"),
    "eval without labels": (lambda s, d, t: s["pq"], ["--eval", "NPY"],
                            r"--eval .*transfer.npy: no label column found; an evaluation set needs labels"),
    "eval of another shape": (lambda s, d, t: s["pq"], ["--eval", "NARROW"],
                              r"--eval .*narrow.parquet: inputs of shape \(6,\), but the transfer set's are \(8,\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line(data: Data, stores: dict[str, Path], tmp_path: Path, case: str) -> None:
    make, extra, match = BAD[case]
    subst = {"OTHER": lambda: _bad_transfer(data, tmp_path), "NPY": lambda: data.npy,
             "NARROW": lambda: write_parquet_array(tmp_path / "narrow.parquet", data.x[:, :6], data.y)}
    extra = [subst[a]() if a in subst else a for a in extra]
    out = tmp_path / "run"
    assert_clean_error(train(make(stores, data, tmp_path), out, *extra), match)
    assert not out.exists()  # every one of these is caught before anything is written


@pytest.mark.parametrize(
    ("student", "extra", "match"),
    [(f"{FIX}:nan_student", [], r"run kd-T4-a0\.9: the loss became nan in epoch 1; lower --lr \(now 0\.001\)"),
     ("mlp:8-16-5", ["--lr", "1e30", "--batch-size", "10"],
      r"run kd-T4-a0\.9: the loss became (nan|inf) in epoch \d; lower --lr \(now 1e\+30\)")],
)
def test_diverging_run_stops_naming_the_run(stores: dict[str, Path], tmp_path: Path, student: str,
                                            extra: list[str], match: str) -> None:
    out = tmp_path / "run"
    assert_clean_error(train(stores["pq"], out, *extra, student=student), match)
    assert not (out / "runs" / "kd-T4-a0.9" / "student.safetensors").exists()


def test_weights_of_a_run_are_reproducible(stores: dict[str, Path], tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ok(train(stores["pq"], a, epochs=1))
    ok(train(stores["pq"], b, epochs=1))
    ok(train(stores["pq"], c, "--seed", "1", epochs=1))
    wa, wb, wc = (weights(p, "kd-T4-a0.9") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    np.testing.assert_array_equal([m["train_loss"] for m in metrics(a)], [m["train_loss"] for m in metrics(b)])


def test_seed_sweep_is_the_single_seed_runs_plus_their_mean(data: Data, stores: dict[str, Path],
                                                            tmp_path: Path) -> None:
    sweep, one = tmp_path / "sweep", tmp_path / "one"
    # one point at a time, so "exactly" holds bit for bit (grouped points match up to rounding: test_grouped.py)
    r = ok(train(stores["pq"], sweep, "-T", "1,4", "--seed", "0,1", "--eval", data.parquet, "--group-size", "1",
                 epochs=1))
    ok(train(stores["pq"], one, "-T", "4", "--seed", "1", "--eval", data.parquet, epochs=1))
    runs = summary(sweep)["runs"]
    assert [(x["run"], x["seed"]) for x in runs] == [("kd-T1-a0.9-s0", 0), ("kd-T1-a0.9-s1", 1),
                                                     ("kd-T4-a0.9-s0", 0), ("kd-T4-a0.9-s1", 1)]
    # a point of the sweep is exactly the run of that seed alone
    w_sweep, w_one = weights(sweep, "kd-T4-a0.9-s1"), weights(one, "kd-T4-a0.9")
    assert all(torch.equal(w_sweep[k], w_one[k]) for k in w_one)
    assert summary(one)["runs"][0]["seed"] == 1 and "over_seeds" not in summary(one)
    assert {m["seed"] for m in metrics(sweep)} == {0, 1}
    # the mean and sample SD over seeds, per (T, alpha)
    over = summary(sweep)["over_seeds"]
    assert [(g["temperature"], g["seeds"]) for g in over] == [(1.0, [0, 1]), (4.0, [0, 1])]
    for g in over:
        errs = [x["eval_errors"] for x in runs if x["temperature"] == g["temperature"]]
        assert g["eval_errors_mean"] == pytest.approx(np.mean(errs))
        assert g["eval_errors_sd"] == pytest.approx(np.std(errs, ddof=1))
    lines = r.output.splitlines()
    assert "mean +- SD over seeds:" in lines
    assert any(ln.strip().startswith("kd-T4-a0.9") and "seeds 0,1: acc" in ln for ln in lines)
    # --resume after the sweep finished trains nothing again
    before = (sweep / "metrics.jsonl").read_text()
    ok(train(stores["pq"], sweep, "-T", "1,4", "--seed", "0,1", "--eval", data.parquet, "--resume", epochs=1))
    assert (sweep / "metrics.jsonl").read_text() == before


def test_over_seeds_without_eval_reports_agreement(stores: dict[str, Path], tmp_path: Path) -> None:
    r = ok(train(stores["pq"], tmp_path / "run", "--loss", "hard", "--seed", "3,4", epochs=1))
    assert [x["run"] for x in summary(tmp_path / "run")["runs"]] == ["hard-s3", "hard-s4"]
    assert any(ln.strip().startswith("hard") and "seeds 3,4: agree" in ln and "(no --eval set)" in ln
               for ln in r.output.splitlines())


def test_seed_list_of_non_integers_is_a_usage_error(stores: dict[str, Path], tmp_path: Path) -> None:
    r = train(stores["pq"], tmp_path / "run", "--seed", "0,1.5")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert ("Error: Invalid value for '--seed': '0,1.5' is not a comma-separated list of integers, e.g. 0,1,2"
            in r.output)
    assert not (tmp_path / "run").exists()


# -- the optimizer kernel ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizers_use_the_fused_kernel_on_cpu(name: str) -> None:
    from kdstore.training import TrainConfig, _optimizer

    cfg = TrainConfig(targets="s/n", student="mlp:8-4", out="o", optimizer=name, momentum=0.9)
    opt = _optimizer(fm.mlp().parameters(), cfg)
    assert opt.defaults["fused"] is True


def test_fused_optimizer_falls_back_where_there_is_no_kernel() -> None:
    from kdstore.device import fused_optimizer

    class NoFused(torch.optim.Adam):
        def __init__(self, params: Any, fused: bool | None = None, **kw: Any) -> None:
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                                   "devices")
            super().__init__(params, **kw)

    opt = fused_optimizer(NoFused, (p for p in fm.mlp().parameters()), lr=0.1)  # a generator is read once
    assert not opt.defaults["fused"] and len(opt.param_groups[0]["params"]) == 4


def test_fused_adam_resumes_a_foreach_checkpoint() -> None:
    """A checkpoint written before the fused kernel (foreach Adam) resumes under it: the same weights after more steps
    to float rounding (1e-6: a few ulps of Adam's update per step, far below one step's change)."""
    from kdstore.device import fused_optimizer

    x, y = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 5

    def steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
        for i in range(n):
            loss = torch.nn.functional.cross_entropy(model(x[i * 8 : i * 8 + 8]), y[i * 8 : i * 8 + 8])
            opt.zero_grad()
            loss.backward()
            opt.step()

    old = fm.mlp()
    old_opt = torch.optim.Adam(old.parameters(), lr=1e-2, foreach=True)
    steps(old, old_opt, 4)
    new = fm.mlp()
    new.load_state_dict(old.state_dict())
    new_opt = fused_optimizer(torch.optim.Adam, new.parameters(), lr=1e-2)
    saved = io.BytesIO()
    torch.save(old_opt.state_dict(), saved)  # as a checkpoint does
    saved.seek(0)
    new_opt.load_state_dict(torch.load(saved, weights_only=True))
    steps(old, old_opt, 4)
    steps(new, new_opt, 4)
    assert new_opt.defaults["fused"]
    for a, b, start in zip(old.parameters(), new.parameters(), fm.mlp().parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        assert (a - start).abs().max() > 1e-3  # 8 steps of lr 1e-2 moved every tensor


def test_heap_kept_between_steps_once_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc's trim and mmap thresholds are set once, on the CPU only, and not with KDSTORE_MALLOC=default."""
    from kdstore import device

    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(device.ctypes, "CDLL", lambda name: Libc())
    for env, dev, want in [("default", "cpu", []), (None, "meta", []),
                           (None, "cpu", [(-1, 1 << 30), (-3, 64 << 20)])]:
        monkeypatch.setattr(device, "_HEAP_KEPT", False)
        if env:
            monkeypatch.setenv("KDSTORE_MALLOC", env)
        else:
            monkeypatch.delenv("KDSTORE_MALLOC", raising=False)
        calls.clear()
        device.keep_heap_between_steps(torch.device(dev))
        assert calls == want, (env, dev)
    device.keep_heap_between_steps(torch.device("cpu"))  # once per process
    assert len(calls) == 2


def test_heap_setting_skips_a_c_library_without_mallopt(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdstore import device

    def no_glibc(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(device.ctypes, "CDLL", no_glibc)
    monkeypatch.setattr(device, "_HEAP_KEPT", False)
    monkeypatch.delenv("KDSTORE_MALLOC", raising=False)
    device.keep_heap_between_steps(torch.device("cpu"))  # no error
