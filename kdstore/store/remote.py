"""Remote stores through fsspec (s3://, gs://, az://, memory://, ...): URLs, the store, and reading by URL.

Reading. A remote version is *materialized*: its manifest is read and validated (path escapes are refused here,
before anything is downloaded), every data file it lists is streamed into a local cache while its sha256 and
size are checked, the manifest is written last and the staging directory is renamed into place, so the cache
holds only complete, verified versions and the local readers work on them unchanged::

    $KDSTORE_CACHE (default ~/.cache/kdstore)/remote/<url-slug>-<hash>/NAME/vN/{manifest.json, data/...}

`resolve_any` is the one entry point: a local path or ``file://`` URL resolves in place; any other URL is
materialized (a cache hit costs one manifest read).

Publishing (`kdstore.store.publish.push`) and unfinished uploads (`kdstore.store.uploads`) use `RemoteStore`
from here.

Credentials and endpoints come from the backend's usual configuration (for S3: ``AWS_PROFILE``,
``AWS_ACCESS_KEY_ID``..., ``AWS_ENDPOINT_URL`` for MinIO/Ceph/moto; fsspec's own config files also apply).
This module imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from kdstore.errors import (
    ConfigError,
    KdstoreError,
    ManifestError,
    RemoteError,
    StoreFormatError,
    StoreNotFoundError,
)
from kdstore.store import manifest as mf
from kdstore.store.files import fsync_dir, write_synced
from kdstore.store.layout import (
    MANIFEST_NAME,
    NAME_RE,
    STAGING_PREFIX,
    VersionRef,
    parse_version_dir,
    pick_version,
    resolve,
    split_ref,
)
from kdstore.store.reader import Version

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CHUNK = 1 << 20


def is_url(ref: object) -> bool:
    """True for ``scheme://...`` references (``file://`` included); False for plain paths."""
    return isinstance(ref, str) and bool(_URL_RE.match(ref))


def is_remote(ref: object) -> bool:
    """True for URLs that are not ``file://`` (those need fsspec and a download)."""
    return is_url(ref) and not str(ref).lower().startswith("file://")


def file_url_to_path(url: str) -> str:
    """``file:///abs/path@v2`` -> ``/abs/path@v2``."""
    u = urlparse(url)
    if u.netloc not in ("", "localhost"):
        raise ConfigError(f"{url}: a file:// URL must name a local path (file:///abs/path), not host {u.netloc!r}")
    return unquote(u.path)


def cache_root() -> Path:
    """Where remote versions are cached: $KDSTORE_CACHE, else $XDG_CACHE_HOME/kdstore, else ~/.cache/kdstore."""
    if os.environ.get("KDSTORE_CACHE"):
        return Path(os.environ["KDSTORE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "kdstore"


def _slug(url: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", url).strip("-.")[:60] or "store"
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def cache_store_dir(store_url: str) -> Path:
    """The local cache directory that mirrors the remote store `store_url` (a store in its own right)."""
    return cache_root() / "remote" / _slug(store_url.rstrip("/"))


def outbox_dir(store_url: str) -> Path:
    """A local store in which to label (resumably) before pushing to `store_url` (see `kdstore label --out URL`)."""
    return cache_root() / "outbox" / _slug(store_url.rstrip("/"))


# --- references -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteRef:
    """``URL/NAME`` or ``URL/NAME@vN`` (or ``URL/NAME/vN``) split into its parts; version None = latest."""

    store: str
    name: str
    version: int | None

    def __str__(self) -> str:
        return f"{self.store}/{self.name}" + (f"@v{self.version}" if self.version else "")


def parse_ref(ref: str) -> RemoteRef:
    """Split a remote reference. Raises ConfigError for one that names no dataset."""
    path, want = split_ref(ref)
    head, _, last = path.rstrip("/").rpartition("/")
    in_dir = parse_version_dir(last)
    if want is None and in_dir is not None and "/" in head:
        want, (head, _, last) = in_dir, head.rpartition("/")
    if not _URL_RE.match(head + "/") or head.endswith(":/") or not NAME_RE.match(last):
        raise ConfigError(f"{ref}: expected URL/NAME or URL/NAME@vN, e.g. s3://bucket/targets/mnist@v2")
    return RemoteRef(head, last, want)


# --- the remote store ------------------------------------------------------------------------------------------


@contextmanager
def _remote_errors(what: str) -> Iterator[None]:
    """Turn backend exceptions (OSError, botocore, aiohttp, ...) into one-line KdstoreErrors naming `what`."""
    try:
        yield
    except KdstoreError:
        raise
    except FileNotFoundError:
        raise StoreNotFoundError(f"{what}: not found on the remote") from None
    except ImportError as e:
        raise ConfigError(f"{what}: the fsspec backend is not installed ({e}); for s3:// run `pip install s3fs` "
                          "(or kdstore[s3]), for gs:// `pip install gcsfs`") from None
    except Exception as e:
        msg = (str(e).splitlines() or [""])[0][:200]
        raise RemoteError(f"{what}: {type(e).__name__}: {msg}; check the URL, the credentials "
                          "(e.g. AWS_PROFILE, AWS_ENDPOINT_URL for S3-compatible servers) and the network") from None


class RemoteStore:
    """A store at an fsspec URL: list datasets and versions, read manifests and files, write files."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        with _remote_errors(self.url):
            self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = str(root).rstrip("/")
        from fsspec.implementations.local import LocalFileSystem

        self.local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.s3 = "s3" in protocols  # objects carry user metadata (the pushed file's sha256), multipart uploads

    def path(self, *parts: str) -> str:
        """Backend path of `parts` under the store root."""
        return "/".join([self.root, *parts]) if self.root else "/".join(parts)

    def url_of(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def ls(self, *parts: str) -> list[str]:
        """Base names directly under `parts`, fresh from the backend (no listing cache); [] if none."""
        p = self.path(*parts)
        with _remote_errors(self.url_of(*parts)):
            self.fs.invalidate_cache(p)
            try:
                entries = self.fs.ls(p, detail=False)
            except FileNotFoundError:
                return []
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

    def datasets(self) -> dict[str, list[int]]:
        """{name: committed versions} (a version is committed when its manifest.json exists)."""
        with _remote_errors(self.url):
            self.fs.invalidate_cache()
            found = self.fs.glob(self.path("*", "v*", MANIFEST_NAME))
        out: dict[str, list[int]] = {}
        prefix = (self.root + "/") if self.root else ""
        for p in map(str, found):
            rel = p[len(prefix):] if p.startswith(prefix) else p.lstrip("/")
            parts = rel.split("/")
            if len(parts) == 3 and NAME_RE.match(parts[0]) and parse_version_dir(parts[1]) is not None:
                out.setdefault(parts[0], []).append(int(parts[1][1:]))
        return {k: sorted(v) for k, v in sorted(out.items())}

    def versions(self, name: str) -> list[int]:
        """Committed versions of dataset `name`, ascending."""
        with _remote_errors(self.url_of(name)):
            self.fs.invalidate_cache()
            found = self.fs.glob(self.path(name, "v*", MANIFEST_NAME))
        versions = (parse_version_dir(p.rstrip("/").split("/")[-2]) for p in map(str, found))
        return sorted(v for v in versions if v is not None)

    def resolve(self, name: str, version: int | None, what: str) -> int:
        """The committed version to open: `version`, or the latest when None (as for local stores)."""
        return pick_version(self.versions(name), version, what, self.url_of(name),
                            f" (run `kdstore ls {self.url}` to list datasets)")

    def read_manifest(self, name: str, version: int) -> tuple[str, dict[str, Any]]:
        """The manifest text and its validated content (schema, format_version, path safety)."""
        where = self.url_of(name, f"v{version}", MANIFEST_NAME)
        with _remote_errors(where):
            raw = self.fs.cat_file(self.path(name, f"v{version}", MANIFEST_NAME))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ManifestError(f"{where} is not UTF-8 text; the file is corrupted") from None
        return text, mf.loads(text, where)

    def find(self, *parts: str) -> dict[str, dict[str, Any]]:
        """Every object under `parts`, recursively and fresh from the backend: {path relative to `parts`: info}
        (info has at least ``size``; times as the backend gives them). {} if there is nothing."""
        p = self.path(*parts).rstrip("/")
        with _remote_errors(self.url_of(*parts)):
            self.fs.invalidate_cache()
            try:
                found = self.fs.find(p, detail=True)
            except FileNotFoundError:
                return {}
        out: dict[str, dict[str, Any]] = {}
        for key, info in found.items():
            if str(key).startswith(p + "/") and info.get("type") != "directory":
                out[str(key)[len(p) + 1:]] = info
        return out

    def cat_many(self, paths: list[str], what: str) -> dict[str, bytes | None]:
        """The content of each backend path (concurrent on async backends), None where it could not be read."""
        if not paths:
            return {}
        with _remote_errors(what):
            got = self.fs.cat(paths, on_error="return")
        if not isinstance(got, dict):  # a single path comes back as bytes
            got = {paths[0]: got}
        return {p: (v if isinstance(v, bytes) else None) for p, v in got.items()}

    def exists(self, *parts: str) -> bool:
        p = self.path(*parts)
        with _remote_errors(self.url_of(*parts)):
            self.fs.invalidate_cache(p)
            return bool(self.fs.exists(p))


# --- reading: materialize into the cache -----------------------------------------------------------------------


def resolve_any(ref: str | Path | VersionRef, option: str = "targets") -> VersionRef:
    """A local `VersionRef` for a local reference, a ``file://`` URL, or a remote URL (materialized).

    Args:
        ref: ``STORE/NAME[@vN]``, ``file:///STORE/NAME[@vN]`` or ``s3://bucket/STORE/NAME[@vN]`` (any fsspec URL).
        option: how error messages name the reference.
    """
    if isinstance(ref, VersionRef):
        return ref
    text = str(ref)
    if is_url(text) and not is_remote(text):
        return resolve(file_url_to_path(text), option)
    if is_remote(text):
        return materialize(text)
    return resolve(text, option)


def shown_ref(ref: object, local: VersionRef) -> str:
    """How a version is named in reports and in a derived version's ``parent.settings.source``: a remote one by its
    URL (``URL/NAME@vN``), a local one by ``STORE/NAME@vN``."""
    if isinstance(ref, str) and is_remote(ref):
        r = parse_ref(ref)
        return f"{r.store}/{r.name}@v{local.version}"
    return str(local)


def materialize(ref: str, progress: Callable[[int], None] | None = None) -> VersionRef:
    """Download (or find in the cache) the remote version `ref`; return its local `VersionRef`.

    Every file is checked against the manifest's size and sha256 while it streams in; the version appears in
    the cache only when complete (staging directory + rename), so an interrupted download leaves nothing visible.

    Raises:
        UnsafePathError: the remote manifest names a path outside its version directory (nothing is downloaded).
        StoreFormatError: a remote file is missing, of the wrong size or sha256.
        StoreNotFoundError, RemoteError, ManifestError.
    """
    r = parse_ref(ref)
    store = RemoteStore(r.store)
    version = store.resolve(r.name, r.version, ref)
    text, manifest = store.read_manifest(r.name, version)
    local_store = cache_store_dir(store.url)
    local = VersionRef(local_store, r.name, version)
    if _cached(local, manifest):
        return local
    staging = _new_staging(local_store / r.name, "dl")
    try:
        problems = fetch_files(store, r.name, version, manifest, staging, stop_at_first=True, progress=progress)
        if problems:
            raise StoreFormatError(f"{store.url_of(r.name, f'v{version}')}: {problems[0]}; the remote copy is damaged: "
                                   "run `kdstore verify` on it and push the version again")
        _commit_cache(staging, local, text, manifest, store.url)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


def _cached(local: VersionRef, manifest: dict[str, Any]) -> bool:
    """A complete cached copy of exactly this manifest whose files pass the cheap checks."""
    try:
        if json.loads((local.path / MANIFEST_NAME).read_text("utf-8")) != manifest:
            return False
        Version(local, check=True)
        return True
    except (OSError, ValueError, KdstoreError):
        return False


def _new_staging(dataset_dir: Path, tag: str) -> Path:
    staging = dataset_dir / f"{STAGING_PREFIX}{tag}-{uuid.uuid4().hex[:16]}"
    try:
        (staging / "data").mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"cannot create the cache directory {staging}: {e.strerror}; set KDSTORE_CACHE to a "
                          "writable directory") from None
    return staging


def fetch_files(
    store: RemoteStore, name: str, version: int, manifest: dict[str, Any], dest: Path, *,
    stop_at_first: bool, progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Stream every file of the (validated) manifest into `dest`, checking size and sha256; return the problems."""
    problems: list[str] = []
    where = store.url_of(name, f"v{version}", MANIFEST_NAME)
    for f in manifest["files"] + mf.attachments(manifest):
        target = mf.resolve_inside(dest, f["path"], where)  # validated already; defence in depth
        target.parent.mkdir(parents=True, exist_ok=True)  # data/, features/
        src = store.path(name, f"v{version}", f["path"])
        problem = _fetch_one(store, src, target, f)
        if problem:
            problems.append(f"{f['path']}: {problem}")
            if stop_at_first:
                break
        if progress:
            progress(f["bytes"])
    return problems


def _fetch_one(store: RemoteStore, src: str, target: Path, entry: dict[str, Any]) -> str | None:
    tmp = target.with_name(target.name + ".tmp")
    h, n = hashlib.sha256(), 0
    try:
        with _remote_errors(store.url + "/" + src[len(store.root):].lstrip("/")):
            try:
                fin = store.fs.open(src, "rb")
            except FileNotFoundError:
                return "missing on the remote"
            with fin, open(tmp, "wb") as out:
                while block := fin.read(_CHUNK):
                    n += len(block)
                    if n > entry["bytes"]:  # never download more than the manifest promised
                        return f"larger than the {entry['bytes']} bytes the manifest says (replaced?)"
                    h.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
        if n != entry["bytes"]:
            return f"{n} bytes, manifest says {entry['bytes']} (truncated or replaced)"
        digest = h.hexdigest()
        if digest != entry["sha256"]:
            return f"sha256 {digest[:12]}..., manifest says {entry['sha256'][:12]}... (corrupted)"
        os.replace(tmp, target)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def _commit_cache(staging: Path, local: VersionRef, text: str, manifest: dict[str, Any], url: str) -> None:
    """Write the manifest last, then rename the staging directory to the cache's vN (replacing a stale copy)."""
    write_synced(staging / MANIFEST_NAME, text.encode("utf-8"))
    fsync_dir(staging)
    final = local.path
    for _ in range(3):
        try:
            os.rename(staging, final)
            break
        except OSError:
            if not final.exists():
                raise
            if _cached(local, manifest):  # another process finished the same download first
                return
            trash = final.parent / f".trash-{uuid.uuid4().hex[:16]}"
            try:
                os.rename(final, trash)  # a stale or damaged cache copy: move it aside, then retry
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(final.parent)
    note = local.store / ".source-url"  # for people looking at the cache; kdstore never reads it
    if not note.exists():
        note.write_text(url + "\n", encoding="utf-8")


def read_remote_manifest(ref: str) -> tuple[str, dict[str, Any]]:
    """Resolve a remote reference and read its validated manifest (no data download): (URL/NAME@vN, manifest)."""
    r = parse_ref(ref)
    store = RemoteStore(r.store)
    version = store.resolve(r.name, r.version, ref)
    return f"{store.url_of(r.name)}@v{version}", store.read_manifest(r.name, version)[1]
