"""`kdstore ls`: the datasets and versions in a store (local directory or URL)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from kdstore.cli._common import user_errors

if TYPE_CHECKING:
    from kdstore.store.catalog import Listing


@click.command("ls", short_help="List a store's datasets and versions (local or URL).")
@click.argument("store", metavar="STORE")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (store, versions[], unfinished) for scripts instead of the table.")
@click.option("--all", "show_all", is_flag=True,
              help="Also list unfinished uploads (interrupted or running pushes): size, idle time, running or not.")
@user_errors
def ls(store: str, as_json: bool, show_all: bool) -> None:
    """List every dataset version in STORE: teachers, transfer set, kind, rows, stored targets, size, creation time.

    STORE is the --out directory of `kdstore label`, or a URL (s3://bucket/targets, gs://..., file://...,
    memory://...). Listing a remote store reads only the manifests, never the data.

    \b
    Examples:
      kdstore ls ./targets
      kdstore ls s3://team-bucket/targets --json | jq -r '.versions[].ref'

    Teachers and the transfer set are shown by file name and the first 8 hex digits of their sha256 (two
    versions with the same transfer-set sha were labeled on the same bytes and can be compared with
    `kdstore diff`). A version whose manifest is damaged is listed with its error; check it with `kdstore verify`.

    With --all, each upload a push left unfinished is listed too (it is invisible to readers): its NAME@vN, data
    files and bytes so far, how long since it last wrote, and whether its push is still running. Rerun the push to
    resume it, or remove old ones with `kdstore prune STORE --older-than AGE`.
    """
    from kdstore.store.catalog import list_store, upload_text

    listing = list_store(store, with_uploads=show_all)
    if as_json:
        click.echo(json.dumps(listing.to_json(), indent=2))
        return
    if listing.entries:
        _table(listing)
    else:
        click.echo(f"no dataset versions in {listing.store}" + (f" ({listing.hint})" if listing.hint else ""))
    for u in listing.uploads or []:
        click.echo(upload_text(u))


def _table(listing: Listing) -> None:
    from kdstore.store.catalog import human_bytes

    has_parent = any(e.manifest and e.manifest.get("parent") for e in listing.entries)
    header = ["VERSION", "ROWS", "KIND", "TARGETS", "FORMAT", "SIZE", "CREATED", "TEACHERS", "TRANSFER SET"]
    if has_parent:
        header.append("FROM")
    rows: list[list[str]] = []
    errors: list[str] = []
    for e in listing.entries:
        ref = f"{e.name}@v{e.version}"
        if e.manifest is None:
            rows.append([ref, "?", "?", "DAMAGED (see below)", "?", "?", "?", "?", "?"] + (["?"] if has_parent else []))
            errors.append(f"{ref}: {e.error}")
            continue
        s = e.summary()
        teachers = ", ".join(f"{t['short']} ({t['sha256'][:8]})" for t in s["teachers"])
        row = [ref, str(s["rows"]), s["kind"], s["targets"]["text"], s["format"], human_bytes(s["bytes"]),
               s["created_at"][:16].replace("T", " "), teachers,
               f"{s['transfer_set']['file']} ({s['transfer_set']['sha256'][:8]})"]
        if has_parent:
            p = s["parent"]
            row.append(f"{p['name']}@v{p['version']} ({p['relation']})" if p else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("  ".join(c.ljust(w) if i < len(r) - 1 else c
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    for name, n in listing.unfinished.items():
        click.echo(f"{name}: {n} unfinished run(s) staged (rerun the same `kdstore label` to resume)")
    for line in errors:
        click.echo(line)
