"""docs/format.md is enough to read a version: its `# doc-test` snippets run against real versions, every engine
returns what pyarrow returns, soft targets rebuilt in numpy from the page's formulas equal kdstore's to 1e-6 at
T in {1, 4, 20}, and the recorded top-k fidelity is reproduced from the stored data to 1e-5 (relative)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kdstore import soft_targets
from kdstore.store import Version
from tests.conftest import Data
from tests.helpers import run_label

DOC = Path(__file__).resolve().parent.parent / "docs" / "format.md"
ENGINES = ("pyarrow", "polars", "duckdb", "datasets")
READ = ("z", "values", "indices", "lse", "tail")


def snippets() -> dict[str, str]:
    text = DOC.read_text("utf-8")
    found = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        first, _, rest = block.partition("\n")
        if first.startswith("# doc-test: "):
            found[first.removeprefix("# doc-test: ").strip()] = rest
    return found


def run(name: str, vdir: Path | None = None, **namespace: Any) -> dict[str, Any]:
    code = snippets()[name]
    if vdir is not None:
        code, n = re.subn(r'^version = ".*"$', f"version = {str(vdir)!r}", code, flags=re.M)
        assert n == 1, f"snippet {name} must set `version` once"
    ns: dict[str, Any] = dict(namespace)
    exec(compile(code, f"docs/format.md:{name}", "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def versions(data: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    store = tmp_path_factory.mktemp("doc_store")
    kw = {"top_k": 3, "shard_rows": 40, "row_group_rows": 16}
    return {
        "full": run_label(data.teacher_pt, data.parquet, store, "digits", **kw).path,
        "bf16": run_label(data.teacher_pt, data.parquet, store, "bf16", logits_dtype="bfloat16", **kw).path,
        "h5": run_label(data.teacher_pt, data.parquet, store, "digits-h5", format="hdf5", **kw).path,
        "topk": run_label(data.teacher_pt, data.parquet, store, "topk", keep_logits=False, **kw).path,
        "drop": run_label(data.teacher_pt, data.parquet, store, "drop", keep_logits=False, tail="drop", **kw).path,
    }


def kdstore_columns(vdir: Path) -> dict[str, np.ndarray]:
    v = Version(vdir)
    cols = v.read_all([c for c in ("t0_logits", "t0_topk_values", "t0_topk_indices", "t0_logsumexp",
                                   "t0_tail_logmass") if c in v.columns])
    return {"z": cols.get("t0_logits", np.zeros(0)).astype(np.float32), "values": cols["t0_topk_values"],
            "indices": cols["t0_topk_indices"], "lse": cols["t0_logsumexp"], "tail": cols["t0_tail_logmass"]}


def test_every_doc_test_snippet_is_tested() -> None:
    tokens = ["tokens-duckdb", "tokens-polars", "tokens-numpy"]  # tests/test_format_doc_tokens.py
    assert sorted(snippets()) == sorted([*ENGINES, "h5py", "soft-targets", "fidelity", "features", *tokens])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("key", ["full", "bf16"])
def test_every_engine_reads_every_column_as_pyarrow_does(versions: dict[str, Path], engine: str, key: str) -> None:
    got, want = run(engine, versions[key]), kdstore_columns(versions[key])
    for name in READ:
        np.testing.assert_array_equal(np.asarray(got[name]).astype(want[name].dtype), want[name], err_msg=name)


def test_h5py_reads_every_column(versions: dict[str, Path]) -> None:
    got, want = run("h5py", versions["h5"]), kdstore_columns(versions["h5"])
    for name in READ:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("key", ["full", "bf16", "topk", "drop"])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_soft_targets_from_the_page_equal_kdstores(versions: dict[str, Path], key: str, temperature: float) -> None:
    v = Version(versions[key])
    f = run("soft-targets")
    cols = kdstore_columns(versions[key])
    block = v.read_all(soft_targets.columns_for(v, "t0"))
    want = soft_targets.log_probs(v, block, "t0", temperature).exp().double().numpy()
    if v.has_logits:
        np.testing.assert_allclose(f["from_logits"](cols["z"], temperature), want, rtol=0, atol=1e-6)
    tail_model = v.manifest["targets"]["top_k"]["tail"]
    got = f["from_topk"](cols["values"], cols["indices"], cols["lse"], cols["tail"], v.num_classes, temperature,
                         tail_model)
    if not v.has_logits:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.isfinite(got).all() and np.allclose(got.sum(1), 1.0)  # no clamping, no NaN, a distribution


@pytest.mark.parametrize("key", ["full", "bf16"])
def test_recorded_fidelity_is_reproduced_from_the_stored_data(versions: dict[str, Path], key: str) -> None:
    ns = run("pyarrow", versions[key])
    ns.update(run("soft-targets"))
    ns = run("fidelity", **{k: v for k, v in ns.items() if not k.startswith("__")})
    recorded = ns["m"]["statistics"]["teachers"]["t0"]["topk_fidelity_kl"]
    assert ns["m"]["statistics"]["teachers"]["t0"]["topk_fidelity_reference"] == "stored logits"
    assert recorded.keys() == ns["fidelity"].keys()
    for t, value in recorded.items():
        assert ns["fidelity"][t] == pytest.approx(value, rel=1e-5), t


def test_features_snippet_reconstructs_the_teachers_outputs(data: Data, tmp_path: Path) -> None:
    """The Features section's reader rebuilds the captured outputs from the stored coordinates and the attachment
    as kdstore's own projection does, and their error matches the recorded variance kept."""
    from safetensors.torch import load_file

    from tests import fixtures_models as fm

    res = run_label(f"tests.fixtures_models:tiny_teacher@{data.weights}", data.parquet, tmp_path, "feat", top_k=3,
                    features=("0",), feature_variance=0.9, shard_rows=40, row_group_rows=16)
    ns = run("features", res.path)
    m = fm.tiny_teacher()
    m.load_state_dict(load_file(str(data.weights)))
    import torch

    with torch.no_grad():
        f = m[0](torch.from_numpy(data.x)).numpy()
    mean = ns["mean"]
    kept = 1 - ((f - ns["features"]) ** 2).sum() / ((f - mean) ** 2).sum()
    stated = Version(res.path).manifest["statistics"]["features"]["t0_feature_0"]["variance_kept"]
    assert ns["features"].shape == f.shape and kept == pytest.approx(stated, abs=2e-3)
