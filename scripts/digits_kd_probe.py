#!/usr/bin/env python
"""Probe: does distilling from the embedded digits teacher help small students? (throwaway)

Trains small MLP students on ``kdstore/datasets/digits_train.parquet`` either on hard labels
(plain cross-entropy) or with Hinton's loss from the teacher's stored logits

    alpha * T^2 * CE(softmax(t/T), softmax(s/T)) + (1 - alpha) * CE(y, s)

and prints test accuracy (mean +- std over seeds) and wall time per run. The teacher
(``digits_teacher.safetensors``) is run once, in eval mode, over the un-augmented train split,
as kdstore does. No regularisation on students; Adam, constant lr.

Usage:
    python scripts/digits_kd_probe.py [--students 64-32-10,64-16-10] [--temps 2,4,8]
        [--alpha 0.9] [--epochs 30,60] [--seeds 3] [--lr 1e-3] [--batch-size 64] [--threads 0]
        [--train-rows N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kdstore.students import MLP

DATA = Path(__file__).resolve().parents[1] / "kdstore" / "datasets"


def load_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    t = pq.read_table(path)
    x = t.column("image").combine_chunks().flatten().to_numpy().reshape(-1, 64).astype(np.float32)
    return torch.from_numpy(x.copy()), torch.from_numpy(t.column("label").to_numpy().astype(np.int64))


def train_student(sizes, x, y, logits, T, alpha, epochs, lr, bs, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MLP(sizes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(y)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            out = model(x[idx])
            hard = F.cross_entropy(out, y[idx])
            if logits is None:
                loss = hard
            else:
                soft_t = F.softmax(logits[idx] / T, dim=1)
                soft = -(soft_t * F.log_softmax(out / T, dim=1)).sum(1).mean()
                loss = alpha * T * T * soft + (1 - alpha) * hard
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", default="64-32-10,64-16-10")
    ap.add_argument("--temps", default="2,4,8")
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--epochs", default="30,60")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-rows", type=int, default=0,
                    help="students see only the first N train rows (0 = all; the teacher saw all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    x_tr, y_tr = load_split(DATA / "digits_train.parquet")
    x_te, y_te = load_split(DATA / "digits_test.parquet")
    teacher = MLP([64, 256, 256, 10])
    teacher.load_state_dict(load_file(str(DATA / "digits_teacher.safetensors")))
    teacher.eval()
    with torch.no_grad():
        t_logits = teacher(x_tr)
        t_test = (teacher(x_te).argmax(1) == y_te).float().mean().item()
    print(f"teacher: train acc {(t_logits.argmax(1) == y_tr).float().mean().item():.4f}  "
          f"test acc {t_test:.4f}  threads={torch.get_num_threads()}")
    for T in [float(t) for t in args.temps.split(",")]:
        p = F.softmax(t_logits / T, 1)
        ent = -(p * p.clamp_min(1e-12).log()).sum(1).mean().item()
        print(f"  T={T:g}: mean teacher max-prob {p.max(1).values.mean().item():.3f}, entropy {ent:.3f} nats")

    if args.train_rows > 0:
        x_tr, y_tr, t_logits = x_tr[: args.train_rows], y_tr[: args.train_rows], t_logits[: args.train_rows]
        print(f"students train on the first {args.train_rows} rows, per class "
              f"{torch.bincount(y_tr, minlength=10).tolist()}")
    print(f"\n{'student':<12}{'epochs':>7}  {'target':<10}{'test acc mean':>14}"
          f"{'std':>8}  {'per-seed':<26}{'s/run':>7}")
    for spec in args.students.split(","):
        sizes = [int(s) for s in spec.split("-")]
        for epochs in [int(e) for e in args.epochs.split(",")]:
            configs = [("hard", None)] + [(f"KD T={t}", float(t)) for t in args.temps.split(",")]
            for name, T in configs:
                accs, times = [], []
                for seed in range(args.seeds):
                    t0 = time.perf_counter()
                    m = train_student(sizes, x_tr, y_tr, None if T is None else t_logits, T, args.alpha,
                                      epochs, args.lr, args.batch_size, seed)
                    times.append(time.perf_counter() - t0)
                    with torch.no_grad():
                        accs.append((m(x_te).argmax(1) == y_te).float().mean().item())
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                per = " ".join(f"{a:.4f}" for a in accs)
                print(f"mlp:{spec:<8}{epochs:>7}  {name:<10}{statistics.mean(accs):>14.4f}{sd:>8.4f}  "
                      f"{per:<26}{statistics.mean(times):>7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
