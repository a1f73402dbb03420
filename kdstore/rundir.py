"""A training run's directory: everything `kdstore train` writes, and how an interrupted run is picked up again.

    RUN/config.json           the options and where they ran; --resume refuses other options
    RUN/metrics.jsonl         one line per (sweep point, epoch), appended after the epoch's checkpoint
    RUN/summary.json          every finished sweep point so far (rewritten after each), the mean and SD over seeds,
                              and the best point by validation error when there is a validation set
    RUN/runs/<id>/checkpoint.pt              model + optimizer + epoch, while a point trains (weights_only load)
    RUN/runs/<id>/result.json                the point's RunResult: present means done, skipped on --resume
    RUN/runs/<id>/student.safetensors (+ student.json, how to load it)
    RUN/sweep.png             accuracy vs T, written by the CLI for sweeps; the best point by validation starred

Every file is written to a temporary name and renamed into place, so a kill leaves the old file or the new one.
Only the main rank calls the writing methods.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdstore.errors import ConfigError, arg
from kdstore.store.files import atomic_path, atomic_write_text


def run_id(loss: str, temperature: float, alpha: float, seed: int | None = None, standardize: bool = False) -> str:
    """The sweep point's directory name: ``kd-T4-a0.9`` (``kd-T4-a0.9-s1`` when seeds are swept, ``kd-std-T2-a0.9``
    with standardised logits); losses without T or alpha are just their name (``hard``, ``hard-s1``, ``mse-std``)."""
    name = f"{loss}-std" if standardize else loss
    base = name if loss in ("hard", "ls", "mse") else f"{name}-T{temperature:g}-a{alpha:g}"
    return base if seed is None else f"{base}-s{seed}"


@dataclass
class RunResult:
    run: str
    loss: str
    temperature: float
    alpha: float
    epochs: int
    eval_accuracy: float | None
    eval_errors: int | None
    eval_nll: float | None
    teacher_agreement: float
    train_seconds: float
    epoch_seconds: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    standardize: bool = False
    val_accuracy: float | None = None
    val_errors: int | None = None
    val_nll: float | None = None


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


METRICS = ("val_accuracy", "val_errors", "val_nll", "eval_accuracy", "eval_errors", "eval_nll", "teacher_agreement")


def over_seeds(results: list[RunResult],
               values: Callable[[RunResult], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One entry per (loss, standardize, T, alpha): its run id without the seed, the seeds, and the mean and
    sample SD of each metric over them (``<metric>_mean``, ``<metric>_sd``; a metric only where every seed has a
    number). `values` gives a run's metrics (default: the `METRICS` attributes; the LM trainer's, `lm_report`).

    A single run's test errors move by several errors from seed to seed, so comparing temperatures on one seed
    each can mislead; this is what a seed sweep (``--seed 0,1,2``) reports.
    """
    values = values or (lambda r: {key: getattr(r, key) for key in METRICS})
    groups: dict[tuple[str, bool, float, float], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.loss, r.standardize, r.temperature, r.alpha), []).append(r)
    out = []
    for (loss, std, t, a), rs in groups.items():
        entry: dict[str, Any] = {"run": run_id(loss, t, a, standardize=std), "loss": loss, "standardize": std,
                                 "temperature": t, "alpha": a, "seeds": [r.seed for r in rs]}
        per_run = [values(r) for r in rs]
        for key in per_run[0]:
            column = [v.get(key) for v in per_run]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in column):
                entry[f"{key}_mean"], entry[f"{key}_sd"] = _mean_sd([float(v) for v in column])
        out.append(entry)
    return out


def best_by_validation(results: list[RunResult]) -> dict[str, Any] | None:
    """The sweep point (over seeds) with the fewest mean validation errors, ties broken by the mean validation
    NLL; None when the runs have no validation set. The test set (``--eval``) plays no part in the choice."""
    scored = [g for g in over_seeds(results) if "val_errors_mean" in g]
    if not scored:
        return None
    return min(scored, key=lambda g: (g["val_errors_mean"], g.get("val_nll_mean", 0.0)))


class RunDir:
    """The files of one `kdstore train --out RUN`."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    def point(self, rid: str) -> Path:
        return self.out / "runs" / rid

    # -- the run as a whole --------------------------------------------------------------------------------------
    def prepare(self, record: dict[str, Any], resume: bool,
                upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        """Create RUN with config.json (`record`, whose "config" holds the options), or check it on --resume.

        `upgrade` turns the options of a run started by an earlier kdstore into today's fields (renamed options,
        options added since at their defaults) before they are compared."""
        cfg = record["config"]
        path = self.out / "config.json"
        if path.exists():
            if not resume:
                raise ConfigError(f"{arg('out')} {self.out} already holds a run; pass {arg('resume')} to continue it, "
                                  f"or choose another {arg('out')}")
            old = json.loads(path.read_text("utf-8")).get("config", {})
            if upgrade is not None:
                old = upgrade(old)
            if old != cfg:
                diff = sorted(k for k in cfg if old.get(k) != cfg[k])
                raise ConfigError(f"{arg('resume')}: {self.out} was started with other settings ({', '.join(diff)}); "
                                  f"rerun with the same options or choose another {arg('out')}")
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{arg('out')} {self.out}: cannot create it ({e.strerror})") from None
        atomic_write_text(path, json.dumps(record, indent=1))

    def append_metrics(self, line: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def truncate_metrics(self, rid: str, start_epoch: int) -> None:
        """Drop metrics lines of `rid` past its checkpoint (a kill between the checkpoint and the line)."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text("utf-8").splitlines()
        keep = [ln for ln in lines if not (json.loads(ln).get("run") == rid and json.loads(ln)["epoch"] > start_epoch)]
        if len(keep) != len(lines):
            atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))

    # -- one sweep point -------------------------------------------------------------------------------------------
    def result(self, rid: str) -> RunResult | None:
        """The finished point's result, or None while it is not finished."""
        done = self.point(rid) / "result.json"
        return RunResult(**json.loads(done.read_text("utf-8"))) if done.exists() else None

    def start(self, rid: str) -> None:
        self.point(rid).mkdir(parents=True, exist_ok=True)

    def load_checkpoint(self, rid: str, device: torch.device) -> dict[str, Any] | None:
        ckpt = self.point(rid) / "checkpoint.pt"
        return torch.load(ckpt, map_location=device, weights_only=True) if ckpt.exists() else None

    def save_checkpoint(self, rid: str, state: dict[str, Any]) -> None:
        with atomic_path(self.point(rid) / "checkpoint.pt") as tmp:
            torch.save(state, tmp)

    def finish(self, rid: str, weights: dict[str, Tensor], student: dict[str, Any], result: RunResult) -> None:
        """Write the student (safetensors + how to load it), drop the checkpoint, then mark the point done."""
        from safetensors.torch import save_file

        rdir = self.point(rid)
        state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        with atomic_path(rdir / "student.safetensors") as tmp:
            save_file(state, str(tmp))
        atomic_write_text(rdir / "student.json", json.dumps(student, indent=1))
        (rdir / "checkpoint.pt").unlink(missing_ok=True)
        atomic_write_text(rdir / "result.json", json.dumps(asdict(result), indent=1))


def plot_sweep(results: list[RunResult], path: Path, title: str) -> Path | None:
    """Accuracy vs temperature: one line per (loss, standardize, alpha) of the soft losses, a dashed level for each
    loss without T (hard, ls, mse); the mean over seeds, with a bar of +-1 SD when several were swept. Test
    accuracy (--eval) where measured, else validation accuracy; the best point by validation is starred. None if
    there is nothing to compare (fewer than two points)."""
    metric = ("eval_accuracy" if results and all(r.eval_accuracy is not None for r in results)
              else "val_accuracy" if results and all(r.val_accuracy is not None for r in results) else None)
    agg = over_seeds(results) if metric else []
    if len(agg) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    best, temps = best_by_validation(results), sorted({g["temperature"] for g in agg if g["loss"] in ("kd", "topk")})
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key in dict.fromkeys((g["loss"], g["standardize"], g["alpha"]) for g in agg):
        gs = sorted((g for g in agg if (g["loss"], g["standardize"], g["alpha"]) == key),
                    key=lambda g: g["temperature"])
        loss, std, alpha = key
        y = [100 * g[f"{metric}_mean"] for g in gs]
        err = [100 * g[f"{metric}_sd"] for g in gs] if any(len(g["seeds"]) > 1 for g in gs) else None
        label = loss + (" standardised" if std else "") + (f", alpha={alpha:g}" if loss in ("kd", "topk") else "")
        if loss in ("kd", "topk"):
            ax.errorbar([g["temperature"] for g in gs], y, yerr=err, marker="o", capsize=3, label=label)
        else:
            ax.axhline(y[0], linestyle="--", linewidth=1, color="grey" if loss == "hard" else None, label=label)
    if best is not None:
        x = best["temperature"] if best["loss"] in ("kd", "topk") else (temps[0] if temps else 1.0)
        ax.plot([x], [100 * best[f"{metric}_mean"]], marker="*", markersize=16, color="gold", markeredgecolor="k",
                linestyle="none", label=f"best by validation: {best['run']}")
    if temps:
        ax.set_xscale("log")
        ax.set_xticks(temps)  # the swept T, written plainly (not 2 x 10^1)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    return save_sweep_plot(fig, ax, path, title, ("test" if metric == "eval_accuracy" else "validation")
                           + " accuracy (%)", max(len(g["seeds"]) for g in agg))


def save_sweep_plot(fig: Any, ax: Any, path: Path, title: str, ylabel: str, seeds: int) -> Path:
    """Label (x: temperature; y: `ylabel`, with the seed count when > 1), title, grid and legend a sweep plot, and
    write it to `path` (classification and LM sweeps alike)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("temperature T")
    ax.set_ylabel(ylabel + (f", mean of {seeds} seeds" if seeds > 1 else ""))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
