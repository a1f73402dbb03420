"""The target store: round trips per format and dtype, plain-tool reads, manifests, versions, resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch

from kdstore import labeling
from kdstore.errors import (
    ConfigError,
    KdstoreError,
    ManifestError,
    StoreFormatError,
    StoreNotFoundError,
    UnsafePathError,
    UnsupportedFormatVersion,
)
from kdstore.store import (
    Version,
    VersionWriter,
    check_name,
    decode_bfloat16,
    encode_bfloat16,
    existing_versions,
    list_datasets,
    resolve,
)
from kdstore.store import manifest as mf
from kdstore.store.files import atomic_write_text
from kdstore.store.formats import read_shard, write_shard
from tests.conftest import Data, teacher_logits
from tests.helpers import REPO_ROOT, all_bytes, data_bytes, run_label, versions_of
from tests.sharing_helpers import copy_version, edit_manifest

EPS = {"float32": 1e-5, "float16": 2.0**-10, "bfloat16": 2.0**-7}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def versions(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Read-only versions shared by this module: parquet/float16 and hdf5/bfloat16 (copy before modifying)."""
    store = tmp_path_factory.mktemp("shared_store")
    pq_v = run_label(data.teacher_pt, data.parquet, store, "pq", format="parquet", top_k=3).path
    h5_v = run_label(data.teacher_pt, data.parquet, store, "h5", format="hdf5", top_k=3, logits_dtype="bfloat16").path
    return {"parquet": pq_v, "hdf5": h5_v}


# --- 2. round trips --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_logits_topk_lse_labels(data: Data, store: Path, fmt: str, dtype: str) -> None:
    res = run_label(data.teacher_pt, data.parquet, store, format=fmt, logits_dtype=dtype, top_k=3)
    assert res.path == store / "ds" / "v1"
    v = Version(f"{store}/ds")
    assert v.fmt == fmt and v.num_rows == 100 and v.num_classes == 5 and v.top_k == 3
    assert v.has_labels and v.has_logits and v.teacher_ids == ["t0"]
    assert [f["rows"] for f in v.files] == [40, 40, 20]
    assert [f["first_row"] for f in v.files] == [0, 40, 80]
    assert [f["path"] for f in v.files] == [f"data/part-0000{i}{'.parquet' if fmt == 'parquet' else '.h5'}"
                                            for i in range(3)]
    assert v.verify(full=True) == []

    names = ["sample_id", "label", "t0_logits", "t0_topk_indices", "t0_topk_values", "t0_logsumexp", "t0_tail_logmass"]
    assert [c["name"] for c in v.manifest["columns"]] == names
    cols = v.read_all(names)
    ref = teacher_logits(data.x)
    np.testing.assert_array_equal(cols["sample_id"], np.arange(100))
    assert cols["sample_id"].dtype == np.int64
    np.testing.assert_array_equal(cols["label"], data.y)

    eps = EPS[dtype]
    assert cols["t0_logits"].dtype == (np.float16 if dtype == "float16" else np.float32)
    np.testing.assert_allclose(cols["t0_logits"].astype(np.float32), ref.numpy(), rtol=eps, atol=eps)
    # exactly the teacher's logits rounded to the storage dtype (ties/rounding as torch does)
    rounded = ref.to(TORCH_DTYPES[dtype]).float().numpy()
    np.testing.assert_allclose(cols["t0_logits"].astype(np.float32), rounded, rtol=0, atol=eps * 1e-2 + 1e-6)

    top = torch.topk(ref, 3)
    np.testing.assert_array_equal(cols["t0_topk_indices"], top.indices.numpy())
    assert cols["t0_topk_indices"].dtype == np.int16
    np.testing.assert_allclose(cols["t0_topk_values"].astype(np.float32), top.values.numpy(), rtol=eps, atol=eps)
    np.testing.assert_allclose(cols["t0_logsumexp"], torch.logsumexp(ref, 1).numpy(), rtol=1e-6, atol=1e-6)
    assert cols["t0_logsumexp"].dtype == np.float32
    # the exact tail: log of the mass outside the top-3 at T = 1, from the unrounded logits
    tail = torch.logsumexp(ref.scatter(1, top.indices, float("-inf")), 1) - torch.logsumexp(ref, 1)
    np.testing.assert_allclose(cols["t0_tail_logmass"], tail.numpy(), rtol=1e-5, atol=1e-6)
    assert cols["t0_tail_logmass"].dtype == np.float32
    # top-k values are float32 on disk, exactly representable in the storage precision
    assert cols["t0_topk_values"].dtype == np.float32
    np.testing.assert_array_equal(cols["t0_topk_values"], top.values.to(TORCH_DTYPES[dtype]).float().numpy())

    if dtype == "bfloat16":  # format 2: float32 on disk holding bfloat16 values (format 1 wrote uint16 bits)
        raw = v.read_file(0, ["t0_logits"], decode=False)["t0_logits"]
        assert raw.dtype == np.float32 and v.columns["t0_logits"]["precision"] == "bfloat16"
        np.testing.assert_array_equal(raw.view(np.uint32) & 0xFFFF, 0)  # the low half of every value is zero


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_round_trip_topk_only(data: Data, store: Path, fmt: str) -> None:
    res = run_label(data.teacher_pt, data.parquet, store, format=fmt, top_k=2, keep_logits=False,
                    logits_dtype="float32")
    v = Version(res.path)
    assert not v.has_logits and v.column_for("logits") is None
    assert v.manifest["targets"]["logits"] is None
    assert v.manifest["targets"]["top_k"] == {"k": 2, "values_dtype": "float32", "indices_dtype": "int16",
                                              "tail": "uniform", "tail_logmass": True}
    assert [c["name"] for c in v.manifest["columns"]] == ["sample_id", "label", "t0_topk_indices", "t0_topk_values",
                                                          "t0_logsumexp", "t0_tail_logmass"]
    ref = teacher_logits(data.x)
    cols = v.read_all(["t0_topk_indices", "t0_topk_values", "t0_logsumexp"])
    top = torch.topk(ref, 2)
    np.testing.assert_array_equal(cols["t0_topk_indices"], top.indices.numpy())
    np.testing.assert_allclose(cols["t0_topk_values"], top.values.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cols["t0_logsumexp"], torch.logsumexp(ref, 1).numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(StoreFormatError, match=r"no column 't0_logits'; it has \["):
        v.read_file(0, ["t0_logits"])


def test_logits_only_and_unlabeled(data: Data, store: Path) -> None:
    res = run_label(data.teacher_pt, data.npy, store, top_k=None, logits_dtype="float32")
    v = Version(res.path)
    assert not v.has_labels and v.top_k is None and v.manifest["targets"]["top_k"] is None
    assert [c["name"] for c in v.manifest["columns"]] == ["sample_id", "t0_logits", "t0_logsumexp"]
    assert v.manifest["transfer_set"]["kind"] == "unlabeled"
    assert v.manifest["statistics"]["labeled_rows"] == 0
    assert v.manifest["statistics"]["teachers"]["t0"]["accuracy"] is None
    assert "topk_fidelity_kl" not in v.manifest["statistics"]["teachers"]["t0"]
    np.testing.assert_allclose(v.read_all(["t0_logits"])["t0_logits"], teacher_logits(data.x).numpy(), atol=1e-5)


def test_ensemble_columns_and_statistics(data: Data, store: Path) -> None:
    res = run_label([str(data.teacher_pt), data.factory_spec], data.parquet, store, top_k=2, logits_dtype="float32")
    v = Version(res.path)
    assert v.teacher_ids == ["t0", "t1"]
    t = v.manifest["teachers"]
    assert [x["kind"] for x in t] == ["torchscript", "factory"]
    assert t[1]["weights"] == str(data.weights)
    assert t[0]["sha256"] == hashlib.sha256(data.teacher_pt.read_bytes()).hexdigest()
    assert t[1]["sha256"] == hashlib.sha256(data.weights.read_bytes()).hexdigest()
    assert v.column_for("logits", "t1") == "t1_logits"
    cols = v.read_all(["t0_logits", "t1_logits"])
    np.testing.assert_allclose(cols["t0_logits"], teacher_logits(data.x).numpy(), atol=1e-5)
    np.testing.assert_allclose(cols["t1_logits"], teacher_logits(data.x, seed=1).numpy(), atol=1e-5)
    probs = (torch.softmax(teacher_logits(data.x), 1) + torch.softmax(teacher_logits(data.x, seed=1), 1)) / 2
    acc = float((probs.argmax(1).numpy() == data.y).mean())
    ens = v.manifest["statistics"]["ensemble"]
    assert ens == {"combine": "mean-prob", "accuracy": pytest.approx(acc), "errors": round((1 - acc) * 100)}
    acc1 = float((teacher_logits(data.x, seed=1).argmax(1).numpy() == data.y).mean())
    assert v.manifest["statistics"]["teachers"]["t1"]["accuracy"] == pytest.approx(acc1)


def test_read_file_by_row_group_and_row_group_ranges(versions: dict[str, Path]) -> None:
    for fmt, path in versions.items():
        v = Version(path)
        assert v.row_groups(0) == [(0, 16), (16, 32), (32, 40)], fmt
        assert v.row_groups(2) == [(0, 16), (16, 20)], fmt
        full = v.read_file(1, ["sample_id", "t0_logits"])
        part = v.read_file(1, ["sample_id", "t0_logits"], row_groups=[1, 2])
        np.testing.assert_array_equal(part["sample_id"], np.arange(56, 80))
        np.testing.assert_array_equal(part["t0_logits"], full["t0_logits"][16:])
        assert [len(f["sample_id"]) for f in v.iter_files(["sample_id"])] == [40, 40, 20]


def test_bfloat16_codec_matches_torch() -> None:
    x = torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.01171875, -3.14159, 65504.0, 1e-30, float("inf"), -float("inf")])
    bits = encode_bfloat16(x.numpy())
    assert bits.dtype == np.uint16
    assert bits.tolist() == x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).tolist()
    np.testing.assert_array_equal(decode_bfloat16(bits), x.to(torch.bfloat16).float().numpy())


# --- 3. plain tools ------------------------------------------------------------------------------------------


def test_read_parquet_with_plain_pyarrow_and_polars(versions: dict[str, Path], data: Data) -> None:
    # Only json + pyarrow/polars/numpy here: this is what docs/format.md shows.
    import polars as pl
    import pyarrow.parquet as pq

    vdir = versions["parquet"]
    manifest = json.loads((vdir / "manifest.json").read_text())
    files = [vdir / f["path"] for f in manifest["files"]]
    assert manifest["storage"]["format"] == "parquet"
    assert {c["name"]: c["dtype"] for c in manifest["columns"]}["t0_logits"] == "float16"

    table = pq.read_table(files[0])
    assert table.num_rows == 40
    assert table.schema.field("t0_logits").metadata[b"kdstore_dtype"] == b"float16"
    logits = np.concatenate([
        pq.read_table(f, columns=["t0_logits"]).column(0).combine_chunks().flatten().to_numpy().reshape(-1, 5)
        for f in files
    ])
    ids = np.concatenate([pq.read_table(f, columns=["sample_id"]).column(0).to_numpy() for f in files])
    np.testing.assert_array_equal(ids, np.arange(100))
    np.testing.assert_allclose(logits.astype(np.float32), teacher_logits(data.x).numpy(), rtol=2e-3, atol=2e-3)
    assert json.loads(pq.read_schema(files[0]).metadata[b"kdstore"])["name"] == "pq"

    df = pl.read_parquet([str(f) for f in files])
    assert df.height == 100
    assert df["sample_id"].to_list() == list(range(100))
    assert df["label"].to_list() == data.y.tolist()
    pl_logits = np.stack(df["t0_logits"].to_list()).astype(np.float32)
    np.testing.assert_array_equal(pl_logits, logits.astype(np.float32))
    topk = np.stack(df["t0_topk_indices"].to_list())
    np.testing.assert_array_equal(topk, np.argsort(-teacher_logits(data.x).numpy(), axis=1, kind="stable")[:, :3])
    lazy = pl.scan_parquet(str(vdir / "data" / "*.parquet")).select("sample_id", "t0_logsumexp").collect()
    assert lazy.height == 100


def test_read_hdf5_with_plain_h5py(versions: dict[str, Path], data: Data) -> None:
    # Only json + h5py/numpy here: this is what docs/format.md shows.
    import h5py

    vdir = versions["hdf5"]
    manifest = json.loads((vdir / "manifest.json").read_text())
    dtypes = {c["name"]: c["dtype"] for c in manifest["columns"]}
    assert manifest["storage"]["format"] == "hdf5" and dtypes["t0_logits"] == "float32"
    parts: dict[str, list[np.ndarray]] = {}
    for f in manifest["files"]:
        with h5py.File(vdir / f["path"], "r") as h:
            assert json.loads(h.attrs["kdstore"])["name"] == "h5"
            assert h["t0_logits"].attrs["kdstore_dtype"] == "float32"
            assert h["t0_logits"].attrs["kdstore_precision"] == "bfloat16"
            assert list(h["t0_logits"].attrs["kdstore_shape"]) == [5]
            assert h["t0_logits"].chunks == (16, 5)
            for name in h:
                parts.setdefault(name, []).append(h[name][()])
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    assert cols["t0_logits"].dtype == np.float32  # bfloat16 values, read as they are
    np.testing.assert_allclose(cols["t0_logits"], teacher_logits(data.x).numpy(), rtol=2.0**-7, atol=2.0**-7)
    np.testing.assert_array_equal(cols["sample_id"], np.arange(100))
    np.testing.assert_array_equal(cols["label"], data.y)
    assert cols["t0_topk_indices"].shape == (100, 3)


# --- 4. manifests ---------------------------------------------------------------------------------------------


def test_manifest_validates_against_the_schema_file(versions: dict[str, Path]) -> None:
    schema = json.loads((REPO_ROOT / "schemas" / "manifest.v2.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in versions.values():
        manifest = json.loads((path / "manifest.json").read_text())
        jsonschema.Draft202012Validator(schema).validate(manifest)
        assert manifest["format_version"] == 2 and manifest["version"] == 1
        assert manifest["num_rows"] == sum(f["rows"] for f in manifest["files"])
        for f in manifest["files"]:
            assert hashlib.sha256((path / f["path"]).read_bytes()).hexdigest() == f["sha256"]
            assert (path / f["path"]).stat().st_size == f["bytes"]
        # nothing staging-only is left in a committed version
        assert sorted(p.name for p in path.iterdir()) == ["data", "manifest.json"]
        assert all(p.suffix in (".parquet", ".h5") for p in (path / "data").iterdir())


def test_manifest_statistics(versions: dict[str, Path], data: Data) -> None:
    m = json.loads((versions["parquet"] / "manifest.json").read_text())
    ref = teacher_logits(data.x)
    s = m["statistics"]
    assert s["rows"] == 100 and s["labeled_rows"] == 100
    t0 = s["teachers"]["t0"]
    correct = int(sum(int(np.argmax(row)) == int(lab) for row, lab in zip(ref.numpy(), data.y, strict=True)))
    assert 0 < correct < 100
    assert t0["accuracy"] == pytest.approx(correct / 100)
    assert t0["errors"] == 100 - correct
    p = torch.softmax(ref.double(), 1)
    stored = torch.softmax(ref.half().double(), 1)  # the entropy of the targets as stored (float16 logits)
    assert t0["mean_entropy_nats"] == pytest.approx(float(-(stored * stored.log()).sum(1).mean()), rel=1e-5)
    assert t0["topk_mass_mean"] == pytest.approx(float(torch.topk(p, 3).values.sum(1).mean()), rel=1e-5)
    assert t0["topk_fidelity_rows"] == 100 and t0["topk_fidelity_reference"] == "stored logits"
    assert s["fidelity_stride"] == 1
    assert sorted(t0["topk_fidelity_kl"]) == ["1.0", "2.0", "20.0", "4.0", "8.0"]
    assert all(v >= 0 and np.isfinite(v) for v in t0["topk_fidelity_kl"].values())
    assert "ensemble" not in s
    assert m["transfer_set"]["sha256"] == hashlib.sha256(data.parquet.read_bytes()).hexdigest()
    assert m["transfer_set"]["kind"] == "original" and m["transfer_set"]["label_column"] == "label"
    assert m["labeling"]["precision"] == "fp32" and m["labeling"]["device"] == "cpu"


def test_manifest_statistics_with_drop_tail_are_strict_json(data: Data, store: Path) -> None:
    res = run_label(data.teacher_pt, data.parquet, store, top_k=2, tail="drop")
    text = (res.path / "manifest.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"manifest holds non-JSON constant {c}"))
    assert Version(res.path).manifest["targets"]["top_k"]["tail"] == "drop"


def test_manifest_newer_format_version(versions: dict[str, Path], store: Path) -> None:
    vdir = copy_version(versions["parquet"], store)
    edit_manifest(vdir, lambda m: m.update(format_version=3))
    with pytest.raises(UnsupportedFormatVersion, match=r"format_version 3; this kdstore reads 1, 2; upgrade kdstore"):
        Version(vdir)
    with pytest.raises(ManifestError, match="upgrade kdstore"):  # UnsupportedFormatVersion is a ManifestError
        mf.load(vdir)


@pytest.mark.parametrize("value", ["1", None, 0, 1.5])
def test_manifest_bad_format_version(versions: dict[str, Path], store: Path, value: Any) -> None:
    vdir = copy_version(versions["parquet"], store)
    edit_manifest(vdir, lambda m: m.update(format_version=value))
    with pytest.raises(ManifestError, match=r"format_version is .*, expected one of \(1, 2\)"):
        Version(vdir)


def test_manifest_invalid_json_and_not_an_object(versions: dict[str, Path], store: Path) -> None:
    vdir = copy_version(versions["parquet"], store)
    (vdir / "manifest.json").write_text('{"format_version": 1,')
    with pytest.raises(ManifestError, match=r"is not valid JSON \(.* at line 1\); the file is corrupted"):
        Version(vdir)
    (vdir / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ManifestError, match="expected a JSON object, found list"):
        mf.load(vdir)


def test_manifest_missing(store: Path) -> None:
    (store / "ds" / "v1").mkdir(parents=True)
    with pytest.raises(ManifestError, match=r"manifest.json not found: .* is not a complete kdstore version"):
        mf.load(store / "ds" / "v1")


@pytest.mark.parametrize("field", ["files", "num_rows", "teachers", "storage", "statistics"])
def test_manifest_missing_fields(versions: dict[str, Path], store: Path, field: str) -> None:
    vdir = copy_version(versions["parquet"], store)
    edit_manifest(vdir, lambda m: m.pop(field))
    with pytest.raises(ManifestError,
                       match=rf"does not match schema manifest.v2.json: <root>: '{field}' is a required property"):
        Version(vdir)


def test_manifest_schema_violations_are_listed(versions: dict[str, Path]) -> None:
    m = json.loads((versions["parquet"] / "manifest.json").read_text())
    bad = dict(m, num_classes=1, storage={"format": "zip", "shard_rows": 0, "row_group_rows": 16})
    with pytest.raises(ManifestError, match=r"num_classes: 1 is less than the minimum of 2.*storage/format"):
        mf.validate(bad)
    with pytest.raises(ManifestError, match=r"files hold 100 rows but num_rows is 99"):
        mf.validate(dict(m, num_rows=99))
    dup = dict(m, columns=m["columns"] + [m["columns"][0]])
    with pytest.raises(ManifestError, match=r"duplicate column names"):
        mf.validate(dup)
    mf.validate(m)  # the original is fine
    assert mf.loads(mf.dumps(m)) == m


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "data/../../x", "data/..", "C:/x", "\\\\server\\share"])
def test_manifest_path_escapes(versions: dict[str, Path], store: Path, path: str) -> None:
    vdir = copy_version(versions["parquet"], store)
    edit_manifest(vdir, lambda m: m["files"][0].update(path=path))
    with pytest.raises(UnsafePathError, match="outside its version directory"):
        Version(vdir)
    with pytest.raises(StoreFormatError):  # UnsafePathError is a StoreFormatError
        mf.load(vdir)


def test_manifest_derived_file_escape(versions: dict[str, Path]) -> None:
    m = json.loads((versions["parquet"] / "manifest.json").read_text())
    mf.validate(dict(m, derived_files=[{"path": "card.md"}, {"path": "plots/fidelity.png"}]))
    with pytest.raises(UnsafePathError, match=r"'\.\./card\.md', which is outside its version directory"):
        mf.validate(dict(m, derived_files=[{"path": "../card.md"}]))


def test_symlink_out_of_the_version_is_refused(versions: dict[str, Path], store: Path, tmp_path: Path) -> None:
    vdir = copy_version(versions["parquet"], store)
    shard = vdir / "data" / "part-00001.parquet"
    outside = tmp_path / "outside.parquet"
    shutil.copy(shard, outside)
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(UnsafePathError,
                       match=r"'data/part-00001.parquet', which resolves to .*outside.* \(a symlink out\?\)"):
        Version(vdir)


def test_symlinked_data_directory_is_refused(versions: dict[str, Path], store: Path, tmp_path: Path) -> None:
    vdir = copy_version(versions["parquet"], store)
    shutil.move(vdir / "data", tmp_path / "elsewhere")
    (vdir / "data").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError, match="a symlink out"):
        Version(vdir)


# --- data-file integrity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_corrupted_truncated_and_missing_files(versions: dict[str, Path], store: Path, fmt: str) -> None:
    vdir = copy_version(versions[fmt], store)
    ext = ".parquet" if fmt == "parquet" else ".h5"
    p0, p1, p2 = (vdir / "data" / f"part-0000{i}{ext}" for i in range(3))
    # same size, flipped byte in the middle: only the full check sees it
    raw = bytearray(p1.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p1.write_bytes(bytes(raw))
    v = Version(vdir)
    problems = v.verify(full=True)
    assert len(problems) == 1 and f"data/part-00001{ext}: sha256" in problems[0] and "(corrupted)" in problems[0]
    # truncated: opening fails
    p2.write_bytes(p2.read_bytes()[:-10])
    with pytest.raises(StoreFormatError,
                       match=rf"part-00002{ext}: \d+ bytes, manifest says \d+ \(truncated or replaced\)"):
        Version(vdir)
    assert Version(vdir, check=False).verify(full=False)  # check=False opens it anyway
    p0.unlink()
    with pytest.raises(StoreFormatError, match=rf"part-00000{ext}: missing \(and 1 more\); run `kdstore verify`"):
        Version(vdir)


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_unreadable_shard_raises_store_format_error(versions: dict[str, Path], store: Path, fmt: str) -> None:
    vdir = copy_version(versions[fmt], store)
    ext = ".parquet" if fmt == "parquet" else ".h5"
    shard = vdir / "data" / f"part-00000{ext}"
    size = shard.stat().st_size
    shard.write_bytes(b"\0" * size)  # same size, garbage
    v = Version(vdir)
    with pytest.raises(StoreFormatError, match=rf"cannot read .*part-00000{ext}: .*the file is corrupted or truncated"):
        v.read_file(0, ["t0_logits"])
    assert any("unreadable" in p or "sha256" in p for p in v.verify(full=True))


# --- 5. versions --------------------------------------------------------------------------------------------------


def test_second_run_makes_v2_and_never_touches_v1(data: Data, store: Path) -> None:
    run_label(data.teacher_pt, data.parquet, store, top_k=3)
    v1 = store / "ds" / "v1"
    before = all_bytes(v1)
    stat_before = {p: os.stat(v1 / p).st_mtime_ns for p in before}
    res = run_label(data.teacher_pt, data.parquet, store, top_k=3)
    assert res.path == store / "ds" / "v2"
    assert all_bytes(v1) == before
    assert {p: os.stat(v1 / p).st_mtime_ns for p in before} == stat_before
    assert json.loads((res.path / "manifest.json").read_text())["version"] == 2
    assert data_bytes(res.path) == data_bytes(v1)  # same settings, same bytes
    assert versions_of(store / "ds") == ["v1", "v2"]
    assert sorted(p.name for p in (store / "ds").iterdir()) == ["v1", "v2"]  # no staging dir or lock left


def test_resolve_forms_and_not_found_messages(data: Data, store: Path) -> None:
    run_label(data.teacher_pt, data.parquet, store, top_k=3)
    run_label(data.teacher_pt, data.parquet, store, top_k=2)
    ds = store / "ds"
    assert resolve(ds).version == 2
    assert resolve(f"{ds}@latest").version == 2
    assert resolve(f"{ds}@v1").version == 1
    assert resolve(f"{ds}@1").version == 1
    ref = resolve(ds / "v1")
    assert (ref.store, ref.name, ref.version, ref.path) == (store, "ds", 1, ds / "v1")
    assert str(ref) == f"{ds}@v1"
    assert Version(f"{ds}@v1").top_k == 3 and Version(ds).top_k == 2
    with pytest.raises(StoreNotFoundError, match=r"version v9 not found; ds has v1, v2"):
        resolve(f"{ds}@v9")
    with pytest.raises(StoreNotFoundError, match=r"no dataset directory .*nope; expected STORE/NAME or STORE/NAME@vN"):
        resolve(store / "nope")
    with pytest.raises(FileNotFoundError):  # StoreNotFoundError is also a FileNotFoundError
        resolve(ds / "v7")
    assert existing_versions(ds) == [1, 2]
    assert list_datasets(store) == {"ds": [1, 2]}
    with pytest.raises(StoreNotFoundError, match="does not exist or is not a directory"):
        list_datasets(store / "missing")


def test_staging_and_incomplete_dirs_are_invisible(data: Data, store: Path) -> None:
    run_label(data.teacher_pt, data.parquet, store, top_k=3)
    (store / "ds" / ".staging-0123456789abcdef" / "data").mkdir(parents=True)
    (store / "ds" / "v2" / "data").mkdir(parents=True)  # a vN without a manifest is not a version
    (store / "other" / ".staging-0123456789abcdef" / "data").mkdir(parents=True)
    (store / ".hidden" / "v1").mkdir(parents=True)
    assert resolve(store / "ds").version == 1
    assert existing_versions(store / "ds") == [1]
    assert list_datasets(store) == {"ds": [1]}
    with pytest.raises(StoreNotFoundError, match=r"holds no committed version \(an unfinished `kdstore label` run"):
        resolve(store / "other")
    with pytest.raises(StoreNotFoundError, match=r"version v2 not found; ds has v1"):
        resolve(f"{store / 'ds'}@v2")


# --- 6a. resume after an interrupt --------------------------------------------------------------------------------


def _interrupt_after_two_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    real = labeling.label_shard
    calls = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:  # shards 0 and 1 are computed (and get written), then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(labeling, "label_shard", flaky)


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_resume_after_keyboard_interrupt_is_byte_identical(
    data: Data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    clean = run_label(data.teacher_pt, data.parquet, tmp_path / "clean", format=fmt, top_k=3)
    if fmt == "hdf5":
        time.sleep(1.05)  # a file-level timestamp would now differ
    store = tmp_path / "store"
    with monkeypatch.context() as m:
        _interrupt_after_two_shards(m)
        with pytest.raises(KeyboardInterrupt):
            run_label(data.teacher_pt, data.parquet, store, format=fmt, top_k=3)
    (staging,) = [p for p in (store / "ds").glob(".staging-*") if p.is_dir()]
    staged = {p.name for p in (staging / "data").iterdir()}
    ext = ".parquet" if fmt == "parquet" else ".h5"
    assert staged == {f"part-00000{ext}", "part-00000.json", f"part-00001{ext}", "part-00001.json"}
    assert versions_of(store / "ds") == []
    assert list_datasets(store) == {}
    with pytest.raises(StoreNotFoundError, match="unfinished"):
        resolve(store / "ds")

    res = run_label(data.teacher_pt, data.parquet, store, format=fmt, top_k=3)
    assert res.resumed_shards == 2
    assert res.path == store / "ds" / "v1"
    assert data_bytes(res.path) == data_bytes(clean.path)
    assert res.manifest["statistics"] == clean.manifest["statistics"]
    assert res.manifest["files"] == clean.manifest["files"]
    assert sorted(p.name for p in (store / "ds").iterdir()) == ["v1"]


def test_resume_rewrites_a_shard_whose_size_disagrees_with_its_sidecar(
    data: Data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = run_label(data.teacher_pt, data.parquet, tmp_path / "clean", top_k=3)
    store = tmp_path / "store"
    with monkeypatch.context() as m:
        _interrupt_after_two_shards(m)
        with pytest.raises(KeyboardInterrupt):
            run_label(data.teacher_pt, data.parquet, store, top_k=3)
    (staging,) = [p for p in (store / "ds").glob(".staging-*") if p.is_dir()]
    shard = staging / "data" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    res = run_label(data.teacher_pt, data.parquet, store, top_k=3)
    assert res.resumed_shards == 1
    assert data_bytes(res.path) == data_bytes(clean.path)


def test_interrupted_run_with_other_settings_does_not_resume_it(
    data: Data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    with monkeypatch.context() as m:
        _interrupt_after_two_shards(m)
        with pytest.raises(KeyboardInterrupt):
            run_label(data.teacher_pt, data.parquet, store, top_k=3)
    res = run_label(data.teacher_pt, data.parquet, store, top_k=2)  # another run key: a fresh staging dir
    assert res.resumed_shards == 0 and res.path == store / "ds" / "v1"
    assert len([p for p in (store / "ds").glob(".staging-*") if p.is_dir()]) == 1  # the other one is kept


# --- writer and shard-level errors ----------------------------------------------------------------------------------

SPECS = [{"name": "sample_id", "role": "sample_id", "teacher": None, "dtype": "int64", "shape": []},
         {"name": "t0_logits", "role": "logits", "teacher": "t0", "dtype": "float32", "shape": [3]}]


def writer(store: Path, key: str = "ab" * 8, **kw: Any) -> VersionWriter:
    opts: dict[str, Any] = {"run_key": key, "fmt": "parquet", "columns": SPECS, "shard_rows": 4, "row_group_rows": 2,
                            "shard_metadata": {"k": 1}}
    opts.update(kw)
    return VersionWriter(store, "ds", **opts)


def shard(first: int, n: int) -> dict[str, np.ndarray]:
    return {"sample_id": np.arange(first, first + n, dtype=np.int64),
            "t0_logits": np.arange(3 * n, dtype=np.float32).reshape(n, 3)}


def base_manifest(v: Version) -> dict[str, Any]:
    m = dict(v.manifest)
    for k in ("name", "version", "created_at", "files"):
        m.pop(k)
    return m


@pytest.mark.parametrize("name", ["", ".", "..", "-x", "a/b", "a b", "x" * 129, "ü"])
def test_check_name_rejects(name: str) -> None:
    with pytest.raises(ConfigError, match="is not a valid dataset name; use letters, digits"):
        check_name(name)


def test_writer_rejects_bad_settings(store: Path) -> None:
    with pytest.raises(ConfigError, match=r"format 'zip' is not supported; expected one of parquet, hdf5"):
        writer(store, fmt="zip")
    with pytest.raises(ConfigError, match="must be >= 1, got 0, 2"):
        writer(store, shard_rows=0)
    with pytest.raises(ConfigError, match="run_key must be a hex digest"):
        writer(store, key="../../etc")
    with pytest.raises(ConfigError, match="not a valid dataset name"):
        VersionWriter(store, "../up", run_key="ab" * 8, fmt="parquet", columns=SPECS, shard_rows=1, row_group_rows=1,
                      shard_metadata={})


def test_writer_lock_refuses_a_second_writer_with_the_same_key(store: Path) -> None:
    with writer(store):
        with pytest.raises(KdstoreError, match="another kdstore process is writing .* with the same settings; wait"), \
                writer(store):
            pass
        with writer(store, key="cd" * 8):  # other settings: another staging dir, no conflict
            pass
    with writer(store):  # released on exit
        pass


def test_writer_refuses_staging_with_other_settings(store: Path) -> None:
    with writer(store) as w:
        w.write(0, 0, shard(0, 4), {})
    with pytest.raises(StoreFormatError, match="holds an interrupted run with other settings; delete that directory"), \
            writer(store, shard_rows=8):
        pass


def test_writer_refuses_non_contiguous_shards(store: Path) -> None:
    with writer(store) as w:
        w.write(1, 4, shard(4, 4), {})
        with pytest.raises(StoreFormatError, match=r"shards \[1\] are not contiguous from 0"):
            w.commit({})
    assert existing_versions(store / "ds") == []


def test_unwritable_store(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreFormatError,
                       match=r"out .*file/store: cannot create .*: Not a directory; choose a writable"), \
            writer(tmp_path / "file" / "store"):
        pass


def test_commit_takes_the_next_number_when_another_writer_won(
    versions: dict[str, Path], store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdstore.store.writer as wmod

    src = Version(versions["parquet"])
    shutil.copytree(src.path, store / "ds" / "v1")  # "the other writer" committed v1 ...
    real = wmod.existing_versions
    calls: list[int] = []

    def stale(d: Path) -> list[int]:  # ... right after we looked
        calls.append(1)
        return [] if len(calls) == 1 else real(d)

    monkeypatch.setattr(wmod, "existing_versions", stale)
    with VersionWriter(store, "ds", run_key="ef" * 8, fmt="parquet", columns=src.manifest["columns"],
                       shard_rows=40, row_group_rows=16, shard_metadata={}) as w:
        for i, f in enumerate(src.files):
            w.write(i, f["first_row"], src.read_file(i, [c["name"] for c in src.manifest["columns"]], decode=False), {})
        path = w.commit(base_manifest(src))
    assert path == store / "ds" / "v2" and len(calls) == 2
    assert Version(path).manifest["version"] == 2
    assert Version(store / "ds" / "v1").manifest["version"] == 1


def test_write_shard_checks_columns(tmp_path: Path) -> None:
    kw: dict[str, Any] = {"fmt": "parquet", "row_group_rows": 2, "metadata": {}}
    with pytest.raises(StoreFormatError, match=r"shard columns have different row counts"):
        write_shard(tmp_path / "a", {"sample_id": np.arange(3), "t0_logits": np.zeros((2, 3), np.float32)}, SPECS, **kw)
    with pytest.raises(StoreFormatError, match=r"shard is missing column 't0_logits'"):
        write_shard(tmp_path / "a", {"sample_id": np.arange(3)}, SPECS, **kw)
    with pytest.raises(StoreFormatError, match=r"column 't0_logits': got float64\[3\], expected float32\[3\]"):
        write_shard(tmp_path / "a", {"sample_id": np.arange(2), "t0_logits": np.zeros((2, 3))}, SPECS, **kw)
    with pytest.raises(StoreFormatError, match=r"column 't0_logits': got float32\[4\], expected float32\[3\]"):
        write_shard(tmp_path / "a", {"sample_id": np.arange(2), "t0_logits": np.zeros((2, 4), np.float32)}, SPECS, **kw)
    with pytest.raises(StoreFormatError, match=r"unknown storage format 'zip'"):
        write_shard(tmp_path / "a", shard(0, 2), SPECS, fmt="zip", row_group_rows=2, metadata={})
    for fmt in ("parquet", "hdf5"):
        write_shard(tmp_path / fmt, shard(0, 5), SPECS, fmt=fmt, row_group_rows=2, metadata={})
        back = read_shard(tmp_path / fmt, fmt, ["sample_id", "t0_logits"], [1, 2], 2)
        np.testing.assert_array_equal(back["sample_id"], [2, 3, 4])
        np.testing.assert_array_equal(back["t0_logits"], shard(0, 5)["t0_logits"][2:])


def _write_many(path: str, n: int, start: Any) -> None:
    start.wait()  # both processes write at the same time
    for i in range(n):
        atomic_write_text(Path(path), f"{os.getpid()} {i}\n" * 50)


def test_atomic_write_text_from_two_processes_at_once(tmp_path: Path) -> None:
    """The ranks of a torchrun labeling job write the same settings.json at once; neither may lose its rename."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    target = tmp_path / "settings.json"
    procs = [ctx.Process(target=_write_many, args=(str(target), 500, start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = target.read_text().splitlines()
    assert len(lines) == 50 and len(set(lines)) == 1  # one whole write, never a mix or a part
    assert not list(tmp_path.glob("*.tmp"))
