"""`kdstore train`: a teacher-free trainer. One plain loop; the teacher never runs here.

For each (temperature, alpha) of the sweep: build the student, then per epoch
    batch -> teacher targets at T (from stored logits or top-k) -> student forward -> loss -> backward -> step,
evaluate, log a line to metrics.jsonl, checkpoint. What lands in RUN/ (config, metrics, checkpoints, students,
summary) and how --resume picks it up is kdstore.rundir's job.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from kdstore import distributed, ensemble, losses, targets
from kdstore.data import TrainingData, describe_need, open_training_data
from kdstore.device import autocast, resolve_device, resolve_precision
from kdstore.errors import ConfigError, InputError, StudentError, TrainingDiverged
from kdstore.rundir import RunDir, RunResult, over_seeds, run_id
from kdstore.students import build_model, count_parameters
from kdstore.transfer import open_transfer

LOSSES = ("kd", "topk", "mse", "hard", "ls")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")


class SweepPoint(NamedTuple):
    """One student to train: its temperature, soft-term weight and seed."""

    temperature: float
    alpha: float
    seed: int


@dataclass(frozen=True)
class TrainConfig:
    """Everything `kdstore train` needs; validated on construction (options map one-to-one to fields)."""

    targets: str
    student: str
    out: str
    loss: str = "kd"
    temperatures: tuple[float, ...] = (4.0,)
    alphas: tuple[float, ...] = (0.9,)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seeds: tuple[int, ...] = (0,)
    device: str = "auto"
    precision: str = "auto"
    eval: str | None = None
    eval_input_columns: tuple[str, ...] = ()
    eval_label_column: str | None = None
    transfer: str | None = None
    top_k: int | None = None
    tail: str | None = None
    ensemble: str = "mean-prob"
    teacher_weights: tuple[float, ...] = ()
    smoothing: float = 0.1
    zero_mean: bool = True
    data_mode: str = "auto"
    num_workers: int = 0
    memory_limit_gb: float = 4.0

    def __post_init__(self) -> None:
        e = []
        if self.loss not in LOSSES:
            e.append(f"--loss {self.loss!r}: expected one of {', '.join(LOSSES)}")
        e += [f"--temperature {t}: must be > 0" for t in self.temperatures if not (t > 0 and math.isfinite(t))]
        e += [f"--alpha {a}: must be in [0, 1]" for a in self.alphas if not 0 <= a <= 1]
        if not self.temperatures or not self.alphas:
            e.append("--temperature and --alpha need at least one value")
        if self.epochs < 1:
            e.append(f"--epochs {self.epochs}: must be >= 1")
        if self.batch_size < 1:
            e.append(f"--batch-size {self.batch_size}: must be >= 1")
        if not self.lr > 0:
            e.append(f"--lr {self.lr}: must be > 0")
        if self.optimizer not in OPTIMIZERS:
            e.append(f"--optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            e.append(f"--schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.weight_decay < 0:
            e.append(f"--weight-decay {self.weight_decay}: must be >= 0")
        e += [f"--seed {s}: must be >= 0" for s in self.seeds if s < 0]
        if not self.seeds:
            e.append("--seed needs at least one value")
        elif len(set(self.seeds)) != len(self.seeds):
            e.append(f"--seed {','.join(map(str, self.seeds))}: a seed is repeated; give each seed once")
        if self.top_k is not None and self.top_k < 1:
            e.append(f"--top-k {self.top_k}: must be >= 1")
        if self.tail is not None and self.tail not in targets.TAIL_MODELS:
            e.append(f"--tail {self.tail!r}: expected one of {', '.join(targets.TAIL_MODELS)}")
        if not (self.ensemble in ensemble.COMBINE or (self.ensemble.startswith("t") and self.ensemble[1:].isdigit())):
            e.append(f"--ensemble {self.ensemble!r}: expected mean-prob, mean-logit or a member id like t0")
        if not 0 <= self.smoothing < 1:
            e.append(f"--smoothing {self.smoothing}: must be in [0, 1)")
        if self.data_mode not in ("auto", "memory", "stream"):
            e.append(f"--data {self.data_mode!r}: expected auto, memory or stream")
        if self.num_workers < 0:
            e.append(f"--num-workers {self.num_workers}: must be >= 0")
        if e:
            raise ConfigError("; ".join(e))

    def sweep(self) -> list[SweepPoint]:
        """Every (T, alpha, seed) to train, seeds innermost; losses without T or alpha get one run per seed."""
        if self.loss in ("hard", "ls", "mse"):
            pairs = [(1.0, 0.0 if self.loss != "mse" else 1.0)]
        else:
            pairs = [(t, a) for t in self.temperatures for a in self.alphas]
        return [SweepPoint(t, a, s) for t, a in pairs for s in self.seeds]

    def run_id(self, point: SweepPoint) -> str:
        """The point's directory under RUN/runs; the seed is part of it only when several are swept."""
        return run_id(self.loss, point.temperature, point.alpha, point.seed if len(self.seeds) > 1 else None)


Progress = Callable[[str, int, int], None]


class Trainer:
    """Trains one student per sweep point from stored targets. Build with a TrainConfig, call `run()`."""

    def __init__(self, config: TrainConfig) -> None:
        self.cfg = config
        self.out = Path(config.out)
        self.rundir = RunDir(self.out)
        self._view: tuple[tuple[float, float], dict[str, Tensor]] | None = None  # see _view_for
        self.dist, self.device = distributed.init(resolve_device(config.device))
        self.precision = resolve_precision(config.precision, self.device)
        need = set()
        for point in config.sweep():
            need |= describe_need(config.loss, point.alpha)
        self.source = "logits"
        probe = open_training_data(config.targets, need=(), transfer=config.transfer, verify_transfer=False)
        version = probe.version
        if config.loss == "kd" and not version.has_logits:
            need = (need - {"logits"}) | {"topk"}  # exact logits absent: rebuild soft targets from top-k
        if config.loss == "topk":
            if version.top_k is None and version.has_logits:
                need = (need - {"topk"}) | {"logits"}  # compute top-k from the full logits at train time
            self.source = "topk" if version.top_k is not None else "logits"
        if "topk" in need:
            self.source = "topk"
        if config.loss in ("hard", "ls"):
            # not used by the loss, but needed to report agreement with the teacher honestly
            if version.has_logits:
                need |= {"logits"}
            elif version.top_k:
                need |= {"topk"}
                self.source = "topk"
        teachers = version.teacher_ids
        if config.ensemble.startswith("t") and config.ensemble[1:].isdigit():
            if config.ensemble not in teachers:
                raise ConfigError(f"--ensemble {config.ensemble}: {version.ref} has teachers {teachers}")
            teachers = [config.ensemble]
        self.weights = ensemble.normalise_weights(config.teacher_weights or None, len(teachers))
        self.data: TrainingData = open_training_data(version, need=sorted(need), teachers=teachers,
                                                     transfer=config.transfer)
        self.num_classes = self.data.num_classes
        stored_k = version.top_k
        self.k = config.top_k or stored_k or self.num_classes
        if config.loss == "topk" and stored_k is not None and self.k > stored_k:
            raise ConfigError(f"--top-k {self.k}: {version.ref} stores top-{stored_k}; use a k <= {stored_k}")
        if config.loss == "topk" and self.k > self.num_classes:
            raise ConfigError(f"--top-k {self.k}: {version.ref} has {self.num_classes} classes; "
                              f"use a k <= {self.num_classes}")
        self.tail = config.tail or (version.manifest["targets"]["top_k"] or {}).get("tail", "uniform")
        self.eval_set = self._load_eval()
        self._build_student()  # fail on a bad --student now, before --out is created
        mode = config.data_mode
        if mode == "auto":
            mode = "memory" if self.data.input_bytes_estimate() < config.memory_limit_gb * 2**30 else "stream"
        self.mode = mode

    # -- setup -------------------------------------------------------------------------------------------------
    def _load_eval(self) -> tuple[Tensor, Tensor] | None:
        if not self.cfg.eval:
            return None
        ts = open_transfer(self.cfg.eval, input_columns=self.cfg.eval_input_columns or None,
                           label_column=self.cfg.eval_label_column, option="--eval")
        if not ts.has_labels:
            raise InputError(f"--eval {self.cfg.eval}: no label column found; an evaluation set needs labels "
                             "(--eval-label-column NAME)")
        x, y = ts.read_rows(0, ts.rows)
        ts.close()
        assert y is not None
        shape = tuple(self.data.version.manifest["transfer_set"]["inputs"]["shape"])
        if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
            raise InputError(f"--eval {self.cfg.eval}: inputs of shape {x.shape[1:]}, but the transfer set's are "
                             f"{shape}; evaluate on data of the same kind")
        if y.min() < 0 or y.max() >= self.num_classes:
            raise InputError(f"--eval {self.cfg.eval}: labels span {y.min()}..{y.max()}, "
                             f"outside 0..{self.num_classes - 1}")
        return torch.from_numpy(x.reshape(len(x), *shape)), torch.from_numpy(y)

    def _build_student(self) -> nn.Module:
        model = build_model(self.cfg.student)
        shape = tuple(self.data.version.manifest["transfer_set"]["inputs"]["shape"])
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, *shape))
        except Exception as e:
            raise StudentError(f"--student {self.cfg.student}: forward failed on inputs of shape {(2, *shape)} "
                               f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); "
                               "match its input size to the data") from None
        if out.ndim != 2 or out.shape[1] != self.num_classes:
            raise StudentError(f"--student {self.cfg.student}: outputs {tuple(out.shape[1:])} classes, but the store "
                               f"has {self.num_classes}; make its last size {self.num_classes}")
        return model.to(self.device)

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        c = self.cfg
        if c.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                   nesterov=c.momentum > 0)
        cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
        return cls(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)

    def _lr_at(self, epoch: int, step: int, steps: int) -> float:
        if self.cfg.schedule == "constant":
            return self.cfg.lr
        progress = (epoch + step / max(steps, 1)) / self.cfg.epochs
        return self.cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))

    # -- batches -----------------------------------------------------------------------------------------------
    def _batches(self, memory: dict[str, Tensor] | None, epoch: int, seed: int) -> Iterator[dict[str, Tensor]]:
        bs, rank, world = self.cfg.batch_size, self.dist.rank, self.dist.world_size
        if memory is not None:
            # --batch-size is the global batch: every rank draws the same permutation and takes every
            # world-th row of each global batch, so all ranks take the same number of steps (DDP needs that)
            # and no row is dropped or repeated; the loss is rescaled to the global mean (see _train_one).
            n = len(memory["sample_id"])
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g).to(self.device)
            for a in range(0, n, bs):
                glob = perm[a : a + bs]
                idx = glob[rank::world]
                batch = {k: v[idx] for k, v in memory.items()}
                batch["n_global"] = torch.tensor(len(glob))
                yield batch
            return
        # Streaming: each rank reads a disjoint set of row groups (uneven counts are handled with DDP's join).
        ds = self.data.stream(max(1, bs // world), seed=seed, rank=rank, world_size=world)
        ds.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def teacher_log_probs(self, batch: dict[str, Tensor], temperature: float) -> Tensor:
        """The (possibly ensembled) teacher's log soft targets at T for a batch, (B, C) float32."""
        if self.source == "logits":
            z = batch["logits"].float()  # (B, M, C)
            if self.cfg.loss == "topk":  # k chosen at train time from full logits
                b, m, c = z.shape
                v, i = targets.top_k(z.reshape(b * m, c), self.k)
                z = targets.rebuild_logits(v, i, torch.logsumexp(z.reshape(b * m, c), 1), c, self.tail).reshape(b, m, c)  # type: ignore[arg-type]
        else:
            v, i, lse = batch["topk_values"][..., : self.k].float(), batch["topk_indices"][..., : self.k], batch["lse"]
            b, m, k = v.shape
            z = targets.rebuild_logits(v.reshape(b * m, k), i.reshape(b * m, k), lse.reshape(b * m).float(),
                                       self.num_classes, self.tail).reshape(b, m, self.num_classes)  # type: ignore[arg-type]
        if z.shape[1] == 1:
            return torch.log_softmax(z[:, 0] / temperature, dim=1)
        if self.cfg.ensemble == "mean-logit":
            return torch.log_softmax(ensemble.mean_logits(z, self.weights) / temperature, dim=1)
        return ensemble.mean_prob_log_targets(torch.log_softmax(z / temperature, dim=2), self.weights)

    def _view_for(self, memory: dict[str, Tensor], temperature: float, alpha: float) -> dict[str, Tensor]:
        """The training view of (T, alpha), kept for the next point: the seeds of a point come one after another
        and share it, so a seed sweep computes the teacher's soft targets once per (T, alpha)."""
        if self._view is None or self._view[0] != (temperature, alpha):
            self._view = None  # free the previous view before building the next
            self._view = ((temperature, alpha), self._training_view(memory, temperature, alpha))
        return self._view[1]

    @torch.no_grad()
    def _training_view(self, memory: dict[str, Tensor], temperature: float, alpha: float) -> dict[str, Tensor]:
        """In-memory fast path: the targets this run's loss reads, precomputed once for every row.

        With T fixed for a run, the teacher's log soft targets (or the ensemble's mean logits) are the same every
        epoch, so they are computed once here and each step only gathers rows: a KD step then costs what a
        hard-label step does, plus the soft cross-entropy.
        """
        view = {"x": memory["x"], "sample_id": memory["sample_id"]}
        if "label" in memory and (self.cfg.loss in ("hard", "ls") or alpha < 1):
            view["label"] = memory["label"]
        n, chunk = len(memory["x"]), 65536
        if self.cfg.loss in ("kd", "topk"):
            parts = [self.teacher_log_probs({k: v[a : a + chunk] for k, v in memory.items()}, temperature)
                     for a in range(0, n, chunk)]
            view["teacher_logp"] = torch.cat(parts)
        elif self.cfg.loss == "mse":
            view["mse_target"] = torch.cat([ensemble.mean_logits(memory["logits"][a : a + chunk].float(), self.weights)
                                            for a in range(0, n, chunk)])
        return view

    def loss(self, student_logits: Tensor, batch: dict[str, Tensor], temperature: float, alpha: float) -> Tensor:
        c, labels = self.cfg, batch.get("label")
        if c.loss == "hard":
            return losses.hard_loss(student_logits, batch["label"])
        if c.loss == "ls":
            return losses.label_smoothing_loss(student_logits, batch["label"], smoothing=c.smoothing)
        if c.loss == "mse":
            target = batch["mse_target"] if "mse_target" in batch else ensemble.mean_logits(batch["logits"].float(),
                                                                                             self.weights)
            return losses.mse_logit_loss(student_logits, target, zero_mean=c.zero_mean)
        logp = batch["teacher_logp"] if "teacher_logp" in batch else self.teacher_log_probs(batch, temperature)
        return losses.kd_loss(student_logits, logp, labels if alpha < 1 else None, temperature=temperature, alpha=alpha)

    # -- evaluation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, int, float] | None:
        """(accuracy, errors, mean NLL) on the --eval set."""
        if self.eval_set is None:
            return None
        model.eval()
        x, y = self.eval_set
        correct, nll = 0, 0.0
        for a in range(0, len(x), 4096):
            xb, yb = x[a : a + 4096].to(self.device), y[a : a + 4096].to(self.device)
            with autocast(self.device, self.precision):
                out = model(xb)
            logp = torch.log_softmax(out.float(), dim=1)
            correct += int((logp.argmax(1) == yb).sum())
            nll += float(-logp.gather(1, yb[:, None]).sum())
        model.train()
        return correct / len(x), len(x) - correct, nll / len(x)

    @torch.no_grad()
    def agreement(self, model: nn.Module, memory: dict[str, Tensor] | None) -> float:
        """Fraction of transfer rows where the student's argmax equals the (ensembled) teacher's."""
        model.eval()
        agree = total = 0
        for batch in self._batches(memory, 0, self.cfg.seeds[0]):  # the order does not matter here
            batch.pop("n_global", None)
            if not len(batch["x"]):
                continue
            with autocast(self.device, self.precision):
                out = model(batch["x"])
            if "logits" in batch or "topk_values" in batch:
                teacher = self.teacher_log_probs(batch, 1.0).argmax(1)
            else:
                teacher = batch["label"]
            agree += int((out.float().argmax(1) == teacher).sum())
            total += len(teacher)
        model.train()
        agree_all, total_all = self.dist.sum(agree, total)
        return agree_all / max(total_all, 1)

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self, progress: Progress | None = None, resume: bool = False) -> list[RunResult]:
        """Train every sweep point; write outputs under `out`. Returns one RunResult per point."""
        self._prepare_out(resume)
        memory = self.data.to_memory(self.device) if self.mode == "memory" else None
        results = []
        for point in self.cfg.sweep():
            results.append(self._train_one(point, memory, progress))
            if self.dist.is_main:
                self.rundir.write_summary(self._summary(results))
        return results

    def _train_one(self, point: SweepPoint, memory: dict[str, Tensor] | None, progress: Progress | None) -> RunResult:
        temperature, alpha, seed = point
        rid = self.cfg.run_id(point)
        main = self.dist.is_main
        self.dist.barrier()  # rank 0 may have just written result.json / checkpoint.pt
        finished = self.rundir.result(rid)
        if finished is not None:
            return finished
        if main:
            self.rundir.start(rid)
        torch.manual_seed(seed)
        model = self._build_student()
        opt = self._optimizer(model)
        start_epoch, epoch_seconds = 0, []
        state = self.rundir.load_checkpoint(rid, self.device)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start_epoch, epoch_seconds = int(state["epoch"]) + 1, [float(s) for s in state["epoch_seconds"]]
            if main:
                self.rundir.truncate_metrics(rid, start_epoch)
        net: nn.Module = model
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        steps = math.ceil(self.data.num_rows / self.cfg.batch_size)
        train_view = self._view_for(memory, temperature, alpha) if memory is not None else None
        t0 = time.perf_counter()
        model.train()
        for epoch in range(start_epoch, self.cfg.epochs):
            te = time.perf_counter()
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            rows = 0
            with _join(net, self.dist.active and memory is None):
                for step, batch in enumerate(self._batches(train_view, epoch, seed)):
                    for group in opt.param_groups:
                        group["lr"] = self._lr_at(epoch, step, steps)
                    n_local = len(batch["x"])
                    n_global = int(batch.pop("n_global", torch.tensor(n_local * self.dist.world_size)))
                    if n_local:
                        with autocast(self.device, self.precision):
                            out = net(batch["x"])
                        loss = self.loss(out, batch, temperature, alpha)
                    else:  # a rank with no rows in the last global batch still joins the gradient all-reduce
                        loss = sum(p.sum() * 0.0 for p in model.parameters())  # type: ignore[assignment]
                    # DDP averages gradients over ranks; weighting by n_local / n_global * world makes the
                    # update the gradient of the mean over the whole global batch, however rows were split.
                    scale = n_local * self.dist.world_size / max(n_global, 1) if self.dist.active else 1.0
                    opt.zero_grad(set_to_none=True)
                    (loss * scale).backward()
                    opt.step()
                    total += loss.detach().double() * n_local
                    rows += n_local
                    if progress and main:
                        progress(rid, epoch, n_global)
            loss_sum, row_sum = self.dist.sum(float(total), float(rows))
            train_loss = loss_sum / max(row_sum, 1)
            if not math.isfinite(train_loss):
                raise TrainingDiverged(self._diverged(rid, f"the loss became {train_loss} in epoch {epoch + 1}"))
            epoch_seconds.append(time.perf_counter() - te)
            ev = self.evaluate(model)
            if main:
                line = {"run": rid, "temperature": temperature, "alpha": alpha, "seed": seed, "epoch": epoch + 1,
                        "train_loss": train_loss, "lr": opt.param_groups[0]["lr"], "seconds": epoch_seconds[-1]}
                if ev:
                    line.update(eval_accuracy=ev[0], eval_errors=ev[1], eval_nll=ev[2])
                self.rundir.save_checkpoint(rid, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                  "epoch": epoch, "epoch_seconds": epoch_seconds})
                self.rundir.append_metrics(line)
        ev = self.evaluate(model)
        if ev and not math.isfinite(ev[2]):
            raise TrainingDiverged(self._diverged(rid, "the trained student's outputs are not finite"))
        result = RunResult(rid, self.cfg.loss, temperature, alpha, self.cfg.epochs,
                           ev[0] if ev else None, ev[1] if ev else None, ev[2] if ev else None,
                           self.agreement(model, memory), time.perf_counter() - t0, epoch_seconds,
                           {"parameters": count_parameters(model), "world_size": self.dist.world_size}, seed)
        if main:
            self.rundir.finish(rid, model.state_dict(), self._student_info(result), result)
        return result

    def _diverged(self, rid: str, what: str) -> str:
        return (f"run {rid}: {what}; lower --lr (now {self.cfg.lr:g}) and train into a new --out, "
                "or check the stored targets")

    # -- the run directory (kdstore.rundir writes it) --------------------------------------------------------------
    def _prepare_out(self, resume: bool) -> None:
        try:
            if self.dist.is_main:
                self.rundir.prepare({"config": json.loads(json.dumps(asdict(self.cfg))),
                                     "targets": str(self.data.version.ref), "mode": self.mode,
                                     "device": str(self.device), "precision": self.precision, "source": self.source,
                                     "torch_version": torch.__version__}, resume)
        finally:
            self.dist.barrier()

    def _student_info(self, result: RunResult) -> dict[str, Any]:
        return {"student": self.cfg.student, "num_classes": self.num_classes, "loss": self.cfg.loss,
                "temperature": result.temperature, "alpha": result.alpha, "seed": result.seed,
                "targets": str(self.data.version.ref),
                "load": f"kdstore.students.build_model({self.cfg.student!r}).load_state_dict("
                        "safetensors.torch.load_file('student.safetensors'))"}

    def _summary(self, results: list[RunResult]) -> dict[str, Any]:
        stats = self.data.version.manifest["statistics"]
        summary = {"targets": str(self.data.version.ref), "student": self.cfg.student, "teacher": stats["teachers"],
                   "ensemble": stats.get("ensemble"), "runs": [asdict(r) for r in results]}
        if len(self.cfg.seeds) > 1:
            summary["over_seeds"] = over_seeds(results)
        return summary


def _join(net: nn.Module, uneven: bool) -> Any:
    """DDP's join context for uneven per-rank batch counts (streaming); a no-op otherwise."""
    import contextlib

    if not uneven:
        return contextlib.nullcontext()
    return net.join()  # type: ignore[operator]
