"""Publish a local version to a store at a URL (`kdstore push`): resumable, idempotent, never seen half done.

1. The local version is verified in full. Its *content key* is the sha256 of the dataset name and its files
   (paths, sizes, sha256): what is published, whatever the version is called locally.
2. A published version of NAME with exactly these files ends the push: it is named, nothing is uploaded.
3. The push takes the upload lease on its content key (`kdstore.store.uploads`); if a live push of the same
   content holds it, this one waits for it and then reports the version it published.
4. It finds the ``NAME/vN`` this content was being uploaded to (the claim ``NAME/vN/.push-<key>`` an interrupted
   push left) or claims a new number, N = highest + 1: write the claim, list ``vN/``, and move on if anything
   else is there.
5. It uploads each file not already in vN (same size, and the same sha256 by the push's record, by the object's
   own metadata on S3, or by hashing it on a local disk), writes ``manifest.json`` last with an exclusive create,
   then removes its claim and record.

An interrupted push leaves its claim, data files and record, invisible to readers; the same push run again
resumes at step 5. See docs/format.md, "Remote stores". This module imports no torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdstore.errors import RemoteError, StoreFormatError
from kdstore.store import manifest as mf
from kdstore.store import uploads
from kdstore.store.files import fsync_dir, sha256_file, write_synced
from kdstore.store.layout import MANIFEST_NAME, VersionRef, check_name, parse_version_dir, version_dir_name
from kdstore.store.reader import Version
from kdstore.store.remote import RemoteStore, _remote_errors, file_url_to_path, is_remote, is_url, resolve_any
from kdstore.store.uploads import CLAIM_PREFIX, Lease

_SHA_META = "kdstore-sha256"  # S3 user metadata (x-amz-meta-kdstore-sha256) on every pushed data file


@dataclass(frozen=True)
class PushResult:
    """Where the version is published; `existing` if it already was (nothing uploaded)."""

    url: str  # URL/NAME@vN
    name: str
    version: int
    files: int
    bytes: int
    existing: bool = False
    resumed_files: int = 0  # files an interrupted push of the same content had uploaded already
    uploaded_bytes: int = 0


def push(source: str | Path | VersionRef, url: str, *, name: str | None = None,
         progress: Callable[[int], None] | None = None, on_wait: Callable[[str], None] | None = None) -> PushResult:
    """Publish a version to the store at `url` as ``NAME/vN``, or name the version that already has its files.

    Resumes an interrupted push of the same content (same vN, only the missing files uploaded); a push of the
    same content running at the same time is waited for, and its version reported.

    Args:
        source: local or remote version reference.
        url: the destination store (``s3://bucket/targets``, ``memory://x``, a local directory...).
        name: dataset name on the remote (default: the source's dataset directory name).
        progress: called with the bytes of each file as it is uploaded or found already there.
        on_wait: called once with a message if another push of the same content is running and this one waits.

    Raises:
        StoreFormatError: the source version is damaged (nothing is published).
        RemoteError: the store refused a read or write; what was uploaded is kept for a rerun to resume.
    """
    local = resolve_any(source, option="")
    v = _verified(local)
    name = name or local.name
    check_name(name)
    store = RemoteStore(file_url_to_path(url) if is_url(url) and not is_remote(url) else url)
    key = uploads.content_key(name, v.files + v.attachments)
    total = sum(f["bytes"] for f in v.files + v.attachments)
    got = _lease_or_published(store, name, key, v, str(local), on_wait)
    if isinstance(got, int):
        return PushResult(f"{store.url_of(name)}@v{got}", name, got, len(v.files), total, existing=True)
    finished = False
    try:
        version = _version_for(store, name, key, got, str(local))
        try:
            resumed, sent = _upload(store, name, version, v, got, progress)
        except RemoteError as e:
            raise RemoteError(f"{e.template}; nothing was published, the files uploaded so far are kept: rerun the "
                              "same push to resume") from None
        manifest = {**v.manifest, "name": name, "version": version}
        manifest.pop("derived_files", None)  # derived files stay with the local copy (see docs/format.md)
        existing = not _publish_manifest(store, name, version, mf.dumps(manifest), got.token, v.files)
        uploads.remove_object(store, (name, version_dir_name(version), CLAIM_PREFIX + key))
        finished = True
    finally:
        got.close(finished=finished)
    return PushResult(f"{store.url_of(name)}@v{version}", name, version, len(v.files), total, existing, resumed, sent)


def _verified(local: VersionRef) -> Version:
    v = Version(local)
    problems = v.verify(full=True)
    if problems:
        raise StoreFormatError(f"{local}: {problems[0]}"
                               + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                               + "; refusing to publish a damaged version (run `kdstore verify` on it)")
    return v


def published_version(store: RemoteStore, name: str, files: list[dict[str, Any]]) -> int | None:
    """The lowest published version of `name` whose manifest lists exactly `files` (path, bytes, sha256), if any.

    The content index is the published manifests themselves: nothing else is kept that could disagree with them.
    """
    want = [(f["path"], f["bytes"], f["sha256"]) for f in files]
    paths = {store.path(name, version_dir_name(n), MANIFEST_NAME): n for n in store.versions(name)}
    texts = store.cat_many(list(paths), store.url_of(name))
    for p, n in sorted(paths.items(), key=lambda item: item[1]):
        try:
            got = [(f["path"], f["bytes"], f["sha256"]) for f in json.loads(texts.get(p) or b"")["files"]]
        except (ValueError, KeyError, TypeError):
            continue  # a damaged manifest: `kdstore ls` and `verify` report it
        if got == want:
            return n
    return None


def _lease_or_published(store: RemoteStore, name: str, key: str, v: Version, source: str,
                        on_wait: Callable[[str], None] | None) -> Lease | int:
    """The lease on this content's upload, or the version that already has it (waiting for a live push first)."""
    told = False
    while True:
        found = published_version(store, name, v.files)
        if found is not None:
            return found
        record = uploads.new_record(key, name, purpose="push", files=len(v.files),
                                    nbytes=sum(f["bytes"] for f in v.files + v.attachments), source=source)
        got = uploads.acquire(store, name, key, record)
        if isinstance(got, Lease):
            found = published_version(store, name, v.files)  # the push we waited for may have finished just now
            if found is None:
                return got
            got.close(finished=True)
            return found
        if on_wait is not None and not told:
            at = f"@v{got['version']}" if isinstance(got.get("version"), int) else ""
            on_wait(f"another push ({uploads.describe_holder(got)}) is uploading the same files to "
                    f"{store.url_of(name)}{at}; waiting for it to finish")
            told = True
        time.sleep(random.uniform(0.5, 1.5))


def _version_for(store: RemoteStore, name: str, key: str, lease: Lease, source: str) -> int:
    """The vN an interrupted push of this content claimed (still without a manifest), else a newly claimed one."""
    claim = CLAIM_PREFIX + key
    n = lease.version
    if n is None and lease.inherited:  # killed between claiming a number and recording it
        found = (parse_version_dir(rel.split("/")[0]) for rel in store.find(name) if rel.endswith("/" + claim))
        n = min((x for x in found if x is not None), default=None)
    if n is None or not store.exists(name, version_dir_name(n), claim) \
            or store.exists(name, version_dir_name(n), MANIFEST_NAME):
        n = _claim(store, name, claim, source)
    if n != lease.version:
        lease.set_version(n)
    return n


def _claim(store: RemoteStore, name: str, claim: str, source: str) -> int:
    """Claim the first free version number from (highest existing vN) + 1: write a claim, then list."""
    taken = [v for v in map(parse_version_dir, store.ls(name)) if v is not None]
    n = max(taken, default=0) + 1
    info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "source": source,
                       "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}).encode()
    collisions = 0
    while collisions < 50:
        vdir = version_dir_name(n)
        if store.ls(name, vdir):  # a committed version, or another push's claim or data: take the next number
            n += 1
            continue
        uploads.write_object(store, (name, vdir, claim), info)
        others = [x for x in store.ls(name, vdir) if x != claim]
        if not others:
            return n
        # Another push wrote a claim in vN at the same moment: withdraw, wait a random, growing while (both may
        # withdraw), and look at vN again; whoever then finds it empty takes it, the others move on.
        uploads.remove_object(store, (name, vdir, claim))
        collisions += 1
        time.sleep(random.uniform(0.0, min(0.02 * 2 ** min(collisions, 6), 1.0)))
    raise RemoteError(f"{store.url_of(name)}: could not claim a version number after {collisions} collisions; "
                      "many pushes are running at once: retry later")


def _upload(store: RemoteStore, name: str, version: int, v: Version, lease: Lease,
            progress: Callable[[int], None] | None) -> tuple[int, int]:
    """Upload the files vN does not hold yet; (files already there, bytes uploaded)."""
    vdir = version_dir_name(version)
    there = store.find(name, vdir)
    done = lease.files_done
    skipped = sent = 0
    for f, p in zip(v.files + v.attachments, v.file_paths + v.attachment_paths, strict=True):
        parts = (name, vdir, f["path"])
        info = there.get(f["path"])
        if info is not None and info.get("size") == f["bytes"] and (
                f["path"] in done or _remote_sha256(store, parts) == f["sha256"]):
            skipped += 1
        else:
            _put(store, p, parts, f["sha256"])
            sent += f["bytes"]
        lease.file_done(f["path"])
        if progress:
            progress(f["bytes"])
    return skipped, sent


def _remote_sha256(store: RemoteStore, parts: tuple[str, ...]) -> str | None:
    """The sha256 of a stored object without downloading it, where the backend allows; None where it does not."""
    path = store.path(*parts)
    with contextlib.suppress(Exception):  # unreadable: upload the file again
        if store.local:
            return sha256_file(path)
        if store.s3:
            value = store.fs.metadata(path).get(_SHA_META)
            return value if isinstance(value, str) else None
    return None


def _put(store: RemoteStore, src: Path, parts: tuple[str, ...], sha256: str) -> None:
    dst = store.path(*parts)
    with _remote_errors(store.url_of(*parts)):
        if store.local:
            store.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        if store.s3:  # the object's sha256 travels with it, so a resumed push can check it without a download
            store.fs.put_file(str(src), dst, Metadata={_SHA_META: sha256})
        else:
            store.fs.put_file(str(src), dst)


def _publish_manifest(store: RemoteStore, name: str, version: int, text: str, token: str,
                      files: list[dict[str, Any]] | None = None) -> bool:
    """Write the manifest by exclusive create. False if the same content's manifest was there already (a twin
    push judged this one dead and finished first); RemoteError if another manifest is there."""
    where = store.url_of(name, f"v{version}", MANIFEST_NAME)
    if store.exists(name, f"v{version}", MANIFEST_NAME):
        if files is not None and published_version(store, name, files) == version:
            return False
        raise RemoteError(f"{where} already exists: another push took v{version} despite the claim (a store "
                          "without read-after-write listing?); nothing of ours was published: push again")
    dst = store.path(name, f"v{version}", MANIFEST_NAME)
    data = text.encode("utf-8")
    if store.local:
        tmp = Path(dst).with_name(f".{MANIFEST_NAME}.{token}.tmp")
        try:
            write_synced(tmp, data)
            try:
                os.link(tmp, dst)  # atomic, and fails if the manifest exists: an exclusive create
            except FileExistsError:
                raise RemoteError(f"{where} was written by another push a moment ago; push again") from None
            fsync_dir(Path(dst).parent)
        finally:
            tmp.unlink(missing_ok=True)
        return True
    with _remote_errors(where):
        try:
            # S3: PUT with If-None-Match: * (atomic exclusive create); other backends: exists-check + PUT.
            store.fs.pipe_file(dst, data, mode="create")
        except FileExistsError:
            raise RemoteError(f"{where} was written by another push a moment ago; push again") from None
    return True
