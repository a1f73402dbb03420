"""`kdstore train`: train students from stored targets, at any temperature, without the teacher."""

from __future__ import annotations

from pathlib import Path

import click

from kdstore import options
from kdstore.cli._common import FLOATS, INTS, SWITCHES, ChoiceList, group_size_option, progress_bar, user_errors
from kdstore.options import DATA_MODES, ENSEMBLES, LM_LOSSES, LOSSES, OPTIMIZERS, PRECISIONS, SCHEDULES, TAIL_MODELS


@click.command("train")
@click.option("--targets", required=True, metavar="STORE/NAME[@vN]",
              help="Stored targets: STORE/NAME (latest version) or STORE/NAME@vN.")
@click.option("--student", required=True, metavar="SPEC",
              help="mlp:IN-H-...-C, cnn:HxW[xC]-C, or package.module:factory returning an nn.Module. Per-token "
                   "(language-model) targets: gpt:LAYERS-DIM-HEADS, hf:DIR (a Hugging Face config or model) or a "
                   "factory.")
@click.option("--loss", "losses", type=ChoiceList(tuple(dict.fromkeys((*LOSSES, *LM_LOSSES)))), default="kd",
              show_default=True,
              metavar="LOSS[,LOSS...]",
              help="kd: Hinton 2015 alpha*T^2*CE(soft)+(1-alpha)*CE(hard); topk: KD on the stored top-k "
                   "(Tang 2020); mse: L2 on logits (Ba & Caruana 2014); hard: labels only; ls: label smoothing. "
                   "Per-token targets: topk (default; the exact tail), sampled (Anshumann 2025), hard (true next "
                   "tokens), rkl (reverse KL to the top-k rebuild) or jsd (generalised JSD, Agarwal 2024; "
                   "--jsd-beta), with default T 1, alpha 1 and --batch-size 16 (sequences); --eval STORE/NAME is a "
                   "held-out labeled version. "
                   "A list (hard,kd) joins the sweep: with --val-fraction one command shows whether distillation "
                   "beats the labels.")
@click.option("--standardize", type=SWITCHES, default="off", is_flag=False, flag_value="on", show_default=True,
              metavar="[on|off|off,on]",
              help="Logit standardisation (Sun et al. 2024): z-score each row of the teacher's and the student's "
                   "logits before the temperature, so the teacher's logit scale no longer matters (for kd and "
                   "topk; for mse: L2 between z-scored rows). Alone it means on; off,on sweeps both. Measured best "
                   "with --alpha 1 and T 0.5-2 (docs/benchmarks.md); the student then learns which class, not how "
                   "sure: its raw probabilities are not calibrated.")
@click.option("--temperature", "-T", "temperatures", type=FLOATS, default="4", show_default=True, metavar="T[,T...]",
              help="Softmax temperature(s); a list runs a sweep, one student each.")
@click.option("--alpha", "alphas", type=FLOATS, default="0.9", show_default=True, metavar="A[,A...]",
              help="Weight of the soft term in [0, 1]; 1 uses no labels. A list joins the sweep.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True,
              help="Adam, AdamW (LM students: always AdamW) or Nesterov SGD; PyTorch's fused kernel where the device "
                   "has one (CPU, CUDA), its foreach kernel elsewhere.")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum (Nesterov).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default="cosine", show_default=True)
@click.option("--seed", "seeds", type=INTS, default="0", show_default=True, metavar="S[,S...]",
              help="Seed(s) of the student's initialisation and batch order; a list trains each sweep point once "
                   "per seed and reports the mean and SD over seeds.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Autocast for the student: auto = bf16 on CUDA, fp32 on CPU.")
@click.option("--eval", "eval_path", metavar="PATH", help="Labeled evaluation set (.parquet/.npz/.h5).")
@click.option("--eval-input-column", "eval_input_columns", multiple=True, help="Input column(s) of --eval.")
@click.option("--eval-label-column", default=None, help="Label column of --eval (default: label / y).")
@click.option("--val-fraction", type=float, default=None, metavar="F",
              help="Hold out this share of the labeled transfer set (chosen by a hash of sample_id, the same rows "
                   "for every sweep point and data path) to measure each run's validation error; the table, "
                   "summary.json and the plot mark the best run by it, not by --eval.")
@click.option("--val", "val", metavar="PATH",
              help="Or: a labeled validation file with the transfer set's columns (train on every transfer row).")
@click.option("--val-seed", type=int, default=0, show_default=True, help="Which rows --val-fraction holds out.")
@click.option("--augment", metavar="SPEC",
              help="Fresh augmented views every epoch, for hard-label losses (e.g. shift:2 or crop:0.35-1,flip): "
                   "the baseline beside students distilled from views a version stores (label --views N --augment "
                   "SPEC), whose views train replays without this option.")
@click.option("--transfer", metavar="PATH", help="The transfer set, if it moved since labeling (fingerprint-checked).")
@click.option("--top-k", type=int, default=None,
              help="For --loss topk (per-token targets: also rkl, jsd): use the K largest (<= stored k).")
@click.option("--jsd-beta", type=float, default=None, metavar="B",
              help="Per-token --loss jsd: the teacher's weight in the mixture m = B*teacher + (1-B)*student, in "
                   "(0, 1); default 0.5 (symmetric). Near 0 it acts as forward KL, near 1 as reverse KL.")
@click.option("--tail", type=click.Choice(TAIL_MODELS), default=None,
              help="Top-k tail model: uniform (stored default) or drop (renormalise over the top-k).")
@click.option("--ensemble", default="mean-prob", show_default=True,
              help=f"Combine several stored teachers: {', '.join(ENSEMBLES)}, or one member (t0, t1, ...).")
@click.option("--teacher-weights", type=FLOATS, default=None, metavar="W,W,...",
              help="Per-teacher weights for the ensemble.")
@click.option("--smoothing", type=float, default=0.1, show_default=True, help="For --loss ls.")
@click.option("--zero-mean/--no-zero-mean", default=True, show_default=True,
              help="For --loss mse: zero-mean each row of logits first.")
@click.option("--data", "data_mode", type=click.Choice(DATA_MODES), default="auto",
              show_default=True, help="memory: whole set on the device; stream: read row groups from disk.")
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader workers when streaming.")
@click.option("--group-size", default="auto", show_default=True, metavar="N|auto",
              help="Sweep points trained together in one pass (stacked weights, one optimizer step; each point as "
                   "if alone, up to float rounding): auto groups up to 16 as memory allows (language-model "
                   "students: on CUDA only); 1 trains them one by one.")
@click.option("--eval-every", type=int, default=1, show_default=True, metavar="N",
              help="Evaluate on --eval every N epochs (and after the last).")
@click.option("--checkpoint-every", type=int, default=1, show_default=True, metavar="N",
              help="Checkpoint every N epochs (and after the last); --resume restarts from the latest.")
@click.option("--agreement", type=click.Choice(options.AGREEMENT), default="last-epoch", show_default=True,
              help="How the results' agree% (top-1 agreement with the teacher on the transfer set) is measured: "
                   "last-epoch counts it on the last epoch's training batches as they are trained (free; the "
                   "weights still move within that epoch); final runs each finished student over the transfer set "
                   "once more (exact; a forward pass, about 1/(3 x epochs) of the training time).")
@click.option("--hint", "hints", multiple=True, metavar="LAYER:MODULE[:WEIGHT]",
              help="FitNets hint: the student's module MODULE (a name in its named_modules(), e.g. layers.3) learns "
                   "the teacher's stored feature LAYER (labeled with --features) through a learned regressor (a "
                   "convolution from a feature map to a teacher map stored whole, else linear); its loss (MSE in "
                   "units of the feature's variance) times WEIGHT [1] is added to the "
                   "logit loss. Repeat for several layers. A language model's attention maps (TinyBERT): "
                   "attn:model.layers.N:blocks.M[:WEIGHT] compares block M's attention probabilities with them.")
@click.option("--hint-epochs", type=int, default=0, show_default=True, metavar="N",
              help="FitNets' two stages: the first N epochs train on the hints alone (the layers below each hinted "
                   "module and the regressors), the rest on the logit loss plus the hints.")
@click.option("--out", required=True, metavar="RUN", help="Run directory (config, metrics, checkpoints, plot).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out (same options).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors(aliases={"loss": "--loss"})
def train(targets: str, student: str, losses: tuple[str, ...], standardize: tuple[bool, ...],
          temperatures: tuple[float, ...], alphas: tuple[float, ...], epochs: int, batch_size: int, lr: float,
          optimizer: str, momentum: float, weight_decay: float, schedule: str, seeds: tuple[int, ...], device: str,
          precision: str, eval_path: str | None, eval_input_columns: tuple[str, ...], eval_label_column: str | None,
          val_fraction: float | None, val: str | None, val_seed: int, augment: str | None, transfer: str | None,
          top_k: int | None, jsd_beta: float | None,
          tail: str | None, ensemble: str, teacher_weights: tuple[float, ...] | None, smoothing: float,
          zero_mean: bool, data_mode: str, num_workers: int, group_size: str, eval_every: int,
          checkpoint_every: int, agreement: str, hints: tuple[str, ...], hint_epochs: int, out: str, resume: bool,
          quiet: bool) -> None:
    """Train students on stored teacher targets: no teacher runs, and the points of a sweep (temperatures,
    alphas, seeds, losses) train together in one pass over the data, each as if alone (--group-size).

    \b
    Example (Hinton et al. 2015, MNIST):
      kdstore train --targets ./targets/mnist-t1200 --student mlp:784-800-800-10 --loss kd \\
          --temperature 1,2,5,10,20 --alpha 0.9 --epochs 30 --eval test.parquet --out runs/sweep1

    Single runs differ by a few test errors from seed to seed; --seed 0,1,2 trains every point three times and
    adds the mean and SD over seeds to the table, summary.json and the plot.

    \b
    Did distillation help? Hard labels beside standardised KD, chosen on held-out rows (what `kdstore label`
    advises; a list of losses, standardize values, temperatures and alphas is one sweep):
      kdstore train --targets ./targets/mnist-t1200 --student mlp:784-300-300-10 --loss hard,kd \\
          --standardize on -T 0.5,1,2 --alpha 1 --val-fraction 0.1 --seed 0,1,2 --eval test.parquet --out runs/check

    \b
    Augmentation: a version labeled with --views N --augment SPEC replays one stored view per row each epoch
    (its parameters applied to the input, its targets as the soft labels); the hard-label baseline with the
    same augmentation draws fresh views:
      kdstore train --targets ./targets/mnist-views --student mlp:784-800-800-10 --loss kd -T 5 --alpha 1 ...
      kdstore train --targets ./targets/mnist --student mlp:784-800-800-10 --loss hard --augment shift:2 ...

    \b
    Hints (FitNets): a version labeled with --features layers.1 lets a thin, deep student learn the teacher's
    middle layer as well as its outputs:
      kdstore train --targets ./targets/mnist-feat --student mlp:784-100-100-100-100-10 --loss kd \
          --hint layers.1:layers.2 ...

    Writes RUN/config.json, RUN/metrics.jsonl (per epoch), RUN/summary.json, RUN/runs/<id>/student.safetensors
    and, for sweeps, RUN/sweep.png; prints one results table.
    """
    from kdstore.lm_training import is_per_token

    if is_per_token(targets):  # a language-model version: kdstore.lm_training (kdstore/cli/_train_lm.py)
        from kdstore.cli._train_lm import train_language_model

        return train_language_model(click.get_current_context())
    if jsd_beta is not None:
        raise click.UsageError(f"--jsd-beta: only for --loss jsd on per-token targets, and {targets} holds "
                               "classification targets; drop it")
    from kdstore.rundir import plot_sweep
    from kdstore.training import TrainConfig, Trainer

    cfg = TrainConfig(
        targets=targets, student=student, out=out, losses=losses, standardize=standardize,
        temperatures=temperatures, alphas=alphas,
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
        weight_decay=weight_decay, schedule=schedule, seeds=seeds, device=device, precision=precision,
        eval=eval_path, eval_input_columns=eval_input_columns, eval_label_column=eval_label_column,
        transfer=transfer, top_k=top_k, tail=tail, ensemble=ensemble, teacher_weights=teacher_weights or (),
        smoothing=smoothing, zero_mean=zero_mean, data_mode=data_mode, num_workers=num_workers, val=val,
        val_fraction=val_fraction, val_seed=val_seed, augment=augment, group_size=group_size_option(group_size),
        eval_every=eval_every, checkpoint_every=checkpoint_every, agreement=agreement, hints=hints,
        hint_epochs=hint_epochs,
    )
    trainer = Trainer(cfg)
    quiet = quiet or not trainer.dist.is_main  # under torchrun, rank 0 alone reports
    total = len(cfg.sweep()) * cfg.epochs * trainer.train_rows
    try:
        with progress_bar(total, "train", "rows", disable=quiet) as bar:
            results = trainer.run(progress=lambda rid, epoch, n: bar.update(n), resume=resume)
    except KeyboardInterrupt:  # the generic message says "rerun the same command"; train needs --resume
        raise click.ClickException(f"interrupted; finished epochs are checkpointed in {out}: rerun the same "
                                   "command with --resume to continue") from None
    if not trainer.dist.is_main:
        return
    click.echo(format_results(trainer, results))
    plot = plot_sweep(results, Path(out) / "sweep.png", f"{student} on {trainer.data.version.ref}")
    click.echo(f"outputs in {out}/ (summary.json, metrics.jsonl, runs/*/student.safetensors"
               + (", sweep.png" if plot else "") + ")")


def format_results(trainer: object, results: list) -> str:  # type: ignore[type-arg]
    """One table: T, alpha, validation errors, accuracy, errors, NLL, agreement with the teacher (the best run by
    validation starred); then, when several seeds were swept, the mean +- SD over seeds of each point; then which
    point validation chose and whether it beat the hard-label runs."""
    from kdstore.rundir import best_by_validation, over_seeds
    from kdstore.training import Trainer

    assert isinstance(trainer, Trainer)
    stats = trainer.data.version.manifest["statistics"]
    best = best_by_validation(results)
    key = None if best is None else (best["loss"], best["standardize"], best["temperature"], best["alpha"])
    val = best is not None
    lines = [f"{'run':<24} {'T':>5} {'alpha':>5}" + (f" {'val err':>7}" if val else "")
             + f" {'acc%':>7} {'errors':>6} {'NLL':>7} {'agree%':>7} {'s/epoch':>7}"]
    for r in results:
        acc = f"{100 * r.eval_accuracy:7.2f}" if r.eval_accuracy is not None else f"{'-':>7}"
        err = f"{r.eval_errors:6d}" if r.eval_errors is not None else f"{'-':>6}"
        nll = f"{r.eval_nll:7.4f}" if r.eval_nll is not None else f"{'-':>7}"
        per = sum(r.epoch_seconds) / max(len(r.epoch_seconds), 1)
        name = ("*" if (r.loss, r.standardize, r.temperature, r.alpha) == key else "") + r.run
        lines.append(f"{name:<24} {r.temperature:5g} {r.alpha:5g}" + (f" {r.val_errors:7d}" if val else "")
                     + f" {acc} {err} {nll} {100 * r.teacher_agreement:7.2f} {per:7.2f}")
    overs = sorted({r.extra.get("teacher_agreement_over") for r in results} - {None})
    if overs:
        lines.append(f"agree%: top-1 agreement with the teacher, over {' / '.join(overs)}"
                     + (" (--agreement final: a pass of the final weights over the transfer set)"
                        if trainer.cfg.agreement == "last-epoch" else ""))
    if len(trainer.cfg.seeds) > 1:
        lines.append("mean +- SD over seeds:")
        lines += [_seed_line(g) for g in over_seeds(results)]
    if best is not None:
        lines += _choice_lines(best, over_seeds(results))
    teachers = ", ".join(f"{t}: {100 * s['accuracy']:.2f}% on the transfer set" for t, s in stats["teachers"].items()
                         if s.get("accuracy") is not None)
    if teachers:
        lines.append(f"teacher {teachers}")
    return "\n".join(lines)


def _seed_line(g: dict) -> str:  # type: ignore[type-arg]
    seeds = ",".join(map(str, g["seeds"]))
    val = f"val errors {g['val_errors_mean']:.1f} +- {g['val_errors_sd']:.1f}, " if "val_errors_mean" in g else ""
    if "eval_accuracy_mean" in g:
        return (f"  {g['run']:<22} seeds {seeds}: {val}acc {100 * g['eval_accuracy_mean']:.2f} +- "
                f"{100 * g['eval_accuracy_sd']:.2f}%, errors {g['eval_errors_mean']:.1f} +- "
                f"{g['eval_errors_sd']:.1f}, agree {100 * g['teacher_agreement_mean']:.2f}%")
    return (f"  {g['run']:<22} seeds {seeds}: {val}agree {100 * g['teacher_agreement_mean']:.2f} +- "
            f"{100 * g['teacher_agreement_sd']:.2f}% (no --eval set)")


def _choice_lines(best: dict, groups: list) -> list[str]:  # type: ignore[type-arg]
    """The best point by validation (*), and how it compares with the hard-label runs of the same sweep."""
    n = len(best["seeds"])
    over = f" (mean of {n} seeds)" if n > 1 else ""
    test = f"; its test errors {best['eval_errors_mean']:.1f}" if "eval_errors_mean" in best else ""
    out = [f"* best by validation: {best['run']}, {best['val_errors_mean']:.1f} validation errors{over}{test}"]
    hard = next((g for g in groups if g["loss"] == "hard"), None)
    if hard is None or hard is best:
        if hard is best:
            out.append("  no distilled run beat the hard labels on validation: this teacher has little to give "
                       "this student here (try --standardize, other temperatures, or a stronger teacher)")
        return out
    gain = hard["val_errors_mean"] - best["val_errors_mean"]
    pct = 100 * gain / max(hard["val_errors_mean"], 1e-9)
    out.append(f"  hard labels: {hard['val_errors_mean']:.1f} validation errors; the chosen run makes {gain:.1f} "
               f"({pct:.1f}%) fewer")
    return out
