"""Labeling and converting a 151,936-class teacher's targets is bounded by a batch of logits, not by the shard:
peak memory of a subprocess is asserted (docs/design.md, "Memory")."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.helpers import REPO_ROOT, subprocess_env

ROWS, BATCH, CLASSES = 1536, 128, 151_936

_CHILD = textwrap.dedent("""
    def peak_kb():  # VmHWM: this process's own peak; ru_maxrss would count the parent's pages at fork time
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
    import json, sys
    from kdstore.convert import ConvertConfig, convert
    from kdstore.labeling import LabelConfig, label
    transfer, out = sys.argv[1], sys.argv[2]
    res = label(LabelConfig(teachers=("tests.fixtures_models:wide_teacher",), transfer=transfer, out=out, name="wide",
                            top_k=64, keep_logits=False, batch_size=int(sys.argv[3]), device="cpu"))
    after_label = peak_kb()
    conv = convert(ConvertConfig(str(res.path), top_k=16, name="wide16", row_group_rows=256))
    print(json.dumps({"label_peak_kb": after_label, "peak_kb": peak_kb(),
                      "bytes": sum(f["bytes"] for f in res.manifest["files"]), "k16": conv.manifest["targets"]}))
""")


def test_wide_teacher_labels_and_converts_in_memory_bounded_by_the_batch(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((ROWS, 8)).astype(np.float32)
    transfer = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8)}), transfer)
    # a clean environment: variables other tests leave behind must not change what the child allocates
    env = {k: v for k, v in subprocess_env().items() if k in ("PATH", "PYTHONPATH", "HOME", "LANG")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(transfer), str(tmp_path / "store"), str(BATCH)],
                       env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    batch_logits_mb = BATCH * CLASSES * 4 / 2**20  # 74 MB; the shard's logits would be 890 MB
    shard_logits_mb = ROWS * CLASSES * 4 / 2**20
    # torch and the interpreter take ~330 MB here; a few batch x C float32 arrays on top, never the shard's
    assert out["peak_kb"] / 1024 < 450 + 4 * batch_logits_mb < shard_logits_mb, out
    assert out["bytes"] / ROWS < 220  # top-64 of 151,936 classes, every column counted
    assert out["k16"]["top_k"]["k"] == 16
