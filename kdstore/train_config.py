"""The options of `kdstore train` as one frozen, validated dataclass, and the sweep points they describe."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from kdstore.errors import ConfigError, arg
from kdstore.options import DATA_MODES, ENSEMBLES, LOSSES, OPTIMIZERS, PRECISIONS, SCHEDULES, TAIL_MODELS
from kdstore.rundir import run_id


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
            e.append(f"{arg('loss')} {self.loss!r}: expected one of {', '.join(LOSSES)}")
        e += [f"{arg('temperatures')} {t}: must be > 0" for t in self.temperatures if not (t > 0 and math.isfinite(t))]
        e += [f"{arg('alphas')} {a}: must be in [0, 1]" for a in self.alphas if not 0 <= a <= 1]
        if not self.temperatures or not self.alphas:
            e.append(f"{arg('temperatures')} and {arg('alphas')} need at least one value")
        if self.epochs < 1:
            e.append(f"{arg('epochs')} {self.epochs}: must be >= 1")
        if self.batch_size < 1:
            e.append(f"{arg('batch_size')} {self.batch_size}: must be >= 1")
        if not self.lr > 0:
            e.append(f"{arg('lr')} {self.lr}: must be > 0")
        if self.optimizer not in OPTIMIZERS:
            e.append(f"{arg('optimizer')} {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            e.append(f"{arg('schedule')} {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.weight_decay < 0:
            e.append(f"{arg('weight_decay')} {self.weight_decay}: must be >= 0")
        e += [f"{arg('seeds')} {s}: must be >= 0" for s in self.seeds if s < 0]
        if not self.seeds:
            e.append(f"{arg('seeds')} needs at least one value")
        elif len(set(self.seeds)) != len(self.seeds):
            e.append(f"{arg('seeds')} {','.join(map(str, self.seeds))}: a seed is repeated; give each seed once")
        if self.top_k is not None and self.top_k < 1:
            e.append(f"{arg('top_k')} {self.top_k}: must be >= 1")
        if self.tail is not None and self.tail not in TAIL_MODELS:
            e.append(f"{arg('tail')} {self.tail!r}: expected one of {', '.join(TAIL_MODELS)}")
        if not (self.ensemble in ENSEMBLES or (self.ensemble.startswith("t") and self.ensemble[1:].isdigit())):
            e.append(f"{arg('ensemble')} {self.ensemble!r}: expected mean-prob, mean-logit or a member id like t0")
        if not 0 <= self.smoothing < 1:
            e.append(f"{arg('smoothing')} {self.smoothing}: must be in [0, 1)")
        if self.data_mode not in DATA_MODES:
            e.append(f"{arg('data_mode')} {self.data_mode!r}: expected one of {', '.join(DATA_MODES)}")
        if self.num_workers < 0:
            e.append(f"{arg('num_workers')} {self.num_workers}: must be >= 0")
        if self.precision not in PRECISIONS:
            e.append(f"{arg('precision')} {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
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
