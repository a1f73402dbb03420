"""The language-model side of `kdstore label`: its options, when a run is one, and the run itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from kdstore.cli._common import progress_bar

_TEXT_SUFFIXES = (".txt", ".text", ".cor", ".jsonl")
LM_ONLY = {"seq_len": "--seq-len", "packing": "--packing", "text_field": "--field", "encoding": "--encoding",
           "sample": "--sample", "sample_seed": "--sample-seed", "sample_logprobs": "--sample-logprobs",
           "tokenizer": "--tokenizer", "gguf_cache": "--gguf-cache"}
CLASSIFICATION_ONLY = {"input_columns": "--input-column", "label_column": "--label-column", "views": "--views",
                       "augment": "--augment", "augment_seed": "--augment-seed",
                       "identity_view": "--identity-view/--no-identity-view", "tail": "--tail",
                       "feature_pool": "--feature-pool (a language model's features are stored per token)"}
FEATURE_OPTIONS = ("features", "feature_rank", "feature_variance", "feature_fit_rows", "feature_dtype")

_OPTIONS = [
    click.option("--seq-len", type=int, default=None, metavar="L",
                 help="Language models: tokens per row (sequence); at most the teacher's context. "
                      "[default: 256, or the teacher's context if shorter]"),
    click.option("--packing", type=click.Choice(("concat", "document")), default=None,
                 help="Language models: how documents become rows. concat (default for text): each document as the "
                      "tokenizer encodes it, then EOS, concatenated and cut into rows of --seq-len (only the last row "
                      "is padded). document (default for chat and input_ids): one document or conversation per row, "
                      "right-padded; a longer one is an error."),
    click.option("--field", "text_field", default=None, metavar="NAME",
                 help="Language models: the .jsonl/.parquet field. Default: 'messages' if present (chat, rendered "
                      "with the teacher's chat template; only positions that predict assistant tokens are targets), "
                      "else 'text'; 'input_ids' for pre-tokenised Parquet (used verbatim)."),
    click.option("--encoding", default="utf-8", show_default=True,
                 help="Language models: text encoding of .txt/.jsonl files (e.g. latin-1)."),
    click.option("--sample", type=int, default=None, metavar="N",
                 help="Language models: also draw N tokens per position from the teacher (T = 1) and store the "
                      "distinct ids, their counts and the teacher's log-probabilities (Sparse Logit Sampling): "
                      "unbiased at T = 1, re-weighted at any T. Draws are keyed by (--sample-seed, row, position), "
                      "so resume and --shard give the same bytes. With --sample and no --top-k, no top-k is stored."),
    click.option("--sample-seed", type=int, default=0, show_default=True,
                 help="Language models: seed of the sampled draws."),
    click.option("--sample-logprobs/--no-sample-logprobs", default=True, show_default=True,
                 help="Language models: store the log-probability of each sampled id (needed at T != 1). Without, "
                      "sampled targets serve T = 1 only and take about half the bytes."),
    click.option("--tokenizer", default=None, metavar="PATH",
                 help="Language models: the tokenizer of a package.module:factory teacher that returns only a "
                      "model (a tokenizer directory, tokenizer.json or .gguf)."),
    click.option("--gguf-cache", is_flag=True,
                 help="Language models: keep a GGUF teacher's dequantised weights under $KDSTORE_CACHE/lm-teachers; "
                      "later runs (a resume, another --shard job) load them in about a second."),
]


def LM_OPTIONS(f: Callable[..., Any]) -> Callable[..., Any]:  # noqa: N802 (a decorator, named like a constant)
    for option in reversed(_OPTIONS):
        f = option(f)
    return f


def is_language_model(teachers: tuple[str, ...], transfer: str, seq_len: Any) -> bool:
    """A language-model run: an hf: teacher, a text transfer set (.txt/.jsonl), or an explicit --seq-len."""
    return (seq_len is not None or any(t.startswith("hf:") for t in teachers)
            or Path(transfer).suffix.lower() in _TEXT_SUFFIXES)


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source != click.core.ParameterSource.DEFAULT


def reject_options(ctx: click.Context, *, language_model: bool) -> None:
    """A usage error for options of the other kind of run."""
    if language_model:
        wrong = [opt for name, opt in CLASSIFICATION_ONLY.items() if _given(ctx, name)]
        if ctx.params.get("keep_logits"):
            wrong.append("--logits (per-token full logits are V values per token; store a top-k or --sample)")
        if ctx.params.get("precision") in ("bf16", "fp16"):
            wrong.append("--precision (language models run in float32)")
        if len(ctx.params.get("teachers", ())) > 1:
            wrong.append("a second --teacher (one language-model teacher per version)")
        kind, fix = "a language-model run", "classification teachers only"
    else:
        wrong = [opt for name, opt in LM_ONLY.items() if _given(ctx, name)]
        kind = "a classification run"
        fix = "language models only: an hf: teacher, a .txt/.jsonl transfer set, or --seq-len"
    if wrong:
        raise click.UsageError(f"{', '.join(wrong)}: not for {kind} ({fix})")


def feature_options(ctx: click.Context) -> dict[str, Any]:
    """The --features options of the command line for a language-model run; --feature-fit-rows counts sequences
    and, when not given, is `lm_features.DEFAULT_FIT_ROWS`."""
    from kdstore.lm_features import DEFAULT_FIT_ROWS

    p = {k: ctx.params.get(k) for k in FEATURE_OPTIONS}
    p["features"] = tuple(f.strip() for f in p["features"].split(",")) if p["features"] is not None else ()
    if not _given(ctx, "feature_fit_rows"):
        p["feature_fit_rows"] = DEFAULT_FIT_ROWS
    return p


def label_language_model(teachers: tuple[str, ...], transfer: str, out: str, name: str, fmt: str,
                         top_k: int | None, logits_dtype: str, batch_size: int | None, device: str,
                         shard_rows: int | None, row_group_rows: int | None, shard_index: int, num_shards: int,
                         quiet: bool, lm: dict[str, Any]) -> None:
    """Build the LMLabelConfig from the command line, run it, print the result."""
    from kdstore.lm_labeling import LMLabelConfig, label_lm

    given = {"batch_size": batch_size, "shard_rows": shard_rows, "row_group_rows": row_group_rows,
             "seq_len": lm["seq_len"]}
    cfg = LMLabelConfig(
        teacher=teachers[0], transfer=transfer, out=out, name=name, format=fmt,
        top_k=(None if lm["sample"] else 64) if top_k is None else (top_k or None),
        sample=lm["sample"] or None, sample_seed=lm["sample_seed"], sample_logprobs=lm["sample_logprobs"],
        logits_dtype=logits_dtype, packing=lm["packing"], text_field=lm["text_field"], encoding=lm["encoding"],
        tokenizer=lm["tokenizer"], device=device, gguf_cache=lm["gguf_cache"], shard_index=shard_index,
        num_shards=num_shards, **{k: v for k, v in given.items() if v is not None},
        **{k: lm[k] for k in FEATURE_OPTIONS if k in lm})
    with progress_bar(0, "label", "rows", disable=quiet) as bar:
        def started(rows: int) -> None:
            bar.total = rows
            bar.refresh()

        result = label_lm(cfg, progress=bar.update, started=started)
    if result.path is None:
        info = result.manifest
        click.echo(f"shard {shard_index}/{num_shards} done: {info['shards_done']} of {info['shards_total']} files "
                   "complete; the job that completes the last file commits the version")
        return
    click.echo(summary(result.manifest, str(result.path), result.seconds, result.resumed_shards, num_shards))
    if result.pushed:
        click.echo(f"pushed -> {result.pushed}")


def summary(m: dict[str, Any], path: str, seconds: float, resumed: int, num_shards: int) -> str:
    """What `kdstore label` prints about a new per-token version."""
    st, tg = m["statistics"], m["targets"]
    size = sum(f["bytes"] for f in m["files"])
    extra = ""
    if resumed:
        extra = f", {resumed} file(s) from other jobs" if num_shards > 1 else f", resumed {resumed} shard(s)"
    lines = [f"wrote {path}  ({m['num_rows']} rows x {tg['seq_len']} tokens, {st['tokens']} tokens, vocabulary "
             f"{tg['vocab_size']}, {size / 1e6:.2f} MB = {size / max(st['tokens'], 1):.1f} B/token, "
             f"{seconds:.1f} s{extra})"]
    for layer in (m.get("features") or {}).get("layers", []):
        if layer.get("kind") == "attention":
            lines.append(f"  feature {layer['module']}: attention maps {layer['stored_shape']} per sequence "
                         f"({layer['heads']} heads, {layer['heads_stored']} stored, {layer['dtype']}: "
                         f"{layer['bytes_per_row'] / layer['stored_shape'][-1]:.0f} B/token before compression)")
            continue
        kept = st.get("features", {}).get(layer["column"], {}).get("variance_kept")
        proj, width = layer["projection"], layer["stored_shape"][-1]
        how = (f"PCA rank {proj['rank']}, keeps {kept:.1%} of the variance" if proj and kept is not None
               else "stored whole")
        lines.append(f"  feature {layer['module']}: {layer['output_shape'][-1]} -> {width} per token ({how}, "
                     f"{2 * width if layer['dtype'] == 'float16' else 4 * width} B/token before compression)")
    for tid, s in st["teachers"].items():
        ppl = f"perplexity {s['perplexity']:.3f}" if s["perplexity"] is not None else "no next tokens"
        acc = f", next-token accuracy {s['accuracy']:.4f}" if s["accuracy"] is not None else ""
        line = f"  {tid}: {ppl}{acc}, mean entropy {s['mean_entropy_nats']:.3f} nats"
        if tg["top_k"]:
            line += f", top-{tg['top_k']['k']} mass {s['topk_mass_mean']:.4f}"
            fid = s.get("topk_fidelity_kl")
            if fid:
                line += " KL@T=1/4/20: " + "/".join("inf" if fid[t] is None else f"{fid[t]:.2g}"
                                                     for t in ("1.0", "4.0", "20.0"))
        if tg["sampled"]:
            line += f", {s['sampled_unique_mean']:.1f} distinct of {tg['sampled']['draws']} draws per position"
        lines.append(line)
    return "\n".join(lines)
