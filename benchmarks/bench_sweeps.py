"""A temperature sweep, side by side in one run: kdstore's points trained one by one and grouped, a plain-torch loop
over the same precomputed targets, and an online-KD loop (teacher forward every step).

The sweep is #18's: a 784-1200-1200-10 teacher labels an MNIST-shaped transfer set once (synthetic data, see
`benchmarks._common.make_transfer`), then five 784-800-800-10 students learn from it at T = 1, 2, 5, 10, 20 (alpha
0.9, Adam 1e-3, batch 128), with an --eval set of rows/6 evaluated every epoch as `kdstore train` does by default.
Every case runs once per round, in turn, after a warm-up round (`_common.interleaved`); every ratio is reported as
the median and the spread (min-max) of its per-round values.

    student epoch   wall time of the training loop per student per epoch (kdstore: the `epoch_seconds` it reports;
                    grouped points share an epoch's time equally)
    overhead        the part of a kdstore sweep's wall time outside the training loop: start-up (opening and loading
                    the store), evaluation, checkpoints, teacher agreement, result files; kdstore's defaults (evaluate
                    and checkpoint every epoch, agreement counted in the last epoch) and, "grouped_end", with
                    --eval-every and --checkpoint-every set to the epochs (once, at the end)
    hard / kd       one kdstore point with hard labels in memory, with KD in memory and KD streamed from disk
    optimizer       the bare loops use the Adam kernel kdstore uses (`kdstore.device.fused_optimizer`: fused where
                    the device has one), so the ratios compare loops, not kernels; "online_foreach" is the online
                    loop with PyTorch's default (foreach) Adam, as an online-KD framework runs out of the box

Run: python -m benchmarks.bench_sweeps [--rows 60000] [--epochs 3] [--rounds 3] [--threads 1] [--json out.json]
     [--cases grouped_end,plain,online]   (a subset; the ratios of cases not run are left out)
     python -m benchmarks.bench_sweeps --device cuda --points 16   (#18's GPU goal: a 16-point grouped sweep of the
     800-800 student against one point, wall time, same rounds; no plain or online loops)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._common import interleaved, make_teacher, make_transfer, median, median_spread, ratios
from kdstore.data import open_training_data
from kdstore.device import fused_optimizer, keep_heap_between_steps
from kdstore.labeling import LabelConfig, label
from kdstore.students import MLP
from kdstore.teachers import load_teacher
from kdstore.training import TrainConfig, Trainer

TEMPS = (1.0, 2.0, 5.0, 10.0, 20.0)
ALPHA = 0.9
STUDENT = [784, 800, 800, 10]


class Sweeps:
    """The cases; each returns its wall time and records its per-student-epoch time in `epoch`."""

    def __init__(self, store: str, eval_path: str, teacher: str, epochs: int, device: str) -> None:
        self.store, self.eval_path, self.epochs, self.device = store, eval_path, epochs, torch.device(device)
        self.tmp = Path(tempfile.mkdtemp(prefix="kdstore-sweeps-"))
        self.epoch: dict[str, list[float]] = {}
        self.overhead: dict[str, list[float]] = {}
        data = open_training_data(store, need=("logits", "label")).to_memory(self.device)
        self.x, self.y, self.z = data["x"], data["label"], data["logits"][:, 0].float()
        self.teacher = load_teacher(teacher).module.to(self.device).eval()
        self.runs = 0

    def kdstore(self, name: str, group_size: int | None, losses: str = "kd", temps: tuple[float, ...] = TEMPS,
                mode: str = "memory", evaluate: bool = True, cadence: int = 1) -> float:
        """One `kdstore train` sweep (in this process); `cadence` is its --eval-every and --checkpoint-every."""
        self.runs += 1
        cfg = TrainConfig(targets=self.store, student="mlp:" + "-".join(map(str, STUDENT)),
                          out=str(self.tmp / f"run{self.runs}"), losses=losses, temperatures=temps, alphas=(ALPHA,),
                          epochs=self.epochs, batch_size=128, lr=1e-3, data_mode=mode, device=str(self.device),
                          eval=self.eval_path if evaluate else None, group_size=group_size, eval_every=cadence,
                          checkpoint_every=cadence)
        t = time.perf_counter()
        results = Trainer(cfg).run()
        wall = time.perf_counter() - t
        train = sum(sum(r.epoch_seconds) for r in results)
        self.epoch.setdefault(name, []).append(train / (len(results) * self.epochs))
        self.overhead.setdefault(name, []).append((wall - train) / wall)
        shutil.rmtree(cfg.out, ignore_errors=True)
        return wall

    def plain(self, name: str, online: bool, fused: bool = True) -> float:
        """Five students one after another in a bare loop: targets precomputed per T (offline) or the teacher's
        forward every step (online); no evaluation, no checkpoints. Adam with the kernel kdstore uses (fused where
        the device has it), or with `fused` False PyTorch's default (foreach), as an online-KD framework runs it."""
        t0, loops = time.perf_counter(), 0.0
        n = len(self.x)
        for temp in TEMPS:
            torch.manual_seed(0)
            student = MLP(STUDENT).to(self.device)
            opt = (fused_optimizer(torch.optim.Adam, student.parameters(), lr=1e-3) if fused
                   else torch.optim.Adam(student.parameters(), lr=1e-3))
            logp = None if online else torch.log_softmax(self.z / temp, dim=1)
            t = time.perf_counter()
            for epoch in range(self.epochs):
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).to(self.device)
                for a in range(0, n, 128):
                    idx = perm[a : a + 128]
                    x, y = self.x[idx], self.y[idx]
                    if online:
                        with torch.no_grad():
                            target = torch.log_softmax(self.teacher(x) / temp, dim=1)
                    else:
                        target = logp[idx]  # type: ignore[index]
                    s = student(x)
                    soft = -(target.exp() * torch.log_softmax(s / temp, dim=1)).sum(1).mean() * temp**2
                    loss = ALPHA * soft + (1 - ALPHA) * F.cross_entropy(s, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            loops += time.perf_counter() - t
        self.epoch.setdefault(name, []).append(loops / (len(TEMPS) * self.epochs))
        return time.perf_counter() - t0


def _labeled(args: argparse.Namespace, tmp: Path) -> tuple[Sweeps, float]:
    """The synthetic transfer and eval sets, the teacher, its one labeling run (timed) and the sweeps over it."""
    transfer = make_transfer(tmp / "mnist-like.parquet", args.rows)
    eval_path = make_transfer(tmp / "eval.parquet", max(args.rows // 6, 1), seed=0)
    spec = make_teacher(tmp / "t.safetensors", [784, 1200, 1200, 10])
    t = time.perf_counter()
    label(LabelConfig(teachers=(spec,), transfer=str(transfer), out=str(tmp / "s"), name="m", top_k=10,
                      device=args.device, shard_rows=16384, row_group_rows=2048))
    label_s = time.perf_counter() - t
    return Sweeps(str(tmp / "s" / "m"), str(eval_path), spec, args.epochs, args.device), label_s


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    keep_heap_between_steps(torch.device(args.device))  # what `kdstore train` sets: every case, bare loops too
    tmp = Path(tempfile.mkdtemp(prefix="kdstore-bench-sweeps-"))
    try:
        s, label_s = _labeled(args, tmp)
        cases = {
            "separate": lambda: s.kdstore("separate", 1),
            "grouped": lambda: s.kdstore("grouped", None),
            "grouped_end": lambda: s.kdstore("grouped_end", None, cadence=args.epochs),
            "plain": lambda: s.plain("plain", online=False),
            "online": lambda: s.plain("online", online=True),
            "online_foreach": lambda: s.plain("online_foreach", online=True, fused=False),
            "hard": lambda: s.kdstore("hard", 1, losses="hard", temps=(4.0,), evaluate=False),
            "kd": lambda: s.kdstore("kd", 1, temps=(4.0,), evaluate=False),
            "kd_stream": lambda: s.kdstore("kd_stream", 1, temps=(4.0,), mode="stream", evaluate=False),
        }
        unknown = set(args.cases or ()) - set(cases)
        if unknown:
            raise SystemExit(f"--cases: unknown {sorted(unknown)}; expected some of {', '.join(cases)}")
        walls = interleaved({k: v for k, v in cases.items() if not args.cases or k in args.cases},
                            rounds=args.rounds)
        per_epoch = {k: v[-args.rounds :] for k, v in s.epoch.items()}  # the warm-up round left out
        overhead = {k: v[-args.rounds :] for k, v in s.overhead.items()}
        shutil.rmtree(s.tmp, ignore_errors=True)
        return {"rows": args.rows, "epochs": args.epochs, "rounds": args.rounds, "threads": args.threads,
                "device": args.device, "label_s": label_s, "wall_s": walls, "student_epoch_s": per_epoch,
                "overhead_share": overhead}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_points(args: argparse.Namespace) -> list[str]:
    """Wall time of one point against `args.points` points trained as one group (T from 1 to 20)."""
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="kdstore-bench-sweeps-"))
    try:
        s, _ = _labeled(args, tmp)
        temps = tuple(1.0 + 19.0 * i / max(args.points - 1, 1) for i in range(args.points))
        walls = interleaved({"one": lambda: s.kdstore("one", None, temps=(4.0,)),
                             "group": lambda: s.kdstore("group", args.points, temps=temps)}, rounds=args.rounds)
        shutil.rmtree(s.tmp, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [f"{args.rows} rows, {args.epochs} epochs on {args.device}, {args.rounds} rounds: one point "
            f"{median_spread(walls['one'])} s, {args.points} points grouped {median_spread(walls['group'])} s; "
            f"ratio {median_spread(ratios(walls['group'], walls['one']))} (goal <= 2)"]


def report(r: dict[str, Any]) -> list[str]:
    """The table; a ratio whose cases were not run (--cases) is left out."""
    w, e, o = r["wall_s"], r["student_epoch_s"], r["overhead_share"]
    sweep = {k: [v + r["label_s"] for v in w[k]] for k in ("separate", "grouped", "grouped_end") if k in w}

    def ratio(label: str, num: dict[str, list[float]], a: str, den: dict[str, list[float]], b: str,
              goal: str = "") -> list[str]:
        return [f"  {label:<44}{median_spread(ratios(num[a], den[b]))}{goal}"] if a in num and b in den else []

    def share(label: str, case: str, goal: str = "") -> list[str]:
        return [f"  {label:<44}{median_spread(o[case])}{goal}"] if case in o else []

    return [
        f"{r['rows']} rows, {r['epochs']} epochs, {r['rounds']} interleaved rounds after a warm-up, "
        f"{r['threads']} torch thread(s) on {r['device']}; label once {r['label_s']:.1f} s",
        "seconds per student epoch, median (min-max):",
        *[f"  {k:<10} {median_spread(v)}" for k, v in e.items()],
        "ratios per round, median (min-max):",
        *ratio("student epoch, grouped / plain torch", e, "grouped", e, "plain", "  (goal <= 1.05)"),
        *ratio("student epoch, grouped at the end / plain", e, "grouped_end", e, "plain"),
        *ratio("student epoch, separate / plain torch", e, "separate", e, "plain"),
        *ratio("sweep wall, grouped / separate", w, "grouped", w, "separate"),
        *share("overhead share of the sweep, grouped", "grouped", "  (goal < 0.05)"),
        *share("overhead share of the sweep, separate", "separate"),
        *share(f"overhead share, grouped, evaluated and checkpointed at the end (--eval-every and "
               f"--checkpoint-every {r['epochs']})  ", "grouped_end", "  (goal < 0.05)"),
        *ratio("KD / hard labels, in memory (epoch)", e, "kd", e, "hard", "  (goal <= 1.05)"),
        *ratio("KD streamed / hard in memory (epoch)", e, "kd_stream", e, "hard", "  (goal <= 1.15)"),
        *ratio("online KD / plain offline (epoch)", e, "online", e, "plain"),
        *ratio("online sweep / (label + grouped sweep)", w, "online", sweep, "grouped", "  (goal >= 1.5)"),
        *ratio("online sweep / (label + separate sweep)", w, "online", sweep, "separate"),
        *ratio("online sweep, PyTorch's default Adam kernel / (label + grouped sweep)  ", w, "online_foreach", sweep,
               "grouped"),
        *ratio("online sweep / (label + grouped, evaluated at the end)  ", w, "online", sweep, "grouped_end",
               "  (goal >= 1.5)"),
        "  (median sweep walls: " + ", ".join(f"{k} {median(v):.1f} s" for k, v in w.items()) + ")",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--points", type=int, default=0, help="only compare one point with this many grouped")
    ap.add_argument("--cases", type=lambda v: v.split(","), default=None,
                    help="only these cases, comma-separated (default: all; ratios of cases not run are left out)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.points:
        print("\n".join(run_points(args)))
        return
    r = run(args)
    print("\n".join(report(r)))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
