"""Train language-model students teacher-free from stored per-token targets (`kdstore train` on a version whose
``targets.kind`` is ``tokens``). One plain loop per sweep point:

    batch of sequences (ids, masks, stored top-k or draws) -> student logits (B, L, V) -> `lm_losses.lm_kd_loss`
    -> backward -> clip -> AdamW step,

then per epoch held-out metrics (perplexity on the true next tokens, KL to the teacher's stored targets at T = 1,
top-1 agreement), a checkpoint and a metrics line. The run directory is `kdstore.rundir`'s, as for classification:
config.json, metrics.jsonl, runs/<id>/{checkpoint.pt, student.safetensors, student.json, result.json},
summary.json; `--resume` skips finished points and continues a point from its last epoch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdstore import distributed, lm_group_training
from kdstore.device import autocast, fused_optimizer, keep_heap_between_steps, resolve_device, resolve_precision
from kdstore.errors import ConfigError, TrainingDiverged, arg
from kdstore.lm_data import TokenTargetDataset, collate, holdout_rows, stream_batches, token_columns
from kdstore.lm_evaluation import eval_version, measure
from kdstore.lm_hints import LMHintedStudent, parse_hint, parse_hints, student_of
from kdstore.lm_losses import lm_kd_loss
from kdstore.lm_report import kl_how, lm_result, lm_summary
from kdstore.lm_students import build_lm_student, describe_lm_student, lm_logits
from kdstore.options import LM_LOSSES
from kdstore.rundir import RunDir, RunResult, run_id
from kdstore.store import Version, open_version
from kdstore.store.remote import resolve_any
from kdstore.targets import check_temperature
from kdstore.train_config import SweepPoint, with_defaults

Progress = Callable[[str, int, int], None]
Batch = dict[str, Tensor]


@dataclass(frozen=True)
class LMTrainConfig:
    """Everything an LM training run needs; validated on construction (every problem reported together)."""

    targets: str
    student: str
    out: str
    losses: tuple[str, ...] = ("topk",)
    temperatures: tuple[float, ...] = (1.0,)
    alphas: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: float = 0.05  # share of the run's steps with a linear learning-rate warm-up
    grad_clip: float = 1.0
    device: str = "auto"
    precision: str = "auto"
    top_k: int | None = None
    val_fraction: float | None = None
    val_seed: int = 0
    eval: str | None = None  # a held-out per-token version of the same teacher (STORE/NAME[@vN])
    data_mode: str = "auto"
    memory_limit_gb: float = 4.0
    jsd_beta: float | None = None  # the teacher's weight in --loss jsd's mixture, in (0, 1); None: 0.5
    hints: tuple[str, ...] = ()  # LAYER:STUDENT_MODULE[:WEIGHT]: per-token feature losses (kdstore.lm_hints)
    group_size: int | None = None  # points per pass (#18, kdstore.lm_group_training); None: automatic, 1: alone

    def __post_init__(self) -> None:
        for name in ("losses", "temperatures", "alphas", "seeds", "hints"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        e = [f"{arg('losses')} {x!r}: per-token targets train with {', '.join(LM_LOSSES)} (a top-k with its exact "
             "tail, or draws; full logits are never stored)" for x in self.losses if x not in LM_LOSSES]
        e += [f"{arg(n)}: empty" for n in ("losses", "temperatures", "alphas", "seeds") if not getattr(self, n)]
        for t in self.temperatures:
            try:
                check_temperature(t)
            except ConfigError as err:
                e.append(str(err.template))
        e += [f"{arg('alphas')} {a:g}: must be in [0, 1]" for a in self.alphas if not 0.0 <= a <= 1.0]
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                e.append(f"{arg(name)} {getattr(self, name)}: must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            e.append(f"{arg('lr')} {self.lr}: must be > 0")
        if self.schedule not in ("cosine", "constant"):
            e.append(f"{arg('schedule')} {self.schedule!r}: expected cosine or constant")
        if self.data_mode not in ("auto", "memory", "stream"):
            e.append(f"{arg('data_mode')} {self.data_mode!r}: expected auto, memory or stream")
        if self.top_k is not None and self.top_k < 1:
            e.append(f"{arg('top_k')} {self.top_k}: must be >= 1")
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            e.append(f"{arg('val_fraction')} {self.val_fraction:g}: must be in (0, 1)")
        e += self._beta_errors()
        if self.group_size is not None and self.group_size < 1:
            e.append(f"{arg('group_size')} {self.group_size}: must be >= 1 (1 trains the points one at a time) or auto")
        for h in self.hints:
            try:
                parse_hint(h)
            except ConfigError as err:
                e.append(str(err.template))
        if e:
            raise ConfigError("; ".join(e))

    def _beta_errors(self) -> list[str]:
        if self.jsd_beta is None:
            return []
        if "jsd" not in self.losses:
            return [f"{arg('jsd_beta')} {self.jsd_beta:g}: only used by {arg('losses')} jsd, and the losses are "
                    f"{','.join(self.losses)}; add jsd to them or drop {arg('jsd_beta')}"]
        if not 0.0 < self.jsd_beta < 1.0:
            return [f"{arg('jsd_beta')} {self.jsd_beta:g}: must be in (0, 1), the teacher's weight in the mixture "
                    f"(near 0 the JSD acts as forward KL, near 1 as reverse KL: {arg('losses')} topk or rkl)"]
        return []

    @property
    def beta(self) -> float:
        """--jsd-beta, 0.5 when not given."""
        return 0.5 if self.jsd_beta is None else self.jsd_beta

    def sweep(self) -> list[SweepPoint]:
        """Every (loss, T, alpha, seed), seeds innermost; hard once per seed."""
        pts = []
        for loss in self.losses:
            pairs = [(1.0, 0.0)] if loss == "hard" else [(t, a) for t in self.temperatures for a in self.alphas]
            pts += [SweepPoint(t, a, s, loss) for t, a in pairs for s in self.seeds]
        return pts

    def run_id(self, p: SweepPoint) -> str:
        return run_id(p.loss, p.temperature, p.alpha, p.seed if len(self.seeds) > 1 else None)


def _metric_targets(version: Version) -> str:
    """How KL to the teacher is measured on a version's held-out rows: against its top-k's exact rebuild, or from
    its draws."""
    return "topk" if version.top_k else "sampled"


def targets_of(loss: str) -> str:
    """The stored targets a loss reads (`lm_data.token_columns`): rkl and jsd the top-k, hard none."""
    return "none" if loss == "hard" else "topk" if loss in ("rkl", "jsd") else loss


def is_per_token(targets: str) -> bool:
    """Whether STORE/NAME[@vN] names a per-token version (False when it cannot be opened: the caller reports it)."""
    try:
        return bool(open_version(resolve_any(targets), check=False).manifest["targets"].get("kind") == "tokens")
    except Exception:  # not a version at all: the classification path produces the one-line error
        return False


class LMTrainer:
    """Trains one language-model student per sweep point from a per-token version. Build, then `run()`."""

    def __init__(self, config: LMTrainConfig) -> None:
        self.cfg = config
        self.out = Path(config.out)
        self.rundir = RunDir(self.out)
        self.dist, self.device = distributed.init(resolve_device(config.device))
        keep_heap_between_steps(self.device)
        self.precision = resolve_precision(config.precision, self.device)
        self.version = open_version(resolve_any(config.targets))
        t = self.version.manifest["targets"]
        if t.get("kind") != "tokens":
            raise ConfigError(f"{arg('targets')} {self.version.ref}: not a per-token version")
        self.vocab_size, self.seq_len = int(t["vocab_size"]), int(t["seq_len"])
        for loss in config.losses:
            if loss in ("rkl", "jsd") and not self.version.top_k:
                raise ConfigError(f"{arg('losses')} {loss}: needs the stored top-k (reverse KL and JSD against its "
                                  f"exact tail); {self.version.ref} stores sampled draws only; use {arg('losses')} "
                                  "sampled, or label with --top-k")
            token_columns(self.version, targets_of(loss))  # a missing kind of target: fail now
        if config.top_k is not None and (self.version.top_k is None or config.top_k > self.version.top_k):
            raise ConfigError(f"{arg('top_k')} {config.top_k}: {self.version.ref} stores top-"
                              f"{self.version.top_k or 0}; choose k <= that")
        n = self.version.num_rows
        self.held_out = holdout_rows(self.version, config.val_fraction, config.val_seed) \
            if config.val_fraction else np.zeros(n, bool)
        self.train_rows = np.flatnonzero(~self.held_out)
        self.eval_version = eval_version(config.eval, self.version, self.vocab_size, self.seq_len) \
            if config.eval else None
        self.hints, self.stored = parse_hints(config.hints, self.version.manifest, str(self.version.ref)) \
            if config.hints else ([], [])
        self.last_hint_loss: float | None = None  # the last epoch's mean hint loss per sequence
        self._student()  # fail on a bad --student or --hint before --out
        mode = config.data_mode
        if mode == "auto":
            size = sum(int(f["bytes"]) for f in self.version.files)  # compressed; decoded it is a few times larger
            mode = "memory" if size * 4 < config.memory_limit_gb * 2**30 else "stream"
        self.mode = mode
        self._data: dict[str, TokenTargetDataset] = {}
        self.group_size, self.group_note = lm_group_training.group_size(self)

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self, progress: Progress | None = None, resume: bool = False) -> list[RunResult]:
        """Train every sweep point; write outputs under `out` (rank 0 under torchrun). One RunResult per point."""
        try:
            if self.dist.is_main:
                self.rundir.prepare({"config": json.loads(json.dumps(asdict(self.cfg))), "kind": "tokens",
                                     "targets": str(self.version.ref), "mode": self.mode, "device": str(self.device),
                                     "precision": self.precision, "torch_version": torch.__version__,
                                     "world_size": self.dist.world_size, "validation": self.validation_info(),
                                     "grouping": {"group_size": self.group_size, "why": self.group_note}},
                                    resume, self._upgrade)
        finally:
            self.dist.barrier()
        results: list[RunResult] = []
        for group in lm_group_training.groups(self.cfg.sweep(), self.group_size):
            if len(group) == 1:
                results.append(self._train_point(group[0], progress))
            else:
                results += lm_group_training.train_group(self, group, progress)
            if self.dist.is_main:
                self.rundir.write_summary(self._summary(results))
        return results

    def _upgrade(self, old: dict[str, Any]) -> dict[str, Any]:
        """A run directory's options with today's defaults for options added since, and --group-size (how the run
        executes, not what it computes) taken from this command: --resume accepts another."""
        return {**with_defaults(LMTrainConfig, old), "group_size": self.cfg.group_size}

    def _train_point(self, point: SweepPoint, progress: Progress | None) -> RunResult:
        rid = self.cfg.run_id(point)
        self.dist.barrier()  # rank 0 may have just written result.json / checkpoint.pt
        done = self.rundir.result(rid)
        if done is not None:
            return done
        if self.dist.is_main:
            self.rundir.start(rid)
        model, opt, start, seconds, tokens = self._start(rid, point.seed)
        net = self._parallel(model)
        for epoch in range(start, self.cfg.epochs):
            t0 = time.perf_counter()
            train_loss, n_tokens = self._epoch(net, model, opt, point, epoch, rid, progress)
            seconds.append(time.perf_counter() - t0)
            tokens += n_tokens
            self.end_epoch(rid, point, epoch, student_of(model), {"model": model.state_dict(),
                           "optimizer": opt.state_dict()}, seconds, tokens, train_loss, opt.param_groups[0]["lr"],
                           n_tokens)
        return self._finish(rid, point, student_of(model), seconds, tokens)

    def end_epoch(self, rid: str, point: SweepPoint, epoch: int, student: nn.Module, state: dict[str, Any],
                  seconds: list[float], tokens: int, train_loss: float, lr: float, n_tokens: int) -> None:
        """After a point's epoch: the held-out measurements (every rank), then on rank 0 the checkpoint (`state`:
        its model and optimizer state) and the metrics line."""
        val = self.measure(student, "val")
        if not self.dist.is_main:
            return
        self.rundir.save_checkpoint(rid, {**state, "epoch": epoch, "epoch_seconds": seconds, "tokens": tokens})
        line = {"run": rid, "loss": point.loss, "temperature": point.temperature, "alpha": point.alpha,
                "seed": point.seed, "epoch": epoch + 1, "train_loss": train_loss, "lr": lr, "seconds": seconds[-1],
                "tokens_per_second": n_tokens / seconds[-1]}
        if self.last_hint_loss is not None:
            line["train_hint_loss"] = self.last_hint_loss
        line.update({f"val_{k}": v for k, v in (val or {}).items()})
        self.rundir.append_metrics(line)

    def _student(self) -> nn.Module:
        """A new student (on the CPU), wrapped with its hint regressors when --hint is given."""
        model = build_lm_student(self.cfg.student, self.vocab_size, self.seq_len)
        return LMHintedStudent(model, self.hints, self.stored) if self.hints else model

    def _start(self, rid: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, int, list[float], int]:
        """A new student and AdamW (no weight decay on vectors), or both restored from the run's checkpoint:
        (model, optimizer, first epoch to train, seconds of the finished epochs, tokens trained so far)."""
        torch.manual_seed(seed)
        model = self._student().to(self.device)
        opt = self.optimizer(list(model.parameters()))
        state = self.rundir.load_checkpoint(rid, self.device)
        if state is None:
            return model, opt, 0, [], 0
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["epoch"]) + 1
        if self.dist.is_main:
            self.rundir.truncate_metrics(rid, start)
        return model, opt, start, [float(x) for x in state["epoch_seconds"]], int(state["tokens"])

    def optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """AdamW over `params` (one student's, or a group's, point after point), with weight decay on matrices only:
        two parameter groups, in the order of `params`."""
        return fused_optimizer(torch.optim.AdamW,
                               [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.cfg.weight_decay},
                                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=self.cfg.lr)

    def _epoch(self, net: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, point: SweepPoint, epoch: int,
               rid: str, progress: Progress | None) -> tuple[float, int]:
        """One pass over the training sequences: (mean training loss per sequence, real tokens trained), summed
        over ranks. Under DDP each rank takes its share of every global batch; its loss (a mean per counted token)
        is weighted by its share of the batch's sequences, so the averaged gradient is that of the global batch
        (exactly so when the sequences count equally many tokens, as packed text does)."""
        model.train()
        steps = math.ceil(len(self.train_rows) / self.cfg.batch_size)
        targets = targets_of(point.loss)
        world, total, rows, tokens, hint_total = self.dist.world_size, 0.0, 0, 0, 0.0
        for step, (batch, n_global) in enumerate(self._batches(targets, point.seed, epoch)):
            for g in opt.param_groups:
                g["lr"] = self._lr(epoch * steps + step, self.cfg.epochs * steps)
            n_local = len(batch["input_ids"]) if batch else 0
            if n_local:
                with autocast(self.device, self.precision):
                    logits = lm_logits(net, batch["input_ids"])
                loss = lm_kd_loss(logits, batch, loss=point.loss, temperature=point.temperature, alpha=point.alpha,
                                  beta=self.cfg.beta)
                if isinstance(model, LMHintedStudent):
                    hint = model.hint_loss(batch)
                    hint_total += float(hint.detach()) * n_local
                    loss = loss + hint
            else:  # no sequence of this global batch for this rank: still join the gradient all-reduce
                loss = sum(p.sum() * 0.0 for p in model.parameters())  # type: ignore[assignment]
            opt.zero_grad(set_to_none=True)
            (loss * (n_local * world / n_global if self.dist.active else 1.0)).backward()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
            opt.step()
            total += float(loss.detach()) * n_local
            rows += n_local
            tokens += int(batch["attention_mask"].sum()) if n_local else 0
            if progress and self.dist.is_main:
                progress(rid, epoch, n_global)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        total, rows, tokens, hint_total = self.dist.sum(total, rows, tokens, hint_total)  # type: ignore[assignment]
        train_loss = total / max(rows, 1)
        self.last_hint_loss = hint_total / max(rows, 1) if self.hints else None
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"run {rid}: the loss became {train_loss} in epoch {epoch + 1}; lower "
                                   f"{arg('lr')} (now {self.cfg.lr:g}) and train into a new {arg('out')}")
        return train_loss, int(tokens)

    def _parallel(self, model: nn.Module) -> nn.Module:
        if not self.dist.active:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _lr(self, step: int, total: int) -> float:
        warm = int(self.cfg.warmup * total)
        if step < warm:
            return self.cfg.lr * (step + 1) / warm
        if self.cfg.schedule == "constant":
            return self.cfg.lr
        return self.cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    # -- data ------------------------------------------------------------------------------------------------------
    def _dataset(self, targets: str, which: str = "train") -> TokenTargetDataset:
        key = f"{which}:{targets}"
        if key not in self._data:
            version = self.eval_version if which == "eval" else self.version
            assert version is not None
            rows = (self.train_rows if which == "train" else np.flatnonzero(self.held_out) if which == "val"
                    else None)
            k = self.cfg.top_k if targets == "topk" and which == "train" else None
            feats = [f.column for f in self.stored] if which == "train" else []
            self._data[key] = TokenTargetDataset(version, targets, k=k, rows=rows, features=feats)
        return self._data[key]

    def _batches(self, targets: str, seed: int, epoch: int) -> Iterator[tuple[Batch, int]]:
        """(this rank's share of a global batch, on the device, or {} if none; sequences in the global batch): in
        memory (a permutation drawn from seed and epoch) or streamed by row group (`lm_data.stream_batches`)."""
        bs, rank, world = self.cfg.batch_size, self.dist.rank, self.dist.world_size
        if self.mode == "stream":
            batches: Iterator[Any] = stream_batches(self.version, targets, bs, seed=seed, epoch=epoch,
                                                    keep=~self.held_out,
                                                    k=self.cfg.top_k if targets == "topk" else None,
                                                    features=[f.column for f in self.stored])
        else:
            ds = self._dataset(targets)
            order = np.random.default_rng([seed, epoch]).permutation(len(ds))
            batches = (order[a : a + bs] for a in range(0, len(ds), bs))  # row indices, collated per rank below
        for b in batches:
            if isinstance(b, dict):  # a streamed global batch: every rank reads it and keeps its share
                n, mine = len(b["input_ids"]), {k: v[rank::world] for k, v in b.items()}
            else:
                n, idx = len(b), b[rank::world]
                mine = collate([ds[int(i)] for i in idx]) if len(idx) else {}
            if mine and not len(mine["input_ids"]):
                mine = {}
            yield {k: v.to(self.device, non_blocking=True) for k, v in mine.items()}, n

    # -- measurements ----------------------------------------------------------------------------------------------
    def measure(self, model: nn.Module, which: str) -> dict[str, float] | None:
        """`lm_evaluation.measure` on the held-out rows ("val") or the --eval version ("eval"); None without
        them."""
        if (which == "val" and not self.held_out.any()) or (which == "eval" and self.eval_version is None):
            return None
        version = self.eval_version if which == "eval" else self.version
        assert version is not None
        return measure(model, self._dataset(_metric_targets(version), which), self.cfg.batch_size, self.device,
                       self.precision)

    def _finish(self, rid: str, point: SweepPoint, model: nn.Module, seconds: list[float], tokens: int) -> RunResult:
        val, ev = self.measure(model, "val"), self.measure(model, "eval")
        for m in (val, ev):
            if m is not None and not math.isfinite(m["nll"]):
                raise TrainingDiverged(f"run {rid}: the trained student's outputs are not finite; lower "
                                       f"{arg('lr')} (now {self.cfg.lr:g}) and train into a new {arg('out')}")
        result = lm_result(rid, point, self.cfg.epochs, val, ev, seconds, tokens,
                           {"parameters": sum(p.numel() for p in model.parameters()),
                            "world_size": self.dist.world_size})
        info = {**describe_lm_student(self.cfg.student, model), "vocab_size": self.vocab_size,
                "seq_len": self.seq_len, "loss": point.loss, "temperature": point.temperature, "alpha": point.alpha,
                "seed": point.seed, "targets": str(self.version.ref)}
        if point.loss == "jsd":
            info["jsd_beta"] = self.cfg.beta
        if self.hints:
            info["hints"] = [{"layer": h.layer, "module": h.module, "weight": h.weight, "column": f.column,
                              "width": f.width} for h, f in zip(self.hints, self.stored, strict=True)]
        if not self.dist.is_main:
            return result
        # tied weights share storage, which safetensors refuses: store each tensor on its own
        self.rundir.finish(rid, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, info, result)
        return result

    def validation_info(self) -> dict[str, Any] | None:
        info: dict[str, Any] = {}
        if self.held_out.any():
            info["held_out"] = {"fraction": self.cfg.val_fraction, "seed": self.cfg.val_seed,
                                "rows": int(self.held_out.sum()), "train_rows": len(self.train_rows)}
        if self.eval_version is not None:
            info["eval"] = str(self.eval_version.ref)
        # each held-out set is measured by its own targets: an --eval version may store a top-k, the training draws
        kinds = {which: _metric_targets(v) for which, v in (("val", self.version if self.held_out.any() else None),
                                                              ("eval", self.eval_version)) if v is not None}
        if kinds:
            info["kl_teacher"] = kl_how(kinds)
        return info or None

    def _summary(self, results: list[RunResult]) -> dict[str, Any]:
        head = {"kind": "tokens", "targets": str(self.version.ref), "student": self.cfg.student,
                "teacher": self.version.manifest["statistics"].get("teachers"), "validation": self.validation_info()}
        return lm_summary(head, results, len(self.cfg.seeds) > 1)


__all__ = ["LM_LOSSES", "LMTrainConfig", "LMTrainer", "is_per_token"]
