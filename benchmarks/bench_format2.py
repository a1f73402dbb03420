"""Format 2's costs, measured: bytes per row against format 1, and labeling a 151,936-class teacher.

1. ``bytes``: the same targets written with format 2's encodings (kdstore's writer) and with format 1's (zstd 1,
   byte-stream-split on float16, bfloat16 as uint16 bits, no tail column; emulated here with pyarrow), in bytes per
   row with every column counted, at C = 10 (full fp16 logits + top-5), 1,000 (full fp16 logits + top-64) and
   151,936 (top-64 only). The logits imitate a trained classifier / LM head: Gaussian scores with one boosted class.
2. ``wide``: `kdstore label` (top-64, no full logits) of a 256-1024-151,936 MLP teacher against the same teacher's
   pure inference over the same batches (load the teacher, read, forward, discard), each in its own process (peak
   memory is the process's), interleaved for --rounds rounds after a warm-up; medians and (min-max) of wall and of
   the children's CPU seconds (on a shared machine the steadier figure).

Run: python -m benchmarks.bench_format2 [bytes] [wide] [--rows 10000] [--rounds 3] [--memory-rows 100000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks._common import interleaved, median, median_spread, ratios
from kdstore import versioning
from kdstore.store.formats import encode_bfloat16, write_shard

CASES = [(10, 5, True), (1000, 64, True), (151_936, 64, False)]  # (C, k, full logits stored)


def realistic_logits(rows: int, classes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, classes, generator=g) * 2.0
    hot = torch.randint(0, classes, (rows,), generator=g)
    z[torch.arange(rows), hot] += 6.0 + 4.0 * torch.rand(rows, generator=g)
    return z


def format2_bytes(z: torch.Tensor, k: int, keep: bool, dtype: str, path: Path) -> int:
    st = versioning.stored_targets(z, k=k, keep_logits=keep, precision=dtype)
    cols = {"sample_id": np.arange(len(z), dtype=np.int64), **st.columns("t0", versioning.index_dtype(z.shape[1]))}
    specs = versioning.column_specs(["t0"], z.shape[1], k=k, keep_logits=keep, dtype=dtype, labels=False)
    write_shard(path, cols, specs, fmt="parquet", row_group_rows=2048, metadata={})
    return path.stat().st_size


def format1_bytes(z: torch.Tensor, k: int, keep: bool, dtype: str, path: Path) -> int:
    """The same targets as format 1 wrote them (pyarrow.parquet.write_table arguments of kdstore 0.1's format 1)."""
    from kdstore import targets

    def stored(a: torch.Tensor) -> np.ndarray:
        return encode_bfloat16(a.numpy()) if dtype == "bfloat16" else a.to(getattr(torch, dtype)).numpy()

    def vec(a: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])

    v, idx = targets.top_k(z, k)
    cols = {"sample_id": pa.array(np.arange(len(z), dtype=np.int64))}
    if keep:
        cols["t0_logits"] = vec(stored(z))
    cols["t0_topk_indices"] = vec(idx.numpy().astype(versioning.index_dtype(z.shape[1])))
    cols["t0_topk_values"] = vec(stored(v))
    cols["t0_logsumexp"] = pa.array(targets.logsumexp(z).numpy())
    floats = [f"{n}.list.element" for n in cols if n in ("t0_logits", "t0_topk_values") and dtype != "bfloat16"]
    pq.write_table(pa.table(cols), path, row_group_size=2048, compression="zstd", compression_level=1,
                   use_byte_stream_split=floats or False, use_dictionary=False, write_statistics=["sample_id"])
    return path.stat().st_size


def bench_bytes(tmp: Path, rows_for: dict[int, int]) -> list[dict[str, object]]:
    out = []
    for c, k, keep in CASES:
        rows = rows_for[c]
        z = realistic_logits(rows, c)
        for dtype in ("float16", "bfloat16"):
            b1 = format1_bytes(z, k, keep, dtype, tmp / f"f1-{c}-{dtype}.parquet") / rows
            b2 = format2_bytes(z, k, keep, dtype, tmp / f"f2-{c}-{dtype}.parquet") / rows
            out.append({"classes": c, "k": k, "logits": keep, "dtype": dtype, "rows": rows,
                        "format1_bytes_per_row": round(b1, 1), "format2_bytes_per_row": round(b2, 1),
                        "ratio": round(b2 / b1, 3)})
            print(json.dumps(out[-1]), flush=True)
    return out


_CHILD = textwrap.dedent("""
    def peak_kb():  # VmHWM: this process's own peak; ru_maxrss would count the parent's pages at fork time
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
    import json, sys, time, torch
    mode, teacher, transfer, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    if int(sys.argv[6]):
        torch.set_num_threads(int(sys.argv[6]))
    cpu0 = time.process_time()
    if mode == "pure":
        from kdstore.teachers import load_teacher
        from kdstore.transfer import open_transfer
        start = time.perf_counter()  # like label(): loading (and fingerprinting) the teacher counts
        t = load_teacher(teacher); ts = open_transfer(transfer)
        with torch.inference_mode():
            for _, x, _ in ts.iter_batches(batch):
                t.module(torch.from_numpy(x)).float()
        seconds = time.perf_counter() - start
    else:
        from kdstore.labeling import LabelConfig, label
        start = time.perf_counter()
        r = label(LabelConfig(teachers=(teacher,), transfer=transfer, out=out, name="wide", top_k=64,
                              keep_logits=False, batch_size=batch, device="cpu"))
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "cpu_seconds": time.process_time() - cpu0, "peak_mb": peak_kb() / 1024}))
""")


def _child(mode: str, teacher: str, transfer: Path, out: Path, batch: int, threads: int = 0) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", _CHILD, mode, teacher, str(transfer), str(out), str(batch), str(threads)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def bench_wide(tmp: Path, rows: int, rounds: int, batch: int, memory_rows: int, threads: int = 0) -> dict[str, object]:
    from benchmarks._common import make_teacher, make_transfer

    teacher = make_teacher(tmp / "wide.safetensors", [256, 1024, 151_936])
    transfer = make_transfer(tmp / "wide.parquet", rows, width=256)
    peaks: dict[str, list[float]] = {"pure": [], "label": []}
    cpu: dict[str, list[float]] = {"pure": [], "label": []}
    run_id = [0]

    def case(mode: str):  # type: ignore[no-untyped-def]
        def fn() -> float:
            run_id[0] += 1
            res = _child(mode, teacher, transfer, tmp / f"store{run_id[0]}", batch, threads)
            peaks[mode].append(res["peak_mb"])
            cpu[mode].append(res["cpu_seconds"])
            return res["seconds"]
        return fn

    times = interleaved({"pure": case("pure"), "label": case("label")}, rounds=rounds)
    cpu = {k: v[1:] for k, v in cpu.items()}  # without the warm-up round, as `interleaved` drops it from `times`
    r = ratios(times["label"], times["pure"])
    result: dict[str, object] = {
        "rows": rows, "batch": batch, "rounds": rounds, "pure_s": median_spread(times["pure"]),
        "label_s": median_spread(times["label"]), "label_over_pure": median_spread(r), "ratio_median": median(r),
        "threads": threads or torch.get_num_threads(), "pure_cpu_s": median_spread(cpu["pure"]),
        "label_cpu_s": median_spread(cpu["label"]),
        "label_over_pure_cpu": median_spread(ratios(cpu["label"], cpu["pure"])),
        "label_peak_mb": round(max(peaks["label"])), "pure_peak_mb": round(max(peaks["pure"])),
        "us_per_row_overhead": round(1e6 * (median(times["label"]) - median(times["pure"])) / rows, 1)}
    print(json.dumps(result), flush=True)
    if memory_rows:
        big = make_transfer(tmp / "wide-big.parquet", memory_rows, width=256)
        res = _child("label", teacher, big, tmp / "store-big", batch, threads)
        result["memory_run"] = {"rows": memory_rows, "seconds": round(res["seconds"], 1),
                                "peak_mb": round(res["peak_mb"])}
        print(json.dumps(result["memory_run"]), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="*", default=["bytes", "wide"])
    p.add_argument("--rows", type=int, default=10_000, help="rows of the wide labeling comparison")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--memory-rows", type=int, default=0, help="also label this many rows once, for the peak")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads of the wide children (0: torch's default); on a shared machine 1 thread and "
                        "the CPU-seconds ratio are the steadier figures")
    a = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "bytes" in a.parts:
            bench_bytes(tmp, {10: 100_000, 1000: 20_000, 151_936: 4_000})
        if "wide" in a.parts:
            bench_wide(tmp, a.rows, a.rounds, a.batch_size, a.memory_rows, a.threads)


if __name__ == "__main__":
    main()
