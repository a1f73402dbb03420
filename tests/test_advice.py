"""Advice from the data (kdstore.advice): the measured informativeness per temperature, the rule, and where it is
shown (`kdstore label`'s summary, `kdstore inspect`, the dataset card)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kdstore.advice import (
    DEFAULT_T,
    ONE_HOT_P2,
    SAMPLE_ROWS,
    TEMPERATURES,
    UNIFORM_ENTROPY,
    WEAK_ACCURACY,
    advise,
    sample_ranges,
)
from kdstore.store import Version
from tests import fixtures_models as fm
from tests.conftest import Data
from tests.helpers import SMALL_ARGS, cli, run_label


def scaled_teacher(tmp: Path, scale: float) -> str:
    """The tiny teacher with its logits multiplied by `scale` (last layer scaled): same ranking, other confidence."""
    # the nn.Sequential's keys 0.* / 2.* as the built-in MLP's layers.0.* / layers.1.*
    state = {f"layers.{k.replace('2.', '1.', 1) if k.startswith('2.') else k}": v.clone()
             for k, v in fm.tiny_teacher().state_dict().items()}
    state["layers.1.weight"] *= scale
    state["layers.1.bias"] *= scale
    path = tmp / f"scaled{scale:g}.safetensors"
    save_file(state, str(path))
    return f"mlp:8-16-5@{path}"


@pytest.fixture(scope="module")
def versions(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Version]:
    root = tmp_path_factory.mktemp("advice")
    return {name: Version(run_label(scaled_teacher(root, s), data.parquet, root / "store", name).path)
            for name, s in (("sure", 300.0), ("flat", 0.02), ("plain", 1.0))}


def test_sample_is_bounded_and_spread_over_the_version() -> None:
    assert sample_ranges(100) == [(0, 100)]
    r = sample_ranges(1_000_000)
    assert sum(b - a for a, b in r) <= SAMPLE_ROWS and r[0][0] == 0 and r[-1][1] == 1_000_000
    assert all(a1 >= b0 for (_, b0), (a1, _) in zip(r, r[1:], strict=False))  # disjoint, in order


def test_measured_values_match_an_independent_computation(versions: dict[str, Version]) -> None:
    v = versions["plain"]
    a = advise(v)[0]
    z = v.read_all([v.column_for("logits", "t0") or ""])["t0_logits"].astype(np.float64)
    assert a.rows == 100 and [r.temperature for r in a.plain] == list(TEMPERATURES)
    for t in TEMPERATURES:
        p = np.exp(z / t - np.log(np.exp(z / t).sum(1, keepdims=True)))
        ps = np.sort(p, axis=1)
        got = a.at(t)
        assert got.entropy == pytest.approx(float(-(p * np.log(p)).sum(1).mean()), rel=1e-4)
        assert got.max_prob == pytest.approx(float(ps[:, -1].mean()), rel=1e-5)
        assert got.second_prob == pytest.approx(float(ps[:, -2].mean()), rel=1e-4)
        zs = (z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True)
        q = np.exp(zs / t) / np.exp(zs / t).sum(1, keepdims=True)
        assert a.at(t, standardized=True).max_prob == pytest.approx(float(q.max(1).mean()), rel=1e-4)
    y = v.read_all(["label"])["label"]
    assert a.accuracy == pytest.approx(float((z.argmax(1) == y).mean()))


def test_a_teacher_sure_of_itself_is_told_to_standardise(versions: dict[str, Version]) -> None:
    a = advise(versions["sure"])[0]
    assert a.at(DEFAULT_T).second_prob < ONE_HOT_P2 and a.verdict == "near one-hot"
    assert "near one-hot" in a.words[0] and "standardise instead: --standardize -T 0.5,1,2 --alpha 1" in a.words[1]
    assert ("--loss hard,kd --standardize on -T 0.5,1,2 --alpha 1 --val-fraction 0.1 --seed 0,1,2"
            in a.command("S/ds@v1", labeled=True))
    # standardised targets do not depend on the logit scale: the same as the unscaled teacher's
    plain = advise(Version(versions["plain"].path))[0]
    assert a.at(1.0, standardized=True).entropy == pytest.approx(plain.at(1.0, standardized=True).entropy, rel=1e-3)


def test_a_flat_teacher_is_told_to_lower_the_temperature(versions: dict[str, Version]) -> None:
    a = advise(versions["flat"])[0]
    assert a.at(DEFAULT_T).entropy > UNIFORM_ENTROPY * math.log(5)
    assert a.verdict == "near uniform" and "near uniform" in a.words[0] and "lower temperature" in a.words[1]


def test_a_weak_teacher_is_called_weak(versions: dict[str, Version]) -> None:
    # the tiny teacher is right on 70% of its transfer rows (the labels of the fixture flip 30%)
    a = advise(versions["plain"])[0]
    assert a.accuracy is not None and a.accuracy < WEAK_ACCURACY
    assert any(w.startswith(f"The teacher is right on only {100 * a.accuracy:.2f}%") for w in a.words)
    assert a.words[-1] == "Keep the hard-label run in the sweep and let the validation split choose."


def test_an_unlabeled_version_gets_a_command_without_labels(data: Data, tmp_path: Path) -> None:
    v = Version(run_label(data.teacher_pt, data.parquet, tmp_path / "store", "unl", label_column="none").path)
    a = advise(v)[0]
    assert a.accuracy is None and not any("right on" in w for w in a.words)
    cmd = a.command(str(v.ref), labeled=False)
    assert "--loss kd --standardize on" in cmd and "--val LABELED.parquet" in cmd and "hard" not in cmd


def test_label_summary_ends_with_the_advice(data: Data, tmp_path: Path) -> None:
    r = cli(["label", "--teacher", scaled_teacher(tmp_path, 300.0), "--transfer", data.parquet, "--out",
             tmp_path / "store", "--name", "ds", "--top-k", "3", *SMALL_ARGS])
    assert r.exit_code == 0, r.output
    out = r.output
    assert "soft targets of t0 per temperature (100 sampled rows" in out and "<- default T" in out
    assert "  At the default T = 4 (mean entropy " in out and "the soft targets are near one-hot" in out
    assert f"try: kdstore train --targets {tmp_path / 'store' / 'ds'}@v1 --student SPEC --loss hard,kd" in out


def test_inspect_shows_the_advice_and_the_card_holds_it(versions: dict[str, Version], tmp_path: Path) -> None:
    v = versions["flat"]
    r = cli(["inspect", str(v.path.parent)])
    assert r.exit_code == 0, r.output
    assert "the soft targets are near uniform" in r.output and f"--targets {v.path.parent}@v1" in r.output
    js = json.loads(cli(["inspect", str(v.path.parent), "--json"]).output)
    assert js["advice"][0]["verdict"] == "near uniform" and len(js["advice"][0]["plain"]) == len(TEMPERATURES)
    r = cli(["inspect", str(v.path.parent), "--card", "--card-dir", str(tmp_path / "card")])
    assert r.exit_code == 0, r.output
    readme = (tmp_path / "card" / "README.md").read_text()
    assert "## Soft targets per temperature" in readme and "**t0** (100 rows): near uniform." in readme
    assert "| **4** (default) |" in readme


def test_advice_reads_top_k_only_versions(data: Data, tmp_path: Path) -> None:
    v = Version(run_label(data.teacher_pt, data.parquet, tmp_path / "store", "k", top_k=3, keep_logits=False).path)
    a = advise(v)[0]
    assert all(torch.isfinite(torch.tensor([r.entropy, r.max_prob, r.second_prob])).all()
               for r in a.plain + a.standardized)
