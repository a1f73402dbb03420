"""`kdstore push`: publish a version to a remote store."""

from __future__ import annotations

import click

from kdstore.cli._common import user_errors


@click.command("push", short_help="Publish a version to a remote store (s3://, gs://, ...).")
@click.argument("ref", metavar="STORE/NAME[@vN]")
@click.argument("url", metavar="URL")
@click.option("--name", default=None, help="Dataset name on the remote. Default: the source's dataset name.")
@user_errors
def push(ref: str, url: str, name: str | None) -> None:
    """Publish a version to the store at URL (s3://bucket/targets, gs://..., a directory) as NAME/vN, where N is
    one more than the highest version already there.

    The version is verified in full first. Data files are uploaded before manifest.json, so readers never see a
    half-pushed version; two pushes running at once get different version numbers (docs/format.md, "Remote
    stores"). Credentials and endpoints come from the usual places (AWS_PROFILE, AWS_ENDPOINT_URL, ...).

    \b
    Examples:
      kdstore push ./targets/mnist@v2 s3://team-bucket/targets
      kdstore ls s3://team-bucket/targets
      kdstore train --targets s3://team-bucket/targets/mnist@v1 ...
    """
    from kdstore.store.catalog import human_bytes
    from kdstore.store.remote import push as run_push

    result = run_push(ref, url, name=name)
    click.echo(f"pushed {ref} -> {result.url}  ({result.files} file(s), {human_bytes(result.bytes)})")
