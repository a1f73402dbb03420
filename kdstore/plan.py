"""What a training run reads from a version: a pure function of the run's options and the version's manifest.

`plan_targets` decides, before any data is opened, which stored targets the run reads (full logits, top-k,
labels), where soft targets come from (exact logits, or rebuilt from a top-k), with which k and tail model,
and which teachers are combined how. The trainer, `kdstore.soft_targets` and the data loader follow the plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kdstore.errors import ConfigError, arg
from kdstore.options import LOSSES

SOFT_LOSSES = ("kd", "topk")
_READS = {"kd": {"logits"}, "topk": {"topk"}, "mse": {"logits"}, "hard": set(), "ls": set()}


def describe_need(loss: str, alpha: float) -> set[str]:
    """Which stored targets a loss reads at `alpha` (hard-label terms need labels)."""
    need = _READS.get(loss)
    if need is None:
        raise ConfigError(f"{arg('loss')} {loss!r}: expected one of {', '.join(LOSSES)}")
    if loss in ("hard", "ls") or (loss in SOFT_LOSSES and alpha < 1):
        need = need | {"label"}
    return need


@dataclass(frozen=True)
class TargetPlan:
    """The stored targets a run reads and how it turns them into soft targets.

    Attributes:
        need: what `kdstore.data` reads: a subset of {"logits", "topk", "label"}.
        source: "logits" (exact soft targets) or "topk" (rebuilt from the stored top-k and log-sum-exp).
        k: the top-k used: stored k (or less, by option) for "topk"; chosen at train time for `topk_from_logits`.
        topk_from_logits: loss "topk" on a version without stored top-k: the top-k is taken from the full logits.
        tail: "uniform" or "drop" (docs/format.md).
        teachers: the stored teachers read, e.g. ("t0", "t1").
        ensemble: "mean-prob" or "mean-logit" (one teacher: irrelevant).
        num_classes: C.
    """

    need: frozenset[str]
    source: str
    k: int
    topk_from_logits: bool
    tail: str
    teachers: tuple[str, ...]
    ensemble: str
    num_classes: int


def plan_targets(manifest: Mapping[str, Any], *, loss: str, alphas: Iterable[float], top_k: int | None = None,
                 tail: str | None = None, ensemble: str = "mean-prob", where: str = "the version") -> TargetPlan:
    """Plan what a run of `loss` over `alphas` reads from a version with this manifest.

    Args:
        manifest: the version's manifest.
        top_k: for loss "topk", use the K largest (at most the stored k); None = the stored k.
        tail: override the version's tail model.
        ensemble: "mean-prob", "mean-logit", or one member's id ("t0") to read only that teacher.
        where: how error messages name the version.

    Raises:
        ConfigError: a k larger than stored or than C, an unknown teacher.
    """
    stored = manifest["targets"]
    has_logits, stored_k = stored["logits"] is not None, (stored["top_k"] or {}).get("k")
    c = int(manifest["num_classes"])
    need: set[str] = set()
    for alpha in alphas:
        need |= describe_need(loss, alpha)
    source = "logits"
    if loss == "kd" and not has_logits:
        need = (need - {"logits"}) | {"topk"}  # exact logits absent: rebuild soft targets from the top-k
    if loss == "topk" and stored_k is None:
        need = (need - {"topk"}) | {"logits"}  # the top-k is taken from the full logits at train time
    if "topk" in need:
        source = "topk"
    if loss in ("hard", "ls"):  # not used by the loss, but needed to report agreement with the teacher honestly
        need |= {"logits"} if has_logits else {"topk"}
        source = "logits" if has_logits else "topk"
    k = top_k or stored_k or c
    if loss == "topk" and stored_k is not None and k > stored_k:
        raise ConfigError(f"{arg('top_k')} {k}: {where} stores top-{stored_k}; use a k <= {stored_k}")
    if loss == "topk" and k > c:
        raise ConfigError(f"{arg('top_k')} {k}: {where} has {c} classes; use a k <= {c}")
    teachers = tuple(t["id"] for t in manifest["teachers"])
    if ensemble.startswith("t") and ensemble[1:].isdigit():
        if ensemble not in teachers:
            raise ConfigError(f"{arg('ensemble')} {ensemble}: {where} has teachers {list(teachers)}")
        teachers = (ensemble,)
    return TargetPlan(frozenset(need), source, k, loss == "topk" and source == "logits",
                      tail or (stored["top_k"] or {}).get("tail", "uniform"), teachers, ensemble, c)
