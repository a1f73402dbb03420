"""A teacher's soft targets from what a version stores: the one place the trainer, `diff`, the card and `convert`
turn stored columns into log-probabilities at a temperature.

Exact from full logits (``log_softmax(z / T)``), otherwise rebuilt from the top-k and log-sum-exp under the
version's tail model (`kdstore.targets.rebuild_logits`); several teachers are combined by
`kdstore.ensemble`. Two shapes of input are served: a *block* of one version's columns (``{column name:
array}``, as `Version.read_file` returns it) and a training *batch* (``{"logits": (B, M, C), "topk_values":
(B, M, k), ...}`` with the M teachers stacked on dim 1, as `kdstore.data` assembles it).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from kdstore import ensemble, targets
from kdstore.errors import ConfigError, arg
from kdstore.plan import TargetPlan
from kdstore.store import Version

# --- blocks of stored columns -------------------------------------------------------------------------------------


def tensor(a: np.ndarray, dtype: type = np.float32) -> Tensor:
    """A torch tensor of `a` as `dtype`, copying only when needed (read-only memory-mapped columns are copied)."""
    return torch.from_numpy(np.require(a, dtype, ["C", "W"]))


def teacher_id(version: Version, teacher: str | None, argument: str = "teacher") -> str:
    """`teacher` checked against the version's teachers (default: the first)."""
    if teacher is None:
        return version.teacher_ids[0]
    if teacher not in version.teacher_ids:
        raise ConfigError(f"{arg(argument)} {teacher}: {version.ref} has teachers {', '.join(version.teacher_ids)}")
    return teacher


def columns_for(version: Version, teacher: str) -> list[str]:
    """The columns needed to rebuild `teacher`'s soft targets (its logits, else its top-k + log-sum-exp)."""
    logits = version.column_for("logits", teacher)
    if logits:
        return [logits]
    names = [version.column_for(r, teacher) for r in ("topk_indices", "topk_values", "logsumexp")]
    if not all(names):
        raise ConfigError(f"{version.ref}: teacher {teacher} has neither logits nor top-k columns")
    tail = version.column_for("tail_logmass", teacher)
    return [n for n in names if n] + ([tail] if tail else [])


def log_probs(version: Version, block: Mapping[str, np.ndarray], teacher: str, temperature: float) -> Tensor:
    """(N, C) float32 log soft targets of `teacher` at `temperature` for a block read with `columns_for`."""
    logits = version.column_for("logits", teacher)
    if logits:
        return targets.log_soft_targets(tensor(block[logits]), temperature)
    idx, val, lse = (block[version.column_for(r, teacher) or ""] for r in ("topk_indices", "topk_values", "logsumexp"))
    tail = (version.manifest["targets"]["top_k"] or {}).get("tail", "uniform")
    tcol = version.column_for("tail_logmass", teacher)
    return targets.log_soft_targets_topk(tensor(val), tensor(idx, np.int64), tensor(lse), version.num_classes,
                                         temperature, tail, tensor(block[tcol]) if tcol else None)


# --- training batches -----------------------------------------------------------------------------------------------


def batch_logits(batch: Mapping[str, Tensor], plan: TargetPlan) -> Tensor:
    """Each teacher's dense logits for a batch, (B, M, C) float32: exact, or rebuilt from a top-k per `plan`."""
    if plan.source == "logits":
        z = batch["logits"].float()
        if not plan.topk_from_logits:
            return z
        b, m, c = z.shape
        flat = z.reshape(b * m, c)
        v, i = targets.top_k(flat, plan.k)
        return targets.rebuild_logits(v, i, torch.logsumexp(flat, 1), c, plan.tail).reshape(b, m, c)
    lse = batch["lse"]
    v, i, tail = targets.truncate_topk(batch["topk_values"].float(), batch["topk_indices"], lse, batch.get("tail"),
                                       plan.k)
    b, m, k = v.shape
    rebuilt = targets.rebuild_logits(v.reshape(b * m, k), i.reshape(b * m, k), lse.reshape(b * m).float(),
                                     plan.num_classes, plan.tail, tail.reshape(b * m) if tail is not None else None)
    return rebuilt.reshape(b, m, plan.num_classes)


def combine(logits: Tensor, temperature: float, plan: TargetPlan, weights: Tensor,
            standardize: bool = False) -> Tensor:
    """The (ensembled) teacher's log soft targets at T from (B, M, C) logits, (B, C) float32.

    With `standardize` each teacher's row is z-scored first (`kdstore.targets.standardize`, Sun et al. 2024); for
    mean-logit the weighted mean of the z-scored rows is z-scored again, so the target is always a z-scored row.
    """
    if standardize:
        b, m, c = logits.shape
        logits = targets.standardize(logits.reshape(b * m, c)).reshape(b, m, c)
    if logits.shape[1] == 1:
        return torch.log_softmax(logits[:, 0] / temperature, dim=1)
    if plan.ensemble == "mean-logit":
        mean = ensemble.mean_logits(logits, weights)
        return torch.log_softmax((targets.standardize(mean) if standardize else mean) / temperature, dim=1)
    return ensemble.mean_prob_log_targets(torch.log_softmax(logits / temperature, dim=2), weights)


def batch_log_probs(batch: Mapping[str, Tensor], temperature: float, plan: TargetPlan, weights: Tensor,
                    standardize: bool = False) -> Tensor:
    """The (possibly ensembled) teacher's log soft targets at T for a batch, (B, C) float32 (z-scored logits first
    with `standardize`; see `combine`)."""
    return combine(batch_logits(batch, plan), temperature, plan, weights, standardize)


def teacher_top1(batch: Mapping[str, Tensor], plan: TargetPlan, weights: Tensor) -> Tensor:
    """The (ensembled) teacher's argmax per row, (B,) int64: the batch's ``teacher_top1`` when it has one (in
    memory, computed once per run by `memory_top1`), else from its stored logits or top-k, else its labels."""
    if "teacher_top1" in batch:
        return batch["teacher_top1"]
    if "logits" in batch or "topk_values" in batch:
        return batch_log_probs(batch, 1.0, plan, weights).argmax(1)
    return batch["label"]


def memory_top1(memory: Mapping[str, Tensor], plan: TargetPlan, weights: Tensor, chunk: int = 65536) -> Tensor:
    """`teacher_top1` of every row of an in-memory set, a chunk of rows at a time."""
    rows = len(memory["sample_id"])
    return torch.cat([teacher_top1({k: v[a : a + chunk] for k, v in memory.items() if k != "x"}, plan, weights)
                      for a in range(0, rows, chunk)])


def mse_target(batch: Mapping[str, Tensor], weights: Tensor) -> Tensor:
    """The logit-regression target of a batch: the (weighted) mean of the teachers' logits, (B, C) float32."""
    return ensemble.mean_logits(batch["logits"].float(), weights)


@torch.no_grad()
def training_view(memory: Mapping[str, Tensor], loss: str, temperature: float, alpha: float, plan: TargetPlan,
                  weights: Tensor, chunk: int = 65536, standardize: bool = False,
                  keep: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """An in-memory set's training view for one (loss, standardize, T, alpha): inputs, labels if the loss reads
    them, the columns named in `keep` (a view's augmentation parameters), and the loss's targets precomputed for
    every row (``teacher_logp`` for kd/topk, ``mse_target`` for mse; for mse the target stays raw and the loss
    standardises both sides). Inputs stay as they are (one per sample when the version stores views).

    With T fixed for a sweep point the targets are the same every epoch, so each training step only gathers rows:
    a KD step costs what a hard-label step does, plus the soft cross-entropy.
    """
    view = {"x": memory["x"], "sample_id": memory["sample_id"], **{k: memory[k] for k in keep}}
    if "label" in memory and (loss in ("hard", "ls") or alpha < 1):
        view["label"] = memory["label"]
    rows = len(memory["sample_id"])
    parts = [{k: v[a : a + chunk] for k, v in memory.items() if k != "x"} for a in range(0, rows, chunk)]
    if loss in ("kd", "topk"):
        view["teacher_logp"] = torch.cat([batch_log_probs(p, temperature, plan, weights, standardize)
                                          for p in parts])
    elif loss == "mse":
        view["mse_target"] = torch.cat([mse_target(p, weights) for p in parts])
    return view


class ViewCache:
    """Training views (`training_view`) by (loss, standardize, T, alpha), kept for the next pass: the seeds of a
    sweep point come one after another and share one, so a seed sweep computes the soft targets once per key. Views
    no longer asked for are freed before new ones are built."""

    def __init__(self, plans: Mapping[str, TargetPlan], weights: Tensor, keep: tuple[str, ...] = ()) -> None:
        self.plans, self.weights, self.keep = plans, weights, keep
        self.views: dict[tuple[str, bool, float, float], dict[str, Tensor]] = {}

    def get(self, memory: Mapping[str, Tensor], keys: list[tuple[str, bool, float, float]]) -> list[dict[str, Tensor]]:
        """The views of `keys` ((loss, standardize, T, alpha) each) over the in-memory set."""
        self.views = {k: v for k, v in self.views.items() if k in keys}
        for loss, std, t, alpha in keys:
            if (loss, std, t, alpha) not in self.views:
                self.views[loss, std, t, alpha] = training_view(
                    memory, loss, t, alpha, self.plans[loss], self.weights, standardize=std, keep=self.keep)
        return [self.views[k] for k in keys]
