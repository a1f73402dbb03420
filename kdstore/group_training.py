"""A group of sweep points trained in one pass (#18): the grouped loop beside `Trainer`'s one-point loop.

The same loop as `Trainer._train_point`, with a stacked student (`kdstore.grouped.StudentGroup`) and one loss per
point: per step one batch per distinct seed, one stacked forward, each point's loss on its slice of the outputs, one
backward of their sum and one optimizer step. Evaluation, checkpoints, metrics lines, students and results stay per
point and in the ungrouped format. These functions take the `Trainer` whose data, config, run directory and loss they
use; `group_size` decides how many points share a pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdstore import grouped
from kdstore.device import autocast
from kdstore.errors import TrainingDiverged
from kdstore.evaluation import AGREEMENT_BATCH, EvalResult
from kdstore.rundir import RunResult
from kdstore.train_config import SweepPoint

if TYPE_CHECKING:
    from kdstore.training import Progress, Trainer

Batch = dict[str, Tensor]

__all__ = ["group_size", "train_group", "train_in_passes"]


def group_size(tr: Trainer) -> tuple[int, str]:
    """Points per pass and why: --group-size, or automatic (up to grouped.AUTO_MAX, bounded by memory); 1 under
    torchrun and for students a stacked forward cannot run."""
    c, n = tr.cfg, len(tr.cfg.sweep())
    if c.group_size == 1 or n == 1:
        return 1, "one point at a time"
    refusal = ("under torchrun every point trains alone: DDP's gradient all-reduce (and join for uneven streams) "
               "wraps one module" if tr.dist.active else
               "hints (--hint) capture the student's modules with hooks, which a stacked forward does not run"
               if tr.hints else
               grouped.group_refusal(tr._build_student(), torch.zeros(2, *tr.input_shape, device=tr.device)))
    settled = grouped.settled_size(c.group_size, n, c.student, refusal)
    if settled is not None:
        return settled
    budget = (torch.cuda.mem_get_info(tr.device)[0] // 2 if tr.device.type == "cuda"
              else int(c.memory_limit_gb * 2**30))
    rows = tr.train_rows if tr.mode == "memory" else 0
    per = grouped.per_point_bytes(tr._build_student(), c.batch_size, rows, tr.num_classes)
    return grouped.auto_group_size(n, per, budget), "automatic (bounded by memory)"


def train_group(tr: Trainer, points: list[SweepPoint], memory: Batch | None,
                progress: Progress | None) -> list[RunResult]:
    """Train the points together: per batch one forward, backward and optimizer step for all of them. Finished
    points are skipped (--resume); points whose checkpoints stand at different epochs train in separate
    passes."""
    return train_in_passes(tr, points, lambda part, starts: _train_stack(tr, part, starts, memory, progress))


Stack = Callable[[list[tuple[SweepPoint, str]], list[Any]], dict[str, RunResult]]  # trains points from their starts


def train_in_passes(tr: Any, points: list[SweepPoint], stack: Stack) -> list[RunResult]:
    """A group's points in sweep order: finished ones read back (--resume), the others started or restored with
    `tr._start` and trained by `stack(points and run ids, their starts)`, one pass per epoch they stand at.
    `tr` is a `Trainer` or an `LMTrainer` (`kdstore.lm_group_training`)."""
    rids = [tr.cfg.run_id(p) for p in points]
    tr.dist.barrier()
    done = {rid: r for rid in rids if (r := tr.rundir.result(rid)) is not None}
    todo = [(p, rid) for p, rid in zip(points, rids, strict=True) if rid not in done]
    starts = {}
    for point, rid in todo:
        if tr.dist.is_main:
            tr.rundir.start(rid)
        starts[rid] = tr._start(rid, point.seed)
    for first in sorted({s[2] for s in starts.values()}):
        part = [(p, rid) for p, rid in todo if starts[rid][2] == first]
        done.update(stack(part, [starts[rid] for _, rid in part]))
    return [done[rid] for rid in rids]


def _train_stack(tr: Trainer, todo: list[tuple[SweepPoint, str]], starts: list[Any], memory: Batch | None,
                 progress: Progress | None) -> dict[str, RunResult]:
    """Points started (or restored) at the same epoch, stacked and trained to the end. Each epoch's wall time is
    shared equally among them; evaluation, checkpoints and metrics stay per point."""
    points, rids = [p for p, _ in todo], [rid for _, rid in todo]
    models, seconds = [s[0] for s in starts], [s[3] for s in starts]
    group = grouped.StudentGroup(models)
    opt = tr._optimizer(group.parameters())
    opt.load_state_dict(grouped.stack_optimizer_states([s[1].state_dict() for s in starts]))
    n = len(group.points[0])
    sources, which = _group_sources(tr, memory, points)
    evs: list[EvalResult | None] = [None] * len(todo)  # the latest evaluation of each point
    t0, agreement = time.perf_counter(), None
    for epoch in range(starts[0][2], tr.cfg.epochs):
        te = time.perf_counter()
        train_losses, agreement = _group_epoch(tr, group, opt, sources, which, epoch, points, rids, progress)
        share = (time.perf_counter() - te) / len(points)
        state = opt.state_dict() if tr._due(tr.cfg.checkpoint_every, epoch) else None
        for i, (point, rid) in enumerate(todo):
            seconds[i].append(share)
            due = tr._due(tr.cfg.eval_every, epoch)
            ev = evs[i] = tr.evaluate(group.load_into(models[i], i)) if due else None
            if tr.dist.is_main and state is not None:
                tr.rundir.save_checkpoint(rid, {"model": group.state(i), "epoch": epoch,
                                                "optimizer": grouped.point_optimizer_state(state, i, n),
                                                "epoch_seconds": seconds[i]})
            tr._log_epoch(rid, point, epoch, train_losses[i], opt, share, ev)
    counted = agreement is not None
    if agreement is None:  # --agreement final, or every epoch was trained before --resume
        agreement = _group_agreement(tr, group, memory)
    each = (time.perf_counter() - t0) / len(points)
    return {rid: tr._finish(rid, point, group.load_into(models[i], i), memory, each, seconds[i], agreement[i],
                            evs[i], counted) for i, (point, rid) in enumerate(todo)}


def _group_epoch(tr: Trainer, group: grouped.StudentGroup, opt: torch.optim.Optimizer,
                 sources: list[tuple[int, Batch | None]], which: list[int], epoch: int, points: list[SweepPoint],
                 rids: list[str], progress: Progress | None) -> tuple[list[float], list[float] | None]:
    """One pass over the data for a group: per step one batch per seed (read once for the points that share
    its order), every point's loss on its own batch, one backward and one optimizer step for all of them. Returns
    each point's mean loss and, when `Trainer.counts_agreement`, its agreement with the teacher over the pass."""
    totals = torch.zeros(len(points), dtype=torch.float64, device=tr.device)
    agree, count = torch.zeros(len(points), dtype=torch.int64, device=tr.device), tr.counts_agreement(epoch)
    rows, steps, shared = 0, math.ceil(tr.train_rows / tr.cfg.batch_size), len(sources) == 1
    streams = [tr._batches(source, epoch, seed) for seed, source in sources]
    for step, batches in enumerate(zip(*streams, strict=True)):
        tr._set_lr(opt, epoch, step, steps)
        x = batches[0][0]["x"] if shared else torch.stack([batches[k][0]["x"] for k in which])
        with autocast(tr.device, tr.precision):
            out = group(x, shared)
        point_losses = torch.stack([tr.loss(out[i], _point_batch(batches[which[i]][0], i), p)
                                    for i, p in enumerate(points)])
        opt.zero_grad(set_to_none=True)
        group.backward(point_losses.sum())  # no parameter is shared: each point gets its own loss's gradient
        opt.step()
        if count:
            agree += torch.stack([(out[i].detach().float().argmax(-1) == tr.teacher_top1(batches[k][0])).sum()
                                  for i, k in enumerate(which)])
        n = len(batches[0][0]["x"])
        totals += point_losses.detach().double() * n
        rows += n
        for rid in rids if progress else ():
            progress(rid, epoch, batches[0][1])  # type: ignore[misc]
    means = (totals / max(rows, 1)).tolist()
    for rid, value in zip(rids, means, strict=True):
        if not math.isfinite(value):
            raise TrainingDiverged(tr._diverged(rid, f"the loss became {value} in epoch {epoch + 1}"))
    return means, (agree.double() / max(rows, 1)).tolist() if count else None  # type: ignore[return-value]


def _group_sources(tr: Trainer, memory: Batch | None,
                   points: list[SweepPoint]) -> tuple[list[tuple[int, Batch | None]], list[int]]:
    """(seed, what its batches are cut from) per distinct seed of the points, and which one each point reads. In
    memory: the rows with every point's precomputed targets under keys suffixed /i (a step gathers them with the
    inputs in one index selection); streamed: None (the stream of that seed)."""
    seeds = list(dict.fromkeys(p.seed for p in points))
    which = [seeds.index(p.seed) for p in points]
    if memory is None:
        return [(seed, None) for seed in seeds], which
    sources: list[tuple[int, Batch | None]] = [(seed, {}) for seed in seeds]
    for i, view in enumerate(tr._views_for(memory, points)):
        source = sources[which[i]][1]
        assert source is not None
        source.update({key if key in memory else f"{key}/{i}": v for key, v in view.items()})
    return sources, which


def _point_batch(batch: Batch, i: int) -> Batch:
    """Point i's part of a group's batch: the shared keys and its own targets (keys suffixed /i, see
    `_group_sources`) under their plain names."""
    own = f"/{i}"
    out = {k: v for k, v in batch.items() if "/" not in k}
    out.update({k[: -len(own)]: v for k, v in batch.items() if k.endswith(own)})
    return out


@torch.no_grad()
def _group_agreement(tr: Trainer, group: grouped.StudentGroup, memory: Batch | None) -> list[float]:
    """`Trainer.agreement` of every point of a group in one pass: the teacher's argmax once per batch, the students'
    in one stacked forward (grouping runs in one process, so there is nothing to sum over ranks)."""
    agree = torch.zeros(group.size, dtype=torch.int64, device=tr.device)
    total = 0
    for batch, _ in tr._batches(memory, 0, tr.cfg.seeds[0], AGREEMENT_BATCH):
        with autocast(tr.device, tr.precision):
            out = group(batch["x"], shared=True)
        agree += (out.float().argmax(-1) == tr.teacher_top1(batch)).sum(1)
        total += len(batch["x"])
    return (agree.double() / max(total, 1)).tolist()  # type: ignore[no-any-return]
