"""Write a dataset version: staged shard by shard (resumable), made visible by one rename at commit.

Layout while writing::

    STORE/NAME/.staging-<run_key>.lock  flock held by the writing process
    STORE/NAME/.staging-<run_key>/      invisible to readers (leading dot, no manifest)
        data/part-00000.parquet         complete shards (written to a temporary name, fsynced, renamed)
        data/part-00000.json            sidecar: rows, bytes, sha256, caller's partial statistics

At commit the sidecars go, ``manifest.json`` is written **last**, and the staging directory is
renamed to ``STORE/NAME/vN`` (N = one more than the highest existing version; a concurrent writer that took N
makes us retry N + 1). An interrupted run leaves its staging directory; rerunning with the same settings
(same `run_key`) resumes from the first shard without a sidecar.

`write_async` hands a shard to the writer's background thread, so encoding, compression, fsync and hashing of one
shard overlap the caller's computation of the next (at most two shards wait in the queue).
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import queue
import re
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from kdstore.errors import ConfigError, KdstoreError, StoreFormatError, arg
from kdstore.store import manifest as mf
from kdstore.store.files import atomic_path, atomic_write_json, create_exclusive, fsync_dir, sha256_file
from kdstore.store.formats import EXTENSIONS, FORMATS, column_names, read_shard, write_shard
from kdstore.store.layout import STAGING_PREFIX, check_name, existing_versions, version_dir_name


class VersionWriter:
    """Context manager that stages shards of one new version and commits them atomically.

    Args:
        store: the store root directory (created if missing).
        name: dataset name.
        run_key: hex digest of everything that determines the data (teachers, transfer set, settings);
            a rerun with the same key resumes the same staging directory.
        fmt: ``"parquet"`` or ``"hdf5"``.
        columns: column specs ``{"name", "role", "dtype", "shape", "teacher"?}`` in file order.
        shard_rows, row_group_rows: rows per shard file and per row group/chunk.
        shard_metadata: JSON embedded in every shard (must not vary between runs: no timestamps).
        pinned: settings recorded when the run first starts and handed back to every later participant
            (`self.pinned`), e.g. the intra-op thread count, so that a resumed or sharded run computes like the
            first process did. Not part of the resume check.
    """

    def __init__(
        self,
        store: Path,
        name: str,
        *,
        run_key: str,
        fmt: str,
        columns: list[dict[str, Any]],
        shard_rows: int,
        row_group_rows: int,
        shard_metadata: dict[str, Any],
        participant: str = "",
        pinned: dict[str, Any] | None = None,
    ) -> None:
        check_name(name)
        if fmt not in FORMATS:
            raise ConfigError(f"{arg('format')} {fmt!r} is not supported; expected one of {', '.join(FORMATS)}")
        if shard_rows < 1 or row_group_rows < 1:
            raise ConfigError(f"shard_rows and row_group_rows must be >= 1, got {shard_rows}, {row_group_rows}")
        if not re.fullmatch(r"[0-9a-f]{8,64}", run_key):
            raise ConfigError(f"run_key must be a hex digest, got {run_key!r}")
        self.store, self.name, self.fmt = Path(store), name, fmt
        self.columns, self.shard_rows, self.row_group_rows = columns, shard_rows, row_group_rows
        self.shard_metadata = shard_metadata
        self.pinned: dict[str, Any] = dict(pinned or {})
        self.dataset_dir = self.store / name
        self.staging = self.dataset_dir / f"{STAGING_PREFIX}{run_key[:16]}"
        # One lock per participant: a single run holds ".lock"; jobs of a sharded run each hold their own
        # (".shard-i-of-N.lock"), so they can write disjoint shards of the same staging directory at once.
        suffix = f".{participant}" if participant else ""
        self._lock_path = self.dataset_dir / f"{self.staging.name}{suffix}.lock"
        self._commit_lock_path = self.dataset_dir / f"{self.staging.name}.commit.lock"
        self._lock_fd: int | None = None
        self._queue: queue.Queue[tuple[int, int, dict[str, np.ndarray], dict[str, Any]] | None] | None = None
        self._thread: threading.Thread | None = None
        self._failure: list[BaseException] = []
        self._attachments: list[str] = []  # paths (in the version) of `attach`ed files, listed at commit

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> VersionWriter:
        try:
            (self.staging / "data").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreFormatError(
                f"{arg('out')} {self.store}: cannot create {self.staging}: {e.strerror}; choose a writable directory"
            ) from None
        self._lock()
        settings = self.staging / "settings.json"
        desc = {"format": self.fmt, "columns": self.columns, "shard_rows": self.shard_rows,
                "row_group_rows": self.row_group_rows, "metadata": self.shard_metadata}
        # The first participant records the settings (and what it pins); everyone after, a resumed run or another
        # job of a sharded run starting at the same moment, reads them back and must agree.
        create_exclusive(settings, json.dumps({**desc, "pinned": self.pinned}, indent=1).encode("utf-8"))
        stored = json.loads(settings.read_text("utf-8"))
        self.pinned = stored.pop("pinned", None) or self.pinned
        if stored != json.loads(json.dumps(desc)):
            raise StoreFormatError(
                f"{self.staging} holds an interrupted run with other settings; delete that directory to start over"
            )
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        # On failure the staging directory stays for resumption; shards already queued are still finished (they
        # are complete results), then the lock is released.
        try:
            self._stop_thread()
        finally:
            self._unlock()

    def _lock(self) -> None:
        import fcntl

        # The lock lives beside the staging directory, so it never travels into the committed version.
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise KdstoreError(
                    f"another kdstore process is writing {self.staging} with the same settings; "
                    "wait for it to finish (its result will be the next version)"
                ) from None
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- shards --------------------------------------------------------------------------------
    def shard_path(self, index: int) -> Path:
        return self.staging / "data" / f"part-{index:05d}{EXTENSIONS[self.fmt]}"

    def completed(self) -> dict[int, dict[str, Any]]:
        """Sidecars of shards already complete in the staging directory, by shard index."""
        out = {}
        for side in sorted((self.staging / "data").glob("part-*.json")):
            info = json.loads(side.read_text("utf-8"))
            shard = self.staging / info["path"]
            if shard.exists() and shard.stat().st_size == info["bytes"]:
                out[int(info["index"])] = info
        return out

    def write(self, index: int, first_row: int, columns: dict[str, np.ndarray],
              stats: dict[str, Any]) -> dict[str, Any]:
        """Write shard `index` (rows from `first_row`), then its sidecar; both appear atomically."""
        final = self.shard_path(index)
        with atomic_path(final) as tmp:  # per-process name: the jobs of a sharded run may race on one shard
            write_shard(tmp, columns, self.columns, fmt=self.fmt, row_group_rows=self.row_group_rows,
                        metadata=self.shard_metadata)
        rows = len(next(iter(columns.values())))
        info = {"index": index, "path": f"data/{final.name}", "rows": rows, "bytes": final.stat().st_size,
                "sha256": sha256_file(final), "first_row": first_row, "stats": stats}
        atomic_write_json(final.with_suffix(".json"), info)
        return info

    def write_async(self, index: int, first_row: int, columns: dict[str, np.ndarray], stats: dict[str, Any]) -> None:
        """`write` on the writer's background thread; returns once the shard is queued (at most two wait).

        Raises:
            the first failure of an earlier queued write (nothing more is written after one fails).
        """
        self._raise_failure()
        if self._thread is None:
            self._queue = queue.Queue(maxsize=2)
            self._thread = threading.Thread(target=self._drain, name="kdstore-shard-writer", daemon=True)
            self._thread.start()
        assert self._queue is not None
        self._queue.put((index, first_row, columns, stats))

    def flush(self) -> None:
        """Wait until every queued shard is written; raise the first failure."""
        self._stop_thread()
        self._raise_failure()

    def _drain(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not None:
            if not self._failure:
                try:
                    self.write(*item)
                except BaseException as e:  # re-raised on the caller's thread
                    self._failure.append(e)

    def _stop_thread(self) -> None:
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
        self._thread = self._queue = None

    def _raise_failure(self) -> None:
        if self._failure:
            raise self._failure[0]

    # -- attachments: checksummed files beside the data (a feature projection) -----------------------------------
    def attach(self, rel: str, columns: dict[str, np.ndarray], specs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Stage an attachment `rel` (e.g. ``features/t0_feature_fc1.parquet``) with `columns`, once: a resumed run
        or another job of a sharded run that finds it staged already gets the staged columns back (the first
        writer's), so every shard uses the same file. Listed in the manifest's ``attachments`` at commit."""
        mf.check_relative_path(rel, "attachment")
        target = self.staging / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            write_shard(tmp, columns, specs, fmt=self.fmt, row_group_rows=max(1, len(next(iter(columns.values())))),
                        metadata={"attachment": rel})
            try:
                os.link(tmp, target)  # fails if another participant staged it first: theirs is kept
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        got = self.staged_attachment(rel)
        assert got is not None
        return got

    def staged_attachment(self, rel: str) -> dict[str, np.ndarray] | None:
        """The columns of attachment `rel` if a participant staged it already (else None); it will be listed."""
        target = self.staging / rel
        if not target.is_file():
            return None
        if rel not in self._attachments:
            self._attachments.append(rel)
        return read_shard(target, self.fmt, column_names(target, self.fmt))

    # -- commit ----------------------------------------------------------------------------------
    def commit(self, manifest: dict[str, Any]) -> Path | None:
        """Finish the version: validate, drop staging-only files, write the manifest last, rename.

        `manifest` lacks ``name``, ``version``, ``created_at`` and ``files``; they are filled in here.

        Returns:
            the committed version directory ``STORE/NAME/vN``, or None if another job of a sharded run is
            committing (or has committed) this staging directory.
        """
        import fcntl

        fd = os.open(self._commit_lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return None
            if not self.staging.is_dir():
                return None
            return self._commit(manifest)
        finally:
            os.close(fd)

    def _commit(self, manifest: dict[str, Any]) -> Path:
        done = self.completed()
        infos = [done[i] for i in sorted(done)]
        expected = list(range(len(infos)))
        if sorted(done) != expected:
            raise StoreFormatError(f"{self.staging}: shards {sorted(done)} are not contiguous from 0")
        files = [{k: info[k] for k in ("path", "rows", "bytes", "sha256", "first_row")} for info in infos]
        head = {"format_version": manifest["format_version"], "name": self.name, "version": 1,
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        manifest = {**head, **{k: v for k, v in manifest.items() if k not in head}, "files": files}
        if self._attachments:
            manifest["attachments"] = [{"path": rel, "bytes": (self.staging / rel).stat().st_size,
                                        "sha256": sha256_file(self.staging / rel)} for rel in self._attachments]
        mf.validate(manifest, f"manifest for {self.name!r}")  # before anything is removed
        for side in (self.staging / "data").glob("part-*.json"):
            side.unlink()
        (self.staging / "settings.json").unlink(missing_ok=True)
        for stale in [*self.staging.glob(".*.tmp"), *self.staging.glob("*/.*.tmp")]:
            stale.unlink(missing_ok=True)  # left by a process killed mid-write; never part of a version
        fsync_dir(self.staging / "data")
        while True:
            version = max(existing_versions(self.dataset_dir), default=0) + 1
            manifest["version"] = version
            mf.save(self.staging, manifest)
            target = self.dataset_dir / version_dir_name(version)
            try:
                os.rename(self.staging, target)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue  # another writer committed vN first; take the next number
                raise
            break
        for lock in self.dataset_dir.glob(f"{self.staging.name}*.lock"):  # every participant's, ours included
            lock.unlink(missing_ok=True)
        fsync_dir(self.dataset_dir)
        return target
