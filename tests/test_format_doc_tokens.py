"""docs/format.md, "Per-token targets": its DuckDB, polars and numpy snippets run against a real per-token version:
one row per token with the values kdstore reads, the recorded top-k mass reproduced in SQL, soft targets from the
page's formula equal to kdstore's at T = 1, 4, 20, and the draws' weights equal to `kdstore.sampling.draw_weights`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdstore import targets
from kdstore.lm_labeling import LMLabelConfig, label_lm
from kdstore.sampling import draw_weights
from kdstore.store import Version
from tests import lm_fixtures as lf
from tests.test_format_doc import run


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("doc_tokens")
    corpus = root / "news.txt"
    corpus.write_text("\n".join(lf.TEXT) + "\n")
    cfg = LMLabelConfig(teacher=f"hf:{lf.hf_dir()}", transfer=str(corpus), out=str(root / "targets"), name="news",
                        seq_len=16, top_k=6, sample=10, shard_rows=6, row_group_rows=4, batch_size=4)
    path = label_lm(cfg).path
    assert path is not None
    return path


def test_duckdb_gives_one_row_per_token(version: Path) -> None:
    ns = run("tokens-duckdb", version)
    v = Version(version)
    want = v.read_all(list(v.columns))
    df = ns["tokens"].df().sort_values(["seq", "pos"])
    rows, seq_len = want["input_ids"].shape
    assert len(df) == rows * seq_len and df["pos"].max() == seq_len - 1
    assert np.array_equal(df["token"].to_numpy(), want["input_ids"].reshape(-1))
    assert np.array_equal(np.stack(df["topk_ids"].to_numpy()), want["t0_topk_indices"].reshape(rows * seq_len, -1))
    assert np.array_equal(np.stack(df["topk_logits"].to_numpy()), want["t0_topk_values"].reshape(rows * seq_len, -1))
    cells = want["t0_sample_ids"].cells()
    assert all(np.array_equal(a, b) for a, b in zip(df["draw_ids"], cells, strict=True))
    assert ns["mass"] == pytest.approx(v.manifest["statistics"]["teachers"]["t0"]["topk_mass_mean"], rel=1e-6)


def test_polars_explodes_positions(version: Path) -> None:
    tokens = run("tokens-polars", version)["tokens"].sort(["sample_id", "pos"])
    v = Version(version)
    want = v.read_all(["input_ids", "t0_topk_values", "t0_sample_counts"])
    rows, seq_len = want["input_ids"].shape
    assert tokens.height == rows * seq_len
    assert np.array_equal(tokens["input_ids"].to_numpy(), want["input_ids"].reshape(-1))
    assert np.array_equal(tokens["t0_topk_values"].to_numpy(), want["t0_topk_values"].reshape(rows * seq_len, -1))
    assert [list(x) for x in tokens["t0_sample_counts"].to_list()[:20]] == \
        [c.tolist() for c in want["t0_sample_counts"].cells()[:20]]


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_numpy_soft_targets_and_draw_weights_equal_kdstores(version: Path, temperature: float) -> None:
    ns = run("tokens-numpy", version)
    v = Version(version)
    cols = v.read_all(["t0_topk_values", "t0_topk_indices", "t0_logsumexp", "t0_tail_logmass", "t0_sample_counts",
                       "t0_sample_logprobs"])
    k = cols["t0_topk_values"].shape[-1]
    want = targets.log_soft_targets_topk(torch.from_numpy(cols["t0_topk_values"].reshape(-1, k)),
                                         torch.from_numpy(cols["t0_topk_indices"].reshape(-1, k)),
                                         torch.from_numpy(cols["t0_logsumexp"].reshape(-1)), v.num_classes,
                                         temperature, "uniform",
                                         torch.from_numpy(cols["t0_tail_logmass"].reshape(-1))).exp().double().numpy()
    np.testing.assert_allclose(ns["soft_targets"](temperature), want, rtol=0, atol=1e-6)
    seq_len = v.manifest["targets"]["seq_len"]
    counts, lps = cols["t0_sample_counts"].cells(), cols["t0_sample_logprobs"].cells()
    for row, pos in ((0, 0), (3, 7), (5, 15)):
        cell = row * seq_len + pos
        _, got = ns["draw_weights"](row, pos, temperature)
        w = draw_weights(torch.from_numpy(counts[cell][None].astype(np.int64)), torch.from_numpy(lps[cell][None]),
                         temperature)
        np.testing.assert_allclose(got, w[0].numpy(), rtol=1e-5)
