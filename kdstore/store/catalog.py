"""What a store holds (`kdstore ls`), whether a version is intact (`kdstore verify`), and removing what crashed
pushes left (`kdstore prune`). Imports no torch.

All accept local stores and remote URLs. Listing a remote store reads only manifests (with ``all``, also the
listing of unfinished uploads and their records); verifying a remote version downloads every file (into the
cache, see `kdstore.store.remote`) and checks it exactly like a local one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdstore.errors import KdstoreError, StoreNotFoundError
from kdstore.store import manifest as mf
from kdstore.store import remote, uploads
from kdstore.store.formats import numpy_dtype, read_shard
from kdstore.store.layout import MANIFEST_NAME, VersionRef, existing_versions, staged_runs
from kdstore.store.reader import Version

_SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


# --- ls -------------------------------------------------------------------------------------------------------


@dataclass
class VersionEntry:
    """One committed version found in a store; `error` is set (and `manifest` None) if its manifest is bad."""

    name: str
    version: int
    ref: str
    manifest: dict[str, Any] | None
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        """Plain JSON-able description (what `kdstore ls --json` prints per version)."""
        out: dict[str, Any] = {"name": self.name, "version": self.version, "ref": self.ref, "error": self.error}
        if self.manifest is not None:
            out.update(summarize(self.manifest))
        return out


@dataclass
class Listing:
    store: str
    entries: list[VersionEntry]
    unfinished: dict[str, int] = field(default_factory=dict)  # dataset -> staged (interrupted or running) runs
    hint: str | None = None
    uploads: list[uploads.Unfinished] | None = None  # unfinished pushes (listed only when asked: `ls --all`)

    def to_json(self) -> dict[str, Any]:
        """What `kdstore ls --json` prints: the store, every version's summary, unfinished runs per dataset (and
        with `--all`, the unfinished uploads)."""
        out = {"store": self.store, "versions": [e.summary() for e in self.entries], "unfinished": self.unfinished}
        if self.uploads is not None:
            out["uploads"] = [u.to_json() for u in self.uploads]
        return out


def class_names(manifest: dict[str, Any]) -> list[str]:
    """The manifest's class names, or "0".."C-1" when it records none (or a list of the wrong length)."""
    names = manifest.get("class_names")
    c = int(manifest["num_classes"])
    return [str(n) for n in names] if isinstance(names, list) and len(names) == c else [str(i) for i in range(c)]


def short_source(source: str) -> str:
    """A teacher spec with its file paths shortened to file names:
    'mlp:8-5@/a/b/w.safetensors' -> 'mlp:8-5@w.safetensors'."""
    model, at, weights = source.rpartition("@")
    if at and model:
        return f"{short_source(model)}@{Path(weights).name}"
    return Path(source).name if ("/" in source or "\\" in source) else source


def targets_text(targets: dict[str, Any]) -> str:
    """'fp16 logits + top-10', 'top-5 (no logits)', 'fp32 logits'; per-token versions: 'per-token top-64 + 50
    draws'."""
    parts = []
    if targets.get("kind") == "tokens":
        if targets.get("top_k"):
            parts.append(f"per-token top-{targets['top_k']['k']}")
        sampled = targets.get("sampled")
        if sampled:
            parts.append(f"{'' if parts else 'per-token '}{sampled['draws']} draws"
                         + ("" if sampled.get("logprobs_dtype") else " (no log-probs)"))
        return " + ".join(parts) or "-"
    if targets.get("logits"):
        parts.append(f"{_SHORT_DTYPE.get(targets['logits']['dtype'], targets['logits']['dtype'])} logits")
    if targets.get("top_k"):
        parts.append(f"top-{targets['top_k']['k']}" + ("" if targets.get("logits") else " (no logits)"))
    return " + ".join(parts) or "-"


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def human_seconds(s: float) -> str:
    """'45 s', '12 min', '3.5 h', '2.0 d'."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h" if s < 172800 else f"{s / 86400:.1f} d"


def upload_text(u: uploads.Unfinished) -> str:
    """One line about an unfinished upload (`kdstore ls --all`, `kdstore prune`)."""
    if u.published:
        return f"{u.ref}: published; markers of its push are left (`kdstore prune` removes them)"
    files = f"{u.data_files} of {u.files_total}" if u.files_total is not None else f"{u.data_files}"
    state = f"running ({u.holder})" if u.live else "not running" + (f" (was {u.holder})" if u.holder else "")
    return (f"{u.ref}: unfinished push, {files} data files, {human_bytes(u.bytes)}, idle "
            f"{human_seconds(u.idle_seconds)}, {state}" + ("" if u.key else "; no kdstore record (an older kdstore?)"))


def summarize(m: dict[str, Any]) -> dict[str, Any]:
    """The facts `ls` shows about one manifest."""
    ts = m["transfer_set"]
    return {
        "created_at": m["created_at"],
        "rows": m["num_rows"],
        "num_classes": m["num_classes"],
        "format": m["storage"]["format"],
        "kind": ts["kind"],
        "teachers": [{"id": t["id"], "source": t["source"], "short": short_source(t["source"]), "sha256": t["sha256"]}
                     for t in m["teachers"]],
        "transfer_set": {"file": Path(ts["path"]).name, "path": ts["path"], "sha256": ts["sha256"], "rows": ts["rows"]},
        "targets": {"logits": (m["targets"]["logits"] or {}).get("dtype"),
                    "top_k": (m["targets"]["top_k"] or {}).get("k"),
                    "tail": (m["targets"]["top_k"] or {}).get("tail"),
                    "labels": m["targets"]["labels"], "text": targets_text(m["targets"])},
        "files": len(m["files"]),
        "bytes": sum(f["bytes"] for f in m["files"]),
        "parent": m.get("parent"),
    }


def list_store(store: str | Path, *, with_uploads: bool = False) -> Listing:
    """Every committed version in a store (local directory, file:// or remote URL), by name then version; with
    `with_uploads`, also the unfinished uploads pushes left there (`kdstore.store.uploads`).

    Raises:
        StoreNotFoundError: the store does not exist.
    """
    listing = _list(store)
    if with_uploads:
        listing.uploads = uploads.unfinished(_push_target(listing.store))
    return listing


def _push_target(store: str | Path) -> remote.RemoteStore:
    """A store as `push` writes to it: a URL, or a local directory through fsspec. It must exist."""
    text = str(store)
    target = remote.RemoteStore(remote.file_url_to_path(text) if remote.is_url(text) and not remote.is_remote(text)
                                else text)
    if not target.exists():
        raise StoreNotFoundError(f"store {target.url} does not exist or holds nothing; check the URL or path")
    return target


def prune(store: str | Path, older_than: float, *, dry_run: bool = False) -> uploads.PruneReport:
    """Remove the unfinished uploads in `store` idle for `older_than` seconds or more (never a live one); see
    `kdstore.store.uploads.prune`.

    Raises:
        StoreNotFoundError: the store does not exist.
    """
    return uploads.prune(_push_target(store), older_than, dry_run=dry_run)


def _list(store: str | Path) -> Listing:
    text = str(store)
    if remote.is_remote(text):
        return _list_remote(text)
    root = Path(remote.file_url_to_path(text) if remote.is_url(text) else text)
    if not root.is_dir():
        raise StoreNotFoundError(f"store {root} does not exist or is not a directory; expected the --out directory "
                                 "of `kdstore label` (or a URL such as s3://bucket/targets)")
    entries: list[VersionEntry] = []
    unfinished: dict[str, int] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        staged = len(staged_runs(d))
        if staged:
            unfinished[d.name] = staged
        for n in existing_versions(d):
            ref = f"{root / d.name}@v{n}"
            try:
                entries.append(VersionEntry(d.name, n, ref, mf.load(d / f"v{n}")))
            except KdstoreError as e:
                entries.append(VersionEntry(d.name, n, ref, None, str(e)))
    hint = None
    if not entries:
        if (root / MANIFEST_NAME).exists():
            hint = f"{root} is a version directory; run `kdstore ls {root.parent.parent}`"
        elif existing_versions(root):
            hint = f"{root} is a dataset directory; run `kdstore ls {root.parent}`"
    return Listing(str(root), entries, unfinished, hint)


def _list_remote(url: str) -> Listing:
    store = remote.RemoteStore(url)
    found = store.datasets()
    if not found and not store.exists():
        raise StoreNotFoundError(f"store {store.url} does not exist or holds nothing (no such bucket or prefix); "
                                 "check the URL")
    paths = {store.path(n, f"v{v}", MANIFEST_NAME): (n, v) for n, vs in found.items() for v in vs}
    texts: dict[str, Any] = {}
    if paths:
        with remote._remote_errors(store.url):
            texts = store.fs.cat(list(paths), on_error="return")  # concurrent on async backends (s3, gcs)
    entries = []
    for p, (n, v) in paths.items():
        where = store.url_of(n, f"v{v}", MANIFEST_NAME)
        raw = texts.get(p)
        try:
            if not isinstance(raw, bytes):
                raise StoreNotFoundError(f"{where}: unreadable ({type(raw).__name__}: {raw})")
            entries.append(VersionEntry(n, v, f"{store.url_of(n)}@v{v}",
                                        mf.loads(raw.decode("utf-8", "replace"), where)))
        except KdstoreError as e:
            entries.append(VersionEntry(n, v, f"{store.url_of(n)}@v{v}", None, str(e)))
    entries.sort(key=lambda e: (e.name, e.version))
    return Listing(store.url, entries)


# --- verify ---------------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """Result of a full check; `problems` has one line per bad file (or one for a bad manifest)."""

    ref: str
    problems: list[str]
    files: int = 0
    bytes: int = 0
    rows: int = 0
    environments: list[str] = field(default_factory=list)  # where the shards were computed (see reproducibility)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(ref: str | Path | VersionRef) -> VerifyReport:
    """Check a version in full: manifest schema and path safety, every file's presence, size, sha256, row count
    and columns. Never raises for damage it can name; raises StoreNotFoundError if the version does not exist."""
    if isinstance(ref, str) and remote.is_remote(ref):
        return _verify_remote(ref)
    return verify_local(remote.resolve_any(ref, option=""))


def verify_local(ref: VersionRef) -> VerifyReport:
    try:
        m = mf.load(ref.path)
        v = Version(ref, check=False)  # refuses symlinks out of the version directory
    except KdstoreError as e:
        return VerifyReport(str(ref), [str(e)])
    problems = v.verify(full=True)
    bad = {p.split(":", 1)[0] for p in problems}
    for i, f in enumerate(v.files):
        if f["path"] not in bad:
            problems.extend(_column_problems(v, i))
    return VerifyReport(str(ref), problems, len(m["files"]), sum(f["bytes"] for f in m["files"]), m["num_rows"],
                        environments_text(m))


def environments_text(m: dict[str, Any]) -> list[str]:
    """Where a version's shards were computed, one line per environment (docs/format.md, "Reproducibility")."""
    groups = (m.get("labeling") or {}).get("environments") or []
    lines = []
    for g in groups:
        e = g["environment"]
        where = (f"{e.get('gpu')} (CUDA {e.get('cuda')})" if e.get("device") == "cuda"
                 else f"{e.get('cpu')} ({e.get('cpu_capability')})")
        shards = g["shards"]
        contiguous = len(shards) > 1 and shards == list(range(shards[0], shards[-1] + 1))
        span = f"shards {shards[0]}-{shards[-1]}" if contiguous else "shards " + ",".join(map(str, shards))
        lines.append(f"{span}: {e.get('device')} {where}, {e.get('threads')} threads, torch {e.get('torch')}")
    return lines


def _column_problems(v: Version, index: int) -> list[str]:
    """Every manifest column is in the file with the recorded dtype and shape (read from its first row group)."""
    path = v.files[index]["path"]
    specs = v.manifest["columns"]
    try:
        arrays = read_shard(v.file_paths[index], v.fmt, [c["name"] for c in specs], [0],
                            v.manifest["storage"]["row_group_rows"])
    except (KdstoreError, KeyError, OSError, ValueError) as e:
        return [f"{path}: columns unreadable ({(str(e).splitlines() or [''])[0][:200]}); the manifest does not "
                "describe this file"]
    out = []
    for c in specs:
        a = arrays[c["name"]]
        want = numpy_dtype(c["dtype"])
        if a.dtype != want or list(a.shape[1:]) != list(c["shape"]):
            out.append(f"{path}: column {c['name']!r} is {a.dtype}{list(a.shape[1:])}, manifest says "
                       f"{c['dtype']}{c['shape']}")
    return out


def _verify_remote(ref: str) -> VerifyReport:
    r = remote.parse_ref(ref)
    store = remote.RemoteStore(r.store)
    version = store.resolve(r.name, r.version, ref)
    label = f"{store.url_of(r.name)}@v{version}"
    try:
        text, m = store.read_manifest(r.name, version)
    except KdstoreError as e:
        if isinstance(e, StoreNotFoundError):
            raise
        return VerifyReport(label, [str(e)])
    staging = remote._new_staging(remote.cache_store_dir(store.url) / r.name, "verify")
    try:
        problems = remote.fetch_files(store, r.name, version, m, staging, stop_at_first=False)
        if not problems:  # the bytes are the published ones: check rows and columns on the copy, keep it cached
            local = VersionRef(remote.cache_store_dir(store.url), r.name, version)
            remote._commit_cache(staging, local, text, m, store.url)
            problems = verify_local(local).problems
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return VerifyReport(label, problems, len(m["files"]), sum(f["bytes"] for f in m["files"]), m["num_rows"])
