"""`kdstore convert`: format round trips keep every value, top-k truncation/recomputation, statistics, parent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdstore import targets
from kdstore.convert import ConvertConfig, convert
from kdstore.errors import ConfigError
from kdstore.store import Version
from tests.conftest import Data
from tests.helpers import all_bytes, assert_clean_error, cli, run_label
from tests.sharing_helpers import label_store


@pytest.fixture(scope="module")
def shared(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return label_store(data, tmp_path_factory.mktemp("convert_store"))


def _approx(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _approx(v) for k, v in obj.items()}
    if isinstance(obj, float):
        return pytest.approx(obj, rel=1e-12)
    return obj


def test_parquet_hdf5_parquet_keeps_every_value(shared: dict[str, Path], tmp_path: Path) -> None:
    for key in ("pq", "pq2", "ens"):  # fp16, bf16 (raw bits), fp32; labeled and not; one and two teachers
        src = Version(shared[key])
        fmt2 = "hdf5" if src.fmt == "parquet" else "parquet"
        out = tmp_path / key
        a = convert(ConvertConfig(str(shared[key]), to=fmt2, out=str(out)))
        b = convert(ConvertConfig(str(a.path), to=src.fmt))
        va, vb = Version(a.path), Version(b.path)
        assert (va.fmt, vb.fmt) == (fmt2, src.fmt)
        for v in (va, vb):
            assert list(v.columns) == list(src.columns)
            assert v.manifest["targets"] == src.manifest["targets"] and v.manifest["columns"] == src.manifest["columns"]
            # nothing about the targets changed (sums over other groupings of rows: equal to 1e-12)
            assert v.manifest["statistics"] == _approx(src.manifest["statistics"])
            for i in range(len(v.files)):
                got = v.read_file(i, list(v.columns), decode=False)
                want = src.read_file(i, list(src.columns), decode=False)
                for n in v.columns:
                    assert got[n].dtype == want[n].dtype and np.array_equal(got[n], want[n]), (key, n)
            assert [f["rows"] for f in v.files] == [40, 40, 20]
            assert v.verify(full=True) == []
        assert va.manifest["parent"] == {"name": src.manifest["name"], "version": src.manifest["version"],
                                         "relation": "convert", "settings": va.manifest["parent"]["settings"]}
        assert va.manifest["parent"]["settings"]["format"] == fmt2
        assert vb.manifest["parent"]["name"] == src.manifest["name"] and vb.manifest["parent"]["version"] == 1
        if src.fmt == "parquet":  # parquet -> hdf5 -> parquet: even the bytes are the same
            assert [f["sha256"] for f in vb.files] == [f["sha256"] for f in src.files]


def test_truncate_stored_top_k_matches_labeling_with_that_k(data: Data, store: Path) -> None:
    src = run_label(data.teacher_pt, data.parquet, store, "k3", top_k=3, logits_dtype="float32").path
    direct = Version(run_label(data.teacher_pt, data.parquet, store, "k2", top_k=2, logits_dtype="float32").path)
    res = convert(ConvertConfig(str(src), top_k=2, name="k3to2"))
    v = Version(res.path)
    assert res.path == store / "k3to2" / "v1"
    for n in ("t0_topk_indices", "t0_topk_values", "t0_logsumexp", "t0_logits", "label", "sample_id"):
        assert np.array_equal(v.read_all([n])[n], direct.read_all([n])[n]), n
    sv, sd = v.manifest["statistics"]["teachers"]["t0"], direct.manifest["statistics"]["teachers"]["t0"]
    assert sv["topk_mass_mean"] == pytest.approx(sd["topk_mass_mean"], rel=1e-5)
    assert sv["topk_fidelity_kl"] == pytest.approx(sd["topk_fidelity_kl"], rel=1e-3, abs=1e-7)
    assert sv["accuracy"] == sd["accuracy"] and sv["mean_entropy_nats"] == sd["mean_entropy_nats"]
    assert v.manifest["targets"]["top_k"] == direct.manifest["targets"]["top_k"]
    assert v.manifest["parent"]["settings"]["topk_from"] == "stored top-k"


def test_larger_top_k_is_recomputed_from_the_logits(shared: dict[str, Path], tmp_path: Path) -> None:
    src = Version(shared["pq"])  # fp16 logits + top-3
    res = convert(ConvertConfig(str(shared["pq"]), top_k=5, logits_dtype="float32", out=str(tmp_path)))
    v = Version(res.path)
    z = torch.from_numpy(src.read_all(["t0_logits"])["t0_logits"].astype(np.float32))
    vals, idx = targets.top_k(z, 5)
    got = v.read_all(["t0_topk_indices", "t0_topk_values", "t0_logits"])
    assert np.array_equal(got["t0_topk_indices"], idx.numpy().astype(np.int16))
    assert np.array_equal(got["t0_topk_values"], vals.numpy())
    assert np.array_equal(got["t0_logits"], z.numpy())  # fp16 -> fp32 is exact
    fid = v.manifest["statistics"]["teachers"]["t0"]["topk_fidelity_kl"]
    assert max(fid.values()) < 1e-5  # k = C: the rebuilt targets are exact
    # all C classes, but fp16-rounded logits against the exact log-sum-exp: 1 up to the fp16 rounding
    assert v.manifest["statistics"]["teachers"]["t0"]["topk_mass_mean"] == pytest.approx(1.0, abs=2e-3)
    assert v.manifest["parent"]["settings"]["topk_from"] == "logits"
    assert v.manifest["targets"]["top_k"]["values_dtype"] == "float32"


def test_dtype_conversion_and_dropping_logits(shared: dict[str, Path], tmp_path: Path) -> None:
    src = Version(shared["pq2"])  # bf16
    res = convert(ConvertConfig(str(shared["pq2"]), logits_dtype="float32", to="parquet", out=str(tmp_path)))
    v = Version(res.path)
    for n in ("t0_logits", "t0_topk_values"):
        assert src.columns[n]["precision"] == "bfloat16" and "precision" not in v.columns[n]
        assert np.array_equal(v.read_all([n])[n], src.read_all([n])[n])  # bf16 -> fp32 is exact
    # statistics are recomputed on the new version's own targets (the same values here)
    s_src, s_new = src.manifest["statistics"]["teachers"]["t0"], v.manifest["statistics"]["teachers"]["t0"]
    assert s_new["topk_fidelity_reference"] == "stored logits"
    assert all(x is not None and x >= 0 for x in s_new["topk_fidelity_kl"].values())
    assert s_new["accuracy"] == s_src["accuracy"]
    assert s_new["mean_entropy_nats"] == pytest.approx(s_src["mean_entropy_nats"], rel=1e-12)
    assert s_new["topk_fidelity_kl"] == pytest.approx(s_src["topk_fidelity_kl"], rel=1e-9)

    res = convert(ConvertConfig(str(shared["pq"]), keep_logits=False, top_k=1, out=str(tmp_path), name="top1"))
    v = Version(res.path)
    assert not v.has_logits and v.top_k == 1 and "t0_logits" not in v.columns
    # measured from the parent's logits
    assert v.manifest["statistics"]["teachers"]["t0"]["topk_fidelity_kl"]["1.0"] > 0
    assert v.manifest["statistics"]["teachers"]["t0"]["topk_fidelity_reference"] == "stored logits of the parent"


def test_top_k_only_source_truncates_without_fidelity(shared: dict[str, Path], tmp_path: Path) -> None:
    res = convert(ConvertConfig(str(shared["topk"]), top_k=1, out=str(tmp_path)))
    v = Version(res.path)
    src = Version(shared["topk"])
    assert np.array_equal(v.read_all(["t0_topk_indices"])["t0_topk_indices"],
                          src.read_all(["t0_topk_indices"])["t0_topk_indices"][:, :1])
    s = v.manifest["statistics"]["teachers"]["t0"]
    assert s["topk_fidelity_kl"] is None  # no full logits anywhere: cannot be measured
    cols = src.read_all(["t0_logsumexp", "t0_topk_values", "t0_tail_logmass"])
    lse, vals, tail = (cols[n].astype(np.float64) for n in ("t0_logsumexp", "t0_topk_values", "t0_tail_logmass"))
    # the dropped second entry joins the tail: t' = logaddexp(t, v_2 - L); top-k mass = 1 - exp(t')
    new_tail = np.logaddexp(tail, vals[:, 1] - lse)
    np.testing.assert_allclose(v.read_all(["t0_tail_logmass"])["t0_tail_logmass"], new_tail, rtol=1e-6)
    assert s["topk_mass_mean"] == pytest.approx(float((-np.expm1(new_tail)).mean()), rel=1e-5)
    r = cli(["inspect", res.path])
    assert "not measured (this version was made from a top-k without full logits)" in r.output
    r = cli(["convert", res.path, "--top-k", "1", "--name", "again", "--quiet"])
    assert "fidelity not measurable (no full logits in the source)" in r.output


def test_convert_cli_new_version_of_the_same_dataset(shared: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "s"
    src = convert(ConvertConfig(str(shared["pq"]), out=str(store), name="ds")).path  # a private copy: ds@v1
    before = all_bytes(src)
    r = cli(["convert", f"{src.parent}@v1", "--to", "hdf5", "--top-k", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {store / 'ds' / 'v2'}  (100 rows, hdf5, fp16 logits + top-2, ")
    assert f"from {store / 'ds'}@v1)" in r.output and "  t0: top-2 mass " in r.output and "KL@T=1/4/20: " in r.output
    assert all_bytes(src) == before  # the source is never touched
    m = json.loads((store / "ds" / "v2" / "manifest.json").read_text())
    assert m["parent"]["name"] == "ds" and m["parent"]["version"] == 1 and m["parent"]["relation"] == "convert"
    assert m["parent"]["settings"]["top_k"] == 2 and m["parent"]["settings"]["format"] == "hdf5"
    assert not list((store / "ds").glob(".staging-*"))
    r = cli(["ls", store])
    assert "ds@v1 (convert)" in r.output
    r = cli(["inspect", store / "ds"])
    assert "derived from ds@v1 by convert (format=hdf5, top_k=2" in r.output


def test_convert_errors(shared: dict[str, Path], tmp_path: Path) -> None:
    pq, topk = shared["pq"], shared["topk"]
    assert_clean_error(cli(["convert", pq, "--no-logits", "--top-k", "0"]), r"nothing to store")
    assert_clean_error(cli(["convert", pq, "--top-k", "6"]), r"--top-k 6: .* has 5 classes; use 1..5")
    assert_clean_error(cli(["convert", topk, "--top-k", "3", "--out", tmp_path]),
                       r"stores top-2 and no full logits, so a larger top-k cannot be made; use --top-k 2 or less")
    assert_clean_error(cli(["convert", topk, "--logits", "--out", tmp_path]), r"stores no full logits")
    assert_clean_error(cli(["convert", pq, "--name", "../x"]), r"--name '../x' is not a valid dataset name")
    assert_clean_error(cli(["convert", pq, "--shard-rows", "0"]), r"--shard-rows 0: must be >= 1")
    assert_clean_error(cli(["convert", tmp_path / "nope"]), r"no dataset directory")
    assert_clean_error(cli(["convert", pq, "--out", "s3://b/t"]), r"--out s3://b/t: convert writes to a local store")
    with pytest.raises(ConfigError, match="top_k -1"):
        ConvertConfig("x", top_k=-1)


def test_convert_reshards_and_resumes(shared: dict[str, Path], tmp_path: Path) -> None:
    src = Version(shared["pq"])
    cfg = ConvertConfig(str(shared["pq"]), shard_rows=30, row_group_rows=7, top_k=2, out=str(tmp_path / "a"))
    seen: list[int] = []

    def interrupt(rows: int) -> None:
        seen.append(rows)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(cfg, progress=interrupt)
    assert not (tmp_path / "a" / "pq" / "v1").exists()  # nothing visible yet
    res = convert(cfg)
    assert res.resumed_shards == 2
    v = Version(res.path)
    assert [f["rows"] for f in v.files] == [30, 30, 30, 10]
    for n in src.columns:
        want = src.read_all([n])[n]
        got = v.read_all([n])[n]
        if n == "t0_tail_logmass":  # grown by the dropped third entry
            want = src.read_all(["t0_topk_values", "t0_logsumexp", "t0_tail_logmass"])
            grown = np.logaddexp(want[n], want["t0_topk_values"][:, 2] - want["t0_logsumexp"])
            np.testing.assert_allclose(got, grown, rtol=1e-6)
            continue
        assert np.array_equal(got, want[:, :2] if n.startswith("t0_topk") else want), n
    assert v.read_rows(25, 65, ["sample_id"])["sample_id"].tolist() == list(range(25, 65))
    clean = Version(convert(ConvertConfig(**{**cfg.__dict__, "out": str(tmp_path / "b")})).path)
    assert [f["sha256"] for f in clean.files] == [f["sha256"] for f in v.files]  # resumed = uninterrupted
    assert clean.manifest["statistics"] == v.manifest["statistics"]
