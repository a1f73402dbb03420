"""`kdstore inspect`: a dataset card in the terminal, and optionally as README.md + plots."""

from __future__ import annotations

import json

import click

from kdstore.cli._common import user_errors


@click.command("inspect", short_help="Show a version's dataset card; --card writes README.md + plots.")
@click.argument("ref", metavar="STORE/NAME[@vN]")
@click.option("--card", is_flag=True,
              help="Also read the data once and write a dataset card: README.md with PNG plots (teacher confidence, "
                   "reliability diagram + ECE if labeled, class-similarity heatmap, top-k mass) in VERSION/card/. "
                   "The card is derived: the manifest and data files are not changed.")
@click.option("--card-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write the card into DIR instead of VERSION/card/ (for read-only stores).")
@click.option("-T", "--temperature", type=float, default=4.0, show_default=True,
              help="Temperature of the class-similarity heatmap (mean soft targets per class); higher T shows more "
                   "of the similarity structure KD transfers.")
@click.option("--teacher", default=None, metavar="ID",
              help="Teacher (t0, t1, ...) whose soft targets make the heatmap. Default: the first.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the manifest (and, with --card, the computed statistics) as JSON instead of the card.")
@user_errors
def inspect(ref: str, card: bool, card_dir: str | None, temperature: float, teacher: str | None,
            as_json: bool) -> None:
    """Show a version's dataset card: provenance (teachers, transfer set, settings), stored targets, label-time
    statistics and the top-k fidelity table (how well the stored top-k rebuilds the exact soft targets per T).

    It ends with advice from the data: per temperature, how informative the soft targets are (mean entropy,
    largest and second probability, plain and standardised), whether the default T gives near one-hot or near
    uniform targets, and a `kdstore train` sweep to try; this reads a sample of at most 8,192 rows.

    A per-token (language-model) version shows the teacher and tokenizer fingerprints, the teacher's perplexity on
    the true next tokens, the per-token entropy and top-k mass histograms and the fidelity; its --card also reads
    the stored targets (their entropy, and their own perplexity: how much of the teacher a student can see).

    The version is STORE/NAME (latest), STORE/NAME@vN, or the same under a URL (s3://bucket/targets/NAME@v2).
    Without --card a remote version's manifest alone is read (nothing else is downloaded, so no advice); with
    --card a remote version is downloaded to the local cache and its card written there (or to --card-dir).

    \b
    Examples:
      kdstore inspect ./targets/mnist-t1200
      kdstore inspect ./targets/mnist-t1200@v2 --card -T 8
      kdstore inspect s3://team-bucket/targets/mnist-t1200 --card --card-dir ./card
    """
    from pathlib import Path

    from kdstore.card import compute_statistics, prepare_card_dir, write_card
    from kdstore.store import Version, remote

    if (card_dir or teacher) and not card:
        raise click.UsageError("--card-dir and --teacher only apply with --card")
    if not card and remote.is_remote(ref):
        where, manifest = remote.read_remote_manifest(ref)
        _show(manifest, where, None, None, as_json)
        if not as_json and manifest["targets"].get("kind") != "tokens":
            click.echo("\n(advice per temperature reads the data: run with --card to download it)")
        return
    from kdstore.advice import advise

    v = Version(remote.resolve_any(ref, option=""))
    tokens = v.manifest["targets"].get("kind") == "tokens"
    if not card:
        _show(v.manifest, str(v.path), None, None if tokens else advise(v), as_json)
        return
    if tokens:
        _token_card(v, Path(card_dir) if card_dir else None, as_json)
        return
    out_dir = prepare_card_dir(v, Path(card_dir) if card_dir else None)
    stats = compute_statistics(v, temperature=temperature, teacher=teacher)
    files = write_card(v, stats, out_dir)
    _show(v.manifest, str(v.path), stats, stats.advice, as_json)
    if not as_json:
        click.echo(f"\nwrote card {files[-1]} (+ {len(files) - 1} plot(s))")


def _token_card(v: object, card_dir: object, as_json: bool) -> None:
    """--card of a per-token version: statistics read from the stored targets, README.md and plots."""
    from kdstore.card import prepare_card_dir
    from kdstore.token_card import compute_token_statistics, write_token_card

    out_dir = prepare_card_dir(v, card_dir)  # type: ignore[arg-type]
    stats = compute_token_statistics(v)  # type: ignore[arg-type]
    files = write_token_card(v, stats, out_dir)  # type: ignore[arg-type]
    _show(v.manifest, str(v.path), stats, None, as_json)  # type: ignore[attr-defined]
    if not as_json:
        click.echo(f"\nwrote card {files[-1]} (+ {len(files) - 1} plot(s))")


def _show(manifest: dict, where: str, stats: object, advice: list | None, as_json: bool) -> None:  # type: ignore[type-arg]
    from kdstore.card import CardStatistics
    from kdstore.card_render import card_text

    tokens = manifest["targets"].get("kind") == "tokens"
    if not as_json:
        if tokens:
            from kdstore.token_card import TokenCardStatistics, token_card_text

            click.echo(token_card_text(manifest, where, stats if isinstance(stats, TokenCardStatistics) else None))
        else:
            click.echo(card_text(manifest, where, stats if isinstance(stats, CardStatistics) else None,
                               advice))
        return
    out: dict = {"path": where, "manifest": manifest}  # type: ignore[type-arg]
    if stats is not None and hasattr(stats, "to_json"):
        out["card_statistics"] = stats.to_json()
    if advice is not None:
        out["advice"] = [a.to_json() for a in advice]
    click.echo(json.dumps(out, indent=2))
