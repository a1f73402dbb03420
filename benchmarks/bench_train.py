"""Trainer cost, measured side by side in one run: every case once per round, in turn, after a warm-up round
(`_common.interleaved`), and every ratio reported as the median and spread (min-max) of its per-round values.

1. offline-KD epoch / hard-label epoch, same student and data: in memory (goal <= 1.05) and streamed from disk
   (goal <= 1.15).
2. offline KD (targets read from the store) vs online KD (teacher forward every step) for a 784-1200-1200-10
   teacher and a 784-800-800-10 student: per epoch, and for a 5-temperature sweep including the one labeling run.
3. peak RSS while streaming a store much larger than the working set stays flat (sampled during the epoch).

Run: python -m benchmarks.bench_train [--rows 60000] [--rounds 3] [--threads N] [--device auto] [--stream-gb 2]
(the 5-temperature sweep itself, separate and grouped: benchmarks/bench_sweeps.py)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import interleaved, make_teacher, make_transfer, median, median_spread, ratios
from kdstore import losses
from kdstore.device import fused_optimizer, keep_heap_between_steps, resolve_device
from kdstore.labeling import LabelConfig, label
from kdstore.store import VersionWriter
from kdstore.students import build_model
from kdstore.teachers import load_teacher
from kdstore.training import TrainConfig, Trainer


def trainer_epoch(store: str, loss: str, mode: str, out: Path, device: str, epochs: int = 1) -> float:
    """Training-loop time of the fastest epoch (eval and checkpointing excluded) of `kdstore train`."""
    cfg = TrainConfig(targets=store, student="mlp:784-800-800-10", out=str(out), losses=loss, temperatures=(4.0,),
                      alphas=(0.9,), epochs=epochs, batch_size=128, data_mode=mode, device=device, lr=1e-3)
    r = Trainer(cfg).run()[0]
    shutil.rmtree(out, ignore_errors=True)
    return min(r.epoch_seconds)


class KDLoop:
    """One epoch of a plain KD loop, targets gathered from memory (offline) or the teacher's forward per step
    (online)."""

    def __init__(self, store: str, teacher_spec: str, device: torch.device) -> None:
        from kdstore.data import open_training_data

        self.data = open_training_data(store, need=("logits", "label")).to_memory(device)
        self.teacher = load_teacher(teacher_spec).module.to(device)
        self.device = device

    def epoch(self, online: bool) -> float:
        data, device, n = self.data, self.device, len(self.data["sample_id"])
        torch.manual_seed(0)
        student = build_model("mlp:784-800-800-10").to(device)
        opt = fused_optimizer(torch.optim.Adam, student.parameters(), lr=1e-3)  # kdstore's kernel: loops compared
        perm = torch.randperm(n, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for a in range(0, n, 128):
            idx = perm[a : a + 128]
            x, y = data["x"][idx], data["label"][idx]
            if online:
                with torch.no_grad():
                    z = self.teacher(x)
            else:
                z = data["logits"][idx, 0].float()
            logp = torch.log_softmax(z / 4.0, dim=1)
            loss = losses.kd_loss(student(x), logp, y, temperature=4.0, alpha=0.9)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def streaming_memory(tmp: Path, gb: float, device: str) -> dict[str, object]:
    """Write a store of ~`gb` GB (1000-class fp32 logits, random), stream one KD epoch, sample RSS."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    c, width = 1000, 16
    rows = int(gb * 1e9 / (c * 4))
    rng = np.random.default_rng(0)
    xt = tmp / "wide.parquet"
    writer = pq.ParquetWriter(xt, pa.schema([("x", pa.list_(pa.float32(), width)), ("label", pa.int64())]))
    for s in range(0, rows, 65536):
        n = min(65536, rows - s)
        x = rng.normal(size=(n, width)).astype(np.float32)
        writer.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), width),
                                     "label": rng.integers(0, c, n)}), row_group_size=4096)
    writer.close()
    # Targets written straight through the store writer (random logits): labeling cost is not what we measure.
    cols = [{"name": "sample_id", "role": "sample_id", "teacher": None, "dtype": "int64", "shape": []},
            {"name": "label", "role": "label", "teacher": None, "dtype": "int64", "shape": []},
            {"name": "t0_logits", "role": "logits", "teacher": "t0", "dtype": "float32", "shape": [c]},
            {"name": "t0_logsumexp", "role": "logsumexp", "teacher": "t0", "dtype": "float32", "shape": []}]
    from kdstore.store import sha256_file
    from kdstore.store.manifest import FORMAT_VERSION

    shard = 65536
    with VersionWriter(tmp / "big", "wide", run_key="ab" * 8, fmt="parquet", columns=cols, shard_rows=shard,
                       row_group_rows=2048, shard_metadata={}) as w:
        labels = pq.read_table(xt, columns=["label"]).column("label").to_numpy()
        for i, s in enumerate(range(0, rows, shard)):
            n = min(shard, rows - s)
            z = rng.normal(size=(n, c)).astype(np.float32) * 3
            w.write(i, s, {"sample_id": np.arange(s, s + n, dtype=np.int64), "label": labels[s : s + n],
                           "t0_logits": z, "t0_logsumexp": np.log(np.exp(z).sum(1)).astype(np.float32)},
                    {})
        size = sum(f.stat().st_size for f in (w.staging / "data").glob("*.parquet"))
        w.commit({"format_version": FORMAT_VERSION, "kdstore_version": "bench", "parent": None, "num_rows": rows,
                  "num_classes": c, "class_names": None,
                  "storage": {"format": "parquet", "shard_rows": shard, "row_group_rows": 2048},
                  "teachers": [{"id": "t0", "source": "random", "kind": "factory", "weights": None,
                                "sha256": "0" * 64, "num_classes": c}],
                  "transfer_set": {"path": str(xt), "sha256": sha256_file(xt), "rows": rows, "format": "parquet",
                                   "inputs": {"columns": ["x"], "shape": [width], "dtype": "float32"},
                                   "label_column": "label", "kind": "original", "generator": None},
                  "targets": {"logits": {"dtype": "float32"}, "top_k": None, "logsumexp": {"dtype": "float32"},
                              "labels": True},
                  "columns": cols, "labeling": {"batch_size": 1, "device": "cpu", "precision": "fp32"},
                  "statistics": {"teachers": {}}})
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter() - t0, rss_mb()))
            time.sleep(0.25)

    th = threading.Thread(target=sample, daemon=True)
    before = rss_mb()
    th.start()
    cfg = TrainConfig(targets=str(tmp / "big" / "wide"), student=f"mlp:{width}-64-{c}", out=str(tmp / "run-big"),
                      losses="kd", temperatures=(4.0,), alphas=(0.9,), epochs=1, batch_size=512, data_mode="stream",
                      device=device)
    r = Trainer(cfg).run()[0]
    stop.set()
    th.join()
    rss = [m for _, m in samples]
    q = len(rss) // 4 or 1
    return {"store_gb": size / 1e9, "rows": rows, "epoch_s": r.epoch_seconds[0], "rss_before_mb": before,
            "rss_first_quarter_max_mb": max(rss[:q]), "rss_last_quarter_max_mb": max(rss[-q:]),
            "rss_peak_mb": max(rss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds after the warm-up round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--stream-gb", type=float, default=2.0, help="size of the store for the memory test (0 skips)")
    ap.add_argument("--sweep-epochs", type=int, default=10, help="epochs per temperature in the sweep estimate")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    keep_heap_between_steps(dev)  # what `kdstore train` sets, here from the start: the bare loops get it too
    tmp = Path(tempfile.mkdtemp(prefix="kdstore-bench-"))
    res: dict[str, object] = {"device": str(dev), "torch_threads": torch.get_num_threads(), "rounds": args.rounds}
    try:
        transfer = make_transfer(tmp / "mnist-like.parquet", args.rows)
        spec = make_teacher(tmp / "t.safetensors", [784, 1200, 1200, 10])
        t = time.perf_counter()
        label(LabelConfig(teachers=(spec,), transfer=str(transfer), out=str(tmp / "s"), name="m", top_k=10,
                          device=args.device, shard_rows=16384, row_group_rows=2048))
        label_s = time.perf_counter() - t
        store, loop = str(tmp / "s" / "m"), KDLoop(str(tmp / "s" / "m"), spec, dev)
        cases = {f"{mode}_{loss}": (lambda loss=loss, mode=mode:
                                    trainer_epoch(store, loss, mode, tmp / "r", args.device))
                 for mode in ("memory", "stream") for loss in ("hard", "kd")}
        cases.update(offline=lambda: loop.epoch(False), online=lambda: loop.epoch(True))
        t_ = interleaved(cases, rounds=args.rounds)  # type: ignore[arg-type]
        e = args.sweep_epochs
        sweep_off = [label_s + 5 * e * x for x in t_["offline"]]
        sweep_on = [5 * e * x for x in t_["online"]]
        res.update(rows=args.rows, label_s=label_s, epoch_s=t_, sweep5_offline_s=sweep_off, sweep5_online_s=sweep_on)
        print(f"device {dev}, torch threads {torch.get_num_threads()}, {args.rows} rows, student 784-800-800-10, "
              f"batch 128; {args.rounds} interleaved rounds after a warm-up; median (min-max) of each")
        for name, times in t_.items():
            print(f"  {name:<13} {median_spread(times)} s/epoch")
        print(f"  ratio kd/hard in memory          {median_spread(ratios(t_['memory_kd'], t_['memory_hard']))} "
              "(goal <= 1.05)")
        print(f"  ratio kd streamed/hard in memory {median_spread(ratios(t_['stream_kd'], t_['memory_hard']))} "
              "(goal <= 1.15)")
        print(f"  ratio kd/hard streamed           {median_spread(ratios(t_['stream_kd'], t_['stream_hard']))}")
        print(f"  online/offline KD per epoch (teacher 784-1200-1200-10 every step) "
              f"{median_spread(ratios(t_['online'], t_['offline']))}")
        print(f"  5-temperature sweep x {e} epochs from these epochs (label once {label_s:.1f} s): online/offline "
              f"{median_spread(ratios(sweep_on, sweep_off))}, median online {median(sweep_on):.1f} s vs offline "
              f"{median(sweep_off):.1f} s")
        if args.stream_gb > 0:
            m = streaming_memory(tmp, args.stream_gb, args.device)
            res["streaming_memory"] = m
            print(f"  streaming a {m['store_gb']:.2f} GB store ({m['rows']} rows x 1000 fp32 logits), one KD epoch "
                  f"{m['epoch_s']:.1f} s: RSS before {m['rss_before_mb']:.0f} MB, max in first quarter "
                  f"{m['rss_first_quarter_max_mb']:.0f} MB, max in last quarter {m['rss_last_quarter_max_mb']:.0f} MB, "
                  f"peak {m['rss_peak_mb']:.0f} MB")
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
