"""Unfinished pushes: the record a push keeps on the remote, its lease, and what crashed pushes leave behind.

A push of dataset NAME whose files (paths, sizes, sha256) hash to the *content key* K fills ``NAME/vN``, claimed
by the object ``NAME/vN/.push-K``, and keeps a record of itself while it runs::

    NAME/.uploads/K/<token>.json   content key, version, files done, host, pid, heartbeat time, lease, state

The record is the push's *lease*. A thread rewrites it every `HEARTBEAT_SECONDS` (with the files uploaded so far,
at most once a second). A record is *live* while its state is "running", its heartbeat is younger than its
lease (`LEASE_SECONDS`) and, if it was written on this machine (same host name, boot and pid namespace), its
process still exists: a push killed here is known dead at once, one on another machine after the lease.

Taking the lease: write your record, list the records, and withdraw (delete yours, wait a random while, retry) if
another live one is there. With read-after-write listing (S3, GCS, Azure, local disks) at most one push holds it.
A push that finds a live record waits for it; one that finds only dead records takes over, inheriting their
version and files done. Two holders could only arise if a live push were judged dead (its heartbeat stalled for
longer than the lease); they would upload the same bytes to the same vN, and the manifest's exclusive create
picks one.

`unfinished` lists what pushes left (uncommitted vN directories with their size and idle time, live or not);
`prune` removes those idle for longer than a given age, holding the lease while it does, so that it never removes
an upload that a push is writing or resuming. This module imports no torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdstore.errors import KdstoreError, RemoteError
from kdstore.store.files import atomic_write_bytes
from kdstore.store.layout import MANIFEST_NAME, NAME_RE, parse_version_dir
from kdstore.store.remote import RemoteStore, _remote_errors

UPLOADS_DIR = ".uploads"
CLAIM_PREFIX = ".push-"
HEARTBEAT_SECONDS = 10.0
LEASE_SECONDS = 60.0
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_HELD: set[str] = set()  # tokens of the leases this process holds: what this process knows of its own liveness


def content_key(name: str, files: list[dict[str, Any]]) -> str:
    """sha256 of the dataset name and the manifest's files (path, bytes, sha256, in order): what a push uploads."""
    material = {"name": name, "files": [[f["path"], f["bytes"], f["sha256"]] for f in files]}
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def _seconds(value: Any) -> float | None:
    """A time as the backends give it (epoch seconds, datetime, ISO text) -> epoch seconds; None if unknown."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(value, _dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)).timestamp()
    return None


def _mtime(info: dict[str, Any]) -> float | None:
    """When an object was last written, from a listing entry (S3, local, memory, GCS and Azure spell it apart)."""
    for k in ("LastModified", "mtime", "updated", "last_modified", "created"):
        t = _seconds(info.get(k))
        if t is not None:
            return t
    return None


# --- liveness -------------------------------------------------------------------------------------------------


@functools.cache
def machine_id() -> str:
    """Host name, boot and pid namespace, hashed: two records with the same id name processes in one pid space."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:
            parts.append("?")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks after boot) of a process, from /proc; None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the command name, in parentheses, may contain spaces
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    return stat[0] not in ("Z", "X") and (start is None or stat[1] == start)  # a reused pid starts later


def is_live(record: dict[str, Any], now: float | None = None) -> bool:
    """Whether the push (or prune) that wrote `record` is still running (see the module docstring)."""
    beat = _seconds(record.get("heartbeat_at"))
    lease = record.get("lease_seconds", LEASE_SECONDS)
    if record.get("state") != "running" or beat is None or not isinstance(lease, (int, float)):
        return False
    if (time.time() if now is None else now) - beat > lease:
        return False
    pid = record.get("pid")
    if record.get("machine") != machine_id() or not isinstance(pid, int) or pid <= 0:
        return True
    if pid == os.getpid():  # this process: exactly the leases it holds now (a failed push's record may say running)
        return record.get("token") in _HELD
    return _process_alive(pid, record.get("pid_start"))


def describe_holder(record: dict[str, Any], now: float | None = None) -> str:
    """'host pid 123, heartbeat 4 s ago' for messages."""
    beat = _seconds(record.get("heartbeat_at"))
    ago = f", heartbeat {max(0, round((time.time() if now is None else now) - beat))} s ago" if beat else ""
    return f"{record.get('host', '?')} pid {record.get('pid', '?')}{ago}"


# --- records and the lease -----------------------------------------------------------------------------------


def _record_parts(name: str, key: str, token: str) -> tuple[str, ...]:
    return (name, UPLOADS_DIR, key, f"{token}.json")


def write_object(store: RemoteStore, parts: tuple[str, ...], data: bytes) -> None:
    """Write a small object whole: on a local disk by rename (never seen half written), elsewhere in one PUT."""
    with _remote_errors(store.url_of(*parts)):
        if store.local:
            path = Path(store.path(*parts))
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        else:
            store.fs.pipe_file(store.path(*parts), data)


def remove_object(store: RemoteStore, parts: tuple[str, ...]) -> None:
    """Delete an object, best effort: what is left is invisible to readers and `prune` removes it."""
    try:
        store.fs.rm_file(store.path(*parts))
    except Exception:  # noqa: BLE001 - best effort, see above
        return
    if store.local:  # local directories do not vanish with their last file
        for up in range(1, len(parts) - 1):
            try:
                os.rmdir(store.path(*parts[:-up]))
            except OSError:
                break


def read_records(store: RemoteStore, name: str, key: str) -> dict[str, dict[str, Any]]:
    """{token: record} of every push that holds or held the upload of `key` (unreadable records are skipped)."""
    found = store.find(name, UPLOADS_DIR, key)
    paths = {store.path(*_record_parts(name, key, rel[:-5])): rel[:-5]
             for rel in found if rel.endswith(".json") and "/" not in rel}
    texts = store.cat_many(list(paths), store.url_of(name, UPLOADS_DIR, key))
    out = {}
    for p, token in paths.items():
        record = _parse_record(texts.get(p))
        if record is not None:
            out[token] = record
    return out


def _parse_record(raw: bytes | None) -> dict[str, Any] | None:
    try:
        record = json.loads(raw or b"")
    except ValueError:
        return None
    return record if isinstance(record, dict) and "content_key" in record else None


def new_record(key: str, name: str, *, purpose: str, files: int = 0, nbytes: int = 0,
               source: str = "") -> dict[str, Any]:
    """What a push (or prune) says about itself in its record; `acquire` adds the time, version and files done."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {"kdstore_upload": 1, "purpose": purpose, "content_key": key, "name": name, "version": None,
            "files": files, "bytes": nbytes, "files_done": [], "source": source, "host": socket.gethostname(),
            "machine": machine_id(), "pid": pid, "pid_start": stat[1] if stat else None, "state": "running",
            "lease_seconds": LEASE_SECONDS}


class Lease:
    """This process's hold on the upload of one content key: its record, refreshed by a heartbeat thread.

    `inherited` are the dead records taken over (their version and files done are ours now); `close` removes
    them with our own record when the work is finished, or marks ours "interrupted" when it is not.
    """

    def __init__(self, store: RemoteStore, name: str, key: str, token: str, record: dict[str, Any],
                 inherited: dict[str, dict[str, Any]]) -> None:
        self.store, self.name, self.key, self.token = store, name, key, token
        self.record, self.inherited = record, inherited
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._dirty = False
        self._written = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="kdstore-lease", daemon=True)
        self._thread.start()

    @property
    def version(self) -> int | None:
        v = self.record.get("version")
        return v if isinstance(v, int) else None

    @property
    def files_done(self) -> set[str]:
        return set(self.record["files_done"])

    def set_version(self, version: int) -> None:
        """Record the vN this upload fills (written at once: a rerun must find it)."""
        with self._lock:
            self.record["version"] = version
            self._write()

    def file_done(self, path: str) -> None:
        """Note a file as uploaded; the heartbeat thread writes it within about a second."""
        with self._lock:
            if path not in self.record["files_done"]:
                self.record["files_done"].append(path)
                self._dirty = True

    def _write(self) -> None:
        self.record["heartbeat_at"] = _iso(time.time())
        write_object(self.store, _record_parts(self.name, self.key, self.token), json.dumps(self.record).encode())
        self._written, self._dirty = time.monotonic(), False

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                since = time.monotonic() - self._written
                if since >= HEARTBEAT_SECONDS or (self._dirty and since >= 1.0):
                    # The upload's own writes fail loudly if the store refuses them; the lease then runs out.
                    with contextlib.suppress(KdstoreError):
                        self._write()

    def close(self, *, finished: bool) -> None:
        """Stop the heartbeat. Finished: remove our record and the inherited ones. Else mark ours interrupted,
        so that a rerun takes over at once instead of waiting for the lease to run out."""
        self._stop.set()
        self._thread.join()
        _HELD.discard(self.token)
        with self._lock:
            if finished:
                for token in [self.token, *self.inherited]:
                    remove_object(self.store, _record_parts(self.name, self.key, token))
                return
            self.record["state"] = "interrupted"
            with contextlib.suppress(KdstoreError):  # e.g. the store refuses writes now: the lease runs out
                self._write()


def acquire(store: RemoteStore, name: str, key: str, record: dict[str, Any]) -> Lease | dict[str, Any]:
    """Take the lease on the upload of `key`, or return the record of the live push that holds it."""
    token = uuid.uuid4().hex
    for attempt in range(50):
        records = read_records(store, name, key)
        live = [r for r in records.values() if is_live(r)]
        if live:
            return live[0]
        versions = [r["version"] for r in records.values() if isinstance(r.get("version"), int)]
        done = sorted({p for r in records.values() for p in r.get("files_done", []) if isinstance(p, str)})
        mine = {**record, "token": token, "version": max(versions, default=None), "files_done": done,
                "started_at": _iso(time.time()), "heartbeat_at": _iso(time.time())}
        _HELD.add(token)  # live for this process's other threads from the moment the record can be seen
        try:
            write_object(store, _record_parts(name, key, token), json.dumps(mine).encode())
            others = {t: r for t, r in read_records(store, name, key).items() if t != token}
            if not any(is_live(r) for r in others.values()):
                return Lease(store, name, key, token, mine, others)
        except BaseException:
            _HELD.discard(token)
            raise
        _HELD.discard(token)
        remove_object(store, _record_parts(name, key, token))  # another push wrote its record at the same moment
        time.sleep(random.uniform(0.0, min(0.05 * 2 ** attempt, 1.0)))
    raise RemoteError(f"{store.url_of(name)}: could not take the upload lease of {key[:12]}... after 50 tries; "
                      "many pushes of the same version are running at once: retry later")


# --- what pushes left: list and prune -------------------------------------------------------------------------


@dataclass(frozen=True)
class Unfinished:
    """An upload that did not finish (crashed, interrupted, or still running), or the markers a finished one left."""

    name: str
    version: int | None  # the vN it fills; None if it stopped before claiming one
    key: str | None  # its content key; None for a vN left without a claim of this kind (an older kdstore, by hand)
    objects: int
    bytes: int
    data_files: int  # data files in vN
    files_total: int | None  # how many the push has (from its record)
    idle_seconds: float  # since the last object written or heartbeat (0 where the backend gives no times)
    live: bool
    holder: str | None  # the newest record's host and pid
    published: bool = False  # vN has its manifest: only the push's markers are left

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}" if self.version is not None else f"{self.name} (no version claimed)"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "content_key": self.key, "objects": self.objects,
                "bytes": self.bytes, "data_files": self.data_files, "files_total": self.files_total,
                "idle_seconds": round(self.idle_seconds, 1), "live": self.live, "holder": self.holder,
                "published": self.published}


def unfinished(store: RemoteStore) -> list[Unfinished]:
    """Every unfinished upload in the store, and the leftover markers of finished ones, by name and version."""
    now = time.time()
    in_version: dict[tuple[str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    record_paths: dict[tuple[str, str], list[str]] = defaultdict(list)
    for rel, info in store.find().items():
        parts = rel.split("/")
        if len(parts) < 3 or not NAME_RE.match(parts[0]):
            continue
        n = parse_version_dir(parts[1])
        if n is not None:
            in_version[(parts[0], n)]["/".join(parts[2:])] = info
        elif parts[1] == UPLOADS_DIR and len(parts) == 4 and parts[3].endswith(".json") and _KEY_RE.match(parts[2]):
            record_paths[(parts[0], parts[2])].append(store.path(rel))
    texts = store.cat_many([p for ps in record_paths.values() for p in ps], store.url)
    records = {k: [r for p in ps if (r := _parse_record(texts.get(p))) is not None] for k, ps in record_paths.items()}
    out = []
    for (name, n), objs in sorted(in_version.items()):
        keys = [rest[len(CLAIM_PREFIX):] for rest in objs if rest.startswith(CLAIM_PREFIX)]
        key = next((k for k in keys if _KEY_RE.match(k)), None)
        if MANIFEST_NAME in objs:
            if key is None:
                continue  # a published version
            objs = {rest: i for rest, i in objs.items() if rest.startswith(CLAIM_PREFIX) or rest == MANIFEST_NAME}
        out.append(_summary(name, n, key, objs, records.pop((name, key), []) if key else [], now))
    for (name, key), recs in sorted(records.items()):  # stopped before claiming a version (or it was removed)
        out.append(_summary(name, None, key, {}, recs, now))
    return out


def _summary(name: str, version: int | None, key: str | None, objs: dict[str, dict[str, Any]],
             records: list[dict[str, Any]], now: float) -> Unfinished:
    times = [t for t in (_mtime(i) for i in objs.values()) if t is not None]
    times += [t for t in (_seconds(r.get("heartbeat_at")) for r in records) if t is not None]
    newest = max(records, key=lambda r: _seconds(r.get("heartbeat_at")) or 0.0, default=None)
    totals = [r["files"] for r in records if isinstance(r.get("files"), int)]
    return Unfinished(
        name, version, key, len(objs), sum(int(i.get("size") or 0) for i in objs.values() if i.get("size")),
        sum(1 for rest in objs if rest.startswith("data/")), max(totals, default=None),
        max(0.0, now - max(times)) if times else 0.0, any(is_live(r, now) for r in records),
        describe_holder(newest, now) if newest else None, MANIFEST_NAME in objs)


@dataclass
class PruneReport:
    removed: list[Unfinished] = field(default_factory=list)
    kept: list[tuple[Unfinished, str]] = field(default_factory=list)  # with the reason


def prune(store: RemoteStore, older_than: float, *, dry_run: bool = False) -> PruneReport:
    """Remove the unfinished uploads idle for `older_than` seconds or more, and the markers finished pushes left.

    Never one that is live (see `is_live`): the lease is taken before anything is deleted, so a push that starts
    to resume it meanwhile either waits for the prune or is left alone. A version with a manifest keeps its data
    (only the claim and records of its push go). On S3, multipart uploads under a removed vN are aborted too.
    """
    report = PruneReport()
    for u in unfinished(store):
        if u.live:
            report.kept.append((u, "a push is writing it"))
        elif u.idle_seconds < older_than:
            report.kept.append((u, "younger than the age given"))
        elif u.key is None and u.idle_seconds < LEASE_SECONDS:
            report.kept.append((u, "written less than a lease ago"))  # an older kdstore's push may be claiming it
        elif dry_run or _remove_upload(store, u):
            report.removed.append(u)
        else:
            report.kept.append((u, "a push took it over meanwhile"))
    return report


def _remove_upload(store: RemoteStore, u: Unfinished) -> bool:
    lease = None
    if u.key is not None:
        got = acquire(store, u.name, u.key, new_record(u.key, u.name, purpose="prune"))
        if not isinstance(got, Lease):
            return False
        lease = got
    try:
        if u.version is not None:
            vdir = (u.name, f"v{u.version}")
            if store.exists(*vdir, MANIFEST_NAME):  # published: only the push's claim goes
                if u.key is not None:
                    remove_object(store, (*vdir, CLAIM_PREFIX + u.key))
            else:
                with _remote_errors(store.url_of(*vdir)):
                    store.fs.rm(store.path(*vdir), recursive=True)
                _abort_multipart(store, vdir)
    finally:
        if lease is not None:
            lease.close(finished=True)  # removes its record and those it took over
    return True


def _abort_multipart(store: RemoteStore, parts: tuple[str, ...]) -> None:
    """S3 keeps the parts of an interrupted multipart upload (invisible, billed) until it is aborted."""
    if not store.s3:
        return
    bucket, _, prefix = store.path(*parts).partition("/")
    with _remote_errors(store.url_of(*parts)):
        for up in store.fs.list_multipart_uploads(bucket):
            if str(up.get("Key", "")).startswith(prefix + "/"):
                store.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
