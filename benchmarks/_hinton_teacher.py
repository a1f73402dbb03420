"""The teacher of benchmarks/hinton_mnist.py, trained in a plain torch loop (dropout, jitter, max-norm), and
`--estimate`'s per-epoch timings. Everything after the teacher goes through kdstore's CLI."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._hinton_data import jitter, load_xy
from benchmarks._hinton_report import TEMPERATURES
from kdstore.store.files import sha256_file
from kdstore.students import MLP, max_norm_

TEACHER_SPEC = "mlp:784-1200-1200-10"
TEACHER_SPECS = {"mlp": TEACHER_SPEC, "lenet": "benchmarks._confidence_teachers:lenet"}


def teacher_model(cfg: dict[str, Any]) -> torch.nn.Module:
    """The paper's 784-1200-1200-10 MLP, or (`arch` lenet) benchmarks/_confidence_teachers.py's LeNet-style CNN
    with dropout `dropout` before its head and `input_dropout` after its convolutions: a teacher better than a
    student trained on shifted images, which #15's views goal needs and the CPU cannot get from the MLP."""
    if cfg.get("arch", "mlp") == "lenet":
        from benchmarks._confidence_teachers import LeNet

        return LeNet(cfg["dropout"], cfg["input_dropout"])
    return MLP([784, 1200, 1200, 10], dropout=cfg["dropout"], input_dropout=cfg["input_dropout"])
CHECKPOINT_SECONDS = 60.0  # teacher checkpoint interval


@torch.no_grad()
def errors_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> int:
    model.eval()
    wrong = 0
    for a in range(0, len(x), 4096):
        wrong += int((model(x[a : a + 4096].to(device)).argmax(1).cpu() != y[a : a + 4096]).sum())
    model.train()
    return wrong


def train_teacher(cfg: dict[str, Any], train: Path, test: Path, device: torch.device, out: Path) -> dict[str, Any]:
    """784-1200-1200-10 (or cfg arch lenet) with dropout, jitter and max-norm; writes teacher.safetensors and
    teacher.json.

    Checkpoints to OUT/checkpoint.pt at most once a minute and resumes from it when the config is the same
    (a command cut off by a time limit continues where it stopped)."""
    from safetensors.torch import save_file

    x, y = load_xy(train)
    xt, yt = load_xy(test)
    xd, yd = x.to(device), y.to(device)
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    model = teacher_model(cfg).to(device)
    if cfg.get("optimizer", "sgd") == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True)
    n, bs, epochs = len(x), cfg["batch_size"], cfg["epochs"]
    steps = math.ceil(n / bs)
    total, warm = epochs * steps, max(1, int(0.02 * epochs * steps))
    history: list[dict[str, Any]] = []
    t0, step, start, prior = time.perf_counter(), 0, 0, 0.0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state["config"] == cfg:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            start, history, prior = state["epoch"], state["history"], state["seconds"]
            step = start * steps
            print(f"  resuming the teacher after epoch {start} from {ckpt}")
    last_save = time.perf_counter()
    for epoch in range(start, epochs):
        te, ce = time.perf_counter(), time.process_time()
        perm = torch.randperm(n, generator=gen).to(device)
        shifts = torch.randint(0, 2 * cfg["jitter"] + 1, (2, n), generator=gen).to(device)
        xe, ye = jitter(xd[perm], cfg["jitter"], shifts), yd[perm]  # the epoch's jittered inputs, one gather
        loss_sum = torch.zeros((), device=device)
        for a in range(0, n, bs):
            lr = cfg["lr"] * (step + 1) / warm if step < warm else \
                cfg["lr"] * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = torch.nn.functional.cross_entropy(model(xe[a : a + bs]), ye[a : a + bs])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            max_norm_(model, cfg["max_norm"])
            loss_sum += loss.detach()
            step += 1
        seconds = time.perf_counter() - te
        line = {"epoch": epoch + 1, "loss": float(loss_sum) / steps, "seconds": seconds,
                "cpu_seconds": time.process_time() - ce}
        if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == epochs:
            line["test_errors"] = errors_of(model, xt, yt, device)
        history.append(line)
        print(f"  teacher epoch {epoch + 1:3d}/{epochs}  loss {line['loss']:.4f}  {seconds:5.1f} s "
              f"(CPU {line['cpu_seconds']:.1f} s)"
              + (f"  test errors {line['test_errors']}" if "test_errors" in line else ""), flush=True)
        if time.perf_counter() - last_save > CHECKPOINT_SECONDS and epoch + 1 < epochs:
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"config": cfg, "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        "epoch": epoch + 1, "history": history,
                        "seconds": prior + time.perf_counter() - t0}, out / "checkpoint.tmp")
            (out / "checkpoint.tmp").replace(ckpt)
            last_save = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "teacher.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights))
    info = {"config": cfg, "spec": TEACHER_SPECS[cfg.get("arch", "mlp")], "test_errors": history[-1]["test_errors"],
            "train_errors": errors_of(model, x, y, device), "seconds": prior + time.perf_counter() - t0,
            "epoch_seconds": [h["seconds"] for h in history], "history": history,
            "sha256": sha256_file(weights), "device": str(device)}
    (out / "teacher.json").write_text(json.dumps(info, indent=1))
    ckpt.unlink(missing_ok=True)
    return info


def _best_step_seconds(step: Any, repeats: int = 5, steps: int = 40) -> float:
    """Least seconds per step over `repeats` chunks of `steps` steps (the least-disturbed chunk on a shared
    machine), after a warm-up chunk."""
    for _ in range(5):
        step()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t) / steps)
    return best


def estimate(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time the steps of every phase on random data and extrapolate this command's wall time (no training)."""
    from kdstore import losses, targets

    rows, test_rows, no3_rows = a.train_rows or 60_000, 10_000, int(0.898 * (a.train_rows or 60_000))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    teacher = MLP([784, 1200, 1200, 10], dropout=0.5, input_dropout=0.2).to(device)
    opt_t = torch.optim.Adam(teacher.parameters(), lr=1e-3) if a.teacher_optimizer == "adam" else \
        torch.optim.SGD(teacher.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    xb, yb = torch.rand(100, 784, device=device), torch.randint(0, 10, (100,), device=device)
    shifts = torch.randint(0, 5, (2, 100), generator=gen).to(device)

    def teacher_step() -> None:
        loss = torch.nn.functional.cross_entropy(teacher(jitter(xb, 2, shifts)), yb)
        opt_t.zero_grad(set_to_none=True)
        loss.backward()
        opt_t.step()
        max_norm_(teacher, 3.5)
        sync()

    per: dict[str, float] = {"teacher_epoch": _best_step_seconds(teacher_step) * math.ceil(rows / 100)}
    teacher.eval()
    big = torch.rand(4096, 784, device=device)

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(big)
        sync()

    per["label_60k"] = _best_step_seconds(teacher_forward, 3, 3) * rows / 4096
    x128, y128 = torch.rand(128, 784, device=device), torch.randint(0, 10, (128,), device=device)
    z128 = torch.randn(128, 10, device=device) * 5
    for hidden_size in (800, 300, 30):
        student = MLP([784, hidden_size, hidden_size, 10]).to(device)
        opt_s = torch.optim.Adam(student.parameters(), lr=1e-3)

        def student_step(student: MLP = student, opt_s: torch.optim.Optimizer = opt_s) -> None:
            loss = losses.kd_loss(student(x128), targets.log_soft_targets(z128, 20.0), y128, temperature=20.0,
                                  alpha=0.9)
            opt_s.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            sync()

        def student_eval(student: MLP = student) -> None:
            with torch.no_grad():
                student(big)
            sync()

        per[f"student_{hidden_size}_epoch"] = _best_step_seconds(student_step) * math.ceil(rows / 128)
        per[f"student_{hidden_size}_eval_10k"] = _best_step_seconds(student_eval, 3, 3) * test_rows / 4096
    # runs per student size, as main() makes them (the T sweep is 5 runs; the no-3 run has ~10% fewer rows)
    n800 = 1 + (len(TEMPERATURES) if "tsweep" in a.experiments else 1) + ("alpha" in a.experiments) \
        + ("mse" in a.experiments) + 3 * ("topk" in a.experiments)
    small = "small" in a.experiments
    e = a.student_epochs

    def run_cost(h: int, n: int = rows) -> float:  # epochs x (train + eval on the test set) + agreement pass
        return e * (per[f"student_{h}_epoch"] * n / rows + per[f"student_{h}_eval_10k"]) \
            + per[f"student_{h}_eval_10k"] * n / test_rows

    total = {"teacher": a.teacher_epochs * per["teacher_epoch"],
             "label": per["label_60k"] * (1 + 0.898 * ("no3" in a.experiments)),
             "students_800": n800 * run_cost(800), "students_small": small * (2 * run_cost(300) + 3 * run_cost(30)),
             "students_no3": ("no3" in a.experiments) * run_cost(800, no3_rows)}
    return {"per_epoch_seconds": per, "phase_seconds": total, "total_seconds": sum(total.values()),
            "runs_800": n800, "device": str(device), "threads": torch.get_num_threads()}
