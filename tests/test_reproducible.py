"""Labeling is bit-reproducible across processes: aligned teacher inputs, a pinned thread count, and a resumed run
(killed with SIGKILL at several points, resumed with another thread count) byte-identical to an uninterrupted one."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from kdstore import reproducible
from kdstore.label_rows import forward as _forward
from kdstore.store import VersionWriter
from kdstore.teachers import Teacher
from tests import fixtures_models as fm
from tests.conftest import Data
from tests.helpers import REPO_ROOT, run_label, subprocess_env


def _misaligned(x: np.ndarray, offset: int) -> np.ndarray:
    """A view of a copy of `x` that starts `offset` bytes past a 64-byte boundary."""
    raw = np.zeros(x.nbytes + 128, np.uint8)
    base = (-raw.ctypes.data) % 64 + offset
    view = raw[base : base + x.nbytes].view(x.dtype).reshape(x.shape)
    view[...] = x
    assert view.ctypes.data % 64 == offset
    return view


@pytest.mark.parametrize("rows", [2, 3, 5, 7])
def test_teacher_outputs_do_not_depend_on_where_the_batch_lives(rows: int) -> None:
    # Small batches at 4-byte offsets are where MKL's SGEMM rounding followed the address before the fix (kdstore
    # then handed the teacher a torch.from_numpy view of pyarrow/numpy memory).
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    teacher = Teacher("mem", "factory", None, "0" * 64, module)
    x = np.random.default_rng(rows).standard_normal((rows, 16)).astype(np.float32)
    ref = _forward(teacher, x, torch.device("cpu"), "fp32").numpy()
    for offset in range(4, 64, 4):
        got = _forward(teacher, _misaligned(x, offset), torch.device("cpu"), "fp32").numpy()
        assert got.tobytes() == ref.tobytes(), f"offset {offset}"
    assert reproducible.device_input(x, torch.device("cpu")).data_ptr() % 64 == 0


def test_the_first_process_pins_the_thread_count(tmp_path: Path) -> None:
    cols = [{"name": "sample_id", "role": "sample_id", "teacher": None, "dtype": "int64", "shape": []}]
    kw = {"run_key": "cd" * 8, "fmt": "parquet", "columns": cols, "shard_rows": 4, "row_group_rows": 2,
          "shard_metadata": {}}
    with VersionWriter(tmp_path, "ds", pinned={"threads": 3}, **kw) as w:
        assert w.pinned == {"threads": 3}
    with VersionWriter(tmp_path, "ds", pinned={"threads": 7}, **kw) as w:  # a resume on another machine
        assert w.pinned == {"threads": 3}


def test_a_resumed_label_run_computes_with_the_first_runs_thread_count(data: Data, store: Path) -> None:
    spec = "tests.fixtures_models:thread_recording_teacher"
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(KeyboardInterrupt):  # interrupted after the first shard's rows
            run_label(spec, data.parquet, store, progress=_interrupt_after(40))
        torch.set_num_threads(1)
        fm.THREADS_SEEN.clear()
        res = run_label(spec, data.parquet, store)
        # the first forward is the class-count probe, before the run opens its staging directory
        assert set(fm.THREADS_SEEN[1:]) == {2} and torch.get_num_threads() == 1  # pinned inside, restored after
    finally:
        torch.set_num_threads(old)
    lab = res.manifest["labeling"]
    assert lab["threads"] == 2
    assert [g["environment"]["threads"] for g in lab["environments"]] == [2]
    assert sorted(s for g in lab["environments"] for s in g["shards"]) == [0, 1, 2]


def _interrupt_after(rows: int):  # type: ignore[no-untyped-def]
    seen = [0]

    def progress(n: int) -> None:
        seen[0] += n
        if seen[0] > rows:
            raise KeyboardInterrupt

    return progress


# --- SIGKILL and resume at a size where shards hold many batches ------------------------------------------------------

_CHILD = textwrap.dedent("""
    import os, signal, sys
    from kdstore.labeling import LabelConfig, label
    teacher, transfer, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    done = [0]
    def progress(n):
        done[0] += n
        if kill_at and done[0] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    label(LabelConfig(teachers=(teacher,), transfer=transfer, out=out, name="big", top_k=10, batch_size=256,
                      shard_rows=4096, row_group_rows=1024, device="cpu"), progress=progress)
""")


def _label_child(teacher: Path, transfer: Path, out: Path, kill_at: int, threads: int) -> int:
    env = subprocess_env(OMP_NUM_THREADS=str(threads))
    env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run([sys.executable, "-c", _CHILD, str(teacher), str(transfer), str(out), str(kill_at)],
                       env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    return r.returncode


def _data_hashes(version_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((version_dir / "data").iterdir())}


@pytest.mark.slow
def test_sigkill_and_resume_is_byte_identical(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((16384, 256)).astype(np.float32)
    transfer = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 256)}), transfer,
                   row_group_size=5000)
    teacher = tmp_path / "teacher.pt"
    with warnings.catch_warnings():  # torch.jit.script is deprecated in recent torch; still the documented format
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(fm.wide_mlp()).save(str(teacher))
    assert _label_child(teacher, transfer, tmp_path / "ref", 0, threads=2) == 0
    want = _data_hashes(tmp_path / "ref" / "big" / "v1")
    assert len(want) == 4
    for kill_at in (2000, 4096 + 1500, 3 * 4096 + 100):  # inside shard 0, inside shard 1, in the last shard
        out = tmp_path / f"kill{kill_at}"
        assert _label_child(teacher, transfer, out, kill_at, threads=2) == -signal.SIGKILL
        assert not (out / "big" / "v1").exists()
        assert _label_child(teacher, transfer, out, 0, threads=4) == 0  # resumed with another thread count
        assert _data_hashes(out / "big" / "v1") == want, f"killed at row {kill_at}"
