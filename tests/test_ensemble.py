"""kdstore.ensemble golden values, and an ensemble labeled in one pass and combined at train time."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdstore import soft_targets
from kdstore.ensemble import mean_logits, mean_prob_log_targets, normalise_weights
from kdstore.errors import ConfigError
from kdstore.store import Version
from kdstore.targets import log_soft_targets_topk
from kdstore.training import TrainConfig, Trainer
from tests.conftest import Data, teacher_logits
from tests.helpers import assert_clean_error, cli, run_label

# --- golden values --------------------------------------------------------------------------------------------------


def test_normalise_weights_uniform_and_given() -> None:
    torch.testing.assert_close(normalise_weights(None, 4), torch.full((4,), 0.25))
    torch.testing.assert_close(normalise_weights([], 2), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(normalise_weights([1, 3], 2), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(normalise_weights([0.0, 2.0, 2.0], 3), torch.tensor([0.0, 0.5, 0.5]))
    assert normalise_weights([7], 1).tolist() == [1.0]


@pytest.mark.parametrize(
    ("weights", "members", "match"),
    [([1, 2, 3], 2, r"teacher_weights has 3 values for 2 teachers; give one per teacher"),
     ([1], 2, r"teacher_weights has 1 values for 2 teachers"),
     ([1, -1], 2, r"teacher_weights \[1, -1\]: must be finite and >= 0 with a positive sum"),
     ([0, 0], 2, r"must be finite and >= 0 with a positive sum"),
     ([float("nan"), 1], 2, r"must be finite and >= 0"),
     ([float("inf"), 1], 2, r"must be finite and >= 0")],
)
def test_normalise_weights_errors(weights: list[float], members: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        normalise_weights(weights, members)


P0 = [0.7, 0.2, 0.1]
P1 = [0.1, 0.3, 0.6]


def test_mean_prob_log_targets_golden() -> None:
    # 2 teachers x 3 classes, two rows (the second swaps the teachers); weights 1:3
    log_probs = torch.log(torch.tensor([[P0, P1], [P1, P0]]))
    got = mean_prob_log_targets(log_probs, normalise_weights([1, 3], 2))
    want = torch.log(torch.tensor([[0.25 * 0.7 + 0.75 * 0.1, 0.25 * 0.2 + 0.75 * 0.3, 0.25 * 0.1 + 0.75 * 0.6],
                                   [0.25 * 0.1 + 0.75 * 0.7, 0.25 * 0.3 + 0.75 * 0.2, 0.25 * 0.6 + 0.75 * 0.1]]))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[0].exp(), torch.tensor([0.25, 0.275, 0.475]))
    torch.testing.assert_close(got.exp().sum(1), torch.ones(2))
    uniform = mean_prob_log_targets(log_probs, normalise_weights(None, 2))
    torch.testing.assert_close(uniform.exp(), torch.tensor([[0.4, 0.25, 0.35], [0.4, 0.25, 0.35]]))
    assert got.dtype == torch.float32
    assert mean_prob_log_targets(log_probs.half(), normalise_weights(None, 2)).dtype == torch.float32


def test_mean_prob_with_a_zero_weight_is_that_member_alone() -> None:
    log_probs = torch.log(torch.tensor([[P0, P1]]))
    torch.testing.assert_close(mean_prob_log_targets(log_probs, normalise_weights([0, 1], 2)), log_probs[:, 1])


def test_mean_logits_golden() -> None:
    z = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 0.0, -1.0]]])
    torch.testing.assert_close(mean_logits(z, normalise_weights([1, 3], 2)), torch.tensor([[2.5, 0.5, 0.0]]))
    torch.testing.assert_close(mean_logits(z, normalise_weights(None, 2)), torch.tensor([[2.0, 1.0, 1.0]]))
    # softened, it is the normalised geometric mean of the members' soft targets
    t = 2.0
    geo = torch.softmax(z[0] / t, 1).log().mean(0)
    torch.testing.assert_close(torch.log_softmax(mean_logits(z, normalise_weights(None, 2)) / t, 1)[0],
                               torch.log_softmax(geo, 0))


def test_shape_errors() -> None:
    w = normalise_weights(None, 2)
    with pytest.raises(ValueError, match=r"must be \(N, M, C\) with M = 2"):
        mean_prob_log_targets(torch.zeros(4, 3, 5), w)
    with pytest.raises(ValueError, match=r"must be \(N, M, C\) with M = 2"):
        mean_logits(torch.zeros(4, 5), w)


# --- end to end -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ens(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One store: 'ens' labeled by two different teachers in one pass, 't1only' by the second alone, and
    'enstopk' by both without logits."""
    store = tmp_path_factory.mktemp("ensemble") / "store"
    r = cli(["label", "--teacher", data.teacher_pt, "--teacher", data.factory_spec, "--transfer", data.parquet,
             "--out", store, "--name", "ens", "--top-k", "3", "--shard-rows", "40", "--row-group-rows", "16",
             "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "  t1: accuracy " in r.output and "  ensemble (mean-prob): accuracy " in r.output
    run_label(data.factory_spec, data.parquet, store, "t1only", top_k=3)
    run_label([str(data.teacher_pt), data.factory_spec], data.parquet, store, "enstopk", top_k=3, keep_logits=False)
    return {"ens": store / "ens", "t1only": store / "t1only", "enstopk": store / "enstopk"}


def test_ensemble_manifest(data: Data, ens: dict[str, Path]) -> None:
    v = Version(ens["ens"])
    assert v.teacher_ids == ["t0", "t1"]
    names = set(v.columns)
    for t in ("t0", "t1"):
        assert {f"{t}_logits", f"{t}_topk_values", f"{t}_topk_indices", f"{t}_logsumexp"} <= names
        assert v.column_for("logits", t) == f"{t}_logits"
    stats = v.manifest["statistics"]
    assert set(stats["teachers"]) == {"t0", "t1"} and "ensemble" in stats
    assert 0 <= stats["ensemble"]["accuracy"] <= 1
    raw = v.read_all(["t0_logits", "t1_logits"])
    np.testing.assert_allclose(raw["t0_logits"], teacher_logits(data.x, seed=0).numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(raw["t1_logits"], teacher_logits(data.x, seed=1).numpy(), rtol=2e-3, atol=2e-3)
    assert not np.allclose(raw["t0_logits"], raw["t1_logits"])  # two different teachers


def trainer(ref: Path, **kw: Any) -> Trainer:
    return Trainer(TrainConfig(targets=str(ref), student="mlp:8-16-5", out="unused", device="cpu", **kw))


def _logp(tr: Trainer, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    return soft_targets.batch_log_probs(batch, temperature, tr.plan, tr.weights)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_trainer_combines_members_as_asked(ens: dict[str, Path], temperature: float) -> None:
    batch = trainer(ens["ens"]).data.to_memory()
    z = batch["logits"].float()  # (N, 2, C)
    p0, p1 = torch.softmax(z[:, 0] / temperature, 1), torch.softmax(z[:, 1] / temperature, 1)
    want = {
        "mean-prob": torch.log(0.5 * p0 + 0.5 * p1),
        "weighted": torch.log(0.25 * p0 + 0.75 * p1),
        "mean-logit": torch.log_softmax((0.5 * z[:, 0] + 0.5 * z[:, 1]) / temperature, 1),
        "t1": torch.log_softmax(z[:, 1] / temperature, 1),
    }
    got = {
        "mean-prob": _logp(trainer(ens["ens"]), batch, temperature),
        "weighted": _logp(trainer(ens["ens"], teacher_weights=(1.0, 3.0)), batch, temperature),
        "mean-logit": _logp(trainer(ens["ens"], ensemble="mean-logit"), batch, temperature),
        "t1": _logp(trainer(ens["ens"], ensemble="t1"), {**batch, "logits": batch["logits"][:, 1:]},
                                                                   temperature),
    }
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
    assert not torch.allclose(got["mean-prob"], got["mean-logit"])
    assert not Path("unused").exists()


def test_topk_only_ensemble_averages_rebuilt_members(ens: dict[str, Path]) -> None:
    tr = trainer(ens["enstopk"], teacher_weights=(1.0, 3.0))
    assert tr.plan.source == "topk"
    b = tr.data.to_memory()
    members = [log_soft_targets_topk(b["topk_values"][:, m], b["topk_indices"][:, m], b["lse"][:, m], 5, 2.0,
                                     "uniform", b["tail"][:, m])
               for m in (0, 1)]
    want = torch.log(0.25 * members[0].exp() + 0.75 * members[1].exp())
    torch.testing.assert_close(_logp(tr, b, 2.0), want, rtol=1e-5, atol=1e-5)


def train(ref: Path, out: Path, *extra: Any) -> Any:
    return cli(["train", "--targets", ref, "--student", "mlp:8-16-5", "--epochs", "1", "--batch-size", "25",
                "--device", "cpu", "--quiet", "--out", out, *extra])


@pytest.mark.parametrize(
    "extra",
    [["--ensemble", "mean-prob"], ["--ensemble", "mean-logit", "-T", "2"], ["--ensemble", "t1"],
     ["--teacher-weights", "1,3"], ["--ensemble", "mean-logit", "--teacher-weights", "1,3"],
     ["--loss", "mse", "--teacher-weights", "1,3"], ["--loss", "topk", "--teacher-weights", "0,1"]],
)
def test_train_on_an_ensemble(data: Data, ens: dict[str, Path], tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "run"
    r = train(ens["ens"], out, *extra, "--eval", data.parquet)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert set(s["teacher"]) == {"t0", "t1"} and s["ensemble"] == Version(ens["ens"]).manifest["statistics"]["ensemble"]
    assert math.isfinite(s["runs"][0]["eval_nll"])


def test_one_member_trains_like_a_store_of_that_teacher_alone(ens: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a, b = tmp_path / "member", tmp_path / "alone"
    assert train(ens["ens"], a, "--ensemble", "t1", "--alpha", "0.5").exit_code == 0
    assert train(ens["t1only"], b, "--alpha", "0.5").exit_code == 0
    wa, wb = (load_file(str(p / "runs" / "kd-T4-a0.5" / "student.safetensors")) for p in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = tmp_path / "mean"
    assert train(ens["ens"], c, "--alpha", "0.5").exit_code == 0
    wc = load_file(str(c / "runs" / "kd-T4-a0.5" / "student.safetensors"))
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize(
    ("store", "extra", "match"),
    [("ens", ["--ensemble", "t5"], r"--ensemble t5: .*ens@v1 has teachers \['t0', 't1'\]"),
     ("ens", ["--ensemble", "median"], r"--ensemble 'median': expected mean-prob, mean-logit or a member id like t0"),
     ("ens", ["--teacher-weights", "1,2,3"], r"--teacher-weights has 3 values for 2 teachers"),
     ("ens", ["--ensemble", "t1", "--teacher-weights", "1,3"], r"--teacher-weights has 2 values for 1 teachers"),
     ("ens", ["--teacher-weights", "1,-1"], r"must be finite and >= 0 with a positive sum"),
     ("ens", ["--teacher-weights", "nan,1"], r"must be finite and >= 0 with a positive sum"),
     ("t1only", ["--teacher-weights", "1,3"], r"--teacher-weights has 2 values for 1 teachers")],
)
def test_ensemble_option_errors(ens: dict[str, Path], tmp_path: Path, store: str, extra: list[str], match: str) -> None:
    out = tmp_path / "run"
    assert_clean_error(train(ens[store], out, *extra), match)
    assert not out.exists()


def test_unparsable_weights_are_a_usage_error(ens: dict[str, Path], tmp_path: Path) -> None:
    r = train(ens["ens"], tmp_path / "run", "--teacher-weights", "1,x")
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    assert "Error: Invalid value for '--teacher-weights': '1,x' is not a comma-separated list of numbers" in r.output
