"""Per-token labeling (#16): the columns and manifest, every stored value against the teacher's own logits, the
statistics by their definitions, chat masks, a 200,000-id vocabulary, HDF5 = Parquet, resume after SIGKILL and a
2-job --shard run byte-identical to one run, and bad input as one-line errors with nothing written."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdstore import targets, versioning
from kdstore.errors import ConfigError, InputError, TeacherError
from kdstore.lm_labeling import LMLabelConfig, label_lm
from kdstore.lm_teachers import load_lm_teacher
from kdstore.sampling import sample_tokens
from kdstore.store import Version
from kdstore.store.ragged import Ragged
from kdstore.text import tokenize_corpus
from kdstore.token_targets import positions_per_chunk
from tests import lm_fixtures as lf
from tests.helpers import REPO_ROOT, data_bytes, subprocess_env

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And the team?"}, {"role": "assistant", "content": "They won the match."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Hello, how can I help?"}],
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lf.write_corpus(tmp_path_factory.mktemp("lm_corpus"))


def config(corpus: Path, out: Path, name: str = "lm", **kw: Any) -> LMLabelConfig:
    """44 rows of 16 tokens, 9 shards of 5 rows, batches of 3, row groups of 2."""
    opts: dict[str, Any] = {"seq_len": 16, "top_k": 8, "sample": 12, "batch_size": 3, "shard_rows": 5,
                            "row_group_rows": 2, **kw}
    return LMLabelConfig(teacher=f"hf:{lf.hf_dir()}", transfer=str(corpus), out=str(out), name=name, **opts)


@pytest.fixture(scope="module")
def labeled(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = label_lm(config(corpus, tmp_path_factory.mktemp("lm_store"))).path
    assert path is not None
    return path


def test_columns_and_manifest(labeled: Path) -> None:
    v = Version(labeled)
    m = v.manifest
    tok = lf.tokenizer()
    assert m["targets"]["kind"] == "tokens" and m["targets"]["seq_len"] == 16 and m["num_classes"] == 512
    assert m["targets"]["top_k"]["k"] == 8 and m["targets"]["sampled"]["draws"] == 12
    assert m["targets"]["logits"] is None and m["targets"]["positions"] == "next-token"
    t = m["teachers"][0]
    assert t["kind"] == "hf" and t["vocab_size"] == 512 and t["tokenizer"]["size"] == len(tok)
    assert t["tokenizer"]["chat_template"]["present"] and t["tokenizer"]["special_tokens"]["eos"]["id"] == 2
    ts = m["transfer_set"]
    assert (ts["source"], ts["format"], ts["documents"], ts["packing"]["policy"]) == ("text", "txt", 30, "concat")
    assert m["num_rows"] == ts["rows"] == 44 and [f["rows"] for f in m["files"]] == [5] * 8 + [4]
    cols = v.read_all(list(v.columns))
    shapes = {n: (type(a).__name__, str(a.dtype), tuple(a.shape)) for n, a in cols.items()}
    assert shapes == {
        "sample_id": ("ndarray", "int64", (44,)), "input_ids": ("ndarray", "int32", (44, 16)),
        "attention_mask": ("ndarray", "int8", (44, 16)), "loss_mask": ("ndarray", "int8", (44, 16)),
        "target_mask": ("ndarray", "int8", (44, 16)), "t0_topk_indices": ("ndarray", "int16", (44, 16, 8)),
        "t0_topk_values": ("ndarray", "float32", (44, 16, 8)), "t0_logsumexp": ("ndarray", "float32", (44, 16)),
        "t0_tail_logmass": ("ndarray", "float32", (44, 16)), "t0_sample_ids": ("Ragged", "int32", (44, 16)),
        "t0_sample_counts": ("Ragged", "int16", (44, 16)), "t0_sample_logprobs": ("Ragged", "float32", (44, 16))}
    assert np.array_equal(cols["sample_id"], np.arange(44))
    counts = cols["t0_sample_counts"]
    assert np.array_equal(np.add.reduceat(counts.values, counts.offsets()[:-1]), np.full(44 * 16, 12))


def _reference(corpus: Path) -> dict[str, Any]:
    """The labeler's computation redone from the public pieces: the teacher over the same batches of 3 rows."""
    teacher = load_lm_teacher(f"hf:{lf.hf_dir()}")
    c = tokenize_corpus(corpus, teacher.tokenizer, seq_len=16, max_context=teacher.max_context)
    step = positions_per_chunk(3, teacher.vocab_size)
    zs, draws = [], []
    for first in range(0, c.rows, 5):  # shards of 5 rows, batches of 3 restarting at every shard
        for a in range(first, min(first + 5, c.rows), 3):
            b = min(a + 3, first + 5, c.rows)
            chunks = list(teacher.iter_logits(torch.from_numpy(c.input_ids[a:b]).long(), positions_per_chunk=step))
            zs.append(torch.cat([z for _, z in chunks], 1))
            draws += [(a, s, sample_tokens(z, seed=0, rows=list(range(a, b)), start=s, draws=12)) for s, z in chunks]
    return {"corpus": c, "z": torch.cat(zs), "draws": draws}


def test_stored_values_are_the_teachers(labeled: Path, corpus: Path) -> None:
    ref = _reference(corpus)
    z = ref["z"]  # (44, 16, V) exact float32 logits
    v = Version(labeled)
    cols = v.read_all(list(v.columns))
    c = ref["corpus"]
    assert np.array_equal(cols["input_ids"], c.input_ids) and np.array_equal(cols["target_mask"], c.target_mask())
    flat = z.reshape(-1, z.shape[-1])
    vals, idx = targets.top_k(flat, 8)
    assert np.array_equal(cols["t0_topk_indices"].reshape(-1, 8), idx.numpy())
    assert np.array_equal(cols["t0_topk_values"].reshape(-1, 8), versioning.as_stored(vals, "float16").numpy())
    lse = torch.logsumexp(flat, 1)
    np.testing.assert_allclose(cols["t0_logsumexp"].reshape(-1), lse.numpy(), rtol=1e-6)
    np.testing.assert_allclose(cols["t0_tail_logmass"].reshape(-1), targets.tail_logmass(flat, idx, lse).numpy(),
                               rtol=0, atol=2e-6)  # log(1 - ~0.02): float32 rounding of a log near 0
    ids, counts, lps = (cols[f"t0_sample_{n}"].cells() for n in ("ids", "counts", "logprobs"))
    for first, start, d in ref["draws"]:  # a chunk of positions of a batch of rows: position by position
        off = d.offsets().numpy()
        for i, (r, j) in enumerate(np.ndindex(*d.num_unique.shape)):
            cell = (first + r) * 16 + start + j
            assert np.array_equal(ids[cell], d.ids[off[i]:off[i + 1]].numpy())
            assert np.array_equal(counts[cell], d.counts[off[i]:off[i + 1]].numpy())
            assert np.array_equal(lps[cell], versioning.as_stored(d.logprobs[off[i]:off[i + 1]], "float16").numpy())


def test_statistics_by_their_definitions(labeled: Path, corpus: Path) -> None:
    ref = _reference(corpus)
    z, c = ref["z"].double(), ref["corpus"]
    st = Version(labeled).manifest["statistics"]
    s = st["teachers"]["t0"]
    mask = c.target_mask() == 1
    nxt = np.full(c.input_ids.shape, -1)
    nxt[:, :-1] = np.where(c.attention_mask[:, 1:] == 1, c.input_ids[:, 1:], -1)
    sel = mask & (nxt >= 0)
    logp = torch.log_softmax(z, -1).numpy()
    nll = -logp[sel, nxt[sel]]
    assert st["tokens"] == c.tokens and st["target_positions"] == mask.sum() and s["next_token_positions"] == len(nll)
    assert s["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    assert s["accuracy"] == pytest.approx((logp[sel].argmax(1) == nxt[sel]).mean())
    cols = Version(labeled).read_all(["t0_tail_logmass", "t0_topk_values", "t0_logsumexp"])
    assert s["topk_mass_mean"] == pytest.approx((-np.expm1(cols["t0_tail_logmass"][mask].astype(np.float64))).mean())
    v, lse, tail = (torch.from_numpy(cols[n][mask]) for n in ("t0_topk_values", "t0_logsumexp", "t0_tail_logmass"))
    h = targets.topk_entropy(v, lse, tail, 512)
    assert s["mean_entropy_nats"] == pytest.approx(float(h.double().mean()), rel=1e-6)
    assert sum(s["entropy_histogram"]["counts"]) == mask.sum() == sum(s["topk_mass_histogram"]["counts"])
    assert s["topk_fidelity_rows"] == (mask.reshape(-1) & (np.arange(mask.size) % st["fidelity_stride"] == 0)).sum()
    assert s["topk_fidelity_kl"]["1.0"] > 0 and s["sampled_unique_mean"] > 1


def test_chat_targets_are_the_assistants_tokens(tmp_path: Path) -> None:
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps({"messages": m}) for m in CHATS) + "\n")
    path = label_lm(config(p, tmp_path / "s", seq_len=96, sample=None)).path
    v = Version(path)  # type: ignore[arg-type]
    cols = v.read_all(["loss_mask", "target_mask", "attention_mask"])
    assert v.manifest["transfer_set"]["source"] == "chat" and v.manifest["transfer_set"]["packing"]["policy"] == \
        "document"
    assert np.array_equal(cols["target_mask"][:, :-1], cols["loss_mask"][:, 1:])
    assert cols["target_mask"][:, -1].sum() == 0
    st = v.manifest["statistics"]
    assert st["target_positions"] == cols["target_mask"].sum() == st["teachers"]["t0"]["next_token_positions"]
    assert 0 < st["target_positions"] < cols["attention_mask"].sum()


def test_a_200k_vocabulary(tmp_path: Path) -> None:
    p = tmp_path / "two.txt"
    p.write_text("\n".join(lf.TEXT[:2]) + "\n")
    cfg = LMLabelConfig(teacher="tests.lm_fixtures:llama_200k", transfer=str(p), out=str(tmp_path / "s"), name="big",
                        seq_len=8, top_k=16, sample=8, batch_size=2, shard_rows=2, row_group_rows=1)
    v = Version(label_lm(cfg).path)  # type: ignore[arg-type]
    assert v.manifest["num_classes"] == 200_000 and v.columns["t0_topk_indices"]["dtype"] == "int32"
    assert v.manifest["labeling"]["positions_per_chunk"] == positions_per_chunk(2, 200_000) == 41
    cols = v.read_all(["t0_topk_indices", "t0_topk_values", "t0_sample_ids"])
    assert cols["t0_topk_indices"].max() < 200_000 and np.isfinite(cols["t0_topk_values"]).all()
    assert cols["t0_sample_ids"].values.max() < 200_000
    assert v.manifest["statistics"]["fidelity_stride"] == 3125  # ceil(200,000 / 64)


def test_hdf5_holds_what_parquet_holds(labeled: Path, corpus: Path, tmp_path: Path) -> None:
    h5 = Version(label_lm(config(corpus, tmp_path, format="hdf5")).path)  # type: ignore[arg-type]
    pq = Version(labeled)
    a, b = pq.read_all(list(pq.columns)), h5.read_all(list(h5.columns))
    for n in a:
        x, y = a[n], b[n]
        if isinstance(x, Ragged):
            assert np.array_equal(x.values, y.values) and np.array_equal(x.lengths, y.lengths), n
        else:
            assert np.array_equal(x, y), n
    assert h5.manifest["statistics"] == pq.manifest["statistics"]


_CHILD = textwrap.dedent("""
    import os, signal, sys
    from kdstore.lm_labeling import LMLabelConfig, label_lm
    teacher, transfer, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    done = [0]
    def progress(n):
        done[0] += n
        if done[0] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    label_lm(LMLabelConfig(teacher=teacher, transfer=transfer, out=out, name="lm", seq_len=16, top_k=8, sample=12,
                           batch_size=3, shard_rows=5, row_group_rows=2), progress=progress)
""")


def test_resume_after_sigkill_is_byte_identical(labeled: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, "-c", _CHILD, f"hf:{lf.hf_dir()}", str(corpus), str(out), "41"],
                       env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr
    # a shard is complete once its sidecar is written (after the shard file: a kill between the two leaves a shard
    # that the resumed run labels again), so count sidecars, not shard files
    staged = list((out / "lm").glob(".staging-*/data/part-*.json"))
    # killed in the last shard; the writer thread lets at most two finished shards wait, so >= 5 are on disk
    assert 5 <= len(staged) < 9 and not (out / "lm" / "v1").exists()
    res = label_lm(config(corpus, out))
    assert res.resumed_shards == len(staged)
    assert data_bytes(res.path) == data_bytes(labeled)  # type: ignore[arg-type]
    assert res.manifest["statistics"] == Version(labeled).manifest["statistics"]


def test_two_shard_jobs_equal_one_run(labeled: Path, corpus: Path, tmp_path: Path) -> None:
    first = label_lm(config(corpus, tmp_path, shard_index=0, num_shards=2))
    assert first.path is None and first.manifest == {"shards_total": 9, "shards_done": 5}
    second = label_lm(config(corpus, tmp_path, shard_index=1, num_shards=2))
    assert second.path is not None and second.manifest["labeling"]["world_size"] == 2
    assert data_bytes(second.path) == data_bytes(labeled)
    assert second.manifest["statistics"] == Version(labeled).manifest["statistics"]


def test_top_k_only_and_sampled_only(corpus: Path, tmp_path: Path) -> None:
    top = Version(label_lm(config(corpus, tmp_path, "top", sample=None)).path)  # type: ignore[arg-type]
    assert not any(n.startswith("t0_sample") for n in top.columns) and top.manifest["targets"]["sampled"] is None
    smp = Version(label_lm(config(corpus, tmp_path, "smp", top_k=None, sample_logprobs=False)).path)  # type: ignore
    assert [n for n in smp.columns if n.startswith("t0")] == ["t0_sample_ids", "t0_sample_counts"]
    tg = smp.manifest["targets"]
    assert tg["top_k"] is None and tg["logsumexp"] is None and tg["sampled"]["logprobs_dtype"] is None
    s = smp.manifest["statistics"]["teachers"]["t0"]
    assert s["entropy_source"] == "sampled estimate" and "topk_mass_mean" not in s and s["perplexity"] > 1


def _without_tokenizer(tmp_path: Path) -> Path:
    d = tmp_path / "notok"
    shutil.copytree(lf.hf_dir(), d)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    return d


def _long_chat(tmp_path: Path) -> Path:
    p = tmp_path / "long.jsonl"
    text = " ".join(lf.TEXT)
    p.write_text(json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant",
                                                                              "content": text}]}) + "\n")
    return p


@pytest.mark.parametrize("case", ["context", "long-chat", "empty", "no-assistant", "gguf", "no-tokenizer", "top-k"])
def test_bad_input_is_one_error_and_nothing_is_written(case: str, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    cfg = config(corpus, out)
    err: type[Exception]
    if case == "context":
        cfg, err, match = replace(cfg, seq_len=200), ConfigError, r"seq_len 200: the teacher's context is 128 tokens"
    elif case == "long-chat":
        cfg = replace(cfg, transfer=str(_long_chat(tmp_path)), seq_len=128)
        err, match = InputError, r"long.jsonl line 1: \d+ tokens, longer than the teacher's context \(128\)"
    elif case == "empty":
        (tmp_path / "e.txt").write_text("\n  \n\n")
        cfg, err, match = replace(cfg, transfer=str(tmp_path / "e.txt")), InputError, r"e.txt: the corpus is empty"
    elif case == "no-assistant":
        p = tmp_path / "u.jsonl"
        p.write_text(json.dumps({"messages": [{"role": "user", "content": "Hello!"}]}) + "\n")
        cfg, err, match = replace(cfg, transfer=str(p)), InputError, r"u.jsonl line 1: .*no assistant turn"
    elif case == "gguf":
        cfg = replace(cfg, teacher=f"hf:{lf.unsupported_gguf_file()}")
        err, match = TeacherError, r"the installed transformers .* cannot read it"
    elif case == "no-tokenizer":
        cfg = replace(cfg, teacher=f"hf:{_without_tokenizer(tmp_path)}")
        err, match = TeacherError, r"the directory has no tokenizer"
    else:
        cfg, err, match = replace(cfg, top_k=1000), ConfigError, r"top_k 1000: the teacher's vocabulary has 512 ids"
    with pytest.raises(err, match=match) as info:
        label_lm(cfg)
    assert "\n" not in str(info.value) and not out.exists()


def test_config_lists_every_problem(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"top_k -2: must be in 1..1024, or the vocabulary size.*sample 0: draws.*"
                                          r"logits_dtype 'int8'.*batch_size 0.*device 'cuda'"):
        config(corpus, tmp_path, top_k=-2, sample=0, logits_dtype="int8", batch_size=0, device="cuda")
    with pytest.raises(ConfigError, match=r"nothing to store: no top-k \(top_k 0\) and no sampled targets"):
        config(corpus, tmp_path, top_k=None, sample=None)


def test_top_k_of_the_whole_vocabulary_is_the_full_reference(corpus: Path, tmp_path: Path) -> None:
    """--top-k V (beyond the 1,024 limit only for V itself) stores every token's logit: the rebuilt distribution is
    the teacher's softmax exactly (up to float16 values), its tail empty; any other k above 1,024, and a shard too
    large to hold in memory, are refused before anything is written."""
    from kdstore.lm_losses import topk_teacher_logprobs

    teacher = "tests.lm_fixtures:bigram_2000"

    def full(**kw: Any) -> LMLabelConfig:
        return replace(config(corpus, tmp_path / "s", sample=None), teacher=teacher, **kw)

    res = label_lm(full(top_k=2000))
    v = Version(res.path)
    cols = v.read_all(["input_ids", "t0_topk_values", "t0_topk_indices", "t0_logsumexp", "t0_tail_logmass"])
    assert cols["t0_topk_values"].shape[-1] == 2000 and np.isneginf(cols["t0_tail_logmass"]).all()
    ids = np.sort(cols["t0_topk_indices"], axis=-1)
    assert (ids == np.arange(2000)).all()  # every id once per position
    model, _ = lf.bigram_2000()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.from_numpy(cols["input_ids"][:2].astype(np.int64))), -1)
    vals = torch.from_numpy(cols["t0_topk_values"][:2].reshape(-1, 2000))
    logq, logq_tail = topk_teacher_logprobs(vals, torch.from_numpy(cols["t0_logsumexp"][:2].reshape(-1)),
                                            torch.from_numpy(cols["t0_tail_logmass"][:2].reshape(-1)), 2000)
    dense = torch.full_like(logq, float("nan")).scatter(
        1, torch.from_numpy(cols["t0_topk_indices"][:2].reshape(-1, 2000).astype(np.int64)), logq)
    assert torch.isneginf(logq_tail).all()
    torch.testing.assert_close(dense, ref.reshape(-1, 2000), atol=2e-2, rtol=0)  # float16 values of logits ~ 10
    from kdstore.lm_training import LMTrainConfig, LMTrainer

    run = LMTrainer(LMTrainConfig(targets=str(res.path), student="gpt:1-16-2", out=str(tmp_path / "run"),
                                  losses=("topk",), epochs=1, batch_size=8, device="cpu")).run()[0]
    assert math.isfinite(run.extra["train_tokens"]) and run.extra["train_tokens"] > 0
    with pytest.raises(ConfigError, match=r"top_k 1500: must be in 1..1024, or 2000 \(the vocabulary"):
        label_lm(full(top_k=1500))
    with pytest.raises(ConfigError, match=r"a shard would hold 3.8 GiB of top-k in memory; use shard_rows 2 or fewer"):
        LMLabelConfig(teacher=teacher, transfer=str(corpus), out=str(tmp_path / "t"), name="x", seq_len=1024,
                      top_k=100_000, shard_rows=5)
