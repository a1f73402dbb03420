"""Golden end-to-end values: label, convert and train with fixed seeds; compare data, manifests and metrics with
values recorded in tests/golden/pipeline.json.

A restructuring must not change a byte of what kdstore writes: this test labels three versions (Parquet and
HDF5, full logits and top-k only, one teacher and an ensemble, labeled and not), converts two, trains every loss
in memory and streamed, and compares

* each data file's **content** (every column's values, types and metadata, read with pyarrow or h5py) exactly,
  and its **sha256** too when pyarrow and h5py are the versions that recorded it (their version string is part of
  a Parquet file's footer, so another release changes the file bytes but not the data);
* each manifest, with volatile fields (times, temporary paths) removed, floats to 1e-9 relative;
* each training run's metrics (losses, accuracy, agreement) to 1e-5 relative: students train with float32
  matmuls whose rounding may differ on another CPU, while the teachers here are exact (see
  tests.fixtures_models.exact_teacher) so that stored targets are the same bits on any machine.

A change that alters the bytes on purpose (a new format version) re-records the values:
``KDSTORE_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py`` and commits tests/golden/pipeline.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import FIX, cli, subprocess_env

GOLDEN = Path(__file__).parent / "golden" / "pipeline.json"
RECORD = os.environ.get("KDSTORE_RECORD_GOLDEN") == "1"
ROWS, EVAL_ROWS = 120, 60


def _inputs(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.integers(-8, 9, size=(rows, 8)) / 4).astype(np.float32)  # multiples of 1/4: exact teachers


def _write_transfer(path: Path, x: np.ndarray, seed: int) -> Path:
    import torch

    from tests.fixtures_models import exact_teacher

    with torch.no_grad():
        pred = exact_teacher()(torch.from_numpy(x)).argmax(1).numpy()
    rng = np.random.default_rng(seed)
    y = np.where(rng.random(len(x)) < 0.3, (pred + 1) % 5, pred).astype(np.int64)
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8), "label": pa.array(y)})
    pq.write_table(table, path, row_group_size=30)
    return path


def _content_hash(path: Path) -> str:
    """sha256 of a data file's values, types and metadata (not of the container's bytes)."""
    h = hashlib.sha256()
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        h.update(json.dumps({k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()},
                            sort_keys=True).encode())
        for field in table.schema:
            meta = {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}
            h.update(json.dumps([field.name, str(field.type), meta], sort_keys=True).encode())
            col = table.column(field.name).combine_chunks()
            values = col.flatten() if pa.types.is_fixed_size_list(col.type) else col
            h.update(np.ascontiguousarray(values.to_numpy(zero_copy_only=False)).tobytes())
    else:
        import h5py

        with h5py.File(path, "r") as f:
            h.update(json.dumps({k: str(v) for k, v in f.attrs.items()}, sort_keys=True).encode())
            for name in sorted(f):
                ds = f[name]
                h.update(json.dumps([name, str(ds.dtype), list(ds.shape), {k: str(v) for k, v in ds.attrs.items()}],
                                    sort_keys=True).encode())
                h.update(np.ascontiguousarray(ds[()]).tobytes())
    return h.hexdigest()


_VOLATILE = {"created_at", "seconds", "kdstore_version", "torch_version", "threads", "environments"}  # machine facts


def _normalise(obj: Any, root: str) -> Any:
    if isinstance(obj, dict):
        return {k: _normalise(v, root) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_normalise(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "<ROOT>")
    return obj


def _version_record(vdir: Path, root: Path) -> dict[str, Any]:
    manifest = json.loads((vdir / "manifest.json").read_text("utf-8"))
    files = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "content": _content_hash(p)}
             for p in sorted((vdir / "data").iterdir())}
    return {"manifest": _normalise(manifest, str(root)), "files": files}


def _runs_record(out: Path) -> dict[str, Any]:
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    first = {ln["run"]: i for i, ln in reversed(list(enumerate(lines)))}
    lines.sort(key=lambda ln: (first[ln["run"]], ln["epoch"]))  # point by point (a grouped sweep's lines alternate)
    keep = ("run", "epoch", "train_loss", "lr", "eval_accuracy", "eval_errors", "eval_nll")
    summary = json.loads((out / "summary.json").read_text())
    runs = [{k: r[k] for k in ("run_id", "loss", "temperature", "alpha", "eval_accuracy", "eval_errors", "eval_nll",
                               "teacher_agreement", "seed") if k in r} for r in summary["runs"]]
    return {"metrics": [{k: ln.get(k) for k in keep} for ln in lines], "runs": runs}


def _ok(result: Any) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("golden")
    os.environ.update({k: v for k, v in subprocess_env().items() if k == "PYTHONPATH"})
    transfer = _write_transfer(root / "transfer.parquet", _inputs(ROWS, 1), 2)
    evalset = _write_transfer(root / "eval.parquet", _inputs(EVAL_ROWS, 3), 4)
    store = root / "store"
    t_a, t_b = f"{FIX}:exact_teacher", f"{FIX}:exact_teacher_b"
    common = ["--out", store, "--shard-rows", "50", "--row-group-rows", "16", "--batch-size", "16", "--device", "cpu",
              "--quiet"]
    _ok(cli(["label", "--teacher", t_a, "--transfer", transfer, "--name", "a", "--top-k", "3", *common]))
    _ok(cli(["label", "--teacher", t_a, "--teacher", t_b, "--transfer", transfer, "--name", "b", "--top-k", "2",
             "--format", "hdf5", "--logits-dtype", "bfloat16", "--tail", "drop", *common]))
    _ok(cli(["label", "--teacher", t_a, "--transfer", transfer, "--name", "c", "--top-k", "3", "--no-logits",
             "--logits-dtype", "float32", "--label-column", "none", *common]))
    _ok(cli(["convert", f"{store}/a@v1", "--top-k", "2", "--logits-dtype", "float32", "--to", "hdf5",
             "--shard-rows", "70", "--name", "a-conv", "--quiet"]))
    _ok(cli(["convert", f"{store}/a@v1", "--no-logits", "--name", "a-topk", "--quiet"]))
    record: dict[str, Any] = {"versions": {}, "train": {}}
    for name in ("a", "b", "c", "a-conv", "a-topk"):
        record["versions"][name] = _version_record(store / name / "v1", root)
    train = ["--student", "mlp:8-16-5", "--epochs", "2", "--batch-size", "25", "--lr", "0.01", "--device", "cpu",
             "--quiet", "--eval", evalset]
    jobs = {
        "kd": ["--targets", f"{store}/a", "--loss", "kd", "-T", "2,4", "--alpha", "0.9"],
        "kd-stream": ["--targets", f"{store}/a", "--loss", "kd", "-T", "2", "--data", "stream"],
        "topk": ["--targets", f"{store}/a", "--loss", "topk", "--top-k", "2", "-T", "3", "--alpha", "0.5"],
        "mse": ["--targets", f"{store}/a", "--loss", "mse"],
        "hard-seeds": ["--targets", f"{store}/a", "--loss", "hard", "--seed", "0,1"],
        "ls": ["--targets", f"{store}/a-conv", "--loss", "ls", "--data", "stream"],
        "ensemble": ["--targets", f"{store}/b", "--loss", "kd", "-T", "4", "--alpha", "0.7"],
        "mean-logit": ["--targets", f"{store}/b", "--loss", "kd", "-T", "2", "--ensemble", "mean-logit",
                       "--teacher-weights", "0.25,0.75", "--alpha", "1"],
        "unlabeled": ["--targets", f"{store}/c", "--loss", "kd", "-T", "2", "--alpha", "1"],
    }
    for job, args in jobs.items():
        out = root / "runs" / job
        _ok(cli(["train", *args, *train, "--out", out]))
        record["train"][job] = _runs_record(out)
    record["libraries"] = {"pyarrow": pa.__version__, "h5py": __import__("h5py").__version__}
    return record


def _close(got: Any, want: Any, rel: float, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _close(got[k], want[k], rel, f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, rel, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=rel, abs=1e-12), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_pipeline_matches_recorded_values(pipeline: dict[str, Any]) -> None:
    if RECORD:
        GOLDEN.write_text(json.dumps(pipeline, indent=1, sort_keys=True) + "\n", "utf-8")
        pytest.skip(f"recorded {GOLDEN}")
    want = json.loads(GOLDEN.read_text("utf-8"))
    same_libraries = pipeline["libraries"] == want["libraries"]
    for name, rec in want["versions"].items():
        got = pipeline["versions"][name]
        assert sorted(got["files"]) == sorted(rec["files"]), name
        for fname, h in rec["files"].items():
            assert got["files"][fname]["content"] == h["content"], f"{name}/{fname}: data differ"
            if same_libraries:
                assert got["files"][fname]["sha256"] == h["sha256"], f"{name}/{fname}: file bytes differ"
        _close(got["manifest"], rec["manifest"], 1e-9, f"{name}.manifest")
    _close(pipeline["train"], want["train"], 1e-5, "train")
