"""Hinton et al. 2015's MNIST 800-800 student, distilled with logit standardisation (Sun et al. 2024), 3 seeds.

The teacher is benchmarks/hinton_mnist.py's (784-1200-1200-10, dropout 0.2 / 0.5, inputs jittered by up to 2
pixels, max-norm 3.5, Adam 1e-3 with warm-up and cosine), trained for --teacher-epochs; it labels the paper's
unshifted 60k transfer set ONCE with `kdstore label`; then two `kdstore train` calls, 3 seeds each, train the
800-800 student on (a) hard labels and plain KD at --plain-t (alpha 0.9, the recipe of docs/benchmarks.md), and
(b) standardised KD at --std-t (alpha --std-alpha), with the same optimiser, schedule and epochs (Adam 1e-3,
cosine, batch 128, fp32, no regularisation).
No validation split here: the paper's transfer set is all 60k rows. The table reports the mean +- SD of the
test errors and the share of the hard-to-teacher gap each mean closes.

Run: python benchmarks/hinton_standardized.py --threads 1 --teacher-epochs 30 --student-epochs 15 --std-t 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks._hinton_teacher import TEACHER_SPEC, train_teacher  # noqa: E402
from benchmarks.hinton_mnist import kdstore, label_once  # noqa: E402
from kdstore.rundir import RunResult, over_seeds  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--student-epochs", type=int, default=15)
    ap.add_argument("--plain-t", default="5")
    ap.add_argument("--std-t", default="0.5")
    ap.add_argument("--std-alpha", default="1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data-dir", type=Path, default=HERE / "data")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "hinton_std")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    train, test = a.data_dir / "mnist_train.parquet", a.data_dir / "mnist_test.parquet"
    tcfg = {"epochs": a.teacher_epochs, "optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "batch_size": 100,
            "dropout": 0.5, "input_dropout": 0.2, "jitter": 2, "max_norm": 3.5, "seed": 0, "train": train.name,
            "eval_every": 5}
    tdir = a.out / "teacher"
    info_path = tdir / "teacher.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else None
    if info is None or info["config"] != tcfg:
        info = train_teacher(tcfg, train, test, torch.device("cpu"), tdir)
    ref = label_once(a.out / "targets", "mnist-t1200", f"{TEACHER_SPEC}@{tdir / 'teacher.safetensors'}", train,
                     info["sha256"], "cpu")
    common = ["--targets", ref, "--student", "mlp:784-800-800-10", "--epochs", str(a.student_epochs),
              "--seed", a.seeds, "--lr", "1e-3", "--optimizer", "adam", "--schedule", "cosine",
              "--batch-size", "128", "--precision", "fp32", "--device", "cpu", "--eval", str(test), "--quiet",
              "--resume"]
    runs: list[dict[str, Any]] = []
    for name, extra in (("plain", ["--loss", "hard,kd", "-T", a.plain_t, "--alpha", "0.9"]),
                        ("std", ["--loss", "kd", "--standardize", "-T", a.std_t, "--alpha", a.std_alpha])):
        kdstore(["train", *common, *extra, "--out", str(a.out / "students" / name)])
        runs += json.loads((a.out / "students" / name / "summary.json").read_text())["runs"]
    groups = over_seeds([RunResult(**r) for r in runs])
    teacher, hard = info["test_errors"], next(g for g in groups if g["loss"] == "hard")["eval_errors_mean"]
    lines = [f"teacher {TEACHER_SPEC}, {a.teacher_epochs} epochs: {teacher} test errors",
             "| 800-800 student | seeds | test errors | mean ± SD | gap closed by the mean |", "|---|---|---|---|---|"]
    for g in groups:
        errs = " / ".join(str(r["eval_errors"]) for r in runs if r["run"].rsplit("-s", 1)[0] == g["run"])
        closed = "" if g["loss"] == "hard" else f"{100 * (hard - g['eval_errors_mean']) / (hard - teacher):.0f}%"
        lines.append(f"| {g['run']} | {','.join(map(str, g['seeds']))} | {errs} | "
                     f"{g['eval_errors_mean']:.1f} ± {g['eval_errors_sd']:.1f} | {closed} |")
    res = {"settings": {k: str(v) for k, v in vars(a).items()}, "teacher": {k: v for k, v in info.items()
                                                                            if k != "history"},
           "targets": ref, "runs": runs, "over_seeds": groups, "table": "\n".join(lines)}
    (a.out / "hinton_std_results.json").write_text(json.dumps(res, indent=1))
    print(res["table"])
    return res


if __name__ == "__main__":
    main()
