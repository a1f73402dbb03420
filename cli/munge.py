"""`kdstore munge`: grow a small tabular transfer set into a larger synthetic one (MUNGE)."""

from __future__ import annotations

from pathlib import Path

import click

from kdstore.cli._common import user_errors


@click.command("munge")
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Real examples to start from: a Parquet (.parquet) or CSV (.csv) table, one example per row.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the synthetic rows (.parquet). Written atomically; records the settings "
                   "and the input's SHA-256 in the file's metadata.")
@click.option("--multiplier", default=1, show_default=True, type=int,
              help="Synthetic rows per real row: the output has multiplier x N rows (one MUNGE round each).")
@click.option("--p", "p", default=0.5, show_default=True, type=float,
              help="Probability, per attribute, of taking the neighbour's value. 0 copies the real rows; "
                   "larger values mix examples more.")
@click.option("--s", "s", default=1.0, show_default=True, type=float,
              help="Local variance parameter: a swapped continuous value is redrawn from "
                   "Normal(neighbour's value, |a - b| / s). Larger s keeps values closer to real ones.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Random seed; the same seed gives the same output.")
@click.option("--label-column", default=None,
              help="Column holding labels; it is dropped (synthetic rows are unlabeled: a teacher labels them).")
@click.option("--exclude-column", "exclude_columns", multiple=True,
              help="Column to leave out of distances and of the output (repeatable), e.g. ids or constant columns.")
@click.option("--block-size", default=4096, show_default=True, type=int,
              help="Rows per block when searching nearest neighbours; memory grows with block-size squared.")
@user_errors
def munge_command(
    input_path: Path,
    out_path: Path,
    multiplier: int,
    p: float,
    s: float,
    seed: int,
    label_column: str | None,
    exclude_columns: tuple[str, ...],
    block_size: int,
) -> None:
    """Make a synthetic transfer set from real examples with MUNGE.

    MUNGE comes from Bucilua, Caruana and Niculescu-Mizil (2006), "Model compression", KDD: a
    small student learns to mimic a teacher best when the teacher labels many examples drawn
    from (close to) the data distribution, more than the real training set provides.

    \b
    For every real example e, MUNGE finds its nearest neighbour e' among the others
    (continuous columns standardised, Euclidean; categorical columns add 1 if they differ).
    Each round makes one synthetic row from e: every attribute takes the neighbour's value
    with probability --p, and a swapped continuous value is then redrawn from
    Normal(e'.a, |e.a - e'.a| / --s), so a larger --s stays closer to the real values.

    Numeric, bool and string/categorical columns are supported; values must not be missing.
    The output keeps the input's column names and types and has no labels: label it with
    `kdstore label` to get the teacher's targets.

    \b
    Example:
      kdstore munge --input train.parquet --out synth.parquet --multiplier 10 --label-column y
    """
    from kdstore.munge import MungeConfig, munge, read_table, sha256_file, write_synthetic

    config = MungeConfig(
        multiplier=multiplier, p=p, s=s, seed=seed, block_size=block_size,
        label_column=label_column, exclude_columns=tuple(exclude_columns),
    )
    if out_path.suffix.lower() != ".parquet":
        raise click.BadParameter(f"{out_path}: the output must be a .parquet file", param_hint="--out")
    table = read_table(input_path)
    synthetic = munge(table, config)
    write_synthetic(synthetic, out_path, parent_path=input_path, parent_sha256=sha256_file(input_path), config=config)
    click.echo(f"munge: {table.num_rows:,} rows in -> {synthetic.num_rows:,} synthetic rows out -> {out_path}")
