"""Per-token versions through the command line (#16): label, inspect (--card), verify, ls, convert (smaller k, draws
from the top-k), diff, push; torchrun's RANK/WORLD_SIZE; bad input as one-line errors with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdstore import targets
from kdstore.store import Version
from tests import lm_fixtures as lf
from tests.helpers import assert_clean_error, cli, data_bytes

ARGS = ["--seq-len", "16", "--top-k", "8", "--batch-size", "3", "--shard-rows", "5", "--row-group-rows", "2",
        "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("lm_cli") / "news.txt"
    p.write_text("\n".join(lf.TEXT * 3) + "\n", "utf-8")
    return p


@pytest.fixture(scope="module")
def store(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = tmp_path_factory.mktemp("lm_cli_store")
    r = cli(["label", "--teacher", f"hf:{lf.hf_dir()}", "--transfer", corpus, "--out", s, "--name", "news", *ARGS])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {s}/news/v1  (44 rows x 16 tokens, 696 tokens, vocabulary 512")
    assert "t0: perplexity " in r.output and "top-8 mass" in r.output and "KL@T=1/4/20" in r.output
    return s


def test_inspect_verify_ls(store: Path, tmp_path: Path) -> None:
    r = cli(["inspect", store / "news"])
    assert r.exit_code == 0, r.output
    for text in ("44 rows x 16 tokens", "vocabulary sha256", "teacher perplexity", "per-token entropy (nats)",
                 "top-k mass per token", "fidelity KL", "top-8 per position"):
        assert text in r.output, text
    r = cli(["inspect", store / "news", "--card", "--card-dir", tmp_path / "card"])
    assert r.exit_code == 0, r.output
    assert "perplexity of the stored top-k (uniform tail)" in r.output
    assert sorted(p.name for p in (tmp_path / "card").iterdir()) == ["README.md", "token_entropy.png", "topk_mass.png"]
    r = cli(["inspect", store / "news", "--card", "--card-dir", tmp_path / "card2", "--json"])
    card = json.loads(r.output)["card_statistics"]
    m = Version(store / "news").manifest
    assert card["positions"] == m["statistics"]["target_positions"]
    assert card["mean_entropy_nats"] == pytest.approx(m["statistics"]["teachers"]["t0"]["mean_entropy_nats"])
    r = cli(["verify", store / "news"])
    assert r.exit_code == 0 and r.output.startswith("ok "), r.output
    r = cli(["ls", store])
    assert "per-token top-8" in r.output and "news.txt" in r.output


def test_convert_smaller_k_and_draws_from_the_top_k(store: Path) -> None:
    r = cli(["convert", store / "news@v1", "--top-k", "4", "--name", "news4", "--quiet"])
    assert r.exit_code == 0 and "per-token top-4" in r.output, r.output
    src, small = Version(store / "news@v1"), Version(store / "news4")
    a, b = src.read_all(list(src.columns)), small.read_all(list(small.columns))
    v, i, t = (torch.from_numpy(a[n]).reshape(-1, a[n].shape[-1]) if a[n].ndim == 3 else torch.from_numpy(a[n])
               for n in ("t0_topk_values", "t0_topk_indices", "t0_tail_logmass"))
    kept, idx, tail = targets.truncate_topk(v, i, torch.from_numpy(a["t0_logsumexp"]).reshape(-1), t.reshape(-1), 4)
    assert np.array_equal(b["t0_topk_indices"].reshape(-1, 4), idx.numpy())
    assert np.array_equal(b["t0_topk_values"].reshape(-1, 4), kept.numpy())
    np.testing.assert_allclose(b["t0_tail_logmass"].reshape(-1), tail.numpy(), rtol=1e-6)
    s4 = small.manifest["statistics"]["teachers"]["t0"]
    s8 = src.manifest["statistics"]["teachers"]["t0"]
    assert s4["perplexity"] == s8["perplexity"] and s4["teacher_statistics_from"] == "parent"
    assert s4["topk_mass_mean"] < s8["topk_mass_mean"] and s4["topk_fidelity_kl"] is None

    r = cli(["convert", store / "news@v1", "--top-k", "0", "--sample", "10", "--sample-seed", "3", "--name",
             "drawn", "--to", "hdf5", "--quiet"])
    assert r.exit_code == 0, r.output
    d = Version(store / "drawn")
    assert d.manifest["targets"]["sampled"]["from"] == "top-k rebuild (uniform tail) of the parent"
    assert d.manifest["parent"]["settings"]["sample"] == 10 and d.fmt == "hdf5"
    cols = d.read_all(["t0_sample_ids", "t0_sample_counts", "t0_sample_logprobs"])
    rebuilt = targets.log_soft_targets_topk(v, i, torch.from_numpy(a["t0_logsumexp"]).reshape(-1), 512, 1.0,
                                            "uniform", t.reshape(-1))
    ids, counts, lps = (cols[n].cells() for n in ("t0_sample_ids", "t0_sample_counts", "t0_sample_logprobs"))
    for cell in range(0, 44 * 16, 37):
        assert counts[cell].sum() == 10
        want = rebuilt[cell, torch.from_numpy(ids[cell].astype(np.int64))].to(torch.float16).float().numpy()
        assert np.array_equal(lps[cell], want)
    assert cli(["verify", store / "drawn"]).exit_code == 0


def test_diff_and_push(store: Path, tmp_path: Path) -> None:
    r = cli(["convert", store / "news@v1", "--top-k", "2", "--name", "news2", "--quiet"])
    assert r.exit_code == 0, r.output
    r = cli(["diff", store / "news@v1", store / "news2", "-T", "4"])
    assert r.exit_code == 0, r.output
    assert "top-1 agreement     100.00%" in r.output and "KL(A||B) at T=4   mean" in r.output
    r = cli(["diff", store / "news@v1", store / "news2", "--json"])
    assert json.loads(r.output)["positions"] == Version(store / "news").manifest["statistics"]["target_positions"]
    remote = tmp_path / "remote"
    remote.mkdir()
    r = cli(["push", store / "news@v1", f"file://{remote}"])
    assert r.exit_code == 0, r.output
    assert data_bytes(remote / "news" / "v1") == data_bytes(store / "news" / "v1")
    assert cli(["verify", f"file://{remote}/news"]).exit_code == 0


def test_torchrun_ranks_share_one_version(store: Path, corpus: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["label", "--teacher", f"hf:{lf.hf_dir()}", "--transfer", corpus, "--out", tmp_path, "--name", "news",
            *ARGS]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    r = cli(args)
    assert r.exit_code == 0 and r.output.startswith("shard 1/2 done: 4 of 9 files complete"), r.output
    monkeypatch.setenv("RANK", "0")
    r = cli(args)
    assert r.exit_code == 0 and "5 file(s) from other jobs" not in r.output and "4 file(s) from other jobs" in r.output
    assert data_bytes(tmp_path / "news" / "v1") == data_bytes(store / "news" / "v1")


def _chat(tmp_path: Path, messages: list[dict[str, str]]) -> Path:
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": messages}) + "\n")
    return p


@pytest.mark.parametrize("case", ["context", "empty", "no-assistant", "gguf", "no-tokenizer", "top-k", "mixed",
                                  "two-teachers"])
def test_label_errors_are_one_line(case: str, corpus: Path, tmp_path: Path) -> None:
    teacher, transfer, extra = f"hf:{lf.hf_dir()}", corpus, ["--quiet"]
    match: Any
    if case == "context":
        extra, match = ["--seq-len", "4096"], r"--seq-len 4096: the teacher's context is 128 tokens"
    elif case == "empty":
        transfer = tmp_path / "empty.txt"
        transfer.write_text("\n\n")
        match = r"--transfer .*empty.txt: the corpus is empty"
    elif case == "no-assistant":
        transfer, match = _chat(tmp_path, [{"role": "user", "content": "Hi"}]), r"has no assistant turn"
    elif case == "gguf":
        teacher, match = f"hf:{lf.unsupported_gguf_file()}", r"--teacher .* the installed transformers"
    elif case == "no-tokenizer":
        d = tmp_path / "notok"
        shutil.copytree(lf.hf_dir(), d)
        (d / "tokenizer.json").unlink()
        teacher, match = f"hf:{d}", r"--teacher .*the directory has no tokenizer"
    elif case == "top-k":
        extra, match = ["--top-k", "600"], r"--top-k 600: the teacher's vocabulary has 512 ids; use 1..512"
    elif case == "mixed":
        extra, match = ["--views", "2", "--label-column", "y"], "--label-column, --views: not for a language-model run"
    else:
        extra, match = ["--teacher", f"hf:{lf.hf_dir()}"], "a second --teacher (one language-model teacher"
    out = tmp_path / "store"
    r = cli(["label", "--teacher", teacher, "--transfer", transfer, "--out", out, "--name", "x", *extra])
    if case in ("mixed", "two-teachers"):  # usage errors: exit 2
        assert r.exit_code == 2 and match in r.output, r.output
    else:
        assert_clean_error(r, match)
    assert not out.exists()


def test_classification_runs_refuse_language_model_options(tmp_path: Path) -> None:
    r = cli(["label", "--teacher", "t.pt", "--transfer", "x.parquet", "--out", tmp_path, "--name", "x", "--sample",
             "8", "--gguf-cache"])
    assert r.exit_code == 2 and "--sample, --gguf-cache: not for a classification run" in r.output, r.output


def test_convert_and_diff_errors(store: Path, tmp_path: Path) -> None:
    assert_clean_error(cli(["convert", store / "news@v1", "--top-k", "9", "--name", "x"]),
                       r"--top-k 9: .*news@v1 stores top-8 and no logits; use a smaller k")
    assert_clean_error(cli(["convert", store / "news@v1", "--logits", "--name", "x"]),
                       r"--logits/--no-logits: a per-token version stores no full logits")
    r = cli(["convert", store / "news@v1", "--top-k", "0", "--sample", "4", "--name", "only-draws", "--quiet"])
    assert r.exit_code == 0, r.output
    assert_clean_error(cli(["convert", store / "only-draws", "--sample", "3", "--name", "x"]),
                       r"--sample 3: sampling needs a distribution; .*only-draws@v1 stores only draws")
    assert_clean_error(cli(["diff", store / "news@v1", store / "only-draws"]),
                       r"only-draws@v1 stores only sampled draws; diff compares the distributions of two top-k")
    assert not (store / "x").exists()
