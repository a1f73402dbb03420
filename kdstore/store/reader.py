"""Find and open dataset versions: `STORE/NAME`, `STORE/NAME@vN` or a version directory; verify them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdstore.errors import StoreFormatError, StoreNotFoundError
from kdstore.store import manifest as mf
from kdstore.store.files import sha256_file
from kdstore.store.formats import column_names, count_rows, decode_bfloat16, numpy_dtype, read_shard, shard_row_groups
from kdstore.store.layout import MANIFEST_NAME, VersionRef, existing_versions, resolve
from kdstore.store.ragged import concat, empty


class Version:
    """An open, committed version: its manifest and typed access to its shards.

    Opening is cheap but checks what can be checked without reading data: the manifest against the schema and
    its `format_version`, every file present with the recorded size and row count. `verify(full=True)` also
    recomputes every sha256.
    """

    def __init__(self, ref: VersionRef | str | Path, *, check: bool = True) -> None:
        self.ref = ref if isinstance(ref, VersionRef) else resolve(ref)
        self.path = self.ref.path
        self.manifest: dict[str, Any] = mf.load(self.path)
        self.fmt: str = self.manifest["storage"]["format"]
        self.files: list[dict[str, Any]] = self.manifest["files"]
        self.columns: dict[str, dict[str, Any]] = {c["name"]: c for c in self.manifest["columns"]}
        self.file_paths = [mf.resolve_inside(self.path, f["path"], str(self.path / MANIFEST_NAME))
                           for f in self.files]
        # files beside the data (a feature projection, docs/format.md "Features"): checksummed, never shards
        self.attachments: list[dict[str, Any]] = mf.attachments(self.manifest)
        self.attachment_paths = [mf.resolve_inside(self.path, f["path"], str(self.path / MANIFEST_NAME))
                                 for f in self.attachments]
        if check:
            problems = self.verify(full=False)
            if problems:
                raise StoreFormatError(f"{self.ref}: {problems[0]}"
                                       + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                                       + "; run `kdstore verify` for the full list")

    # -- description ---------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self.manifest["num_rows"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def teacher_ids(self) -> list[str]:
        return [t["id"] for t in self.manifest["teachers"]]

    @property
    def has_labels(self) -> bool:
        return bool(self.manifest["targets"]["labels"])

    @property
    def format_version(self) -> int:
        return int(self.manifest["format_version"])

    @property
    def has_tail(self) -> bool:
        """Whether the top-k carries its exact tail (format 2's ``tail_logmass`` columns)."""
        return bool((self.manifest["targets"]["top_k"] or {}).get("tail_logmass"))

    @property
    def has_logits(self) -> bool:
        return self.manifest["targets"]["logits"] is not None

    @property
    def top_k(self) -> int | None:
        tk = self.manifest["targets"]["top_k"]
        return int(tk["k"]) if tk else None

    def column_for(self, role: str, teacher: str | None = None) -> str | None:
        """Name of the column with `role` (and `teacher`), or None."""
        for c in self.manifest["columns"]:
            if c["role"] == role and (teacher is None or c.get("teacher") == teacher):
                return str(c["name"])
        return None

    # -- data ----------------------------------------------------------------------------------------
    def read_file(
        self, index: int, names: Sequence[str], row_groups: Sequence[int] | None = None, *, decode: bool = True
    ) -> dict[str, Any]:
        """Read columns of one data file (all rows or some row groups); bfloat16 decoded to float32 if `decode`.
        Arrays are numpy arrays, ragged columns (per-token sampled targets) `kdstore.store.ragged.Ragged`."""
        unknown = [n for n in names if n not in self.columns]
        if unknown:
            raise StoreFormatError(f"{self.ref}: no column {unknown[0]!r}; it has {sorted(self.columns)}")
        out = read_shard(self.file_paths[index], self.fmt, names, row_groups,
                         self.manifest["storage"]["row_group_rows"])
        rows = self.files[index]["rows"] if row_groups is None else None
        for n in names:
            if rows is not None and len(out[n]) != rows:
                raise StoreFormatError(f"{self.files[index]['path']}: column {n!r} has {len(out[n])} rows, "
                                       f"manifest says {rows}")
            if decode and self.columns[n]["dtype"] == "bfloat16":
                out[n] = decode_bfloat16(out[n])
        return out

    def row_groups(self, index: int) -> list[tuple[int, int]]:
        """[start, stop) row ranges (within file `index`) of its row groups / chunks."""
        return shard_row_groups(self.file_paths[index], self.fmt, self.files[index]["rows"],
                                self.manifest["storage"]["row_group_rows"])

    def read_rows(self, start: int, stop: int, names: Sequence[str], *, decode: bool = True) -> dict[str, np.ndarray]:
        """Rows [start, stop) of `names`, read only from the row groups / chunks that hold them."""
        if not 0 <= start <= stop <= self.num_rows:
            raise StoreFormatError(f"{self.ref}: rows [{start}, {stop}) are outside [0, {self.num_rows})")
        if start == stop:
            return {n: empty(numpy_dtype(self.columns[n]["dtype"]), self.columns[n]["shape"],
                             bool(self.columns[n].get("ragged"))) for n in names}
        parts: list[dict[str, np.ndarray]] = []
        for i, f in enumerate(self.files):
            lo, hi = max(start, f["first_row"]), min(stop, f["first_row"] + f["rows"])
            if lo >= hi:
                continue
            a, b = lo - f["first_row"], hi - f["first_row"]
            groups = [(g, s, e) for g, (s, e) in enumerate(self.row_groups(i)) if s < b and e > a]
            if not groups:
                raise StoreFormatError(f"{f['path']}: no row group holds rows [{a}, {b}); the file is corrupted")
            block = self.read_file(i, names, [g for g, _, _ in groups], decode=decode)
            off = groups[0][1]
            parts.append({n: block[n][a - off : b - off] for n in names})
        if not parts:
            raise StoreFormatError(f"{self.ref}: no file holds rows [{start}, {stop})")
        return {n: concat([p[n] for p in parts]) if len(parts) > 1 else parts[0][n] for n in names}

    def read_attachment(self, rel: str) -> dict[str, np.ndarray]:
        """Every column of the attachment `rel` (a path listed in the manifest's ``attachments``)."""
        for f, p in zip(self.attachments, self.attachment_paths, strict=True):
            if f["path"] == rel:
                return read_shard(p, self.fmt, column_names(p, self.fmt))
        raise StoreFormatError(f"{self.ref}: no attachment {rel!r}; it lists "
                               f"{', '.join(a['path'] for a in self.attachments) or 'none'}")

    def iter_blocks(self, names: Sequence[str], max_rows: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield `names` in row order one row group (HDF5 chunk) at a time, cut into blocks of at most `max_rows`
        rows: memory is bounded by a row group, whatever the shard size."""
        for i in range(len(self.files)):
            for g in range(len(self.row_groups(i))):
                group = self.read_file(i, names, [g])
                n = len(next(iter(group.values())))
                step = max_rows or n
                for a in range(0, n, step):
                    yield {k: v[a : a + step] for k, v in group.items()}

    def iter_files(self, names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """Yield each data file's columns in row order."""
        for i in range(len(self.files)):
            yield self.read_file(i, names)

    def read_all(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Every row of `names`, concatenated (for sets that fit in memory)."""
        parts = list(self.iter_files(names))
        return {n: concat([p[n] for p in parts]) for n in names}

    # -- integrity ----------------------------------------------------------------------------------
    def verify(self, *, full: bool = True) -> list[str]:
        """Problems found (empty if none): missing files, sizes, row counts; and sha256 if `full`."""
        problems: list[str] = []
        first = 0
        for f, p in zip(self.files, self.file_paths, strict=True):
            if f["first_row"] != first:
                problems.append(f"{f['path']}: first_row {f['first_row']}, expected {first}")
            first += f["rows"]
            problem = file_problem(p, f, full)
            if problem:
                problems.append(f"{f['path']}: {problem}")
                continue
            if full:
                try:
                    n = count_rows(p, self.fmt)
                except Exception as e:  # unreadable footer/header: report, don't crash
                    problems.append(f"{f['path']}: unreadable ({type(e).__name__}: {e})")
                    continue
                if n != f["rows"]:
                    problems.append(f"{f['path']}: {n} rows, manifest says {f['rows']}")
        for f, p in zip(self.attachments, self.attachment_paths, strict=True):
            problem = file_problem(p, f, full)
            if problem:
                problems.append(f"{f['path']}: {problem}")
        return problems


def file_problem(path: Path, entry: dict[str, Any], full: bool) -> str | None:
    """What is wrong with a file against its manifest entry (missing, size, and sha256 if `full`), or None."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{size} bytes, manifest says {entry['bytes']} (truncated or replaced)"
    if full:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            return f"sha256 {digest[:12]}..., manifest says {entry['sha256'][:12]}... (corrupted)"
    return None


def open_version(ref: VersionRef | str | Path, *, check: bool = True) -> Version:
    """Open a committed version (see `Version`)."""
    return Version(ref, check=check)


def list_datasets(store: Path) -> dict[str, list[int]]:
    """{name: [versions]} of a store directory."""
    if not store.is_dir():
        raise StoreNotFoundError(f"store {store} does not exist or is not a directory")
    return {p.name: existing_versions(p) for p in sorted(store.iterdir()) if p.is_dir() and not p.name.startswith(".")
            and existing_versions(p)}
