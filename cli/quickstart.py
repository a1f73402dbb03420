"""`kdstore quickstart`: the whole pipeline on the embedded digits data, nothing downloaded."""

from __future__ import annotations

import time
from pathlib import Path

import click

from kdstore.cli._common import user_errors


@click.command("quickstart")
@click.option("--out", default="kdstore-quickstart", show_default=True, metavar="DIR",
              help="Where the target store and the runs go.")
@click.option("--epochs", type=int, default=100, show_default=True, help="Epochs per student.")
@click.option("--device", default="auto", show_default=True)
@user_errors
def quickstart(out: str, epochs: int, device: str) -> None:
    """Label a small transfer set (200 digits images) once with the shipped teacher, then train the same small
    student on hard labels and distilled at T = 2, 4, 8, and print teacher / student / distilled test accuracy
    side by side."""
    import torch

    from kdstore import quickstart as qs

    torch.set_num_threads(1)  # tiny models: threads only add synchronisation cost

    t0 = time.perf_counter()
    click.echo(f"1/3 labeling the first {qs.TRANSFER_ROWS} training images with the digits teacher (runs once)")
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
    click.echo(f"The teacher was trained on all 1,347 training images; the students saw {qs.TRANSFER_ROWS}. "
               "Soft targets carry\nmore per example than hard labels (Hinton et al. 2015); see docs/benchmarks.md "
               "for the full-data numbers.")
    click.echo(f"done in {time.perf_counter() - t0:.0f} s; store in {Path(out) / 'targets'}, runs in {r.out}")
