"""`kdstore verify`: check every byte of a version against its manifest."""

from __future__ import annotations

import click

from kdstore.cli._common import user_errors


@click.command("verify", short_help="Check every file of a version against its manifest.")
@click.argument("ref", metavar="STORE/NAME[@vN]")
@user_errors
def verify(ref: str) -> None:
    """Check a version in full: manifest schema and paths, every data file's presence, size, sha256, row count
    and columns. Exits 1 if anything is wrong, printing one line per problem (each naming its file) and a summary.

    The version is STORE/NAME (latest), STORE/NAME@vN, or the same under a URL (s3://bucket/targets/NAME@v2);
    a remote version is downloaded (into the local cache) and every file checked as it arrives.

    \b
    Examples:
      kdstore verify ./targets/mnist-t1200@v2
      kdstore verify s3://team-bucket/targets/mnist-t1200

    Opening a version (train, inspect, diff) already checks the cheap things (schema, file sizes, row totals);
    verify also re-hashes every file. A failure means the files were changed after they were written: restore
    them from a copy, or re-create the version (`kdstore label`, `kdstore convert`).
    """
    from kdstore.store.catalog import human_bytes
    from kdstore.store.catalog import verify as run_verify

    report = run_verify(ref)
    if report.ok:
        click.echo(f"ok {report.ref}: {report.files} file(s), {human_bytes(report.bytes)}, {report.rows} rows; "
                   "schema, sizes, sha256, row counts and columns match the manifest")
        if len(report.environments) > 1:
            click.echo("computed in more than one environment: float columns may differ in the last bits from a "
                       "run on one kind of machine (docs/format.md, Reproducibility):")
        for line in report.environments:
            click.echo(f"  {line}")
        return
    for problem in report.problems:
        click.echo(problem)
    n = len(report.problems)
    raise click.ClickException(f"{report.ref}: {n} problem{'s' if n != 1 else ''} found; the version is damaged: "
                               "restore the named files or re-create the version")
