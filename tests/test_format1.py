"""kdstore reads format 1 forever: the format-1 fixtures (tests/fixtures/format1, written by the format-1 code)
open, verify, inspect, diff, train and convert to format 2 with every command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdstore import soft_targets, targets
from kdstore.convert import ConvertConfig, convert
from kdstore.data import open_training_data
from kdstore.store import Version
from tests.helpers import cli

FIXTURES = Path(__file__).parent / "fixtures" / "format1"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A writable copy of the fixture store (convert writes next versions into it)."""
    return Path(shutil.copytree(FIXTURES / "store", tmp_path / "store"))


TRANSFER = FIXTURES / "transfer.parquet"


def test_format1_versions_open_and_verify(store: Path) -> None:
    for name, fmt in (("pq", "parquet"), ("h5", "hdf5")):
        v = Version(store / name)
        assert v.format_version == 1 and v.fmt == fmt and v.num_rows == 40 and not v.has_tail
        assert v.verify(full=True) == []
        r = cli(["verify", store / name])
        assert r.exit_code == 0 and r.output.startswith("ok "), r.output
        r = cli(["inspect", store / name])
        assert r.exit_code == 0 and "top-k fidelity" in r.output, r.output
        r = cli(["inspect", store / name, "--card", "--card-dir", store.parent / f"card-{name}"])
        assert r.exit_code == 0, r.output


def test_format1_bfloat16_bits_are_decoded(store: Path) -> None:
    v = Version(store / "h5")
    raw = v.read_file(0, ["t0_topk_values"], decode=False)["t0_topk_values"]
    assert raw.dtype == np.uint16 and v.columns["t0_topk_values"]["dtype"] == "bfloat16"
    got = v.read_file(0, ["t0_topk_values"])["t0_topk_values"]
    np.testing.assert_array_equal(got, (raw.astype(np.uint32) << 16).view(np.float32))


def test_format1_soft_targets_use_the_format1_tail(store: Path) -> None:
    v = Version(store / "h5")
    block = v.read_file(0, soft_targets.columns_for(v, "t0"))
    got = soft_targets.log_probs(v, block, "t0", 2.0)
    val, idx, lse = (torch.from_numpy(np.ascontiguousarray(block[n])) for n in
                     ("t0_topk_values", "t0_topk_indices", "t0_logsumexp"))
    want = targets.log_soft_targets_topk(val, idx.long(), lse, 5, 2.0, "uniform", None)  # tail derived, clamped
    torch.testing.assert_close(got, want)
    data = open_training_data(store / "h5", need=("topk", "label"), transfer=TRANSFER)
    assert "tail" not in data.to_memory()


@pytest.mark.parametrize(("name", "loss"), [("pq", "kd"), ("pq", "topk"), ("pq", "mse"), ("h5", "kd"), ("h5", "hard")])
def test_format1_trains(store: Path, tmp_path: Path, name: str, loss: str) -> None:
    out = tmp_path / "run"
    r = cli(["train", "--targets", store / name, "--transfer", TRANSFER, "--student", "mlp:8-16-5", "--loss", loss,
             "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--quiet", "--out", out])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(x["train_loss"]) for x in lines)


def test_format1_converts_to_format2(store: Path) -> None:
    res = convert(ConvertConfig(str(store / "pq"), top_k=2))
    v = Version(res.path)
    assert v.format_version == 2 and v.has_tail and v.ref.version == 2
    src = Version(store / "pq@v1")
    assert res.manifest["parent"]["settings"]["source"] == str(src.ref)
    assert res.manifest["parent"]["settings"]["source_format_version"] == 1
    cols = v.read_all(["t0_topk_indices", "t0_tail_logmass", "t0_logsumexp"])
    z = torch.from_numpy(src.read_all(["t0_logits"])["t0_logits"].astype(np.float32))
    lse = torch.from_numpy(cols["t0_logsumexp"])
    # the new top-k is taken from the stored logits; its tail from them too, against the label-time log-sum-exp
    want_idx = targets.top_k(z, 2)[1]
    np.testing.assert_array_equal(cols["t0_topk_indices"], want_idx.numpy())
    np.testing.assert_allclose(cols["t0_tail_logmass"], targets.tail_logmass(z, want_idx, lse).numpy(), rtol=1e-6)
    s = v.manifest["statistics"]["teachers"]["t0"]
    assert s["topk_fidelity_reference"] == "stored logits" and s["topk_fidelity_rows"] == 40

    res = convert(ConvertConfig(str(store / "h5"), to="parquet", name="h5-v2"))  # top-k only, bf16 bits
    v = Version(res.path)
    assert v.format_version == 2 and v.columns["t0_topk_values"] == {
        "name": "t0_topk_values", "role": "topk_values", "teacher": "t0", "dtype": "float32", "shape": [2],
        "precision": "bfloat16"}
    assert v.manifest["statistics"]["teachers"]["t0"]["topk_fidelity_kl"] is None  # no logits to measure against
    r = cli(["diff", store / "h5@v1", res.path, "-T", "2"])
    assert r.exit_code == 0 and "argmax agreement   100.00%  (0 rows differ)" in r.output, r.output
    assert "KL(A||B) at T=2   mean 0 nats" in r.output  # the same tail a format-1 reader derives
