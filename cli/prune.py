"""`kdstore prune`: remove the unfinished uploads that interrupted pushes left in a store."""

from __future__ import annotations

import re
from typing import Any

import click

from kdstore.cli._common import user_errors

_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


class Duration(click.ParamType):
    """An age such as 90s, 30m, 12h, 2d (a bare number is seconds), as seconds."""

    name = "AGE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|min|h|d)?\s*", str(value))
        if m is None:
            self.fail(f"{value!r} is not an age; use a number with s, m, h or d, e.g. 30m or 2d", param, ctx)
        return float(m.group(1)) * _UNITS[m.group(2) or "s"]


@click.command("prune", short_help="Remove unfinished uploads older than an age (never a running push's).")
@click.argument("store", metavar="STORE")
@click.option("--older-than", "older_than", type=Duration(), default="1d", show_default=True,
              help="Remove uploads idle (no write, no heartbeat) for at least this long: 90s, 30m, 12h, 2d.")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@user_errors
def prune(store: str, older_than: float, dry_run: bool) -> None:
    """Remove what interrupted pushes left in STORE (a URL such as s3://bucket/targets, or a directory): version
    directories without a manifest, and the markers of pushes that finished. Published versions are never touched.

    An upload is removed only if no push is running it: a running push refreshes its record under
    NAME/.uploads/ every 10 s, and one whose record is older than its 60 s lease (or whose process is gone, on
    this machine) is not running. prune takes the same lease before it deletes, so a push that starts to resume
    the upload meanwhile waits, or is left alone. Rerunning an interrupted push resumes it instead of pruning.

    \b
    Examples:
      kdstore ls s3://team-bucket/targets --all
      kdstore prune s3://team-bucket/targets --older-than 2h --dry-run
      kdstore prune s3://team-bucket/targets --older-than 2h
    """
    from kdstore.store.catalog import human_bytes, upload_text
    from kdstore.store.catalog import prune as run_prune

    report = run_prune(store, older_than, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for u in report.removed:
        click.echo(f"{verb} {upload_text(u)}")
    for u, why in report.kept:
        click.echo(f"kept {upload_text(u)}: {why}")
    n, size = len(report.removed), human_bytes(sum(u.bytes for u in report.removed))
    click.echo(f"{verb} {n} unfinished upload{'s' if n != 1 else ''} ({size}); kept {len(report.kept)}")
