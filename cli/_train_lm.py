"""The language-model side of `kdstore train`: a version of per-token targets trains with `kdstore.lm_training`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from kdstore.cli._common import group_size_option, progress_bar
from kdstore.lm_report import lm_over_seeds, plot_lm_sweep

# Options of `kdstore train` that mean nothing for per-token targets: refused when given, so a run never silently
# ignores what was asked for.
CLASSIFICATION_ONLY = ("standardize", "eval_input_columns", "eval_label_column", "val", "augment", "transfer", "tail",
                       "ensemble", "teacher_weights", "smoothing", "zero_mean", "momentum", "num_workers",
                       "eval_every", "checkpoint_every",  # an LM run measures and checkpoints every epoch
                       "agreement",  # an LM's agreement is measured on held-out text (lm_evaluation)
                       "hint_epochs")  # FitNets' stage 1: classification students only for now
# Defaults that differ for language models (the classification ones are Hinton's MNIST settings).
LM_DEFAULTS = {"temperatures": (1.0,), "alphas": (1.0,), "batch_size": 16, "losses": ("topk",)}


def train_language_model(ctx: click.Context) -> None:
    """Run `kdstore train` on a per-token version with the command's options (`ctx.params`)."""
    from kdstore.lm_training import LMTrainConfig, LMTrainer

    p = dict(ctx.params)
    given = {n for n in p if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)}
    bad = [option_label(ctx, n) for n in CLASSIFICATION_ONLY if n in given]
    if p["optimizer"] == "sgd":
        bad.append("--optimizer sgd")
    if bad:
        raise click.UsageError(f"{', '.join(bad)}: not used with per-token targets ({p['targets']} is a language-model "
                               "version); drop them")
    for name, value in LM_DEFAULTS.items():
        if name not in given:
            p[name] = value
    cfg = LMTrainConfig(
        targets=p["targets"], student=p["student"], out=p["out"], losses=p["losses"], temperatures=p["temperatures"],
        alphas=p["alphas"], seeds=p["seeds"], epochs=p["epochs"], batch_size=p["batch_size"], lr=p["lr"],
        weight_decay=p["weight_decay"], schedule=p["schedule"], device=p["device"], precision=p["precision"],
        top_k=p["top_k"], val_fraction=p["val_fraction"], val_seed=p["val_seed"], eval=p["eval_path"],
        data_mode=p["data_mode"], jsd_beta=p["jsd_beta"], hints=tuple(p.get("hints") or ()),
        group_size=group_size_option(p["group_size"]))
    trainer = LMTrainer(cfg)
    total = len(cfg.sweep()) * cfg.epochs * len(trainer.train_rows)
    quiet = p["quiet"] or not trainer.dist.is_main  # under torchrun, rank 0 alone reports
    try:
        with progress_bar(total, "train", "rows", disable=quiet) as bar:
            results = trainer.run(progress=lambda rid, epoch, n: bar.update(n), resume=p["resume"])
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted; finished epochs are checkpointed in {cfg.out}: rerun the same "
                                   "command with --resume to continue") from None
    if not trainer.dist.is_main:
        return
    click.echo(format_lm_results(results))
    plot = plot_lm_sweep(results, Path(cfg.out) / "sweep.png", f"{cfg.student} on {trainer.version.ref}")
    click.echo(f"outputs in {cfg.out}/ (summary.json, metrics.jsonl, runs/*/student.safetensors"
               + (", sweep.png" if plot else "") + ")")


def option_label(ctx: click.Context, name: str) -> str:
    """How parameter `name` of the command is spelled on the command line."""
    return next((o for p in ctx.command.params if p.name == name for o in p.opts if o.startswith("--")), name)


def _f(x: Any, fmt: str) -> str:
    width = int(fmt.split(".")[0] or 0)
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "-".rjust(width)


def format_lm_results(results: list[Any]) -> str:
    """One line per run: held-out perplexity and KL to the teacher (the held-out rows; the --eval version), top-1
    agreement with the teacher, training tokens/s; the best by held-out NLL starred."""
    scored = [r for r in results if r.val_nll is not None]
    best = min(scored, key=lambda r: r.val_nll).run if scored else None
    lines = [f"{'run':<24} {'T':>4} {'alpha':>5} {'val ppl':>8} {'val KL':>7} {'eval ppl':>8} {'eval KL':>7} "
             f"{'agree%':>6} {'tok/s':>7}"]
    for r in results:
        e = r.extra
        name = ("*" if r.run == best else "") + r.run
        lines.append(f"{name:<24} {r.temperature:4g} {r.alpha:5g} {_f(e.get('val_perplexity'), '8.2f')} "
                     f"{_f(e.get('val_kl_teacher'), '7.4f')} {_f(e.get('eval_perplexity'), '8.2f')} "
                     f"{_f(e.get('eval_kl_teacher'), '7.4f')} {_f(100 * r.teacher_agreement, '6.2f')} "
                     f"{_f(e.get('tokens_per_second'), '7.0f')}")
    groups = lm_over_seeds(results)
    if any(len(g["seeds"]) > 1 for g in groups):
        lines.append("mean +- SD over seeds:")
        for g in groups:
            parts = [f"{label} {g[m + '_mean']:{fmt}} +- {g[m + '_sd']:{fmt}}" for m, label, fmt in (
                ("val_perplexity", "val ppl", ".2f"), ("val_kl_teacher", "val KL", ".4f"),
                ("eval_perplexity", "eval ppl", ".2f"), ("eval_kl_teacher", "eval KL", ".4f"),
                ("tokens_per_second", "tok/s", ".0f")) if m + "_mean" in g]
            lines.append(f"  {g['run']:<22} seeds {','.join(map(str, g['seeds']))}: " + ", ".join(parts))
    return "\n".join(lines)
