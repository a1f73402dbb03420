"""`kdstore diff`: compare two versions' targets row by row."""

from __future__ import annotations

import json

import click

from kdstore.cli._common import user_errors


@click.command("diff", short_help="Compare two versions' targets on the same transfer set.")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("-T", "--temperature", type=float, default=1.0, show_default=True,
              help="Temperature of the soft targets compared by KL(A||B) and the per-class probabilities "
                   "(argmax agreement does not depend on it).")
@click.option("--teacher-a", default=None, metavar="ID", help="Teacher of A to compare (default: its first, t0).")
@click.option("--teacher-b", default=None, metavar="ID", help="Teacher of B to compare (default: its first, t0).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result (every class) as JSON.")
@user_errors
def diff(a: str, b: str, temperature: float, teacher_a: str | None, teacher_b: str | None, as_json: bool) -> None:
    """Compare the targets of versions A and B, labeled on the same transfer set (same sha256): argmax agreement,
    mean KL(A||B) at --temperature, accuracy where labeled, and per class the agreement and the shift of mean
    probability from A to B.

    A and B are STORE/NAME[@vN] or URLs. Soft targets come from the full logits if stored, else are rebuilt from
    the top-k (tail model, docs/format.md).

    Two per-token (language-model) versions of the same tokenised corpus are compared position by position over
    the target positions: top-1 agreement, KL(A||B) at --temperature of the top-k rebuilds, and both teachers'
    perplexity and entropy (--teacher-a/-b do not apply: a per-token version has one teacher).

    \b
    Examples:
      kdstore diff ./targets/mnist@v1 ./targets/mnist@v2            # e.g. teacher retrained, or fp16 vs top-k
      kdstore diff ./targets/mnist@v1 ./targets/mnist@v1 --teacher-a t0 --teacher-b t1 -T 4
    """
    from kdstore.compare import diff as run_diff
    from kdstore.compare import format_diff

    result = run_diff(a, b, temperature=temperature, teacher_a=teacher_a, teacher_b=teacher_b)
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else format_diff(result))
