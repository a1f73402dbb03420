"""`kdstore train`: a teacher-free trainer. One plain loop; the teacher never runs here.

For each sweep point (loss, standardize, temperature, alpha, seed): build the student, then per epoch
    batch -> teacher targets at T (precomputed in memory, or from stored logits / top-k) -> student -> loss ->
    backward -> step,
evaluate, log a line to metrics.jsonl, checkpoint; at the end measure the validation error (rows of the transfer
set held out by `--val-fraction`, or a `--val` file), which picks the best point without the test set. What the
run reads is `kdstore.plan`'s decision, soft targets are `kdstore.soft_targets`', batches `kdstore.data`'s, and
the files a run leaves behind (config, metrics, checkpoints, students, summary, and how --resume picks them up)
`kdstore.rundir`'s. Points trained together as a group (#18) run the same loop with a stacked student in
`kdstore.group_training`; `run` sends each group there.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdstore import distributed, ensemble, group_training, losses, soft_targets
from kdstore.data import TrainingData, check_holdout, memory_batches, open_training_data, split_memory
from kdstore.device import autocast, fused_optimizer, keep_heap_between_steps, resolve_device, resolve_precision
from kdstore.errors import TrainingDiverged, arg
from kdstore.evaluation import AGREEMENT_BATCH, EvalResult, agreement_counts, evaluate, load_eval_set
from kdstore.hints import HintedStudent, HintSpec, stored_features, with_hints
from kdstore.plan import plan_targets
from kdstore.replay import check_train_augment
from kdstore.rundir import RunDir, RunResult, best_by_validation, over_seeds
from kdstore.store import open_version
from kdstore.store.remote import resolve_any
from kdstore.students import build_student, count_parameters
from kdstore.train_config import DATA_MODES, EXECUTION, LOSSES, OPTIMIZERS, SCHEDULES, SweepPoint, TrainConfig
from kdstore.validation import Validation

__all__ = ["DATA_MODES", "LOSSES", "OPTIMIZERS", "SCHEDULES", "SweepPoint", "TrainConfig", "Trainer"]

Progress = Callable[[str, int, int], None]
# what a result's teacher_agreement was measured on (its extra["teacher_agreement_over"]), by whether it was counted
AGREEMENT_OVER = {True: "the last epoch's batches, as trained", False: "the transfer set, final weights"}
Batch = dict[str, Tensor]


class Trainer:
    """Trains one student per sweep point from stored targets. Build with a TrainConfig, call `run()`."""

    def __init__(self, config: TrainConfig) -> None:
        self.cfg = config
        self.out = Path(config.out)
        self.rundir = RunDir(self.out)
        self.dist, self.device = distributed.init(resolve_device(config.device))
        keep_heap_between_steps(self.device)
        self.precision = resolve_precision(config.precision, self.device)
        version = open_version(resolve_any(config.targets))
        self.plans = {loss: plan_targets(version.manifest, loss=loss, top_k=config.top_k, tail=config.tail,
                                         alphas=[p.alpha for p in config.sweep() if p.loss == loss],
                                         ensemble=config.ensemble, where=str(version.ref))
                      for loss in config.losses}
        self.plan = self.plans[config.losses[0]]  # the teachers, and how agreement with them is measured
        self.weights = ensemble.normalise_weights(config.teacher_weights or None, len(self.plan.teachers))
        self.replay = check_train_augment(config.augment, version.manifest, config.losses, str(version.ref))
        self.holdout = check_holdout(version, config.val_fraction, config.val_seed)
        need = set().union(*(p.need for p in self.plans.values())) | ({"label"} if self.holdout else set())
        self.hints = [HintSpec.parse(h) for h in config.hints]
        self.hint_features = stored_features(self.hints, version.manifest, str(version.ref)) if self.hints else []
        self.data = open_training_data(version, need=sorted(need), teachers=self.plan.teachers,
                                       transfer=config.transfer, features=[f.column for f in self.hint_features])
        self.num_classes = self.data.num_classes
        self.input_shape = tuple(version.manifest["transfer_set"]["inputs"]["shape"])
        self.eval_set = None if not config.eval else load_eval_set(
            config.eval, input_columns=config.eval_input_columns, label_column=config.eval_label_column,
            input_shape=self.input_shape, num_classes=self.num_classes)
        self.train_rows = self.data.num_samples - (self.holdout.rows if self.holdout else 0)
        self.validation = Validation.open(self.data, self.holdout, config.val, self.input_shape, self.train_rows)
        self._build_student()  # fail on a bad --student now, before --out is created
        self.mode = _data_mode(config, self.data)
        self.group_size, self.group_note = group_training.group_size(self)
        keep = tuple(self.replay.param_names) if self.replay and self.replay.stored else ()
        keep += tuple(f"feature:{f.column}" for f in self.hint_features) + ("teacher_top1",)
        self._views = soft_targets.ViewCache(self.plans, self.weights, keep)  # see _views_for

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self, progress: Progress | None = None, resume: bool = False) -> list[RunResult]:
        """Train every sweep point; write outputs under `out`. Returns one RunResult per point."""
        self._prepare_out(resume)
        memory = self.data.to_memory(self.device) if self.mode == "memory" else None
        if memory is not None and self.holdout is not None:
            memory, self.validation.memory = split_memory(memory, self.holdout)
        if memory is not None:  # every view carries it (ViewCache keep): the last epoch counts agreement for free
            memory["teacher_top1"] = soft_targets.memory_top1(memory, self.plan, self.weights)
        results: list[RunResult] = []
        points = self.cfg.sweep()
        for a in range(0, len(points), self.group_size):
            group = points[a : a + self.group_size]
            if len(group) == 1:
                results.append(self._train_point(group[0], memory, progress))
            else:
                results += group_training.train_group(self, group, memory, progress)
            if self.dist.is_main:
                self.rundir.write_summary(_summary(self.cfg, self.data.version.ref, self.data.version.manifest,
                                                   results, self.validation.info()))
        return results

    def _train_point(self, point: SweepPoint, memory: Batch | None, progress: Progress | None) -> RunResult:
        rid = self.cfg.run_id(point)
        self.dist.barrier()  # rank 0 may have just written result.json / checkpoint.pt
        finished = self.rundir.result(rid)
        if finished is not None:
            return finished
        if self.dist.is_main:
            self.rundir.start(rid)
        model, opt, start_epoch, epoch_seconds = self._start(rid, point.seed)
        net = _parallel(model, self.dist.active, self.device)
        view = self._views_for(memory, [point])[0] if memory is not None else None
        t0, ev, agreement = time.perf_counter(), None, None
        model.train()
        for epoch in range(start_epoch, self.cfg.epochs):
            te = time.perf_counter()
            train_loss, agreement = self._epoch(net, model, opt, view, epoch, point, rid, progress)
            epoch_seconds.append(time.perf_counter() - te)
            ev = self.evaluate(model) if self._due(self.cfg.eval_every, epoch) else None
            if self.dist.is_main and self._due(self.cfg.checkpoint_every, epoch):
                self.rundir.save_checkpoint(rid, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                  "epoch": epoch, "epoch_seconds": epoch_seconds})
            self._log_epoch(rid, point, epoch, train_loss, opt, epoch_seconds[-1], ev)
        return self._finish(rid, point, model, memory, time.perf_counter() - t0, epoch_seconds, agreement, ev,
                            counted=agreement is not None)

    def _epoch(self, net: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, view: Batch | None, epoch: int,
               point: SweepPoint, rid: str, progress: Progress | None) -> tuple[float, float | None]:
        """One pass over the data; returns the mean training loss over every rank's rows and, in the last epoch
        under --agreement last-epoch, the share of rows where the student's argmax (as trained) was the teacher's."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        agree = torch.zeros((), dtype=torch.int64, device=self.device)
        rows, world, count = 0, self.dist.world_size, self.counts_agreement(epoch)
        point_loss = functools.partial(self.loss, point=point)
        steps = math.ceil(self.train_rows / self.cfg.batch_size)
        with _join(net, self.dist.active and view is None):
            for step, (batch, n_global) in enumerate(self._batches(view, epoch, point.seed)):
                self._set_lr(opt, epoch, step, steps)
                n_local = len(batch["x"])
                if n_local:
                    with autocast(self.device, self.precision):
                        out = net(batch["x"])
                    loss = with_hints(model, point_loss, out, batch, epoch, self.cfg.hint_epochs)
                    if count:
                        agree += (out.detach().float().argmax(-1) == self.teacher_top1(batch)).sum()
                else:  # a rank with no rows in the last global batch still joins the gradient all-reduce
                    loss = sum(p.sum() * 0.0 for p in model.parameters())  # type: ignore[assignment]
                # DDP averages gradients over ranks; weighting by n_local / n_global * world makes the update the
                # gradient of the mean over the whole global batch, however its rows were split.
                scale = n_local * world / max(n_global, 1) if self.dist.active else 1.0
                opt.zero_grad(set_to_none=True)
                (loss * scale).backward()
                opt.step()
                total += loss.detach().double() * n_local
                rows += n_local
                if progress and self.dist.is_main:
                    progress(rid, epoch, n_global)
        loss_sum, row_sum, agree_sum = self.dist.sum(float(total), float(rows), float(agree))
        train_loss = loss_sum / max(row_sum, 1)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(self._diverged(rid, f"the loss became {train_loss} in epoch {epoch + 1}"))
        return train_loss, agree_sum / max(row_sum, 1) if count else None

    def counts_agreement(self, epoch: int) -> bool:
        """Whether `epoch`'s training batches count the agreement with the teacher (--agreement last-epoch): free,
        where a pass with the final weights costs a forward over the transfer set (1/(3 x epochs) of the training)."""
        return self.cfg.agreement == "last-epoch" and epoch + 1 == self.cfg.epochs

    def _due(self, every: int, epoch: int) -> bool:
        """Whether a per-epoch task with cadence `every` (--eval-every, --checkpoint-every) runs after `epoch`: every
        `every`-th epoch and the last."""
        return (epoch + 1) % every == 0 or epoch + 1 == self.cfg.epochs

    def loss(self, student_logits: Tensor, batch: Batch, point: SweepPoint) -> Tensor:
        """The point's loss on one batch (a precomputed view's targets, or stored targets softened here)."""
        c, std, t, alpha = self.cfg, point.standardize, point.temperature, point.alpha
        if point.loss == "hard":
            return losses.hard_loss(student_logits, batch["label"])
        if point.loss == "ls":
            return losses.label_smoothing_loss(student_logits, batch["label"], smoothing=c.smoothing)
        if point.loss == "mse":
            target = batch["mse_target"] if "mse_target" in batch else soft_targets.mse_target(batch, self.weights)
            return losses.mse_logit_loss(student_logits, target, zero_mean=c.zero_mean, standardize=std)
        logp = (batch["teacher_logp"] if "teacher_logp" in batch
                else soft_targets.batch_log_probs(batch, t, self.plans[point.loss], self.weights, std))
        return losses.kd_loss(student_logits, logp, batch.get("label") if alpha < 1 else None,
                              temperature=t, alpha=alpha, standardize=std)

    # -- data ------------------------------------------------------------------------------------------------------
    def _batches(self, memory: Batch | None, epoch: int, seed: int,
                 batch_size: int | None = None) -> Iterator[tuple[Batch, int]]:
        """(this rank's batch, rows in the global batch): in-memory index selections, or streamed from disk (the
        held-out validation rows left out either way); of --batch-size rows unless `batch_size` says otherwise."""
        bs, rank, world = batch_size or self.cfg.batch_size, self.dist.rank, self.dist.world_size
        if memory is not None:
            yield from memory_batches(memory, bs, seed=seed, epoch=epoch, rank=rank, world_size=world,
                                      replay=self.replay)
            return
        # Streaming: each rank reads a disjoint set of row groups (uneven counts are handled with DDP's join).
        ds = self.data.stream(max(1, bs // world), seed=seed, rank=rank, world_size=world, holdout=self.holdout,
                              replay=self.replay)
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, len(batch["x"]) * world

    def _views_for(self, memory: Batch, points: list[SweepPoint]) -> list[Batch]:
        """The in-memory training views of points (soft_targets.ViewCache: one per (loss, standardize, T, alpha))."""
        return self._views.get(memory, [(p.loss, p.standardize, p.temperature, p.alpha) for p in points])

    # -- students, optimizers, measurements ----------------------------------------------------------------------
    def _build_student(self) -> nn.Module:
        """The student (with --hint, wrapped with its hint regressors: `kdstore.hints.HintedStudent`)."""
        student = build_student(self.cfg.student, self.input_shape, self.num_classes)
        if self.hints:
            student = HintedStudent(student, self.hints, self.hint_features, torch.zeros(2, *self.input_shape))
        return student.to(self.device)

    def _start(self, rid: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, int, list[float]]:
        """A new student and optimizer for a point, or both restored from the point's checkpoint."""
        torch.manual_seed(seed)
        model = self._build_student()
        opt = self._optimizer(model.parameters())
        state = self.rundir.load_checkpoint(rid, self.device)
        if state is None:
            return model, opt, 0, []
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["epoch"]) + 1
        if self.dist.is_main:
            self.rundir.truncate_metrics(rid, start)
        return model, opt, start, [float(s) for s in state["epoch_seconds"]]

    def _optimizer(self, params: Any) -> torch.optim.Optimizer:
        return _optimizer(params, self.cfg)

    def _set_lr(self, opt: torch.optim.Optimizer, epoch: int, step: int, steps: int) -> None:
        for group in opt.param_groups:
            group["lr"] = _lr_at(self.cfg, epoch, step, steps)

    def _log_epoch(self, rid: str, point: SweepPoint, epoch: int, train_loss: float, opt: torch.optim.Optimizer,
                   seconds: float, ev: EvalResult | None) -> None:
        """The epoch's line in metrics.jsonl (rank 0 writes it)."""
        if self.dist.is_main:
            self.rundir.append_metrics(_metrics_line(rid, point, epoch, train_loss, opt, seconds, ev))

    def evaluate(self, model: nn.Module) -> EvalResult | None:
        """(accuracy, errors, mean NLL) on the --eval set, or None without one."""
        return None if self.eval_set is None else evaluate(model, *self.eval_set, self.device, self.precision)

    def agreement(self, model: nn.Module, memory: Batch | None) -> float:
        """Fraction of transfer rows where the student's argmax equals the (ensembled) teacher's."""
        # the order does not matter here, and forward passes over large batches cost less per row
        batches = (b for b, _ in self._batches(memory, 0, self.cfg.seeds[0], AGREEMENT_BATCH))
        agree, total = agreement_counts(model, batches, self.teacher_top1, self.device, self.precision)
        agree_all, total_all = self.dist.sum(agree, total)
        return agree_all / max(total_all, 1)

    def teacher_top1(self, batch: Batch) -> Tensor:
        return soft_targets.teacher_top1(batch, self.plan, self.weights)

    def _finish(self, rid: str, point: SweepPoint, model: nn.Module, memory: Batch | None, seconds: float,
                epoch_seconds: list[float], agreement: float | None = None, ev: EvalResult | None = None,
                counted: bool = False) -> RunResult:
        """The point's result, student and files. `agreement` (`counted` on the last epoch's batches, else a pass of
        the final weights) and `ev` (the last epoch's evaluation, of the same weights) are measured here when not
        given."""
        ev, val = ev or self.evaluate(model), self.validation.evaluate(model, self.device, self.precision)
        if any(e and not math.isfinite(e.nll) for e in (ev, val)):
            raise TrainingDiverged(self._diverged(rid, "the trained student's outputs are not finite"))
        if agreement is None:
            agreement, counted = self.agreement(model, memory), False
        student = model.student if isinstance(model, HintedStudent) else model  # saved without hint regressors
        result = _run_result(rid, point, self.cfg.epochs, ev, val, agreement, seconds, epoch_seconds,
                             {"parameters": count_parameters(student), "world_size": self.dist.world_size,
                              "teacher_agreement_over": AGREEMENT_OVER[counted]})
        if self.dist.is_main:
            info = _student_info(self.cfg, self.num_classes, str(self.data.version.ref), result)
            self.rundir.finish(rid, student.state_dict(), info, result)
        return result

    def _diverged(self, rid: str, what: str) -> str:
        return (f"run {rid}: {what}; lower {arg('lr')} (now {self.cfg.lr:g}) and train into a new {arg('out')}, "
                "or check the stored targets")

    # -- the run directory (kdstore.rundir writes it) --------------------------------------------------------------
    def _prepare_out(self, resume: bool) -> None:
        try:
            if self.dist.is_main:
                sources = sorted({p.source for p in self.plans.values()})
                self.rundir.prepare({"config": json.loads(json.dumps(asdict(self.cfg))),
                                     "targets": str(self.data.version.ref), "mode": self.mode,
                                     "device": str(self.device), "precision": self.precision,
                                     "source": ", ".join(sources), "validation": self.validation.info(),
                                     "grouping": {"group_size": self.group_size, "why": self.group_note},
                                     "torch_version": torch.__version__}, resume,
                                    functools.partial(_upgrade, self.cfg))
        finally:
            self.dist.barrier()


def _data_mode(c: TrainConfig, data: TrainingData) -> str:
    """--data-mode, with auto resolved: in memory when the inputs fit --memory-limit-gb, else streamed."""
    mode = c.data_mode
    if mode == "auto":
        mode = "memory" if data.input_bytes_estimate() < c.memory_limit_gb * 2**30 else "stream"
    return mode


def _run_result(rid: str, point: SweepPoint, epochs: int, ev: EvalResult | None, val: EvalResult | None,
                agreement: float, seconds: float, epoch_seconds: list[float], extra: dict[str, Any]) -> RunResult:
    """A finished point's RunResult: its sweep point, the --eval and validation measurements, agreement, times."""
    return RunResult(rid, point.loss, point.temperature, point.alpha, epochs,
                     ev.accuracy if ev else None, ev.errors if ev else None, ev.nll if ev else None,
                     agreement, seconds, epoch_seconds, extra, point.seed,
                     point.standardize, val.accuracy if val else None, val.errors if val else None,
                     val.nll if val else None)


def _upgrade(cfg: TrainConfig, old: dict[str, Any]) -> dict[str, Any]:
    """A run directory's options in today's fields, with the options that change only how the run executes
    (EXECUTION: --group-size, --checkpoint-every) taken from this command (`cfg`): --resume accepts other values."""
    new = TrainConfig.upgrade_record(old)
    new.update({k: getattr(cfg, k) for k in EXECUTION})
    return new


def _lr_at(c: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """The learning rate at `step` of `steps` in `epoch`: constant, or cosine from --lr down to 0 over the run."""
    if c.schedule == "constant":
        return c.lr
    progress = (epoch + step / max(steps, 1)) / c.epochs
    return c.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _student_info(c: TrainConfig, num_classes: int, targets: str, result: RunResult) -> dict[str, Any]:
    """student.json: what the student is and how to load it."""
    return {"student": c.student, "num_classes": num_classes, "loss": result.loss, "standardize": result.standardize,
            "temperature": result.temperature, "alpha": result.alpha, "seed": result.seed, "targets": targets,
            "load": f"kdstore.students.build_model({c.student!r}).load_state_dict("
                    "safetensors.torch.load_file('student.safetensors'))"}


def _summary(c: TrainConfig, ref: object, manifest: dict[str, Any], results: list[RunResult],
             validation: dict[str, Any] | None) -> dict[str, Any]:
    """summary.json: the teacher's statistics, every finished point (with mean and SD over seeds), the validation
    set and the best point by validation error."""
    stats = manifest["statistics"]
    summary = {"targets": str(ref), "student": c.student, "teacher": stats["teachers"],
               "ensemble": stats.get("ensemble"), "runs": [asdict(r) for r in results]}
    if len(c.seeds) > 1:
        summary["over_seeds"] = over_seeds(results)
    if validation is not None:
        summary["validation"] = validation
        summary["best_by_validation"] = best_by_validation(results)
    return summary


def _optimizer(params: Any, c: TrainConfig) -> torch.optim.Optimizer:
    if c.optimizer == "sgd":
        return fused_optimizer(torch.optim.SGD, params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                               nesterov=c.momentum > 0)
    cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
    return fused_optimizer(cls, params, lr=c.lr, weight_decay=c.weight_decay)


def _metrics_line(rid: str, point: SweepPoint, epoch: int, train_loss: float, opt: torch.optim.Optimizer,
                  seconds: float, ev: EvalResult | None) -> dict[str, Any]:
    line = {"run": rid, "temperature": point.temperature, "alpha": point.alpha, "seed": point.seed,
            "epoch": epoch + 1, "train_loss": train_loss, "lr": opt.param_groups[0]["lr"], "seconds": seconds}
    if ev:
        line.update(eval_accuracy=ev.accuracy, eval_errors=ev.errors, eval_nll=ev.nll)
    return line


def _parallel(model: nn.Module, active: bool, device: torch.device) -> nn.Module:
    """The model wrapped in DDP under torchrun, else itself."""
    if not active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _join(net: nn.Module, uneven: bool) -> Any:
    """DDP's join context for uneven per-rank batch counts (streaming); a no-op otherwise."""
    return net.join() if uneven else contextlib.nullcontext()  # type: ignore[operator]
