"""`kdstore push`: publish a version to a remote store."""

from __future__ import annotations

import click

from kdstore.cli._common import progress_bar, user_errors


@click.command("push", short_help="Publish a version to a remote store (s3://, gs://, ...); resumes, never duplicates.")
@click.argument("ref", metavar="STORE/NAME[@vN]")
@click.argument("url", metavar="URL")
@click.option("--name", default=None, help="Dataset name on the remote. Default: the source's dataset name.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def push(ref: str, url: str, name: str | None, quiet: bool) -> None:
    """Publish a version to the store at URL (s3://bucket/targets, gs://..., a directory) as NAME/vN, where N is
    one more than the highest version already there.

    The version is verified in full first. Data files are uploaded before manifest.json, so readers never see a
    half-pushed version. Credentials and endpoints come from the usual places (AWS_PROFILE, AWS_ENDPOINT_URL, ...).

    \b
    Interrupted? Run the same command again: it continues the same NAME/vN, uploading only the files not
    already there. Already published? If a version of NAME on the remote has exactly these files (same
    sha256), nothing is uploaded and that version is named. A push of the same version running at the same
    time is waited for. `kdstore ls URL --all` lists unfinished uploads; `kdstore prune URL` removes old ones
    (docs/format.md, "Remote stores").

    \b
    Examples:
      kdstore push ./targets/mnist@v2 s3://team-bucket/targets
      kdstore ls s3://team-bucket/targets
      kdstore train --targets s3://team-bucket/targets/mnist@v1 ...
    """
    from kdstore.store.catalog import human_bytes
    from kdstore.store.publish import push as run_push

    with progress_bar(0, "push", "B", disable=quiet) as bar:
        def progress(n: int) -> None:
            bar.update(n)

        def waiting(message: str) -> None:
            click.echo(message, err=True)

        r = run_push(ref, url, name=name, progress=progress, on_wait=waiting)
    size = f"{r.files} file{'s' if r.files != 1 else ''}, {human_bytes(r.bytes)}"
    if r.existing:
        click.echo(f"already published: {ref} -> {r.url} (same {size}; nothing uploaded)")
    elif r.resumed_files:
        click.echo(f"pushed {ref} -> {r.url} ({size}; resumed: {r.resumed_files} file"
                   f"{'s' if r.resumed_files != 1 else ''} already there, {human_bytes(r.uploaded_bytes)} uploaded)")
    else:
        click.echo(f"pushed {ref} -> {r.url} ({size})")
