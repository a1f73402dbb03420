"""Write a dataset version: staged shard by shard (resumable), made visible by one rename at commit.

Layout while writing::

    STORE/NAME/.staging-<run_key>.lock  flock held by the writing process
    STORE/NAME/.staging-<run_key>/      invisible to readers (leading dot, no manifest)
        data/part-00000.parquet         complete shards (written to *.tmp, fsynced, renamed)
        data/part-00000.json            sidecar: rows, bytes, sha256, caller's partial statistics

At commit the sidecars go, ``manifest.json`` is written **last**, and the staging directory is
renamed to ``STORE/NAME/vN`` (N = one more than the highest existing version; a concurrent writer that took N
makes us retry N + 1). An interrupted run leaves its staging directory; rerunning with the same settings
(same `run_key`) resumes from the first shard without a sidecar.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import re
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from kdstore import manifest as mf
from kdstore.errors import ConfigError, KdstoreError, StoreFormatError
from kdstore.store.formats import EXTENSIONS, FORMATS, atomic_write_text, fsync_dir, sha256_file, write_shard

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")


def check_name(name: str) -> None:
    """A dataset name is one path component of safe characters."""
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise ConfigError(
            f"--name {name!r} is not a valid dataset name; use letters, digits, '.', '_' and '-' "
            "(start with a letter or digit, at most 128 characters)"
        )


def existing_versions(dataset_dir: Path) -> list[int]:
    """Committed version numbers under a dataset directory, ascending."""
    if not dataset_dir.is_dir():
        return []
    out = []
    for p in dataset_dir.iterdir():
        m = VERSION_RE.match(p.name)
        if m and (p / mf.MANIFEST_NAME).exists():
            out.append(int(m.group(1)))
    return sorted(out)


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
    ) -> None:
        check_name(name)
        if fmt not in FORMATS:
            raise ConfigError(f"--format {fmt!r} is not supported; expected one of {', '.join(FORMATS)}")
        if shard_rows < 1 or row_group_rows < 1:
            raise ConfigError(f"shard_rows and row_group_rows must be >= 1, got {shard_rows}, {row_group_rows}")
        if not re.fullmatch(r"[0-9a-f]{8,64}", run_key):
            raise ConfigError(f"run_key must be a hex digest, got {run_key!r}")
        self.store, self.name, self.fmt = Path(store), name, fmt
        self.columns, self.shard_rows, self.row_group_rows = columns, shard_rows, row_group_rows
        self.shard_metadata = shard_metadata
        self.dataset_dir = self.store / name
        self.staging = self.dataset_dir / f".staging-{run_key[:16]}"
        # One lock per participant: a single run holds ".lock"; jobs of a sharded run each hold their own
        # (".shard-i-of-N.lock"), so they can write disjoint shards of the same staging directory at once.
        suffix = f".{participant}" if participant else ""
        self._lock_path = self.dataset_dir / f".staging-{run_key[:16]}{suffix}.lock"
        self._commit_lock_path = self.dataset_dir / f".staging-{run_key[:16]}.commit.lock"
        self._lock_fd: int | None = None
        self.committed: Path | None = None

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> VersionWriter:
        try:
            (self.staging / "data").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreFormatError(
                f"--out {self.store}: cannot create {self.staging}: {e.strerror}; choose a writable directory"
            ) from None
        self._lock()
        settings = self.staging / "settings.json"
        desc = {"format": self.fmt, "columns": self.columns, "shard_rows": self.shard_rows,
                "row_group_rows": self.row_group_rows, "metadata": self.shard_metadata}
        if settings.exists():
            if json.loads(settings.read_text("utf-8")) != json.loads(json.dumps(desc)):
                raise StoreFormatError(
                    f"{self.staging} holds an interrupted run with other settings; delete that directory to start over"
                )
        else:
            atomic_write_text(settings, json.dumps(desc, indent=1))
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        # On failure the staging directory stays for resumption; only the lock is released.
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
        tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")  # unique: jobs may race on one shard
        write_shard(tmp, columns, self.columns, fmt=self.fmt, row_group_rows=self.row_group_rows,
                    metadata=self.shard_metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        rows = len(next(iter(columns.values())))
        info = {"index": index, "path": f"data/{final.name}", "rows": rows, "bytes": final.stat().st_size,
                "sha256": sha256_file(final), "first_row": first_row, "stats": stats}
        atomic_write_text(final.with_suffix(".json"), json.dumps(info))
        return info

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
        mf.validate(manifest, f"manifest for {self.name!r}")  # before anything is removed
        for side in (self.staging / "data").glob("part-*.json"):
            side.unlink()
        for extra in ("settings.json",):
            (self.staging / extra).unlink(missing_ok=True)
        fsync_dir(self.staging / "data")
        while True:
            version = max(existing_versions(self.dataset_dir), default=0) + 1
            manifest["version"] = version
            mf.save(self.staging, manifest)
            target = self.dataset_dir / f"v{version}"
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
        self.committed = target
        return target

    def discard(self) -> None:
        """Delete the staging directory (used when the caller decides not to resume)."""
        self._unlock()
        shutil.rmtree(self.staging, ignore_errors=True)
