"""Publishing that resumes and never duplicates (issue #20), with faults injected against a real S3 server.

A `kdstore push` (or `kdstore label --out s3://...`) runs in a child process; the moto server's tap
(tests/sharing_helpers.S3Tap) SIGKILLs it at an exact request (the claim, the first data object, half-way
through a data object's body, the manifest), refuses writes half-way, or holds a request open. The tap also
counts the bytes each request sends, so a rerun is checked to upload exactly what was missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from kdstore.store import catalog, publish, uploads
from kdstore.store.remote import RemoteStore, outbox_dir
from tests.conftest import Data
from tests.helpers import SMALL_ARGS, assert_clean_error, cli, run_label, subprocess_env
from tests.sharing_helpers import Fault, S3Tap, moto_s3


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Tap]:
    pytest.importorskip("s3fs", reason="s3fs is needed for s3:// stores (pip install kdstore[s3])")
    pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests")
    with moto_s3() as (_, tap):
        yield tap


@pytest.fixture
def bucket(s3: S3Tap) -> str:
    import fsspec

    name = f"kd-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    s3.clear()
    return f"s3://{name}/targets"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KDSTORE_CACHE", str(tmp_path / "cache"))  # children inherit it
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def versions(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two versions of five data files each (20 rows per shard)."""
    store = tmp_path_factory.mktemp("resume_src")
    return {"pq": run_label(data.teacher_pt, data.parquet, store, "ds", top_k=3, shard_rows=20).path,
            "h5": run_label(data.teacher_pt, data.parquet, store, "ds", format="hdf5", top_k=2, shard_rows=20).path}


def _fs():  # type: ignore[no-untyped-def]
    import fsspec

    return fsspec.filesystem("s3")


def _files(version: Path) -> list[dict]:  # type: ignore[type-arg]
    return json.loads((version / "manifest.json").read_text())["files"]


def _missing(bucket: str, name: str, version: int, files: list[dict]) -> int:  # type: ignore[type-arg]
    """Bytes of `files` that the remote vN does not hold whole."""
    _fs().invalidate_cache()
    there = {k.rsplit(f"/v{version}/", 1)[1]: i["size"]
             for k, i in _fs().find(f"{bucket.removeprefix('s3://')}/{name}/v{version}", detail=True).items()}
    return sum(f["bytes"] for f in files if there.get(f["path"]) != f["bytes"])


def _spawn(args: list[str], tmp_path: Path, tag: str) -> subprocess.Popen:  # type: ignore[type-arg]
    """`python -m kdstore ARGS` with stdout/stderr in tmp_path/TAG.out, .err."""
    with open(tmp_path / f"{tag}.out", "w") as out, open(tmp_path / f"{tag}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "kdstore", *map(str, args)], env=subprocess_env(),
                                stdout=out, stderr=err)  # the child has its own copies of the descriptors


def _killed_by(fault: Fault, proc: subprocess.Popen, tmp_path: Path, tag: str) -> None:  # type: ignore[type-arg]
    fault.pid = proc.pid
    rc = proc.wait(timeout=120)
    assert rc == -signal.SIGKILL, (rc, (tmp_path / f"{tag}.err").read_text())
    assert fault.fired.is_set()


def _nothing_left(bucket: str, published: list[str]) -> None:
    """Only the published versions' own files are on the remote: no claims, records or stray data."""
    keys = [k.removeprefix(bucket.removeprefix("s3://") + "/") for k in _fs().find(bucket.removeprefix("s3://"))]
    assert all(k.split("/")[0] + "/" + k.split("/")[1] in published for k in keys), keys
    assert not [k for k in keys if "/.push-" in k or "/.uploads/" in k], keys


# --- SIGKILL at several points, then the same command again ---------------------------------------------------

KILL_POINTS = {
    "at-the-claim": Fault("kill", "PUT", r"/v\d+/\.push-"),  # its record is written; no version number yet
    "before-the-first-object": Fault("kill", "PUT", r"/data/"),  # vN claimed, no data
    "mid-data": Fault("kill", "PUT", r"/data/", nth=3, after=0.5),  # two files whole, the third half sent
    "before-the-manifest": Fault("kill", "PUT", r"/manifest\.json$"),  # every data file there
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_push_killed_then_rerun_resumes_the_same_version(point: str, s3: S3Tap, bucket: str,
                                                         versions: dict[str, Path], tmp_path: Path) -> None:
    src, files = versions["pq"], _files(versions["pq"])
    publish.push(versions["h5"], bucket)  # ds@v1 is another version: the push under test makes ds@v2
    fault = replace(KILL_POINTS[point])
    s3.faults.append(fault)
    _killed_by(fault, _spawn(["push", src, bucket, "--quiet"], tmp_path, "push"), tmp_path, "push")
    assert [e.version for e in catalog.list_store(bucket).entries] == [1]  # nothing half-published is visible
    missing = _missing(bucket, "ds", 2, files)
    expected_missing = {"at-the-claim": 5, "before-the-first-object": 5, "mid-data": 3, "before-the-manifest": 0}
    assert missing == sum(f["bytes"] for f in files[5 - expected_missing[point]:])

    s3.clear()
    r = cli(["push", src, bucket])
    assert r.exit_code == 0, r.output
    resumed = 5 - expected_missing[point]
    assert r.output.startswith(f"pushed {src} -> {bucket}/ds@v2 (5 files, ")
    assert (f"; resumed: {resumed} file" in r.output) == (resumed > 0), r.output
    assert s3.sent("PUT", "/data/") == missing  # the rerun uploaded exactly the data that was missing
    overhead = s3.sent("PUT", "/") - missing  # manifest, claim, records
    assert overhead < 3 * (src / "manifest.json").stat().st_size + 4096
    assert [e.version for e in catalog.list_store(bucket).entries] == [1, 2]  # one new version, not two
    assert json.loads(_fs().cat(f"{bucket.removeprefix('s3://')}/ds/v2/manifest.json"))["files"] == files
    assert catalog.verify(f"{bucket}/ds@v2").ok
    _nothing_left(bucket, ["ds/v1", "ds/v2"])


def test_label_out_url_killed_while_pushing_resumes(data: Data, s3: S3Tap, bucket: str, tmp_path: Path) -> None:
    """`label --out URL` labels into a local outbox, then pushes: a rerun resumes that push (same bytes)."""
    args = ["label", "--teacher", data.teacher_pt, "--transfer", data.parquet, "--out", bucket, "--name", "team",
            "--top-k", "3", *SMALL_ARGS]
    fault = Fault("kill", "PUT", r"/data/", nth=2, after=0.5)
    s3.faults.append(fault)
    _killed_by(fault, _spawn(args, tmp_path, "label"), tmp_path, "label")
    assert catalog.list_store(bucket).entries == []
    outbox = next(outbox_dir(bucket).glob("team/v1"))
    files = _files(outbox)
    missing = _missing(bucket, "team", 1, files)
    assert 0 < missing < sum(f["bytes"] for f in files)

    s3.clear()
    r = cli(args)
    assert r.exit_code == 0, r.output
    assert f"pushed -> {bucket}/team@v1" in r.output
    assert s3.sent("PUT", "/data/") == missing
    assert [e.version for e in catalog.list_store(bucket).entries] == [1]
    assert catalog.verify(f"{bucket}/team@v1").ok
    _nothing_left(bucket, ["team/v1"])


# --- concurrency and idempotence ------------------------------------------------------------------------------


def test_two_pushes_of_the_same_version_at_once_publish_it_once(s3: S3Tap, bucket: str, versions: dict[str, Path],
                                                                tmp_path: Path) -> None:
    src, files = versions["pq"], _files(versions["pq"])
    hold = Fault("hold", "PUT", r"/data/")  # the first data file waits until the other push is seen waiting
    s3.faults.append(hold)
    procs = [_spawn(["push", src, bucket, "--quiet"], tmp_path, tag) for tag in ("a", "b")]
    deadline = time.monotonic() + 60
    while not any("waiting for it to finish" in (tmp_path / f"{t}.err").read_text() for t in ("a", "b")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)
    hold.release.set()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    outs = sorted((tmp_path / f"{t}.out").read_text().strip() for t in ("a", "b"))
    size = catalog.human_bytes(sum(f["bytes"] for f in files))
    assert outs == [f"already published: {src} -> {bucket}/ds@v1 (same 5 files, {size}; nothing uploaded)",
                    f"pushed {src} -> {bucket}/ds@v1 (5 files, {size})"]
    assert s3.sent("PUT", "/data/") == sum(f["bytes"] for f in files)  # one copy sent, not two
    assert [e.version for e in catalog.list_store(bucket).entries] == [1]
    _nothing_left(bucket, ["ds/v1"])


def test_pushing_published_content_again_names_the_version(s3: S3Tap, bucket: str, versions: dict[str, Path],
                                                           tmp_path: Path) -> None:
    publish.push(versions["pq"], bucket)
    publish.push(versions["h5"], bucket)
    copy = tmp_path / "elsewhere" / "renamed-locally" / "v7"  # another local copy of the same files
    shutil.copytree(versions["pq"], copy)
    s3.clear()
    r = cli(["push", copy, bucket, "--name", "ds"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"already published: {copy} -> {bucket}/ds@v1 (same 5 files, ")
    assert s3.sent("PUT", "/") == 0  # nothing at all was written
    res = publish.push(copy, bucket)  # under its own name it is another dataset: published as renamed-locally@v1
    assert (res.url, res.existing) == (f"{bucket}/renamed-locally@v1", False)


# --- a store that refuses writes half-way ---------------------------------------------------------------------


def test_store_refusing_writes_half_way(s3: S3Tap, bucket: str, versions: dict[str, Path]) -> None:
    src, files = versions["pq"], _files(versions["pq"])
    s3.faults.append(Fault("deny", "PUT", r"/data/", nth=3))  # the third data file, and every write after it
    line = assert_clean_error(cli(["push", src, bucket]), r"ds/v1/data/part-00002.parquet: PermissionError")
    assert "nothing was published, the files uploaded so far are kept: rerun the same push to resume" in line
    assert catalog.list_store(bucket).entries == []  # nothing visible

    listing = catalog.list_store(bucket, with_uploads=True)
    [u] = listing.uploads or []
    assert (u.ref, u.data_files, u.files_total, u.live) == ("ds@v1", 2, 5, False)
    assert u.bytes >= files[0]["bytes"] + files[1]["bytes"]
    r = cli(["ls", bucket, "--all"])
    assert r.exit_code == 0, r.output
    assert "ds@v1: unfinished push, 2 of 5 data files, " in r.output and ", not running (was " in r.output
    j = json.loads(cli(["ls", bucket, "--all", "--json"]).output)
    assert j["versions"] == [] and j["uploads"][0]["version"] == 1 and j["uploads"][0]["data_files"] == 2

    s3.clear()  # permissions restored
    r = cli(["push", src, bucket])
    assert r.exit_code == 0, r.output
    assert "; resumed: 2 files already there" in r.output
    assert s3.sent("PUT", "/data/") == sum(f["bytes"] for f in files[2:])
    assert catalog.verify(f"{bucket}/ds@v1").ok
    _nothing_left(bucket, ["ds/v1"])


# --- listing and pruning unfinished uploads -------------------------------------------------------------------


def test_prune_removes_dead_uploads_and_never_a_running_push(s3: S3Tap, bucket: str, versions: dict[str, Path],
                                                             tmp_path: Path) -> None:
    kill = Fault("kill", "PUT", r"/data/", nth=2, after=0.5)
    s3.faults.append(kill)
    _killed_by(kill, _spawn(["push", versions["h5"], bucket, "--quiet"], tmp_path, "dead"), tmp_path, "dead")
    hold = Fault("hold", "PUT", r"/data/", nth=2)  # the live push waits at its second data file
    s3.faults.append(hold)
    live = _spawn(["push", versions["pq"], bucket, "--quiet"], tmp_path, "live")
    try:
        deadline = time.monotonic() + 60
        while not hold.fired.is_set():
            assert time.monotonic() < deadline and live.poll() is None, (tmp_path / "live.err").read_text()
            time.sleep(0.05)
        bkt, prefix = bucket.removeprefix("s3://").split("/", 1)
        mpu = _fs().call_s3("create_multipart_upload", Bucket=bkt, Key=f"{prefix}/ds/v1/data/big.h5")

        r = cli(["ls", bucket, "--all"])
        assert r.exit_code == 0, r.output
        lines = r.output.splitlines()
        assert lines[0] == f"no dataset versions in {bucket}"
        assert lines[1].startswith("ds@v1: unfinished push, 1 of 5 data files, ") and "not running (was " in lines[1]
        assert lines[2].startswith("ds@v2: unfinished push, 1 of 5 data files, ") and ", running (" in lines[2]

        r = cli(["prune", bucket, "--older-than", "1h"])
        assert r.exit_code == 0 and r.output.splitlines()[-1] == "removed 0 unfinished uploads (0 B); kept 2"
        r = cli(["prune", bucket, "--older-than", "0", "--dry-run"])
        assert r.output.splitlines()[0].startswith("would remove ds@v1: unfinished push")
        r = cli(["prune", bucket, "--older-than", "0"])
        assert r.exit_code == 0, r.output
        out = r.output.splitlines()
        assert out[0].startswith("removed ds@v1: unfinished push, 1 of 5 data files")
        assert out[1].startswith("kept ds@v2: unfinished push") and out[1].endswith(": a push is writing it")
        assert out[2].startswith("removed 1 unfinished upload (")
        keys = [k.split("/targets/", 1)[1] for k in _fs().find(bkt)]
        assert not [k for k in keys if k.startswith("ds/v1/")]  # the dead upload is gone, its record too
        assert len({k.split("/")[2] for k in keys if k.startswith("ds/.uploads/")}) == 1
        assert not [u for u in _fs().list_multipart_uploads(bkt) if u["UploadId"] == mpu["UploadId"]]
    finally:
        hold.release.set()
    assert live.wait(timeout=120) == 0, (tmp_path / "live.err").read_text()
    assert [e.version for e in catalog.list_store(bucket).entries] == [2]
    assert catalog.verify(f"{bucket}/ds@v2").ok
    _nothing_left(bucket, ["ds/v2"])


def test_prune_removes_markers_a_finished_push_left_and_keeps_its_data(versions: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    store = tmp_path / "published"
    res = publish.push(versions["pq"], str(store))
    key = uploads.content_key("ds", _files(versions["pq"]))
    (store / "ds" / "v1" / f".push-{key}").write_text("{}")  # as if killed after the manifest
    (store / "ds" / ".uploads" / key).mkdir(parents=True)
    (store / "ds" / ".uploads" / key / "abc.json").write_text(json.dumps({"content_key": key, "state": "running"}))
    [u] = catalog.list_store(store, with_uploads=True).uploads or []
    assert u.published and u.ref == "ds@v1" and not u.live
    r = cli(["prune", store, "--older-than", "0"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (store / "ds").iterdir()) == ["v1"]
    assert not list((store / "ds" / "v1").glob(".push-*")) and catalog.verify(res.url).ok
    assert_clean_error(cli(["prune", tmp_path / "nope"]), r"store .*nope does not exist")


# --- liveness and resuming without a process to kill ------------------------------------------------------------


def _record(key: str, **kw: object) -> dict:  # type: ignore[type-arg]
    now = uploads._iso(time.time())
    return {"content_key": key, "name": "ds", "version": None, "files": 5, "files_done": [], "host": "elsewhere",
            "machine": "another-machine", "pid": 4242, "state": "running", "heartbeat_at": now,
            "lease_seconds": uploads.LEASE_SECONDS, **kw}


def test_liveness_of_records() -> None:
    old = uploads._iso(time.time() - uploads.LEASE_SECONDS - 5)
    assert uploads.is_live(_record("k"))  # another machine: trusted while its heartbeat is fresh
    assert not uploads.is_live(_record("k", heartbeat_at=old))  # its lease ran out
    assert not uploads.is_live(_record("k", state="interrupted"))
    here = {"machine": uploads.machine_id()}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not uploads.is_live(_record("k", **here, pid=dead.pid))  # this machine, process gone: dead at once
    assert not uploads.is_live(_record("k", **here, pid=dead.pid, pid_start=None))
    assert not uploads.is_live(_record("k", **here, pid=os.getpid(), token="not-held"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = uploads._proc_stat(sleeper.pid)
        assert uploads.is_live(_record("k", **here, pid=sleeper.pid, pid_start=start[1] if start else None))
        assert not uploads.is_live(_record("k", **here, pid=sleeper.pid, pid_start="1"))  # a reused pid
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("where", ["memory", "directory"])
def test_interrupted_push_resumes_from_its_record(where: str, versions: dict[str, Path], tmp_path: Path) -> None:
    """Stores without object metadata: the files done come from the push's record (and hashing, on a disk)."""
    url = f"memory://kd-{uuid.uuid4().hex[:8]}/t" if where == "memory" else str(tmp_path / "published")
    files = _files(versions["pq"])
    seen: list[int] = []

    def stop_after_two(n: int) -> None:
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt  # Ctrl-C after two files

    with pytest.raises(KeyboardInterrupt):
        publish.push(versions["pq"], url, progress=stop_after_two)
    [u] = catalog.list_store(url, with_uploads=True).uploads or []
    assert (u.ref, u.data_files, u.live) == ("ds@v1", 2, False)
    res = publish.push(versions["pq"], url)
    assert (res.version, res.resumed_files, res.uploaded_bytes) == (1, 2, sum(f["bytes"] for f in files[2:]))
    assert catalog.verify(res.url).ok
    assert catalog.list_store(url, with_uploads=True).uploads == []


def test_a_push_waits_for_a_live_push_on_another_machine_and_takes_over_when_its_lease_runs_out(
    versions: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"memory://kd-{uuid.uuid4().hex[:8]}/t"
    store = RemoteStore(url)
    key = uploads.content_key("ds", _files(versions["pq"]))
    uploads.write_object(store, ("ds", ".uploads", key, "other.json"), json.dumps(_record(key)).encode())
    messages: list[str] = []
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(publish.push(versions["pq"], url, on_wait=messages.append)))
    t.start()
    deadline = time.monotonic() + 30
    while not messages:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert messages[0].startswith("another push (elsewhere pid 4242, heartbeat ") and "waiting for it" in messages[0]
    assert not result  # still waiting
    stale = _record(key, heartbeat_at=uploads._iso(time.time() - uploads.LEASE_SECONDS - 1))
    uploads.write_object(store, ("ds", ".uploads", key, "other.json"), json.dumps(stale).encode())
    t.join(timeout=30)
    [res] = result
    assert isinstance(res, publish.PushResult) and res.version == 1 and not res.existing
    assert catalog.list_store(url, with_uploads=True).uploads == []  # the dead record went with ours
