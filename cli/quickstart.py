"""`kdstore quickstart`: the whole pipeline on the embedded digits data, nothing downloaded."""

from __future__ import annotations

import time
from pathlib import Path

import click

from kdstore.cli._common import user_errors


@click.command("quickstart")
@click.option("--out", default="kdstore-quickstart", show_default=True, metavar="DIR",
              help="Where the target store and the runs go.")
@click.option("--epochs", type=int, default=60, show_default=True, help="Epochs per student.")
@click.option("--device", default="auto", show_default=True)
@user_errors
def quickstart(out: str, epochs: int, device: str) -> None:
    """Label the shipped digits set once with the shipped teacher, then train the same small student on hard
    labels and distilled at T = 2, 4, 8, and print teacher / student / distilled accuracy side by side."""
    from kdstore import quickstart as qs

    t0 = time.perf_counter()
    click.echo(f"1/3 labeling {qs.dataset_file('digits_train.parquet').name} with the digits teacher (runs once)")
    r = qs.run(Path(out), epochs=epochs, device=device)
    m = r.label.manifest
    click.echo(f"    -> {r.label.path} ({m['num_rows']} rows, top-{m['targets']['top_k']['k']} + fp16 logits)")
    click.echo(f"2/3 trained {qs.STUDENT} on hard labels; 3/3 distilled it at T = "
               f"{', '.join(f'{t:g}' for t in qs.TEMPERATURES)} (alpha {qs.ALPHA}), teacher-free")
    click.echo("")
    click.echo(f"{'model':<34} {'test acc%':>9} {'errors':>7}")
    click.echo(f"{'teacher ' + qs.teacher_spec().split('@')[0]:<34} {100 * r.teacher_test_accuracy:9.2f} "
               f"{r.teacher_test_errors:7d}")
    for run in r.runs:
        name = f"student {qs.STUDENT} " + ("hard labels" if run.loss == "hard" else f"KD T={run.temperature:g}")
        click.echo(f"{name:<34} {100 * (run.eval_accuracy or 0):9.2f} {run.eval_errors:7d}")
    click.echo("")
    click.echo(f"done in {time.perf_counter() - t0:.0f} s; store in {Path(out) / 'targets'}, runs in {r.out}")
