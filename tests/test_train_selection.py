"""`kdstore train` choosing without the test set: validation splits, sweeps over losses and standardisation, the
best run by validation in the table, summary and plot; bad validation and standardisation options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdstore import soft_targets
from kdstore.data import Holdout, check_holdout, open_training_data, split_memory
from kdstore.errors import ConfigError
from kdstore.store import Version
from kdstore.targets import standardize
from kdstore.training import TrainConfig, Trainer
from tests.conftest import Data, write_parquet_array
from tests.helpers import assert_clean_error, cli, run_label

STUDENT = "mlp:8-16-5"


@pytest.fixture(scope="module")
def stores(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("selection_stores")
    store = root / "store"
    return {"pq": run_label(data.teacher_pt, data.parquet, store, "pq", top_k=3).path.parent,
            "unl": run_label(data.teacher_pt, data.parquet, store, "unl", top_k=3, label_column="none").path.parent}


def train(targets: Path | str, out: Path, *extra: Any, epochs: int = 2) -> Any:
    return cli(["train", "--targets", targets, "--student", STUDENT, "--epochs", epochs, "--batch-size", 25,
                "--device", "cpu", "--quiet", "--out", out, *extra])


def ok(result: Any) -> Any:
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())  # type: ignore[no-any-return]


# --- the split ------------------------------------------------------------------------------------------------------


def test_holdout_is_a_fixed_share_decided_by_the_row_alone() -> None:
    ids = np.arange(20_000)
    m = Holdout(0.1, 0).mask(ids)
    assert 0.09 < m.mean() < 0.11
    np.testing.assert_array_equal(Holdout(0.1, 0).mask(ids[::-1]), m[::-1])  # order does not matter
    np.testing.assert_array_equal(Holdout(0.1, 0).mask(ids[5000:6000]), m[5000:6000])  # nor the block it is read in
    assert (Holdout(0.2, 0).mask(ids) >= m).all()  # a larger fraction holds out a superset
    other = Holdout(0.1, 1).mask(ids)
    assert 0.005 < (m & other).mean() < 0.015  # another seed: another, independent split


def test_streamed_and_in_memory_paths_hold_out_the_same_rows(stores: dict[str, Path]) -> None:
    data = open_training_data(stores["pq"], need=("logits", "label"))
    h = check_holdout(data.version, 0.3, 0)
    assert h is not None and 0 < h.rows < 100
    train_rows, val_rows = split_memory(data.to_memory(), h)
    assert len(val_rows["sample_id"]) == h.rows and len(train_rows["sample_id"]) == 100 - h.rows

    def streamed(part: str) -> list[int]:
        return sorted(int(i) for b in data.stream(7, seed=3, holdout=h, part=part) for i in b["sample_id"])

    assert streamed("val") == sorted(val_rows["sample_id"].tolist())
    assert streamed("train") == sorted(train_rows["sample_id"].tolist())


def test_check_holdout_refuses_empty_sides_and_unlabeled_data(stores: dict[str, Path]) -> None:
    v = Version(stores["pq"])
    with pytest.raises(ConfigError, match=r"val_fraction 1e-06: holds out 0 of 100 rows; use a larger fraction"):
        check_holdout(v, 1e-6)
    with pytest.raises(ConfigError, match=r"holds out all 100 rows and leaves none to train on"):
        check_holdout(v, 0.999999)
    with pytest.raises(ConfigError, match=r"unl@v1 is unlabeled, so held-out rows cannot be scored; pass val PATH"):
        check_holdout(Version(stores["unl"]), 0.1)


# --- one command: hard labels, plain and standardised KD, chosen on validation ----------------------------------


def test_loss_and_standardize_sweep_marks_the_best_run_by_validation(data: Data, stores: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = ok(train(stores["pq"], out, "--loss", "hard,kd", "--standardize", "off,on", "-T", "1,4", "--seed", "0,1",
                 "--val-fraction", "0.3", "--eval", data.parquet))
    s = summary(out)
    ids = [x["run"] for x in s["runs"]]
    assert ids == ["hard-s0", "hard-s1", "kd-T1-a0.9-s0", "kd-T1-a0.9-s1", "kd-T4-a0.9-s0", "kd-T4-a0.9-s1",
                   "kd-std-T1-a0.9-s0", "kd-std-T1-a0.9-s1", "kd-std-T4-a0.9-s0", "kd-std-T4-a0.9-s1"]
    rows = s["validation"]["rows"]
    assert s["validation"]["fraction"] == 0.3 and s["validation"]["train_rows"] == 100 - rows
    assert all(x["val_errors"] == round(rows * (1 - x["val_accuracy"])) for x in s["runs"])
    assert [x["standardize"] for x in s["runs"]] == [False] * 6 + [True] * 4
    best = s["best_by_validation"]
    groups = {g["run"]: g for g in s["over_seeds"]}
    assert best["val_errors_mean"] == min(g["val_errors_mean"] for g in groups.values())
    assert groups[best["run"]]["seeds"] == [0, 1]
    # the table stars the chosen runs (both seeds) and says how the choice compares with the hard labels
    starred = [ln.split()[0] for ln in r.output.splitlines() if ln.startswith("*") and not ln.startswith("* ")]
    assert starred == [f"*{best['run']}-s0", f"*{best['run']}-s1"]
    assert f"* best by validation: {best['run']}, {best['val_errors_mean']:.1f} validation errors (mean of 2 seeds)" \
        in r.output
    hard = groups["hard"]["val_errors_mean"]
    if best["run"] == "hard":
        assert "no distilled run beat the hard labels on validation" in r.output
    else:
        assert (f"hard labels: {hard:.1f} validation errors; the chosen run makes "
                f"{hard - best['val_errors_mean']:.1f} ({100 * (hard - best['val_errors_mean']) / hard:.1f}%) fewer"
                in r.output)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "runs" / "kd-std-T4-a0.9-s1" / "student.json").read_text())["standardize"] is True


def test_validation_is_the_same_in_memory_and_streamed(stores: dict[str, Path], tmp_path: Path) -> None:
    for mode in ("memory", "stream"):
        ok(train(stores["pq"], tmp_path / mode, "--loss", "hard", "--val-fraction", "0.3", "--data", mode))
    a, b = summary(tmp_path / "memory"), summary(tmp_path / "stream")
    assert a["validation"] == b["validation"]
    assert b["runs"][0]["val_errors"] is not None and b["best_by_validation"]["run"] == "hard"


def test_val_file_scores_every_run_and_training_uses_every_row(data: Data, stores: dict[str, Path],
                                                               tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = ok(train(stores["pq"], out, "--loss", "kd", "-T", "2", "--val", data.parquet))
    s = summary(out)
    assert s["validation"] == {"source": str(data.parquet), "rows": 100}
    assert s["runs"][0]["val_errors"] is not None and "* best by validation: kd-T2-a0.9" in r.output


def test_without_a_validation_set_nothing_is_chosen(stores: dict[str, Path], tmp_path: Path) -> None:
    r = ok(train(stores["pq"], tmp_path / "run", "--loss", "hard,kd"))
    s = summary(tmp_path / "run")
    assert "best_by_validation" not in s and "validation" not in s and "best by validation" not in r.output
    assert [x["run"] for x in s["runs"]] == ["hard", "kd-T4-a0.9"]


def test_standardised_targets_through_the_public_api(stores: dict[str, Path]) -> None:
    t = Trainer(TrainConfig(targets=str(stores["pq"]), student=STUDENT, out="unused", device="cpu"))
    batch = t.data.to_memory()
    got = soft_targets.batch_log_probs(batch, 2.0, t.plan, t.weights, standardize=True)
    torch.testing.assert_close(got, torch.log_softmax(standardize(batch["logits"][:, 0].float()) / 2.0, dim=1))
    assert not Path("unused").exists()


def test_resume_accepts_a_run_started_before_these_options(stores: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    ok(train(stores["pq"], out, "-T", "2", epochs=1))
    path = out / "config.json"
    record = json.loads(path.read_text())
    cfg = record["config"]
    cfg["loss"] = cfg.pop("losses")[0]
    for new in ("standardize", "val", "val_fraction", "val_seed"):
        del cfg[new]
    path.write_text(json.dumps(record))  # what an earlier kdstore wrote
    (out / "runs" / "kd-T2-a0.9" / "result.json").unlink()
    ok(train(stores["pq"], out, "-T", "2", "--resume", epochs=1))
    assert_clean_error(train(stores["pq"], out, "-T", "2", "--resume", "--standardize", epochs=1),
                       r"--resume: .* was started with other settings \(standardize\)")


# --- bad input: one 'Error:' line, nothing written ------------------------------------------------------------------


BAD: dict[str, tuple[str, list[str], str]] = {
    "standardize hard": ("pq", ["--loss", "hard", "--standardize"],
                         r"--standardize: --loss hard reads no teacher logits, so there is nothing to standardise"),
    "standardize hard,ls": ("pq", ["--loss", "hard,ls", "--standardize", "off,on"], r"use it with --loss kd, topk"),
    "loss repeated": ("pq", ["--loss", "kd,kd"], r"--loss kd,kd: a value is repeated"),
    "val fraction 0": ("pq", ["--val-fraction", "0"], r"--val-fraction 0.0: must be in \(0, 1\)"),
    "val fraction negative": ("pq", ["--val-fraction", "-0.1"], r"--val-fraction -0.1: must be in \(0, 1\)"),
    "val fraction 1": ("pq", ["--val-fraction", "1"], r"--val-fraction 1.0: must be in \(0, 1\)"),
    "val fraction empty split": ("pq", ["--val-fraction", "1e-6"], r"--val-fraction 1e-06: holds out 0 of 100 rows"),
    "val fraction no training rows": ("pq", ["--val-fraction", "0.999999"],
                                      r"--val-fraction 0.999999: holds out all 100 rows and leaves none to train on"),
    "val fraction unlabeled": ("unl", ["--loss", "kd", "--alpha", "1", "--val-fraction", "0.2"],
                               r"--val-fraction 0.2: .*unl@v1 is unlabeled, so held-out rows cannot be scored; "
                               r"pass --val PATH"),
    "val and val fraction": ("pq", ["--val", "LABELED", "--val-fraction", "0.2"],
                             r"--val and --val-fraction both choose the validation set; give one of them"),
    "val seed negative": ("pq", ["--val-fraction", "0.2", "--val-seed", "-1"], r"--val-seed -1: must be >= 0"),
    "val missing": ("pq", ["--val", "MISSING"], r"--val .*missing.parquet"),
    "val unlabeled": ("pq", ["--val", "UNLABELED"],
                      r"--val .*unlabeled.parquet: no label column found; an evaluation set needs labels in 'label'"),
    "val empty": ("pq", ["--val", "EMPTY"], r"--val .*empty.parquet"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_selection_options_are_one_error_line(data: Data, stores: dict[str, Path], tmp_path: Path,
                                                  case: str) -> None:
    store, extra, match = BAD[case]
    files = {"LABELED": lambda: data.parquet, "MISSING": lambda: tmp_path / "missing.parquet",
             "UNLABELED": lambda: write_parquet_array(tmp_path / "unlabeled.parquet", data.x, None),
             "EMPTY": lambda: write_parquet_array(tmp_path / "empty.parquet", data.x[:0], data.y[:0])}
    extra = [str(files[a]()) if a in files else a for a in extra]
    out = tmp_path / "run"
    assert_clean_error(train(stores[store], out, *extra), match)
    assert not out.exists()


@pytest.mark.parametrize(("extra", "match"), [
    (["--standardize", "maybe"], "Invalid value for '--standardize': 'maybe' is not a comma-separated list of on/off"),
    (["--loss", "hard,kdd"], "Invalid value for '--loss': 'kdd' is not one of kd, topk, mse, hard, ls"),
])
def test_bad_lists_are_usage_errors(stores: dict[str, Path], tmp_path: Path, extra: list[str], match: str) -> None:
    r = train(stores["pq"], tmp_path / "run", *extra)
    assert r.exit_code == 2 and "Traceback" not in r.output and match in r.output
    assert not (tmp_path / "run").exists()


def test_standardised_targets_are_the_same_in_memory_and_streamed(stores: dict[str, Path]) -> None:
    for loss in ("kd", "topk"):  # exact logits; rebuilt from the stored top-k
        t = Trainer(TrainConfig(targets=str(stores["pq"]), student=STUDENT, out="unused", losses=loss, device="cpu"))
        view = soft_targets.training_view(t.data.to_memory(), loss, 2.0, 1.0, t.plan, t.weights, standardize=True)
        for batch in t.data.stream(16, seed=1):
            got = soft_targets.batch_log_probs(batch, 2.0, t.plan, t.weights, standardize=True)
            torch.testing.assert_close(got, view["teacher_logp"][batch["sample_id"]])


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_every_soft_loss_trains_standardised(stores: dict[str, Path], tmp_path: Path, mode: str) -> None:
    out = tmp_path / mode
    ok(train(stores["pq"], out, "--loss", "kd,topk,mse", "--standardize", "-T", "2", "--alpha", "1", "--data", mode,
             epochs=1))
    runs = summary(out)["runs"]
    assert [r["run"] for r in runs] == ["kd-std-T2-a1", "topk-std-T2-a1", "mse-std"]
    assert all(r["standardize"] and 0 <= r["teacher_agreement"] <= 1 for r in runs)
    losses = [json.loads(ln)["train_loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses)) and losses[2] <= 2 * 5  # z-scored rows: 0.5 * |Z(s) - Z(t)|^2 <= 2C
