"""Labeling throughput with 1 vs 2 processes (torchrun, CPU), measured side by side in one run.

Run: python -m benchmarks.bench_distributed [--rows 60000]
Each process gets OMP_NUM_THREADS = cores / nproc, so both configurations use the same cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import make_teacher, make_transfer


def run(nproc: int, spec: str, transfer: Path, out: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={port}", "-m", "kdstore", "label", "--teacher", spec, "--transfer", str(transfer),
           "--out", str(out), "--name", "b", "--device", "cpu", "--quiet", "--shard-rows", "8192"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=60000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kdstore-bench-"))
    try:
        transfer = make_transfer(tmp / "t.parquet", args.rows)
        spec = make_teacher(tmp / "w.safetensors", [784, 1200, 1200, 10])
        run(1, spec, transfer, tmp / "warm")  # warm-up
        t1 = min(run(1, spec, transfer, tmp / f"one{i}") for i in range(2))
        t2 = min(run(2, spec, transfer, tmp / f"two{i}") for i in range(2))
        same = all((tmp / "one0/b/v1/data" / p.name).read_bytes() == p.read_bytes()
                   for p in (tmp / "two0/b/v1/data").iterdir())
        print(f"{args.rows} rows, 784-1200-1200-10 teacher, {os.cpu_count()} cores, wall time incl. process start:")
        print(f"  1 process {t1:.2f} s ({args.rows / t1:,.0f} rows/s)   2 processes {t2:.2f} s "
              f"({args.rows / t2:,.0f} rows/s)   speed-up 2/1 = {t1 / t2:.2f}x   data identical: {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
