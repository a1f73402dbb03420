"""Remote stores through fsspec (s3://, gs://, az://, memory://, ...): read by URL, publish with `push`.

Reading. A remote version is *materialized*: its manifest is read and validated (path escapes are refused here,
before anything is downloaded), every data file it lists is streamed into a local cache while its sha256 and
size are checked, the manifest is written last and the staging directory is renamed into place, so the cache
holds only complete, verified versions and the local readers work on them unchanged::

    $KDSTORE_CACHE (default ~/.cache/kdstore)/remote/<url-slug>-<hash>/NAME/vN/{manifest.json, data/...}

`resolve_any` is the one entry point: a local path or ``file://`` URL resolves in place; any other URL is
materialized (a cache hit costs one manifest read).

Publishing. `push` copies a verified local version to ``URL/NAME/vN`` with N = (highest vN on the remote) + 1:
it first *claims* vN by writing ``vN/.push-<token>`` and listing ``vN/`` (another claim or file there means
another push got it: withdraw and try N + 1), then uploads the data files, then writes ``manifest.json`` last,
with an exclusive create where the backend has one (S3 ``If-None-Match: *``, ``os.link`` locally). See
docs/format.md, "Remote stores", for what this does and does not guarantee.

Credentials and endpoints come from the backend's usual configuration (for S3: ``AWS_PROFILE``,
``AWS_ACCESS_KEY_ID``..., ``AWS_ENDPOINT_URL`` for MinIO/Ceph/moto; fsspec's own config files also apply).
This module imports no torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
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
    check_name,
    parse_version_dir,
    pick_version,
    resolve,
    split_ref,
    version_dir_name,
)
from kdstore.store.reader import Version

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
CLAIM_PREFIX = ".push-"
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
    for f in manifest["files"]:
        target = mf.resolve_inside(dest, f["path"], where)  # validated already; defence in depth
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


# --- publishing: push -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    url: str  # URL/NAME@vN
    name: str
    version: int
    files: int
    bytes: int


def push(source: str | Path | VersionRef, url: str, *, name: str | None = None,
         progress: Callable[[int], None] | None = None) -> PushResult:
    """Publish a version to the store at `url` as ``NAME/vN``, N = highest existing + 1; data first, manifest last.

    The source is verified in full first (a damaged version is never published). Two concurrent pushes of the
    same dataset get two different version numbers (see module docstring); neither overwrites the other.

    Args:
        source: local or remote version reference.
        url: the destination store (``s3://bucket/targets``, ``memory://x``, a local directory...).
        name: dataset name on the remote (default: the source's dataset directory name).
    """
    local = resolve_any(source, option="")
    v = Version(local)
    problems = v.verify(full=True)
    if problems:
        raise StoreFormatError(f"{local}: {problems[0]}"
                               + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                               + "; refusing to publish a damaged version (run `kdstore verify` on it)")
    name = name or local.name
    check_name(name)
    if is_url(url) and not is_remote(url):
        url = file_url_to_path(url)
    store = RemoteStore(url)
    token = uuid.uuid4().hex
    version, claim = _claim(store, name, token, str(local))
    uploaded: list[str] = []
    ok = False
    try:
        for f, p in zip(v.files, v.file_paths, strict=True):
            dst = store.path(name, f"v{version}", f["path"])
            with _remote_errors(store.url_of(name, f"v{version}", f["path"])):
                if store.local:
                    store.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
                store.fs.put_file(str(p), dst)
            uploaded.append(dst)
            if progress:
                progress(f["bytes"])
        manifest = {**v.manifest, "name": name, "version": version}
        manifest.pop("derived_files", None)  # derived files stay with the local copy (see docs/format.md)
        _publish_manifest(store, name, version, mf.dumps(manifest), token)
        ok = True
    finally:
        _remove(store, claim)
        if not ok:  # leave no orphan data in a version number we held
            for p in uploaded:
                _remove(store, p)
    return PushResult(store.url_of(name) + f"@v{version}", name, version, len(v.files),
                      sum(f["bytes"] for f in v.files))


def _claim(store: RemoteStore, name: str, token: str, source: str) -> tuple[int, str]:
    """Claim the first free version number from (highest existing vN) + 1: write a claim, then list."""
    taken = [v for v in map(parse_version_dir, store.ls(name)) if v is not None]
    n = max(taken, default=0) + 1
    info = json.dumps({"token": token, "host": socket.gethostname(), "pid": os.getpid(), "source": source,
                       "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}).encode()
    collisions = 0
    while collisions < 50:
        vdir = version_dir_name(n)
        if store.ls(name, vdir):  # a committed version, or another push's claim or data: take the next number
            n += 1
            continue
        claim = store.path(name, vdir, CLAIM_PREFIX + token)
        with _remote_errors(store.url_of(name, vdir)):
            if store.local:
                store.fs.makedirs(store.path(name, vdir), exist_ok=True)
            store.fs.pipe_file(claim, info)
        others = [x for x in store.ls(name, vdir) if x != CLAIM_PREFIX + token]
        if not others:
            return n, claim
        # Another push wrote a claim in vN at the same moment: withdraw, wait a random, growing while (both may
        # withdraw), and look at vN again; whoever then finds it empty takes it, the others move on.
        _remove(store, claim)
        collisions += 1
        time.sleep(random.uniform(0.0, min(0.02 * 2 ** min(collisions, 6), 1.0)))
    raise RemoteError(f"{store.url_of(name)}: could not claim a version number after {collisions} collisions; "
                      "many pushes are running at once: retry later")


def _publish_manifest(store: RemoteStore, name: str, version: int, text: str, token: str) -> None:
    where = store.url_of(name, f"v{version}", MANIFEST_NAME)
    if store.exists(name, f"v{version}", MANIFEST_NAME):
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
        return
    with _remote_errors(where):
        try:
            # S3: PUT with If-None-Match: * (atomic exclusive create); other backends: exists-check + PUT.
            store.fs.pipe_file(dst, data, mode="create")
        except FileExistsError:
            raise RemoteError(f"{where} was written by another push a moment ago; push again") from None


def _remove(store: RemoteStore, path: str) -> None:
    with contextlib.suppress(Exception):  # best effort: a leftover claim or orphan file is invisible to readers
        store.fs.rm_file(path)


def read_remote_manifest(ref: str) -> tuple[str, dict[str, Any]]:
    """Resolve a remote reference and read its validated manifest (no data download): (URL/NAME@vN, manifest)."""
    r = parse_ref(ref)
    store = RemoteStore(r.store)
    version = store.resolve(r.name, r.version, ref)
    return f"{store.url_of(r.name)}@v{version}", store.read_manifest(r.name, version)[1]
