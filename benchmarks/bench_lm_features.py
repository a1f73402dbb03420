"""TinyBERT-style hidden-state distillation from stored per-token features (#19): a `gpt:` student trained on the
teacher's stored top-k with and without `--hint` losses against its stored (PCA-projected) hidden states; bytes
per token of full and projected features against the logit targets; labeling throughput with and without features.

Teacher: SmolLM2-135M-Instruct Q4_1 GGUF (30 layers, hidden 576); corpus: the Lee news corpus (both as in
benchmarks/bench_lm_label.py). A small run for a shared 2-core CPU:

    nice python -m benchmarks.bench_lm_features --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --corpus lee_background.cor --out bench_lm_features.json

1. Label the first `--train-docs` documents (rows of `--seq-len`, top-`--top-k`) with the features of
   `--layers` projected to keep `--variance` of their variance, and the last `--test-docs` documents (top-k only)
   as the held-out version.
2. Throughput: `--rounds` interleaved rounds (shuffled order per round) of labeling the first `--speed-rows` rows
   logits-only, with the full features and with the projected ones (the teacher loaded once; the fit included);
   tokens/s median and range; bytes per real token of each feature column (compressed Parquet column chunks).
3. Training: per seed, the same student on the same sequences with the top-k loss alone and with the hints
   `--hints` (in a shuffled order per seed); held-out perplexity and KL to the teacher, mean and SD over seeds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_lm_label import column_bytes


def _docs(corpus: Path, out: Path, first: int, last: int) -> Path:
    lines = corpus.read_bytes().decode("latin-1").splitlines()
    out.write_text("\n".join(lines[first:last]) + "\n", "utf-8")
    return out


def _label_timed(cfg: Any, teacher: Any, corpus: Any) -> tuple[Path, float]:
    from kdstore.lm_labeling import _label

    t0 = time.perf_counter()
    res = _label(cfg, teacher, corpus, t0, None)
    assert res.path is not None
    return res.path, time.perf_counter() - t0


def feature_bytes(version: Path) -> dict[str, float]:
    """Compressed bytes per real token: each feature column, the logit targets (top-k columns), ids and masks."""
    from kdstore.store import open_version

    v = open_version(version)
    cols = column_bytes(version)
    tokens = int(v.read_all(["attention_mask"])["attention_mask"].sum())
    out = {c: b / tokens for c, b in cols.items() if c.startswith("t0_feature_")}
    out["logit_targets"] = sum(b for c, b in cols.items() if c.startswith("t0_") and "feature" not in c) / tokens
    attach = sum(a["bytes"] for a in v.manifest.get("attachments", []))
    out["attachments_total_bytes"] = attach
    return out


def throughput(a: argparse.Namespace, text: Path, tmp: Path) -> dict[str, Any]:
    from kdstore.lm_labeling import LMLabelConfig
    from kdstore.lm_teachers import load_lm_teacher
    from kdstore.text import tokenize_corpus

    teacher = load_lm_teacher(f"hf:{a.gguf}", cache=True)
    corpus = tokenize_corpus(str(text), teacher.tokenizer, seq_len=a.seq_len, max_context=teacher.max_context,
                             vocab_size=teacher.vocab_size)
    corpus = _head(corpus, a.speed_rows)
    base = LMLabelConfig(teacher=f"hf:{a.gguf}", transfer=str(text), out=str(tmp / "speed"), name="x",
                         seq_len=a.seq_len, top_k=a.top_k, batch_size=a.batch_size, shard_rows=64,
                         row_group_rows=16)
    layers = tuple(a.layers.split(","))
    cases = {"logits-only": base, "full-features": replace(base, features=layers),
             "projected-features": replace(base, features=layers, feature_variance=a.variance,
                                           feature_fit_rows=a.speed_rows)}
    runs: dict[str, list[float]] = {c: [] for c in cases}
    sizes: dict[str, Any] = {}
    tokens = int(corpus.attention_mask.sum())
    for rnd in range(a.rounds):
        order = list(cases)
        random.Random(rnd).shuffle(order)
        for c in order:
            path, s = _label_timed(replace(cases[c], name=f"{c}-{rnd}"), teacher, corpus)
            runs[c].append(tokens / s)
            sizes[c] = feature_bytes(path)
            print(json.dumps({"round": rnd, "case": c, "tokens_per_s": tokens / s}), flush=True)
    return {"rows": corpus.rows, "tokens": tokens,
            "tokens_per_s": {c: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                             for c, v in runs.items()},
            "bytes_per_token": sizes}


def _head(corpus: Any, rows: int) -> Any:
    """The first `rows` rows of a tokenised corpus."""
    return replace(corpus, input_ids=corpus.input_ids[:rows], attention_mask=corpus.attention_mask[:rows],
                   loss_mask=corpus.loss_mask[:rows])


def train(a: argparse.Namespace, targets: Path, held: Path, tmp: Path) -> list[dict[str, Any]]:
    from kdstore.lm_training import LMTrainConfig, LMTrainer

    hints = tuple(a.hints.split(","))
    lrs = {"logits-only": a.lr, "hint": a.lr, **{f"logits-only-lr{x}": float(x) for x in a.control_lrs.split(",") if x}}
    runs = []
    for seed in map(int, a.seeds.split(",")):
        order = [c for c in lrs if c in a.cases.split(",") or c.startswith("logits-only-lr")]
        random.Random(seed).shuffle(order)
        for case in order:
            cfg = LMTrainConfig(targets=str(targets), student=a.student, out=str(tmp / f"{case}-{seed}"),
                                seeds=(seed,), epochs=a.epochs, batch_size=4, lr=lrs[case], eval=str(held),
                                data_mode="memory", device="cpu", hints=hints if case == "hint" else ())
            res = LMTrainer(cfg).run()[0]
            metrics = [json.loads(x) for x in (tmp / f"{case}-{seed}" / "metrics.jsonl").read_text().splitlines()]
            runs.append({"case": case, "seed": seed, "eval_perplexity": res.extra["eval_perplexity"],
                         "eval_kl_teacher": res.extra["eval_kl_teacher"], "train_seconds": res.train_seconds,
                         "hint_loss": [m.get("train_hint_loss") for m in metrics]})
            print(json.dumps(runs[-1]), flush=True)
    return runs


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for case in sorted({r["case"] for r in runs}):
        rs = [r for r in runs if r["case"] == case]
        out[case] = {m: {"mean": statistics.mean(r[m] for r in rs), "sd": statistics.stdev(r[m] for r in rs),
                         "min": min(r[m] for r in rs), "max": max(r[m] for r in rs)}
                     for m in ("eval_perplexity", "eval_kl_teacher")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--train-docs", type=int, default=40)
    ap.add_argument("--test-docs", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--layers", default="model.layers.14,model.norm")
    ap.add_argument("--variance", type=float, default=0.95, help="0: store the features whole (attention maps, "
                    "attn_mean:model.layers.N, are never projected)")
    ap.add_argument("--fit-rows", type=int, default=64)
    ap.add_argument("--speed-rows", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--student", default="gpt:2-128-4")
    ap.add_argument("--hints", default="model.layers.14:blocks.0,model.norm:blocks.1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--cases", default="logits-only,hint")
    ap.add_argument("--control-lrs", default="",
                    help="also logits-only at these learning rates (a control: the hint's gradient shares the "
                         "global gradient-norm clip, which lowers the logit loss's effective step)")
    ap.add_argument("--out", default="bench_lm_features.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    from kdstore.lm_labeling import LMLabelConfig, label_lm

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lines = len(Path(a.corpus).read_bytes().splitlines())
        train_txt = _docs(Path(a.corpus), tmp / "train.txt", 0, a.train_docs)
        test_txt = _docs(Path(a.corpus), tmp / "test.txt", lines - a.test_docs, lines)
        common = dict(teacher=f"hf:{a.gguf}", out=str(tmp / "T"), seq_len=a.seq_len, top_k=a.top_k,
                      batch_size=a.batch_size, gguf_cache=True)
        t0 = time.perf_counter()
        targets = label_lm(LMLabelConfig(transfer=str(train_txt), name="train", features=tuple(a.layers.split(",")),
                                         feature_variance=a.variance or None, feature_fit_rows=a.fit_rows,
                                         **common))
        label_s = time.perf_counter() - t0
        held = label_lm(LMLabelConfig(transfer=str(test_txt), name="test", **common))
        assert targets.path is not None and held.path is not None
        speed = throughput(a, train_txt, tmp) if a.rounds else None
        runs = train(a, targets.path, held.path, tmp)
        m = targets.manifest
        report = {"args": vars(a), "torch": torch.__version__, "label_seconds": label_s,
                  "train_version": {"rows": m["num_rows"], "tokens": m["statistics"]["tokens"],
                                    "features": m["features"], "feature_statistics": m["statistics"]["features"],
                                    "bytes_per_token": feature_bytes(targets.path)},
                  "teacher_eval_perplexity": held.manifest["statistics"]["teachers"]["t0"]["perplexity"],
                  "throughput": speed, "runs": runs, "summary": summarise(runs)}
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("train_version", "teacher_eval_perplexity", "summary")}, indent=1))
    print(json.dumps(speed, indent=1))


if __name__ == "__main__":
    main()
