"""`kdstore convert`: a new version in another format, dtype or top-k, made from a stored one (no teacher)."""

from __future__ import annotations

import click

from kdstore.cli._common import progress_bar, user_errors
from kdstore.options import FORMATS, LOGITS_DTYPES


@click.command("convert", short_help="Make a new version in another format, dtype or top-k.")
@click.argument("ref", metavar="STORE/NAME[@vN]")
@click.option("--to", "to", type=click.Choice(FORMATS), default=None,
              help="On-disk format of the new version. Default: the source's.")
@click.option("--top-k", type=int, default=None, metavar="K",
              help="Store the K largest logits per row. K <= the stored k truncates the stored top-k; a larger K is "
                   "recomputed from the full logits (which must be stored). 0 stores no top-k. Default: as stored.")
@click.option("--logits-dtype", type=click.Choice(LOGITS_DTYPES), default=None,
              help="Storage dtype of logits and top-k values. Default: as stored. Going up in precision adds bytes, "
                   "not information.")
@click.option("--logits/--no-logits", "keep_logits", default=None,
              help="Keep or drop the full logits (top-k only). Default: keep them if the source has them.")
@click.option("--name", default=None, help="Dataset name of the new version. Default: the source's (so it becomes "
                                            "its next version).")
@click.option("--out", default=None, metavar="STORE",
              help="Local store directory of the new version. Default: the source's store; required for a remote "
                   "source (push the result with `kdstore push`).")
@click.option("--shard-rows", type=int, default=None, help="Rows per data file. Default: as stored.")
@click.option("--row-group-rows", type=int, default=None, help="Rows per row group / chunk. Default: as stored.")
@click.option("--sample", type=int, default=None, metavar="N",
              help="Per-token versions: also store N draws per position from the stored top-k's rebuilt distribution "
                   "(top-k exact, tail uniform; not the teacher's exact distribution). Use --top-k 0 to keep only the "
                   "draws.")
@click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed of the --sample draws.")
@click.option("--drop-features", is_flag=True, help="Leave out the stored teacher features (and their projections).")
@click.option("--feature-rank", type=int, default=None, metavar="R",
              help="Cut each projected teacher feature to its first R principal directions (exact: they are stored "
                   "largest first).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors(aliases={"format": "--to", "source": "STORE/NAME[@vN]", "keep_logits": "--logits/--no-logits"})
def convert(ref: str, to: str | None, top_k: int | None, logits_dtype: str | None, keep_logits: bool | None,
            name: str | None, out: str | None, shard_rows: int | None, row_group_rows: int | None,
            sample: int | None, sample_seed: int, drop_features: bool, feature_rank: int | None, quiet: bool) -> None:
    """Write a NEW version converted from a stored one: another format (--to), top-k (--top-k), dtype, with or
    without full logits. The source is never changed; the new manifest's `parent` names it and the settings.

    \b
    Examples:
      kdstore convert ./targets/mnist@v1 --to hdf5                 # same targets, HDF5 files: mnist@v2
      kdstore convert ./targets/mnist@v1 --top-k 3 --no-logits --name mnist-top3
      kdstore convert s3://team-bucket/targets/mnist --to parquet --out ./targets
      kdstore convert ./targets/mnist-feat@v1 --feature-rank 8 --name mnist-feat8   # fewer PCA directions

    When the stored top-k changes, its probability mass and fidelity (KL of the soft targets rebuilt from it, per
    temperature) are recomputed against the full logits; without full logits the fidelity is recorded as null.
    An interrupted conversion resumes when the same command is run again.

    \b
    Per-token (language-model) versions:
      kdstore convert ./targets/smol-news@v1 --top-k 16 --name smol-news-top16
      kdstore convert ./targets/smol-news@v1 --top-k 0 --sample 24 --name smol-news-sampled
    A smaller --top-k truncates each position's top-k (dropped entries join the exact tail); --sample N draws from
    the rebuilt distribution (docs/format.md says what that serves).
    """
    from kdstore.convert import ConvertConfig
    from kdstore.convert import convert as run_convert

    cfg = ConvertConfig(source=ref, to=to, top_k=top_k, logits_dtype=logits_dtype, keep_logits=keep_logits,
                        name=name, out=out, shard_rows=shard_rows, row_group_rows=row_group_rows, sample=sample,
                        sample_seed=sample_seed, drop_features=drop_features, feature_rank=feature_rank)
    with progress_bar(0, "convert", "rows", disable=quiet) as bar:
        result = run_convert(cfg, progress=bar.update)
    m = result.manifest
    from kdstore.store.catalog import human_bytes, targets_text

    click.echo(f"wrote {result.path}  ({m['num_rows']} rows, {m['storage']['format']}, {targets_text(m['targets'])}, "
               f"{human_bytes(sum(f['bytes'] for f in m['files']))}; from {result.source})")
    if m["targets"].get("kind") == "tokens":
        s = m["statistics"]["teachers"]["t0"]
        click.echo(f"  t0: mean entropy {s['mean_entropy_nats']:.4f} nats ({s['entropy_source']})"
                   + (f", top-{m['targets']['top_k']['k']} mass {s['topk_mass_mean']:.4f}" if m["targets"]["top_k"]
                      else "")
                   + (f", {s['sampled_unique_mean']:.2f} distinct ids per position" if m["targets"]["sampled"]
                      else ""))
        return
    for tid, s in m["statistics"].get("teachers", {}).items():
        fid = s.get("topk_fidelity_kl")
        if m["targets"]["top_k"] is None:
            continue
        if fid:
            click.echo(f"  {tid}: top-{m['targets']['top_k']['k']} mass {s['topk_mass_mean']:.4f}, KL@T=1/4/20: "
                       + "/".join("inf" if fid.get(t) is None else f"{fid[t]:.2g}" for t in ("1.0", "4.0", "20.0")))
        else:
            click.echo(f"  {tid}: top-{m['targets']['top_k']['k']} mass {s['topk_mass_mean']:.4f}, fidelity not "
                       "measurable (no full logits in the source)")
