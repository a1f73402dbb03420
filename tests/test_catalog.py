"""`kdstore ls` and `kdstore verify`: listing stores, and naming every damaged file (local; remote in test_remote)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kdstore.errors import StoreNotFoundError
from kdstore.store import catalog
from tests.conftest import Data
from tests.helpers import assert_clean_error, cli
from tests.sharing_helpers import copy_version, edit_manifest, flip_byte, label_store, truncate


@pytest.fixture(scope="module")
def shared(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return label_store(data, tmp_path_factory.mktemp("catalog_store"))


# --- ls -----------------------------------------------------------------------------------------------------------


def test_ls_table_shows_every_version(shared: dict[str, Path]) -> None:
    store = shared["pq"].parent.parent
    r = cli(["ls", store])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:6] == ["VERSION", "ROWS", "KIND", "TARGETS", "FORMAT", "SIZE"]
    assert [ln.split()[0] for ln in lines[1:]] == ["ens@v1", "pq@v1", "pq@v2", "topk@v1"]
    m = json.loads((shared["pq"] / "manifest.json").read_text())
    pq1 = lines[2]
    assert " 100 " in pq1 and " original " in pq1 and "fp16 logits + top-3" in pq1 and " parquet " in pq1
    assert f"teacher.pt ({m['teachers'][0]['sha256'][:8]})" in pq1
    assert f"transfer.parquet ({m['transfer_set']['sha256'][:8]})" in pq1
    assert m["created_at"][:16].replace("T", " ") in pq1
    assert "kB" in pq1
    assert "bf16 logits + top-3" in lines[3] and " hdf5 " in lines[3]
    assert "top-2 (no logits)" in lines[4]
    ens = lines[1]
    assert " unlabeled " in ens and "tiny_teacher@tiny_seed1.safetensors" in ens and "transfer.npy" in ens


def test_ls_json_for_scripts(shared: dict[str, Path]) -> None:
    store = shared["pq"].parent.parent
    r = cli(["ls", store, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["store"] == str(store) and out["unfinished"] == {}
    by_ref = {(v["name"], v["version"]): v for v in out["versions"]}
    assert sorted(by_ref) == [("ens", 1), ("pq", 1), ("pq", 2), ("topk", 1)]
    v = by_ref[("pq", 1)]
    m = json.loads((shared["pq"] / "manifest.json").read_text())
    assert v["ref"] == f"{store / 'pq'}@v1" and v["error"] is None
    assert v["rows"] == 100 and v["kind"] == "original" and v["format"] == "parquet"
    assert v["targets"] == {"logits": "float16", "top_k": 3, "tail": "uniform", "labels": True,
                            "text": "fp16 logits + top-3"}
    assert v["bytes"] == sum(f["bytes"] for f in m["files"]) and v["files"] == 3
    assert v["teachers"][0]["sha256"] == m["teachers"][0]["sha256"]
    assert v["transfer_set"]["sha256"] == m["transfer_set"]["sha256"]
    assert v["created_at"] == m["created_at"] and v["parent"] is None
    assert [t["id"] for t in by_ref[("ens", 1)]["teachers"]] == ["t0", "t1"]
    assert by_ref[("topk", 1)]["targets"]["logits"] is None


def test_ls_lists_a_damaged_manifest_and_unfinished_runs(shared: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "s"
    copy_version(shared["pq"], store, "good")
    bad = copy_version(shared["pq"], store, "bad")
    (bad / "manifest.json").write_text("{not json")
    (store / "good" / ".staging-0123456789abcdef" / "data").mkdir(parents=True)
    r = cli(["ls", store])
    assert r.exit_code == 0, r.output
    assert "bad@v1" in r.output and "DAMAGED" in r.output and "is not valid JSON" in r.output
    assert "good: 1 unfinished run(s) staged" in r.output
    out = json.loads(cli(["ls", store, "--json"]).output)
    assert out["unfinished"] == {"good": 1}
    assert [v["error"] is None for v in out["versions"]] == [False, True]


def test_ls_empty_missing_and_misdirected(shared: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert cli(["ls", tmp_path / "empty"]).output.strip() == f"no dataset versions in {tmp_path / 'empty'}"
    assert_clean_error(cli(["ls", tmp_path / "nope"]), r"store .*nope does not exist or is not a directory")
    with pytest.raises(StoreNotFoundError):
        catalog.list_store(tmp_path / "nope")
    dataset_dir = shared["pq"].parent
    r = cli(["ls", dataset_dir])
    assert "is a dataset directory; run `kdstore ls " in r.output
    assert "is a version directory" in cli(["ls", shared["pq"]]).output
    assert cli(["ls", f"file://{shared['pq'].parent.parent}"]).output.count("@v") == 4  # file:// URL = local path


def test_short_source_and_targets_text() -> None:
    assert catalog.short_source("mlp:8-5@/a/b/w.safetensors") == "mlp:8-5@w.safetensors"
    assert catalog.short_source("/x/y/teacher.pt") == "teacher.pt"
    assert catalog.short_source("mlp:8-16-5") == "mlp:8-16-5"
    assert catalog.targets_text({"logits": None, "top_k": {"k": 5}}) == "top-5 (no logits)"
    assert catalog.human_bytes(999) == "999 B" and catalog.human_bytes(46820) == "46.8 kB"


# --- verify -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["pq", "pq2", "topk", "ens"])
def test_verify_ok(shared: dict[str, Path], key: str) -> None:
    v = shared[key]
    r = cli(["verify", f"{v.parent}@v{v.name[1:]}"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"ok {v.parent}@{v.name}: ") and "sha256" in r.output
    rep = catalog.verify(v)
    assert rep.ok and rep.rows == 100 and rep.files == 3


def _verify_fails(vdir: Path, *names: str) -> list[str]:
    """`kdstore verify` exits 1; one line per problem naming each file in `names`, then the 'Error:' summary."""
    r = cli(["verify", vdir])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("Error: ") and "problem" in lines[-1] and "damaged" in lines[-1]
    for name in names:
        assert any(name in ln for ln in lines[:-1]), (name, r.output)
    return lines[:-1]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "flip_and_delete"])
@pytest.mark.parametrize("key", ["pq", "pq2"])
def test_verify_names_each_damaged_file(shared: dict[str, Path], tmp_path: Path, damage: str, key: str) -> None:
    vdir = copy_version(shared[key], tmp_path / "s")
    ext = ".parquet" if key == "pq" else ".h5"
    p0, p2 = vdir / "data" / f"part-00000{ext}", vdir / "data" / f"part-00002{ext}"
    if damage == "flip":
        flip_byte(p0)
        lines = _verify_fails(vdir, f"data/part-00000{ext}")
        assert len(lines) == 1 and "sha256" in lines[0] and "(corrupted)" in lines[0]
    elif damage == "truncate":
        truncate(p2)
        lines = _verify_fails(vdir, f"data/part-00002{ext}")
        assert len(lines) == 1 and "100 bytes, manifest says" in lines[0] and "truncated" in lines[0]
    elif damage == "delete":
        p2.unlink()
        assert _verify_fails(vdir, f"data/part-00002{ext}") == [f"data/part-00002{ext}: missing"]
    else:
        flip_byte(p0)
        p2.unlink()
        lines = _verify_fails(vdir, f"data/part-00000{ext}", f"data/part-00002{ext}")
        assert len(lines) == 2
        assert cli(["verify", vdir]).output.splitlines()[-1].startswith(f"Error: {vdir.parent}@v1: 2 problems found")


def test_verify_schema_invalid_manifest(shared: dict[str, Path], tmp_path: Path) -> None:
    vdir = copy_version(shared["pq"], tmp_path / "s")
    edit_manifest(vdir, lambda m: m["files"][1].update(rows="forty"))
    lines = _verify_fails(vdir, "manifest.json")
    assert len(lines) == 1 and "does not match schema" in lines[0] and "files/1/rows" in lines[0]
    (vdir / "manifest.json").write_text("[]")
    assert "expected a JSON object" in _verify_fails(vdir, "manifest.json")[0]


def test_verify_valid_manifest_with_wrong_sha_rows_or_columns(shared: dict[str, Path], tmp_path: Path) -> None:
    vdir = copy_version(shared["pq"], tmp_path / "s")
    edit_manifest(vdir, lambda m: m["files"][1].update(sha256="0" * 64))
    lines = _verify_fails(vdir, "data/part-00001.parquet")
    assert len(lines) == 1 and "manifest says 000000000000..." in lines[0]

    vdir = copy_version(shared["pq"], tmp_path / "s", "rows")
    def move_rows(m: dict) -> None:  # schema-valid and adding up, but the files hold 40/40/20
        m["files"][0]["rows"], m["files"][1]["rows"], m["files"][1]["first_row"] = 39, 41, 39
    edit_manifest(vdir, move_rows)
    lines = _verify_fails(vdir, "data/part-00000.parquet", "data/part-00001.parquet")
    assert "40 rows, manifest says 39" in lines[0] and "40 rows, manifest says 41" in lines[1]

    vdir = copy_version(shared["pq"], tmp_path / "s", "cols")
    edit_manifest(vdir, lambda m: m["columns"][2].update(dtype="float32"))  # t0_logits are float16 on disk
    lines = _verify_fails(vdir, "data/part-00000.parquet", "data/part-00001.parquet", "data/part-00002.parquet")
    assert len(lines) == 3 and "column 't0_logits' is float16[5], manifest says float32[5]" in lines[0]


@pytest.mark.parametrize("path", ["../x.parquet", "/etc/passwd", "data/../../x", "data/."])
def test_verify_refuses_path_escapes(shared: dict[str, Path], tmp_path: Path, path: str) -> None:
    vdir = copy_version(shared["pq"], tmp_path / "s")
    edit_manifest(vdir, lambda m: m["files"][0].update(path=path))
    lines = _verify_fails(vdir, "manifest.json")
    assert "outside its version directory" in lines[0] and repr(path) in lines[0]


def test_verify_refuses_a_symlink_out(shared: dict[str, Path], tmp_path: Path) -> None:
    vdir = copy_version(shared["pq"], tmp_path / "s")
    shard = vdir / "data" / "part-00001.parquet"
    outside = tmp_path / "outside.parquet"
    shard.rename(outside)
    shard.symlink_to(outside)
    lines = _verify_fails(vdir, "data/part-00001.parquet")
    assert "a symlink out" in lines[0]
    assert os.path.exists(outside)  # never touched


def test_verify_missing_version_is_a_clean_error(shared: dict[str, Path], tmp_path: Path) -> None:
    assert_clean_error(cli(["verify", f"{shared['pq'].parent}@v9"]), r"version v9 not found; pq has v1, v2")
    assert_clean_error(cli(["verify", tmp_path / "nope"]), r"no dataset directory")
    vdir = copy_version(shared["pq"], tmp_path / "s")
    (vdir / "manifest.json").unlink()
    assert_clean_error(cli(["verify", vdir.parent]), r"holds no committed version")


def test_ls_verify_and_remote_import_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, kdstore.store.catalog, kdstore.store.remote, kdstore.cli.ls, kdstore.cli.verify, "
            "kdstore.cli.push; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_verify_names_the_environments_a_version_was_computed_in(shared: dict[str, Path], tmp_path: Path) -> None:
    v = shared["pq"]
    rep = catalog.verify(v)
    assert len(rep.environments) == 1 and rep.environments[0].startswith("shards 0-2: cpu ")
    dst = copy_version(v, tmp_path / "store")
    env = {"device": "cpu", "threads": 8, "torch": "x", "cpu": "Other CPU", "cpu_capability": "AVX2"}

    def two_kinds(m: dict[str, Any]) -> None:
        m["labeling"]["environments"][0]["shards"] = [0, 2]
        m["labeling"]["environments"].append({"environment": env, "shards": [1]})

    edit_manifest(dst, two_kinds)
    r = cli(["verify", dst])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "computed in more than one environment" in lines[1]
    assert lines[2].startswith("  shards 0,2: cpu ")
    assert lines[3] == "  shards 1: cpu Other CPU (AVX2), 8 threads, torch x"
