"""The options of `kdstore train` as one frozen, validated dataclass, and the sweep points they describe."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, NamedTuple

from kdstore import options
from kdstore.errors import ConfigError, arg
from kdstore.hints import HintSpec
from kdstore.options import DATA_MODES, ENSEMBLES, LM_LOSSES, LOSSES, OPTIMIZERS, PRECISIONS, SCHEDULES, TAIL_MODELS
from kdstore.rundir import run_id

NO_TEMPERATURE = ("hard", "ls", "mse")  # losses without T or alpha: one run per seed (and per standardize, mse)
SOFT = ("kd", "topk", "mse")  # losses that read teacher logits, so standardising them means something
# Options that change how a run executes, not what it computes (up to floating-point reassociation): --resume
# accepts other values of them.
EXECUTION = ("group_size", "checkpoint_every", "agreement")


class SweepPoint(NamedTuple):
    """One student to train: its temperature, soft-term weight, seed, loss and whether logits are standardised."""

    temperature: float
    alpha: float
    seed: int
    loss: str = "kd"
    standardize: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Everything `kdstore train` needs; validated on construction (options map one-to-one to fields)."""

    targets: str
    student: str
    out: str
    losses: tuple[str, ...] = ("kd",)
    standardize: tuple[bool, ...] = (False,)
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
    val: str | None = None
    val_fraction: float | None = None
    val_seed: int = 0
    augment: str | None = None
    group_size: int | None = None  # points per pass; None: automatic (bounded by memory), 1: one at a time
    eval_every: int = 1
    checkpoint_every: int = 1
    agreement: str = "last-epoch"  # options.AGREEMENT: counted in the last epoch, or a pass of the final weights
    hints: tuple[str, ...] = ()  # LAYER:STUDENT_MODULE[:WEIGHT] (kdstore.hints)
    hint_epochs: int = 0  # FitNets stage 1: the first N epochs train on the hints alone

    def __post_init__(self) -> None:
        if isinstance(self.losses, str):  # TrainConfig(losses="kd"): one loss
            object.__setattr__(self, "losses", (self.losses,))
        e = [f"{arg('losses')} {x!r}: expected one of {', '.join(LOSSES)}"
             + (" (it is for per-token targets: a version labeled by a language model)" if x in LM_LOSSES else "")
             for x in self.losses if x not in LOSSES]
        e += _once("losses", self.losses) + _once("standardize", self.standardize)
        if True in self.standardize and not set(self.losses) & set(SOFT):
            e.append(f"{arg('standardize')}: {arg('losses')} {','.join(self.losses)} reads no teacher logits, so "
                     f"there is nothing to standardise; use it with {arg('losses')} kd, topk or mse")
        e += self._check_val()
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
        e += self._check_cadence()
        if self.agreement not in options.AGREEMENT:
            e.append(f"{arg('agreement')} {self.agreement!r}: expected one of {', '.join(options.AGREEMENT)}")
        if self.hint_epochs and not self.hints:
            e.append(f"{arg('hint_epochs')} {self.hint_epochs}: trains on the hints alone, and no {arg('hint')} is "
                     "given; add --hint LAYER:MODULE or drop it")
        if not 0 <= self.hint_epochs < self.epochs:
            e.append(f"{arg('hint_epochs')} {self.hint_epochs}: must be in [0, {arg('epochs')} {self.epochs}): the "
                     "epochs after it train on the logit loss too")
        for h in self.hints:
            try:
                HintSpec.parse(h)
            except ConfigError as err:
                e.append(err.template)
        if self.precision not in PRECISIONS:
            e.append(f"{arg('precision')} {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if e:
            raise ConfigError("; ".join(e))

    def _check_cadence(self) -> list[str]:
        e = []
        if self.group_size is not None and self.group_size < 1:
            e.append(f"{arg('group_size')} {self.group_size}: must be >= 1 (1 trains the points one at a time) or "
                     "auto")
        e += [f"{arg(name)} {getattr(self, name)}: must be >= 1 (epochs)" for name in ("eval_every", "checkpoint_every")
              if getattr(self, name) < 1]
        return e

    def _check_val(self) -> list[str]:
        e = []
        if self.val is not None and self.val_fraction is not None:
            e.append(f"{arg('val')} and {arg('val_fraction')} both choose the validation set; give one of them")
        if self.val is not None and not self.val:
            e.append(f"{arg('val')}: empty path; give a labeled file like the transfer set")
        f = self.val_fraction
        if f is not None and not (0 < f < 1):
            e.append(f"{arg('val_fraction')} {f}: must be in (0, 1), e.g. 0.1 holds out 10% of the transfer set")
        if self.val_seed < 0:
            e.append(f"{arg('val_seed')} {self.val_seed}: must be >= 0")
        return e

    def sweep(self) -> list[SweepPoint]:
        """Every (loss, standardize, T, alpha, seed) to train, seeds innermost. Losses without T or alpha get one
        run per seed; hard and ls are never standardised (they read no logits)."""
        points = []
        for loss in self.losses:
            for std in (self.standardize if loss in SOFT else (False,)):
                if loss in NO_TEMPERATURE:
                    pairs = [(1.0, 0.0 if loss != "mse" else 1.0)]
                else:
                    pairs = [(t, a) for t in self.temperatures for a in self.alphas]
                points += [SweepPoint(t, a, s, loss, std) for t, a in pairs for s in self.seeds]
        return points

    def run_id(self, point: SweepPoint) -> str:
        """The point's directory under RUN/runs; the seed is part of it only when several are swept."""
        return run_id(point.loss, point.temperature, point.alpha, point.seed if len(self.seeds) > 1 else None,
                      point.standardize)

    @classmethod
    def upgrade_record(cls, old: dict[str, Any]) -> dict[str, Any]:
        """The options of a run directory's config.json in today's fields: runs started before `loss` became a
        list (`losses`) and before options added since (`standardize`, the validation set) ran with one loss and
        those options' defaults, so `--resume` accepts them unchanged."""
        new = dict(old)
        if "loss" in new and "losses" not in new:
            new["losses"] = [new.pop("loss")]
        return with_defaults(cls, new)


def with_defaults(cls: type, record: dict[str, Any]) -> dict[str, Any]:
    """A config dataclass's options as config.json records them (tuples as lists), each field missing from `record`
    (an option added since the run started) at its default."""
    return {**{f.name: list(f.default) if isinstance(f.default, tuple) else f.default
               for f in fields(cls) if f.default is not MISSING}, **record}


def _once(name: str, values: tuple[Any, ...]) -> list[str]:
    """Errors for an empty list or a repeated value of option `name`."""
    if not values:
        return [f"{arg(name)} needs at least one value"]
    if len(set(values)) != len(values):
        return [f"{arg(name)} {','.join(map(str, values))}: a value is repeated; give each once"]
    return []
