"""`kdstore diff`: agreement, KL and per-class shifts against a direct computation; transfer-set checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdstore.compare import diff
from kdstore.errors import ConfigError, ShapeMismatchError
from tests.conftest import Data, teacher_logits
from tests.helpers import assert_clean_error, cli, run_label


@pytest.fixture(scope="module")
def pair(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two teachers (seed 0 and seed 1) labeled separately on the same transfer set, fp32 logits; plus others."""
    store = tmp_path_factory.mktemp("diff_store")
    return {
        "a": run_label(data.teacher_pt, data.parquet, store, "a", logits_dtype="float32").path,
        "b": run_label(data.factory_spec, data.parquet, store, "b", logits_dtype="float32").path,
        "b_drop": run_label(data.factory_spec, data.parquet, store, "bd", keep_logits=False, top_k=2, tail="drop").path,
        "ens": run_label([str(data.teacher_pt), data.factory_spec], data.npy, store, "ens",
                         logits_dtype="float32").path,
        "other": run_label(data.teacher_pt, data.npz, store, "other").path,
    }


def test_diff_matches_a_direct_computation(data: Data, pair: dict[str, Path]) -> None:
    t = 2.0
    r = diff(pair["a"], pair["b"], temperature=t)
    za, zb = teacher_logits(data.x, 0), teacher_logits(data.x, 1)
    pa, pb = torch.log_softmax(za / t, 1), torch.log_softmax(zb / t, 1)
    kl = (pa.exp() * (pa - pb)).sum(1).double().numpy()
    arg_a, arg_b = za.argmax(1).numpy(), zb.argmax(1).numpy()
    assert r.rows == 100 and r.num_classes == 5 and (r.teacher_a, r.teacher_b) == ("t0", "t0")
    assert r.agreement == pytest.approx((arg_a == arg_b).mean())
    assert r.disagreeing_rows == int((arg_a != arg_b).sum()) > 0
    assert r.kl_mean == pytest.approx(kl.mean(), rel=1e-4) and r.kl_max == pytest.approx(kl.max(), rel=1e-4)
    assert (r.accuracy_a == pytest.approx((arg_a == data.y).mean())
            and r.accuracy_b == pytest.approx((arg_b == data.y).mean()))
    assert r.grouped_by == "label"
    for c, d in enumerate(r.per_class):
        rows = data.y == c
        assert d.rows == rows.sum()
        assert d.agreement == pytest.approx((arg_a[rows] == arg_b[rows]).mean())
        assert d.mean_prob_a == pytest.approx(float(pa.exp()[:, c].mean()), rel=1e-5)
        assert d.shift == pytest.approx(float((pb.exp() - pa.exp())[:, c].mean()), abs=1e-6)


def test_diff_of_a_version_with_itself(pair: dict[str, Path]) -> None:
    r = diff(pair["a"], pair["a"], temperature=4.0)
    assert r.agreement == 1.0 and r.kl_mean == pytest.approx(0.0, abs=1e-7) and r.disagreeing_rows == 0
    assert all(abs(d.shift) < 1e-9 for d in r.per_class)


def test_diff_two_teachers_of_one_version_unlabeled(pair: dict[str, Path], data: Data) -> None:
    r = diff(pair["ens"], pair["ens"], teacher_a="t0", teacher_b="t1")
    arg_a, arg_b = teacher_logits(data.x, 0).argmax(1).numpy(), teacher_logits(data.x, 1).argmax(1).numpy()
    assert r.agreement == pytest.approx((arg_a == arg_b).mean())
    assert r.grouped_by == "argmax of A" and r.accuracy_a is None
    assert [d.rows for d in r.per_class] == np.bincount(arg_a, minlength=5).tolist()
    with pytest.raises(ConfigError, match=r"teacher_b t7: .* has teachers t0, t1"):
        diff(pair["ens"], pair["ens"], teacher_b="t7")


def test_diff_against_a_drop_tail_top_k_is_infinite(pair: dict[str, Path]) -> None:
    r = diff(pair["b"], pair["b_drop"])
    assert r.kl_mean is None and r.kl_infinite_rows == 100 and r.agreement == 1.0
    out = cli(["diff", pair["b"], pair["b_drop"]]).output
    assert "inf on 100 rows" in out
    back = diff(pair["b_drop"], pair["b"])  # A = drop tail gives 0 outside its top-2: finite
    assert back.kl_mean is not None and back.kl_mean >= 0


def test_diff_cli_text_and_json(pair: dict[str, Path]) -> None:
    a, b = f"{pair['a'].parent}@v1", f"{pair['b'].parent}@v1"
    r = cli(["diff", a, b, "-T", "2"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == f"A: {a} (t0)" and lines[1] == f"B: {b} (t0)"
    assert lines[2].startswith("transfer set transfer.parquet (sha256 ") and lines[2].endswith("100 rows, 5 classes")
    assert lines[4].startswith("argmax agreement ") and "KL(A||B) at T=2   mean " in r.output
    assert "per class (rows grouped by label; mean probabilities at T=2):" in r.output
    assert len([ln for ln in lines if ln[:1].isdigit()]) == 5
    j = json.loads(cli(["diff", a, b, "-T", "2", "--json"]).output)
    ref = diff(pair["a"], pair["b"], temperature=2.0)
    assert j["agreement"] == ref.agreement and j["kl_mean"] == pytest.approx(ref.kl_mean)
    assert len(j["per_class"]) == 5 and set(j["per_class"][0]) == {"cls", "name", "rows", "agreement", "mean_prob_a",
                                                                   "mean_prob_b", "shift"}


def test_diff_refuses_different_transfer_sets(pair: dict[str, Path]) -> None:
    with pytest.raises(ShapeMismatchError, match=r"labeled on transfer.parquet \(sha256 .*\) but .* on transfer.npz"):
        diff(pair["a"], pair["other"])
    line = assert_clean_error(cli(["diff", pair["a"], pair["other"]]), r"must come from the same transfer set")
    assert "sha256" in line
    assert_clean_error(cli(["diff", pair["a"], pair["b"], "-T", "0"]), r"--temperature 0.0: must be a finite number > "
                                                                       r"0")
    assert_clean_error(cli(["diff", pair["a"], f"{pair['b'].parent}@v3"]), r"version v3 not found")
