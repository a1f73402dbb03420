"""File utilities every writer shares: streamed sha256, and atomic writes that readers never see half done.

An atomic write goes to a temporary name beside the target that carries the process id (so processes writing
the same file at once, e.g. the ranks of a torchrun job, never share one), is fsynced, then renamed over the
target; `fsync_dir` makes the rename itself durable.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path | str, chunk: int = _CHUNK) -> str:
    """sha256 hex digest of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def temporary_path(path: Path, tag: str = "") -> Path:
    """A hidden temporary name beside `path`, unique to this process (and `tag`)."""
    return path.with_name(f".{path.name}.{os.getpid()}{'.' + tag if tag else ''}.tmp")


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (no rename: for temporary files the caller renames or links)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    """fsync a file written by someone else (e.g. a Parquet writer) before it is renamed into place."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: Path, tag: str = "") -> Iterator[Path]:
    """A temporary path for a writer that needs a file name (Parquet, HDF5, torch.save): when the block ends
    normally the file is fsynced and renamed over `path`; if it raises, the temporary file is removed.

    `tag` makes the temporary name unique among writers of one process (threads, or jobs racing on one file).
    """
    tmp = temporary_path(path, tag)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to a per-process temporary file, fsync it and rename it over `path`: readers see the old file
    or the new one, never a part. The temporary file is removed if anything fails."""
    tmp = temporary_path(path)
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = None) -> Path:
    """`atomic_write_text` of `obj` as JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist yet (atomically: written aside, fsynced, then hard-linked
    into place, which fails if another process got there first). Returns whether this call created it."""
    tmp = temporary_path(path, "excl")
    try:
        write_synced(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
