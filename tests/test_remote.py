"""Remote stores: push / ls / inspect / verify / diff / convert against a real S3-compatible server (moto's server
mode on 127.0.0.1, a random free port, dummy credentials; see tests/sharing_helpers.moto_s3), plus memory:// and
file:// URLs.

Nothing is patched: kdstore talks to the server over HTTP through fsspec/s3fs exactly as it would to S3; the test
only points AWS_ENDPOINT_URL at it. The server is in-process (a thread) and stops at the end of the module.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kdstore.errors import ConfigError, RemoteError, StoreFormatError, StoreNotFoundError, UnsafePathError
from kdstore.store import Version, catalog, publish, remote
from tests.conftest import Data
from tests.helpers import assert_clean_error, cli, run_label
from tests.sharing_helpers import copy_version, flip_byte, moto_s3


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (free port), with dummy credentials and the endpoint set for this module."""
    pytest.importorskip("s3fs", reason="s3fs is needed for s3:// stores (pip install kdstore[s3])")
    pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests")
    with moto_s3() as (endpoint, _):
        yield endpoint


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """s3://<fresh bucket>/targets"""
    import fsspec

    name = f"kd-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}/targets"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KDSTORE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def versions(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    store = tmp_path_factory.mktemp("remote_src")
    return {
        "pq": run_label(data.teacher_pt, data.parquet, store, "ds", top_k=3).path,
        "h5": run_label(data.teacher_pt, data.parquet, store, "ds", format="hdf5", top_k=2).path,
        "b": run_label(data.factory_spec, data.parquet, store, "other-teacher", top_k=3).path,
    }


def _fs():  # type: ignore[no-untyped-def]
    import fsspec

    return fsspec.filesystem("s3")


def _key(url: str) -> str:
    return url.removeprefix("s3://")


# --- push, ls, inspect, verify, materialize --------------------------------------------------------------------


def test_push_then_read_everything_back(versions: dict[str, Path], bucket: str, cache: Path) -> None:
    r = cli(["push", f"{versions['pq'].parent}@v1", bucket])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"pushed {versions['pq'].parent}@v1 -> {bucket}/ds@v1 (3 files, ")
    r2 = publish.push(versions["h5"], bucket)
    assert (r2.url, r2.version, r2.files) == (f"{bucket}/ds@v2", 2, 3)
    keys = sorted(k.removeprefix(_key(bucket) + "/") for k in _fs().find(_key(bucket)))
    assert keys == ["ds/v1/data/part-00000.parquet", "ds/v1/data/part-00001.parquet", "ds/v1/data/part-00002.parquet",
                    "ds/v1/manifest.json", "ds/v2/data/part-00000.h5", "ds/v2/data/part-00001.h5",
                    "ds/v2/data/part-00002.h5", "ds/v2/manifest.json"]  # no claims or temporary files left
    pushed = json.loads(_fs().cat(f"{_key(bucket)}/ds/v1/manifest.json"))
    local = json.loads((versions["pq"] / "manifest.json").read_text())
    assert pushed == local  # name and version happen to match; files and checksums always do

    # ls reads manifests only
    r = cli(["ls", bucket])
    assert r.exit_code == 0, r.output
    assert [ln.split()[0] for ln in r.output.splitlines()[1:]] == ["ds@v1", "ds@v2"]
    j = json.loads(cli(["ls", bucket, "--json"]).output)
    assert [v["ref"] for v in j["versions"]] == [f"{bucket}/ds@v1", f"{bucket}/ds@v2"]
    assert not cache.exists()

    # inspect without --card: the manifest only, nothing downloaded
    r = cli(["inspect", f"{bucket}/ds@v1"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"ds@v1   {bucket}/ds@v1\n") and "top-k fidelity" in r.output
    assert not cache.exists()

    # verify downloads into the cache and checks every byte
    r = cli(["verify", f"{bucket}/ds"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"ok {bucket}/ds@v2: 3 file(s)")

    # materialize: a normal local version in the cache, identical values
    ref = remote.resolve_any(f"{bucket}/ds@v1")
    assert ref.path.is_relative_to(cache) and ref.name == "ds" and ref.version == 1
    v, src = Version(ref), Version(versions["pq"])
    for n in src.columns:
        assert np.array_equal(v.read_all([n])[n], src.read_all([n])[n])
    assert (ref.path / "manifest.json").read_bytes() == _fs().cat(f"{_key(bucket)}/ds/v1/manifest.json")
    assert not [p for p in ref.path.parent.iterdir() if p.name.startswith(".")]  # no staging left

    # a cache hit costs one manifest read: the data is not fetched again
    _fs().rm(f"{_key(bucket)}/ds/v1/data/part-00001.parquet")
    assert remote.resolve_any(f"{bucket}/ds@v1") == ref
    r = cli(["verify", f"{bucket}/ds@v1"])  # but verify checks the remote itself
    assert r.exit_code == 1 and "data/part-00001.parquet: missing on the remote" in r.output

    # inspect --card on a remote version writes the card into the cache copy (or --card-dir)
    r = cli(["inspect", f"{bucket}/ds@v2", "--card"])
    assert r.exit_code == 0, r.output
    assert (cache / "remote").is_dir() and list(cache.rglob("card/README.md"))


def test_diff_and_convert_read_remote_versions(versions: dict[str, Path], bucket: str, tmp_path: Path) -> None:
    publish.push(versions["pq"], bucket)
    publish.push(versions["b"], bucket)
    r = cli(["diff", f"{bucket}/ds@v1", f"{bucket}/other-teacher", "--json"])
    assert r.exit_code == 0, r.output
    local = cli(["diff", versions["pq"], versions["b"], "--json"])
    a, b = json.loads(r.output), json.loads(local.output)
    assert a["agreement"] == b["agreement"] and a["kl_mean"] == b["kl_mean"]
    assert a["a"] == f"{bucket}/ds@v1"  # reported by the name given, not the cache path

    assert_clean_error(cli(["convert", f"{bucket}/ds@v1", "--to", "hdf5"]), r"is remote: pass --out STORE")
    r = cli(["convert", f"{bucket}/ds@v1", "--to", "hdf5", "--out", tmp_path / "local", "--quiet"])
    assert r.exit_code == 0, r.output
    v = Version(tmp_path / "local" / "ds")
    assert v.fmt == "hdf5" and v.manifest["parent"]["settings"]["source"] == f"{bucket}/ds@v1"
    # and push the converted version back: it becomes ds@v2 on the remote
    assert publish.push(v.path, bucket).version == 2


def test_push_rename_and_version_numbering(versions: dict[str, Path], bucket: str) -> None:
    fs = _fs()
    # a crashed push left data (no manifest) in v1, and someone's claim in v2: both numbers are taken
    fs.pipe(f"{_key(bucket)}/ds/v1/data/part-00000.parquet", b"partial")
    fs.pipe(f"{_key(bucket)}/ds/v2/.push-deadbeef", b"{}")
    res = publish.push(versions["pq"], bucket, name="ds")
    assert res.version == 3
    assert publish.push(versions["pq"], bucket, name="renamed").url == f"{bucket}/renamed@v1"
    m = json.loads(fs.cat(f"{_key(bucket)}/renamed/v1/manifest.json"))
    assert m["name"] == "renamed" and m["version"] == 1
    assert catalog.list_store(bucket).entries[0].ref == f"{bucket}/ds@v3"  # v1, v2 are not versions
    assert_clean_error(cli(["push", versions["pq"], bucket, "--name", "a/b"]), r"is not a valid dataset name")


@pytest.mark.parametrize("where", ["s3", "directory"])
def test_concurrent_pushes_never_overwrite_or_duplicate(versions: dict[str, Path], bucket: str, tmp_path: Path,
                                                        where: str) -> None:
    """Three different versions, each pushed twice at once: three remote versions, never a mix, never a copy."""
    if where == "directory":
        bucket = str(tmp_path / "published")
    sources = ["pq", "h5", "b"] * 2
    results: list[object] = [None] * len(sources)
    barrier = threading.Barrier(len(sources))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = publish.push(versions[sources[i]], bucket, name="race")
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sources))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    done: list[publish.PushResult] = results  # type: ignore[assignment]
    assert sorted({r.version for r in done}) == [1, 2, 3]  # one version per content
    for i, r in enumerate(done[:3]):
        twin = done[i + 3]
        assert twin.version == r.version and sorted([r.existing, twin.existing]) == [False, True]
        rep = catalog.verify(r.url)
        assert rep.ok, rep.problems  # each version holds exactly its own files
        assert Version(remote.resolve_any(r.url)).manifest["files"] == Version(versions[sources[i]]).manifest["files"]
    if where == "s3":
        assert not [k for k in _fs().find(_key(bucket)) if "/.push-" in k or ".tmp" in k or ".uploads" in k]
    else:
        assert not [p for p in Path(bucket).rglob("*") if p.name.startswith((".push-", ".uploads")) or ".tmp" in p.name]


def test_manifest_is_published_by_exclusive_create(versions: dict[str, Path], bucket: str, tmp_path: Path) -> None:
    """The last step of a push never replaces a manifest that appeared meanwhile (S3 If-None-Match, os.link)."""
    text = (versions["pq"] / "manifest.json").read_text()
    for url in (bucket, str(tmp_path / "dir")):
        store = remote.RemoteStore(url)
        if store.local:
            (tmp_path / "dir" / "ds" / "v1").mkdir(parents=True)
        publish._publish_manifest(store, "ds", 1, text, "aaaa")
        with pytest.raises(RemoteError, match=r"ds/v1/manifest.json already exists: another push took v1"):
            publish._publish_manifest(store, "ds", 1, text.replace("ds", "xx"), "bbbb")
        store.fs.invalidate_cache()
        assert store.fs.cat_file(store.path("ds", "v1", "manifest.json")).decode() == text


# --- damage and safety on the remote ------------------------------------------------------------------------------


def test_corrupted_remote_file_is_named_and_never_cached(versions: dict[str, Path], bucket: str, cache: Path) -> None:
    publish.push(versions["pq"], bucket)
    fs = _fs()
    key = f"{_key(bucket)}/ds/v1/data/part-00001.parquet"
    raw = bytearray(fs.cat(key))
    raw[len(raw) // 2] ^= 0xFF
    fs.pipe(key, bytes(raw))
    fs.pipe(f"{_key(bucket)}/ds/v1/data/part-00002.parquet", b"short")
    with pytest.raises(StoreFormatError,
                       match=r"data/part-00001.parquet: sha256 .* \(corrupted\); the remote copy is damaged"):
        remote.materialize(f"{bucket}/ds")
    assert not list(cache.rglob("v1"))  # nothing half-downloaded is visible
    assert not list(cache.rglob(".staging-*"))
    r = cli(["verify", f"{bucket}/ds"])
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert lines[0].startswith("data/part-00001.parquet: sha256 ") and "(corrupted)" in lines[0]
    assert lines[1] == "data/part-00002.parquet: 5 bytes, manifest says " + lines[1].split("says ")[1]
    assert lines[2].startswith(f"Error: {bucket}/ds@v1: 2 problems found")
    assert_clean_error(cli(["inspect", f"{bucket}/ds", "--card"]), r"part-00001.parquet: sha256 .*corrupted")


@pytest.mark.parametrize("path", ["../../x", "data/../../x", "/etc/passwd", "data/.", "data/..", "C:/x"])
def test_remote_manifest_naming_a_path_outside_is_refused_before_download(
    versions: dict[str, Path], bucket: str, cache: Path, tmp_path: Path, path: str,
) -> None:
    publish.push(versions["pq"], bucket)
    fs = _fs()
    mkey = f"{_key(bucket)}/ds/v1/manifest.json"
    m = json.loads(fs.cat(mkey))
    m["files"][0]["path"] = path
    fs.pipe(mkey, json.dumps(m).encode())
    fs.pipe(f"{_key(bucket)}/x", b"outside")  # what ../../x would reach from ds/v1
    with pytest.raises(UnsafePathError, match="outside its version directory"):
        remote.materialize(f"{bucket}/ds@v1")
    assert not cache.exists() or not list(cache.rglob("*.parquet"))  # nothing was downloaded
    assert not (tmp_path / "x").exists() and not (cache / "x").exists()
    r = cli(["verify", f"{bucket}/ds@v1"])
    assert r.exit_code == 1 and "outside its version directory" in r.output.splitlines()[0]
    assert_clean_error(cli(["inspect", f"{bucket}/ds@v1"]), r"outside its version directory")
    assert_clean_error(cli(["diff", f"{bucket}/ds@v1", versions["pq"]]), r"outside its version directory")


def test_remote_manifest_schema_invalid(versions: dict[str, Path], bucket: str) -> None:
    publish.push(versions["pq"], bucket)
    mkey = f"{_key(bucket)}/ds/v1/manifest.json"
    _fs().pipe(mkey, b'{"format_version": 1, "name": "ds"}')
    r = cli(["verify", f"{bucket}/ds"])
    assert r.exit_code == 1 and "manifest.json does not match schema" in r.output
    r = cli(["ls", bucket])
    assert "DAMAGED" in r.output and "does not match schema" in r.output


def test_push_refuses_a_damaged_local_version(versions: dict[str, Path], bucket: str, tmp_path: Path) -> None:
    vdir = copy_version(versions["pq"], tmp_path / "s", "ds")
    flip_byte(vdir / "data" / "part-00000.parquet")
    assert_clean_error(cli(["push", vdir, bucket]),
                       r"part-00000.parquet: sha256 .*refusing to publish a damaged version")
    assert not _fs().find(_key(bucket))


def test_remote_errors_are_one_line(bucket: str) -> None:
    assert_clean_error(cli(["ls", "s3://no-such-bucket-kdstore/targets"]), r"no-such-bucket-kdstore")
    assert_clean_error(cli(["verify", f"{bucket}/nope"]), r"holds no committed version")
    assert_clean_error(cli(["inspect", f"{bucket}/nope@v3"]), r"holds no committed version")
    assert_clean_error(cli(["ls", "nosuchproto://x/y"]), r"nosuchproto://x/y")
    assert_clean_error(cli(["verify", "s3://bucket-only"]), r"expected URL/NAME or URL/NAME@vN")
    with pytest.raises(ConfigError):
        remote.parse_ref("s3://x")
    assert remote.parse_ref("s3://b/t/ds/v3") == remote.RemoteRef("s3://b/t", "ds", 3)
    assert remote.parse_ref("s3://b/t/ds@latest") == remote.RemoteRef("s3://b/t", "ds", None)


# --- memory:// and file:// ---------------------------------------------------------------------------------------


def test_memory_and_file_urls(versions: dict[str, Path], cache: Path, tmp_path: Path) -> None:
    url = f"memory://kd-{uuid.uuid4().hex[:8]}/targets"
    assert publish.push(versions["pq"], url).version == 1
    assert publish.push(versions["h5"], url).version == 2
    assert [e.version for e in catalog.list_store(url).entries] == [1, 2]
    assert catalog.verify(f"{url}/ds@v1").ok
    with pytest.raises(StoreNotFoundError, match=r"version v5 not found; ds has v1, v2"):
        remote.materialize(f"{url}/ds@v5")
    # file:// is read in place (no cache); push to a plain directory publishes with os.link (exclusive)
    store = versions["pq"].parent.parent
    assert remote.resolve_any(f"file://{store}/ds@v1").path == versions["pq"]
    assert cli(["verify", f"file://{store}/ds@v2"]).exit_code == 0
    dest = tmp_path / "published"
    assert publish.push(versions["pq"], str(dest)).version == 1
    again = publish.push(versions["pq"], f"file://{dest}")
    assert (again.version, again.existing, again.uploaded_bytes) == (1, True, 0)  # the same files: no second copy
    assert publish.push(versions["h5"], f"file://{dest}").version == 2
    assert catalog.verify(dest / "ds").ok and sorted(p.name for p in (dest / "ds").iterdir()) == ["v1", "v2"]
    assert not list(dest.rglob(".push-*")) and not list(dest.rglob("*.tmp"))
    assert not (cache / "remote" / "file").exists()


def test_cache_and_outbox_locations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KDSTORE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert remote.cache_root() == tmp_path / "xdg" / "kdstore"
    a, b = remote.cache_store_dir("s3://b/t"), remote.cache_store_dir("s3://b/t/")
    assert a == b and a.parent == tmp_path / "xdg" / "kdstore" / "remote" and a.name.startswith("s3-b-t-")
    assert remote.outbox_dir("s3://b/t").parent.name == "outbox"
    assert remote.is_remote("s3://b/t") and not remote.is_remote("file:///x") and not remote.is_url("./x")


def test_remote_error_type_for_unreachable_server(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> None:
    import socket

    import s3fs

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(RemoteError, match="check the URL, the credentials"):
            catalog.list_store("s3://kd-unreachable/targets")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_label_out_url_then_train_from_the_url(data: Data, bucket: str, tmp_path: Path) -> None:
    """`kdstore label --out s3://...` labels into a local outbox and publishes; `train --targets s3://...` reads it."""
    url = f"s3://{bucket}/shared-{uuid.uuid4().hex[:6]}"
    r = cli(["label", "--teacher", data.teacher_pt, "--transfer", data.parquet, "--out", url, "--name", "team",
             "--top-k", "3", "--shard-rows", "40", "--row-group-rows", "16", "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"pushed -> {url}/team@v1" in r.output
    assert _fs().exists(_key(f"{url}/team/v1/manifest.json"))
    t = cli(["train", "--targets", f"{url}/team", "--student", "mlp:8-16-5", "-T", "2", "--epochs", "1",
             "--device", "cpu", "--quiet", "--out", tmp_path / "run"])
    assert t.exit_code == 0, t.output
    assert "kd-T2-a0.9" in t.output
