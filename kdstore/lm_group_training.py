"""Language-model sweep points trained together in one pass (#18 for LM students): `LMTrainer`'s loop with a stacked
student, beside its one-point loop, as `kdstore.group_training` is beside `Trainer`'s.

A group is consecutive points of the sweep that read the same stored targets (top-k for topk/rkl/jsd, draws for
sampled, none for hard): per step one token batch per distinct seed (the points of one seed share it), one stacked
forward (`grouped.StudentGroup`: `vmap` over the student's `functional_call`, its tied embedding and head passed
under both names), each point's `lm_losses.lm_kd_loss` on its slice of the (P, B, L, V) logits, one backward of
their sum, each point's gradient clipped on its own, one AdamW step. Held-out measurements, checkpoints, metrics
lines, students and results stay per point and in the ungrouped format, so `--resume` continues a run in any group
size. Not grouped: runs under torchrun (DDP wraps one module), students with --hint (hooks capture one module's
outputs) and students whose stacked forward does not run (`grouped.group_refusal`); they train one by one.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdstore import grouped
from kdstore.device import autocast
from kdstore.errors import TrainingDiverged, arg
from kdstore.group_training import train_in_passes
from kdstore.lm_losses import lm_kd_loss
from kdstore.rundir import RunResult
from kdstore.train_config import SweepPoint

if TYPE_CHECKING:
    from kdstore.lm_training import LMTrainer, Progress

Batch = dict[str, Tensor]
# Why auto does not group LM students on a CPU (an explicit --group-size still does): a CPU step is bound by its
# matmuls, which stacking does not change, and the stacked (P, B, L, V) logits cost one more copy of their gradient
# (gpt:2-128-4, V = 49,152, 3 points, one thread: 8.9 s per point-epoch grouped against 7.1 s alone).
CPU_NOTE = ("on a CPU, auto trains LM students one at a time: a stacked step costs what the points cost alone plus "
            "a copy of the (P, B, L, V) logits' gradient; --group-size N groups them anyway")

__all__ = ["group_size", "groups", "train_group"]


def group_size(tr: LMTrainer) -> tuple[int, str]:
    """Points per pass and why: --group-size, or automatic (up to grouped.AUTO_MAX, bounded by memory); 1 under
    torchrun, with hints, and for students a stacked forward cannot run."""
    c, n = tr.cfg, len(tr.cfg.sweep())
    if c.group_size == 1 or n == 1:
        return 1, "one point at a time"
    refusal = ("under torchrun every point trains alone: DDP's gradient all-reduce wraps one module" if tr.dist.active
               else "hints (--hint) capture the student's modules with hooks, which a stacked forward does not run"
               if tr.hints else grouped.group_refusal(tr._student().to(tr.device),
                                                      torch.zeros(2, tr.seq_len, dtype=torch.long, device=tr.device)))
    settled = grouped.settled_size(c.group_size, n, c.student, refusal)
    if settled is not None:
        return settled
    if tr.device.type != "cuda":
        return 1, CPU_NOTE
    budget = (torch.cuda.mem_get_info(tr.device)[0] // 2 if tr.device.type == "cuda"
              else int(c.memory_limit_gb * 2**30))
    return grouped.auto_group_size(n, point_bytes(tr), budget), "automatic (bounded by memory)"


def point_bytes(tr: LMTrainer) -> int:
    """A point's memory in a group: float32 parameters with their gradient and AdamW's two moments, and one batch's
    (B, L, V) logits about four times over (logits, their log-softmax, the gradient, the fused loss's buffers)."""
    params = sum(p.numel() for p in tr._student().parameters())
    return 4 * (4 * params + 4 * tr.cfg.batch_size * tr.seq_len * tr.vocab_size)


def groups(points: list[SweepPoint], size: int) -> list[list[SweepPoint]]:
    """The sweep cut into groups of at most `size` consecutive points that read the same stored targets."""
    from kdstore.lm_training import targets_of

    out: list[list[SweepPoint]] = []
    for p in points:
        if out and len(out[-1]) < size and targets_of(out[-1][0].loss) == targets_of(p.loss):
            out[-1].append(p)
        else:
            out.append([p])
    return out


def train_group(tr: LMTrainer, points: list[SweepPoint], progress: Progress | None) -> list[RunResult]:
    """Train the points together; finished points are skipped (--resume), and points whose checkpoints stand at
    different epochs train in separate passes."""
    return train_in_passes(tr, points, lambda part, starts: _train_stack(tr, part, starts, progress))


def _train_stack(tr: LMTrainer, todo: list[tuple[SweepPoint, str]], starts: list[Any],
                 progress: Progress | None) -> dict[str, RunResult]:
    """Points started (or restored) at the same epoch, stacked and trained to the end; each epoch's wall time is
    shared equally among them."""
    points, rids = [p for p, _ in todo], [rid for _, rid in todo]
    models, seconds, tokens = [s[0] for s in starts], [s[3] for s in starts], [s[4] for s in starts]
    group = grouped.StudentGroup(models)
    per_point = [list(p.values()) for p in group.points]
    opt = tr.optimizer([v for params in per_point for v in params])  # its groups: every point's, point after point
    states = [s[1].state_dict() for s in starts]
    opt.load_state_dict(grouped.stack_optimizer_states(states))
    sizes = [len(g["params"]) for g in states[0]["param_groups"]]
    for epoch in range(starts[0][2], tr.cfg.epochs):
        t0 = time.perf_counter()
        losses, n_tokens = _group_epoch(tr, group, opt, points, rids, epoch, progress)
        share = (time.perf_counter() - t0) / len(points)
        state = opt.state_dict()
        for i, (point, rid) in enumerate(todo):
            seconds[i].append(share)
            tokens[i] += n_tokens
            tr.end_epoch(rid, point, epoch, group.load_into(models[i], i),
                         {"model": group.state(i), "optimizer": grouped.point_optimizer_state(state, i, sizes)},
                         seconds[i], tokens[i], losses[i], opt.param_groups[0]["lr"], n_tokens)
    return {rid: tr._finish(rid, point, group.load_into(models[i], i), seconds[i], tokens[i])
            for i, (point, rid) in enumerate(todo)}


def _group_epoch(tr: LMTrainer, group: grouped.StudentGroup, opt: torch.optim.Optimizer, points: list[SweepPoint],
                 rids: list[str], epoch: int, progress: Progress | None) -> tuple[list[float], int]:
    """One pass over the training sequences for a group: (each point's mean loss per sequence, real tokens)."""
    from kdstore.lm_training import targets_of

    seeds = list(dict.fromkeys(p.seed for p in points))
    which, shared = [seeds.index(p.seed) for p in points], len(seeds) == 1
    steps = math.ceil(len(tr.train_rows) / tr.cfg.batch_size)
    streams = [tr._batches(targets_of(points[0].loss), seed, epoch) for seed in seeds]
    totals = torch.zeros(len(points), dtype=torch.float64, device=tr.device)
    rows = tokens = 0
    for step, batches in enumerate(zip(*streams, strict=True)):
        for g in opt.param_groups:
            g["lr"] = tr._lr(epoch * steps + step, tr.cfg.epochs * steps)
        first = batches[0][0]
        ids = first["input_ids"] if shared else torch.stack([batches[k][0]["input_ids"] for k in which])
        with autocast(tr.device, tr.precision):
            logits = group(ids, shared)
        # unbind, not logits[i]: the backward of P selections would fill P zero tensors of all the (P, B, L, V) logits
        per_point = logits.unbind(0)
        losses = torch.stack([lm_kd_loss(per_point[i], batches[which[i]][0], loss=p.loss, temperature=p.temperature,
                                         alpha=p.alpha, beta=tr.cfg.beta) for i, p in enumerate(points)])
        opt.zero_grad(set_to_none=True)
        group.backward(losses.sum())  # no parameter is shared between points: each gets its own loss's gradient
        if tr.cfg.grad_clip > 0:
            for params in group.points:
                torch.nn.utils.clip_grad_norm_(list(params.values()), tr.cfg.grad_clip)
        opt.step()
        n = len(first["input_ids"])
        totals += losses.detach().double() * n
        rows += n
        tokens += int(first["attention_mask"].sum())
        for rid in rids if progress else ():
            progress(rid, epoch, batches[0][1])  # type: ignore[misc]
    if tr.device.type == "cuda":
        torch.cuda.synchronize(tr.device)
    means: list[float] = (totals / max(rows, 1)).tolist()
    for rid, value in zip(rids, means, strict=True):
        if not math.isfinite(value):
            raise TrainingDiverged(f"run {rid}: the loss became {value} in epoch {epoch + 1}; lower {arg('lr')} "
                                   f"(now {tr.cfg.lr:g}) and train into a new {arg('out')}")
    return means, tokens
