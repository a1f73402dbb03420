"""`kdstore label` on the command line: output, bad input as one-line errors, kill -9 and resume, concurrency."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdstore.store import Version, list_datasets
from tests import fixtures_models as fm
from tests.conftest import Data, write_parquet_array
from tests.helpers import (
    FIX,
    SMALL_ARGS,
    assert_clean_error,
    cli,
    data_bytes,
    kdstore_command,
    subprocess_env,
    versions_of,
)


def label_args(teacher: str | Path, transfer: str | Path, out: Path, name: str = "ds", *extra: str) -> list[str]:
    return ["label", "--teacher", str(teacher), "--transfer", str(transfer), "--out", str(out), "--name", name,
            "--top-k", "3", *SMALL_ARGS, *extra]


# --- 10. end to end ---------------------------------------------------------------------------------------------------


def test_label_prints_path_and_summary(data: Data, store: Path) -> None:
    r = cli(label_args(data.teacher_pt, data.parquet, store))
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    path = store / "ds" / "v1"
    assert lines[0].startswith(f"wrote {path}  (100 rows, 5 classes, ") and lines[0].endswith(" s)")
    m = Version(path).manifest
    acc = m["statistics"]["teachers"]["t0"]["accuracy"]
    assert lines[1].startswith(f"  t0: accuracy {acc:.4f}, mean entropy ") and "top-k KL@T=1/4/20: " in lines[1]
    assert lines[2].startswith("soft targets of t0 per temperature (100 sampled rows")  # then the advice
    assert lines[-1].startswith(f"  try: kdstore train --targets {store / 'ds'}@v1 --student SPEC --loss hard,kd")
    r2 = cli(label_args(data.teacher_pt, data.parquet, store, "ds", "--format", "hdf5", "--logits-dtype", "bfloat16"))
    assert r2.exit_code == 0 and f"wrote {store / 'ds' / 'v2'}" in r2.output
    assert Version(store / "ds").fmt == "hdf5"


def test_label_ensemble_unlabeled_and_no_logits(data: Data, store: Path) -> None:
    r = cli(label_args(data.teacher_pt, data.npz, store, "ens", "--teacher", data.factory_spec, "--no-logits",
                       "--top-k", "2"))
    assert r.exit_code == 0, r.output
    assert "  t1: accuracy " in r.output and "  ensemble (mean-prob): accuracy " in r.output
    v = Version(store / "ens")
    assert v.teacher_ids == ["t0", "t1"] and not v.has_logits and v.top_k == 2
    r = cli(label_args(data.teacher_pt, data.parquet_numeric, store, "unl", "--label-column", "none", "--top-k", "0",
                       *[a for i in range(8) for a in ("--input-column", f"f{i}")]))
    assert r.exit_code == 0, r.output
    assert "  t0: unlabeled, mean entropy " in r.output and "top-k KL" not in r.output
    v = Version(store / "unl")
    assert not v.has_labels and v.top_k is None and v.manifest["transfer_set"]["inputs"]["columns"][-1] == "f7"


def test_help_and_version() -> None:
    r = cli(["--help"])
    assert r.exit_code == 0 and "label" in r.output and "Typical use" in r.output
    r = cli(["label", "--help"])
    assert r.exit_code == 0
    for opt in ("--teacher", "--transfer", "--out", "--name", "--format", "--top-k", "--no-logits", "--logits-dtype",
                "--shard-rows", "--row-group-rows", "--label-column", "--input-column"):
        assert opt in r.output
    r = cli(["--version"])
    assert r.exit_code == 0 and "kdstore, version " in r.output


def test_console_script_runs(data: Data, store: Path) -> None:
    p = subprocess.run([*kdstore_command(), *label_args(f"{FIX}:tiny_teacher", data.parquet, store)],
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"wrote {store / 'ds' / 'v1'}  (100 rows, 5 classes")
    assert p.stderr == ""  # no progress bar when stderr is not a terminal, no warnings


# --- 9. bad input --------------------------------------------------------------------------------------------------


def bad(tmp: Path, data: Data) -> dict[str, Path]:
    """Broken inputs, made on demand."""
    x = data.x.copy()
    x[57, 0] = fm.NAN_SENTINEL
    y = data.y.copy()
    y[63] = 7
    (tmp / "text.pt").write_text("this is not TorchScript\n")
    (tmp / "x.csv").write_text("a,b\n1,2\n")
    (tmp / "regular_file").write_text("x")
    from safetensors.torch import save_file

    save_file(fm.mlp(3).state_dict(), str(tmp / "w3.safetensors"))
    return {
        "nan": write_parquet_array(tmp / "nan.parquet", x, data.y),
        "labels": write_parquet_array(tmp / "labels.parquet", data.x, y),
        "empty": write_parquet_array(tmp / "empty.parquet", np.zeros((0, 8), np.float32), np.zeros(0, np.int64)),
        "narrow": write_parquet_array(tmp / "narrow.parquet", data.x[:, :6], data.y),
        "text": tmp / "text.pt", "csv": tmp / "x.csv", "file": tmp / "regular_file", "w3": tmp / "w3.safetensors",
    }


CASES = {
    "missing transfer": (lambda d, b, t: ("T", t / "nope.parquet"), r"--transfer .*nope.parquet: file not found"),
    "unknown extension": (lambda d, b, t: ("T", b["csv"]), r"unknown file type '.csv'; expected one of"),
    "teacher file missing": (lambda d, b, t: (t / "missing.pt", "P"),
                             r"missing.pt': no such file, and not a model spec"),
    "teacher not torchscript": (lambda d, b, t: (b["text"], "P"), r"text.pt: cannot load it as TorchScript"),
    "factory import failure": (lambda d, b, t: ("no_such_pkg_kdstore:teacher", "P"),
                               r"cannot import module 'no_such_pkg_kdstore' .*ModuleNotFoundError"),
    "weights do not fit": (lambda d, b, t: (f"{FIX}:tiny_teacher@{b['w3']}", "P"),
                           r"w3.safetensors do not fit .*size mismatch"),
    "output not 2-D": (lambda d, b, t: (f"{FIX}:three_d_teacher", "P"),
                       r"output \(2, 5, 1\) .*expected logits of shape"),
    "nan logits": (lambda d, b, t: (f"{FIX}:nan_teacher", b["nan"]), r"NaN or Inf logits for row 57 of .*nan.parquet"),
    "labels out of range": (lambda d, b, t: ("T", b["labels"]),
                            r"row 63 has label 7, outside the teachers' class range 0..4"),
    "empty transfer set": (lambda d, b, t: ("T", b["empty"]), r"empty.parquet: the transfer set is empty \(0 rows\)"),
    "wrong input width": (lambda d, b, t: ("T", b["narrow"]), r"forward pass failed on inputs of shape \(2, 6\)"),
    "bare assert in teacher": (lambda d, b, t: (f"{FIX}:asserting_teacher", b["narrow"]),
                               r"forward pass failed on inputs of shape \(2, 6\) \(AssertionError: \)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(data: Data, tmp_path: Path, store: Path, case: str) -> None:
    make, match = CASES[case]
    teacher, transfer = make(data, bad(tmp_path, data), tmp_path)
    teacher = data.teacher_pt if teacher == "T" else teacher
    transfer = data.parquet if transfer == "P" else transfer
    assert_clean_error(cli(label_args(teacher, transfer, store)), match)
    assert versions_of(store / "ds") == []


@pytest.mark.parametrize(
    ("extra", "match"),
    [(["--top-k", "0", "--no-logits"],
      r"nothing to store: no full logits \(--logits/--no-logits False\) and no top-k \(--top-k 0\); keep the logits or "
      r"give --top-k K"),
     (["--top-k", "6"], r"--top-k 6: the teachers have 5 classes; use 1..5"),
     (["--top-k", "-2"], r"--top-k -2: must be >= 1"),
     (["--name", "../evil"], r"--name '../evil' is not a valid dataset name"),
     (["--batch-size", "0"], r"--batch-size 0: must be >= 1"),
     (["--teacher", f"{FIX}:three_class_teacher"], r"teachers disagree on the number of classes: .*teacher.pt has 5, "
                                                    rf"{FIX}:three_class_teacher has 3"),
     (["--label-column", "nope"], r"--label-column 'nope': .* has no such column"),
     (["--input-column", "nope"], r"--input-column 'nope': .* has no such column")],
)
def test_bad_options_are_one_error_line(data: Data, store: Path, extra: list[str], match: str) -> None:
    assert_clean_error(cli(label_args(data.teacher_pt, data.parquet, store, "ds", *extra)), match)
    assert versions_of(store / "ds") == [] and versions_of(store / "../evil") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(data: Data, store: Path) -> None:
    assert_clean_error(cli(label_args(data.teacher_pt, data.parquet, store, "ds", "--device", "cuda")),
                       "CUDA is not available on this machine")


def test_unwritable_out(data: Data, tmp_path: Path) -> None:
    (tmp_path / "regular_file").write_text("x")
    out = tmp_path / "regular_file" / "store"
    assert_clean_error(cli(label_args(data.teacher_pt, data.parquet, out)),
                       r"--out .*regular_file/store: cannot create .*: Not a directory; choose a writable directory")


def test_format_choice_error(data: Data, store: Path) -> None:
    r = cli(label_args(data.teacher_pt, data.parquet, store, "ds", "--format", "xyz"))
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit)
    assert "Error: Invalid value for '--format': 'xyz' is not one of 'parquet', 'hdf5'" in r.output
    assert "Traceback" not in r.output and not store.exists()


def test_keyboard_interrupt_is_one_line_and_resumable(data: Data, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdstore import labeling

    real = labeling.label_shard
    calls: list[int] = []

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(labeling, "label_shard", flaky)
        assert_clean_error(cli(label_args(data.teacher_pt, data.parquet, store)),
                           r"^Error: interrupted; completed work is kept, rerun the same command to resume$")
    assert versions_of(store / "ds") == []
    r = cli(label_args(data.teacher_pt, data.parquet, store))
    assert r.exit_code == 0 and ", resumed 1 shard(s))" in r.output.splitlines()[0]


# --- 6b. kill -9 and resume -------------------------------------------------------------------------------------------


def test_sigkill_then_resume_is_byte_identical(data: Data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, clean_store = tmp_path / "store", tmp_path / "clean"
    args = ["label", "--teacher", f"{FIX}:slow_teacher", "--transfer", str(data.parquet), "--out", str(store),
            "--name", "ds", "--top-k", "3", "--shard-rows", "20", "--row-group-rows", "16", "--batch-size", "10",
            "--quiet", "--device", "cpu"]
    proc = subprocess.Popen([*kdstore_command(), *args], env=subprocess_env(**{fm.SLEEP_ENV: "0.2"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            shards = list((store / "ds").glob(".staging-*/data/part-*.parquet"))
            if len(shards) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"kdstore exited ({proc.returncode}) before 2 shards were written: {proc.communicate()}")
            if time.monotonic() > deadline:
                pytest.fail("no 2 shards within 90 s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert versions_of(store / "ds") == [] and list_datasets(store) == {}

    monkeypatch.setenv(fm.SLEEP_ENV, "0")
    r = cli(args)
    assert r.exit_code == 0, r.output
    assert ", resumed " in r.output.splitlines()[0]
    resumed = int(r.output.split(", resumed ")[1].split(" ")[0])
    assert 1 <= resumed <= 4
    clean = cli([a if a != str(store) else str(clean_store) for a in args])
    assert clean.exit_code == 0 and "resumed" not in clean.output
    got, want = data_bytes(store / "ds" / "v1"), data_bytes(clean_store / "ds" / "v1")
    assert list(got) == [f"part-0000{i}.parquet" for i in range(5)]
    assert got == want
    m = json.loads((store / "ds" / "v1" / "manifest.json").read_text())
    assert m["files"] == json.loads((clean_store / "ds" / "v1" / "manifest.json").read_text())["files"]
    assert Version(store / "ds").verify(full=True) == []
    assert sorted(p.name for p in (store / "ds").iterdir()) == ["v1"]


# --- 7. concurrent writers ------------------------------------------------------------------------------------------


def test_concurrent_labels_with_different_settings_make_v1_and_v2(data: Data, store: Path) -> None:
    def start(k: str) -> subprocess.Popen[str]:
        args = ["label", "--teacher", f"{FIX}:slow_teacher", "--transfer", str(data.parquet), "--out", str(store),
                "--name", "shared", "--top-k", k, "--shard-rows", "40", "--row-group-rows", "16", "--batch-size", "20",
                "--quiet", "--device", "cpu"]
        return subprocess.Popen([*kdstore_command(), *args], env=subprocess_env(**{fm.SLEEP_ENV: "0.02"}),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start("2"), start("3")]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    assert versions_of(store / "shared") == ["v1", "v2"]
    written = sorted(out.split()[1] for out, _ in outs)
    assert written == [str(store / "shared" / "v1"), str(store / "shared" / "v2")]
    ks = set()
    for n in (1, 2):
        v = Version(f"{store / 'shared'}@v{n}")
        assert v.manifest["version"] == n and v.num_rows == 100
        assert v.verify(full=True) == []
        cols = v.read_all(["sample_id", "t0_topk_indices"])
        np.testing.assert_array_equal(cols["sample_id"], np.arange(100))
        ks.add(cols["t0_topk_indices"].shape[1])
    assert ks == {2, 3}
    assert sorted(p.name for p in (store / "shared").iterdir()) == ["v1", "v2"]


def test_label_column_none_keeps_labels_out_of_numeric_inputs(data: Data, tmp_path: Path, store: Path) -> None:
    # f0..f7 + an integer 'label' column: with --label-column none the labels must not become a 9th input.
    cols = {f"f{i}": pa.array(data.x[:, i]) for i in range(8)}
    cols["label"] = pa.array(data.y)
    pq.write_table(pa.table(cols), tmp_path / "num.parquet")
    r = cli(label_args(data.teacher_pt, tmp_path / "num.parquet", store, "ds", "--label-column", "none"))
    assert r.exit_code == 0, r.output
    assert Version(store / "ds").manifest["transfer_set"]["inputs"]["shape"] == [8]
