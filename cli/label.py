"""`kdstore label`: run teachers once over a transfer set and store their targets (classification, or per token
for a language-model teacher: `kdstore.cli._label_lm`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from kdstore.cli._common import parse_shard, progress_bar, user_errors
from kdstore.cli._label_lm import (
    LM_OPTIONS,
    feature_options,
    is_language_model,
    label_language_model,
    reject_options,
)
from kdstore.options import FORMATS, LOGITS_DTYPES, PRECISIONS, TAIL_MODELS

if TYPE_CHECKING:
    from kdstore.labeling import LabelResult


@click.command("label")
@click.option("--teacher", "teachers", multiple=True, required=True, metavar="SPEC",
              help="Teacher: a TorchScript file (teacher.pt), or MODEL@WEIGHTS where MODEL is a built-in spec "
                   "(mlp:784-1200-1200-10) or package.module:factory and WEIGHTS a .safetensors or state-dict .pt "
                   "file. Repeat to label with an ensemble in one pass. A language model: hf:DIR (a Hugging Face "
                   "model directory with its tokenizer), hf:FILE.gguf (dequantised), or package.module:factory "
                   "returning a model that maps token ids (B, L) to logits (B, L, V) (with --seq-len).")
@click.option("--transfer", required=True, metavar="PATH",
              help="Transfer set: .parquet, .npz, .npy or .h5 (original training data, unlabeled or synthetic). For "
                   "a language model: .txt (one document per line), .jsonl (a text field, or chat 'messages') or "
                   ".parquet (a text, messages or input_ids column).")
@click.option("--out", required=True, metavar="STORE",
              help="Store directory (or fsspec URL: s3://bucket/store, ...); the version goes to STORE/NAME/vN.")
@click.option("--name", required=True, help="Dataset name inside the store (letters, digits, '.', '_', '-').")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="parquet", show_default=True,
              help="On-disk format of the data files.")
@click.option("--top-k", type=int, default=None,
              help="Also store each row's K largest logits (+ log-sum-exp) for top-k KD; 0 stores none. "
                   "[default: 10; a language model: 64 per position, or none with --sample]")
@click.option("--logits/--no-logits", "keep_logits", default=None,
              help="Keep the full logits (needed for --loss mse and exact KD), or only the top-k. [default: keep; "
                   "a language model never stores full logits]")
@click.option("--logits-dtype", type=click.Choice(LOGITS_DTYPES), default="float16",
              show_default=True, help="Storage dtype of logits and top-k values, and of sampled log-probs "
                                      "(softening is always float32).")
@click.option("--batch-size", type=int, default=None,
              help="Teacher batch size (rows). [default: 1024; a language model: 8 sequences]")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Teacher autocast: auto = bf16 on CUDA, fp32 on CPU.")
@click.option("--input-column", "input_columns", multiple=True,
              help="Input column/array (repeat for several numeric columns). Default: the array column, or all "
                   "numeric columns, or 'x'.")
@click.option("--label-column", default=None,
              help="Integer label column. Default: 'label' or 'y' if present; 'none' treats the set as unlabeled.")
@click.option("--shard-rows", type=int, default=None,
              help="Rows per data file; an interrupted run resumes from its last complete file. [default: 32768; a "
                   "language model: 512 sequences]")
@click.option("--row-group-rows", type=int, default=None,
              help="Rows per Parquet row group / HDF5 chunk (the unit of streamed, shuffled reads). [default: 2048; "
                   "a language model: 64 sequences]")
@click.option("--tail", type=click.Choice(TAIL_MODELS), default="uniform", show_default=True,
              help="Default tail model for rebuilding soft targets from the top-k (see docs/format.md); "
                   "the trainer can override it.")
@click.option("--shard", default=None, metavar="I/N",
              help="Label only job I's share (files I, I+N, ...) of an N-job run, e.g. a Slurm array "
                   "(--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT). The job that finishes the last file "
                   "commits the version. Under torchrun, RANK/WORLD_SIZE are used automatically.")
@click.option("--views", type=int, default=1, show_default=True, metavar="N",
              help="Label N augmented views of every row (FKD): each view's parameters and the teacher's targets for "
                   "it are stored, and `kdstore train` replays one view per row per epoch, teacher-free. Needs "
                   "--augment.")
@click.option("--augment", default=None, metavar="SPEC",
              help="The views' augmentation, applied in order: shift:P (integer shift by up to P pixels), "
                   "crop:S0-S1[:R0-R1] (random resized crop: area fraction, aspect ratio), flip (horizontal), "
                   "noise:STD (Gaussian, also for vector inputs). E.g. shift:2 or crop:0.35-1,flip.")
@click.option("--augment-seed", type=int, default=0, show_default=True,
              help="Seed of the views' parameters (each drawn from seed, row and view: resume and --shard give the "
                   "same views).")
@click.option("--identity-view/--no-identity-view", default=True, show_default=True,
              help="Make view 0 of every row the unaugmented input.")
@click.option("--features", default=None, metavar="NAME[,NAME...]",
              help="Also store the outputs of these modules of the (first) teacher for every row, names as in its "
                   "named_modules() (e.g. net.2), for hint / feature distillation (kdstore train --hint). Needs a "
                   "MODEL@WEIGHTS teacher. A language model's are stored per token (e.g. model.layers.14, "
                   "model.norm: hidden states; attn:model.layers.N: layer N's attention probabilities per "
                   "head, attn_mean:model.layers.N: averaged over heads). See docs/format.md, 'Features', and "
                   "docs/lm.md.")
@click.option("--feature-pool", type=click.Choice(("none", "avg", "max")), default="none", show_default=True,
              help="Pool each feature map over its spatial axes first: (C, H, W) -> (C).")
@click.option("--feature-rank", type=int, default=None, metavar="R",
              help="Store each feature's coordinates on its top-R principal directions (PCA fitted on the first "
                   "--feature-fit-rows samples; the directions are stored once in the version).")
@click.option("--feature-variance", type=float, default=None, metavar="F",
              help="Like --feature-rank, with the smallest R that keeps the fraction F of the variance, e.g. 0.95.")
@click.option("--feature-fit-rows", type=int, default=8192,
              help="Samples the projection is fitted on (the first rows of the transfer set; for a language model, "
                   "the real tokens of the first sequences). [default: 8192; a language model: 64 sequences]")
@click.option("--feature-dtype", type=click.Choice(("float16", "float32")), default="float16", show_default=True,
              help="Storage dtype of the features.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@LM_OPTIONS
@user_errors(aliases={"format": "--format", "shard_index": "--shard", "num_shards": "--shard",
                      "keep_logits": "--logits/--no-logits"})
@click.pass_context
def label(ctx: click.Context, teachers: tuple[str, ...], transfer: str, out: str, name: str, fmt: str,
          top_k: int | None, keep_logits: bool | None, logits_dtype: str, batch_size: int | None, device: str,
          precision: str, input_columns: tuple[str, ...], label_column: str | None, shard_rows: int | None,
          row_group_rows: int | None, tail: str, shard: str | None, views: int, augment: str | None,
          augment_seed: int, identity_view: bool, features: str | None, feature_pool: str, feature_rank: int | None,
          feature_variance: float | None, feature_fit_rows: int, feature_dtype: str, quiet: bool,
          **lm: object) -> None:
    """Run one or more teachers ONCE over a transfer set; write logits and top-k targets as a new version.

    \b
    Example:
      kdstore label --teacher teacher.pt --transfer train.parquet \\
                    --out ./targets --name mnist-t1200 --top-k 10

    The version appears as STORE/NAME/vN only when complete (manifest.json is written last). If the run is
    interrupted (Ctrl-C, kill), rerun the same command: it resumes from the last completed shard and ends with
    the same bytes as an uninterrupted run.

    The summary ends with advice from the data: per temperature, how informative the soft targets are (mean
    entropy, largest and second probability, plain and standardised), whether the default T gives near one-hot
    or near uniform targets, and a `kdstore train` sweep to try.

    \b
    Language models (per-token targets, docs/format.md "Per-token targets"):
      kdstore label --teacher hf:SmolLM2-135M-Instruct.Q4_1.gguf --transfer news.txt \\
                    --seq-len 256 --top-k 64 --out ./targets --name smol-news
      kdstore label --teacher hf:./my-model --transfer chats.jsonl --sample 50 --top-k 0 ...
    A run labels a language model when the teacher is hf:..., the transfer set is a .txt/.jsonl text file, or
    --seq-len is given (needed for a package.module:factory language model over a .parquet transfer set). Each
    row is a sequence of --seq-len tokens; position t stores the teacher's distribution of token t+1.
    """
    from kdstore.labeling import LabelConfig
    from kdstore.labeling import label as run_label
    from kdstore.transfer import open_transfer

    shard_index, num_shards = parse_shard(shard)
    if is_language_model(teachers, transfer, lm.get("seq_len")):
        reject_options(ctx, language_model=True)
        label_language_model(teachers, transfer, out, name, fmt, top_k, logits_dtype, batch_size, device,
                             shard_rows, row_group_rows, shard_index, num_shards, quiet,
                             {**lm, **feature_options(ctx)})
        return
    reject_options(ctx, language_model=False)
    cfg = LabelConfig(teachers=teachers, transfer=transfer, out=out, name=name, format=fmt,
                      top_k=10 if top_k is None else (top_k or None),
                      keep_logits=True if keep_logits is None else keep_logits, logits_dtype=logits_dtype,
                      batch_size=_or(batch_size, 1024), device=device, precision=precision,
                      input_columns=input_columns, label_column=label_column, shard_rows=_or(shard_rows, 32768),
                      row_group_rows=_or(row_group_rows, 2048), tail=tail, shard_index=shard_index,
                      num_shards=num_shards, views=views, augment=augment, augment_seed=augment_seed,
                      identity_view=identity_view,
                      features=tuple(f.strip() for f in features.split(",")) if features is not None else (),
                      feature_pool=feature_pool, feature_rank=feature_rank, feature_variance=feature_variance,
                      feature_fit_rows=feature_fit_rows, feature_dtype=feature_dtype)
    ts = open_transfer(transfer, input_columns=input_columns or None, label_column=label_column)
    rows = ts.rows
    ts.close()  # only the row count is needed here; label() opens it again
    with progress_bar(rows, "label", "rows", disable=quiet) as bar:
        result = run_label(cfg, progress=bar.update)
    if result.path is None:
        info = result.manifest
        click.echo(f"shard {shard_index}/{num_shards} done: {info['shards_done']} of {info['shards_total']} files "
                   "complete; the job that completes the last file commits the version")
        return
    _report(result, num_shards)


def _report(result: LabelResult, num_shards: int) -> None:
    """The summary of a committed version: where, how big, the teachers' statistics, and the advice."""
    from kdstore.advice import advise
    from kdstore.card_render import advice_text
    from kdstore.store import Version

    assert result.path is not None  # the caller returns early for a shard job that commits nothing
    m = result.manifest
    resumed = ""
    if result.resumed_shards:
        resumed = (f", {result.resumed_shards} file(s) from other jobs" if num_shards > 1
                   else f", resumed {result.resumed_shards} shard(s)")
    click.echo(f"wrote {result.path}  ({m['num_rows']} rows, {m['num_classes']} classes, "
               f"{sum(f['bytes'] for f in m['files']) / 1e6:.2f} MB, {result.seconds:.1f} s{resumed})")
    for tid, s in m["statistics"]["teachers"].items():
        acc = f"accuracy {s['accuracy']:.4f}" if s["accuracy"] is not None else "unlabeled"
        fid = s.get("topk_fidelity_kl")
        fid_txt = (" top-k KL@T=1/4/20: " + "/".join("inf" if fid[t] is None else f"{fid[t]:.2g}"
                                                       for t in ("1.0", "4.0", "20.0"))) if fid else ""
        click.echo(f"  {tid}: {acc}, mean entropy {s['mean_entropy_nats']:.3f} nats{fid_txt}")
        if s.get("accuracy_identity_views") is not None:
            click.echo(f"  {tid} on views: unaugmented {s['accuracy_identity_views']:.4f}, augmented "
                       f"{s['accuracy_augmented_views']:.4f}")
    for layer in (m.get("features") or {}).get("layers", []):
        kept = m["statistics"].get("features", {}).get(layer["column"], {}).get("variance_kept")
        proj = layer["projection"]
        how = (f"PCA rank {proj['rank']}, keeps {kept:.1%} of the variance" if proj and kept is not None
               else "stored whole")
        click.echo(f"  feature {layer['module']}: {layer['output_shape']} -> {layer['stored_shape']} ({how})")
    if result.pushed:
        click.echo(f"pushed -> {result.pushed}")
    if "ensemble" in m["statistics"]:
        click.echo(f"  ensemble (mean-prob): accuracy {m['statistics']['ensemble']['accuracy']:.4f}")
    ref = result.pushed or f"{result.path.parent}@v{m['version']}"
    click.echo("\n".join(advice_text(advise(Version(result.path)), ref, bool(m["targets"]["labels"]))))


def _or(value: int | None, default: int) -> int:
    """An option's value, or its classification default when not given (None; 0 stays 0 and fails validation)."""
    return default if value is None else value
