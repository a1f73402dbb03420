"""Advice from the data: how informative a version's soft targets are at each temperature, and what to train with.

`advise` reads a bounded, evenly spread sample of a version's rows (`SAMPLE_ROWS`, through
`kdstore.soft_targets.log_probs`) and measures, per teacher and temperature, the mean entropy, the mean largest and
the mean second-largest probability of the soft targets, plain and standardised (`kdstore.targets.standardize`).
From these it says in plain words whether the default temperature gives near one-hot or near uniform targets and
suggests a `kdstore train` sweep. The thresholds come from the benchmark in docs/benchmarks.md ("Teachers of
different confidence"): `kdstore label`'s summary, `kdstore inspect` and the dataset card all show this advice.
Nothing is written: the manifest is not changed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from kdstore.soft_targets import columns_for, log_probs, teacher_id
from kdstore.store import Version
from kdstore.targets import standardize

TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)
DEFAULT_T = 4.0  # `kdstore train`'s default --temperature
SAMPLE_ROWS = 8192
CHUNKS = 8  # the sample is this many contiguous runs of rows spread over the version

# The rule, measured (docs/benchmarks.md, "Teachers of different confidence": three MNIST CNN teachers that differ
# only in how they were trained, a 784-100-10 student, 3 seeds, the best chosen on a 10% validation split):
ONE_HOT_P2 = 0.03  # mean 2nd probability at the default T below this: near one-hot. The overconfident teacher
#                    (0.021) made plain KD at T = 4 lose 39% to hard labels; the calibrated one (0.058) lost 5%.
UNIFORM_ENTROPY = 0.9  # mean entropy above this share of log C: near uniform (the calibrated teacher at T = 20,
#                        0.96, was its worst temperature: 9% more errors than hard labels)
WEAK_ACCURACY = 0.95  # a teacher right on fewer labeled transfer rows has little to give (the undertrained one, 88%,
#                       lost to hard labels at every setting; the 92% teacher tied at best)
SUGGESTED_T = (0.5, 1.0, 2.0)  # standardised KD from the soft targets alone (alpha 1): 39-44% fewer errors than
SUGGESTED_ALPHA = 1.0  # hard labels for both good teachers (T 0.5 chosen on validation); a tie with plain KD on
#                        Hinton's 800-800 student


@dataclass(frozen=True)
class Informativeness:
    """Soft targets of one teacher at one temperature, averaged over the sampled rows."""

    temperature: float
    standardized: bool
    entropy: float  # nats
    max_prob: float
    second_prob: float


@dataclass
class Advice:
    """What the data says about one teacher's soft targets, and the sweep to try."""

    teacher: str
    rows: int  # rows sampled
    num_classes: int
    accuracy: float | None  # on the sampled labeled rows
    plain: list[Informativeness]
    standardized: list[Informativeness]
    verdict: str = "informative"  # "near one-hot", "near uniform" or "informative" at DEFAULT_T
    words: list[str] = field(default_factory=list)  # the advice, one sentence a line
    standardize: tuple[bool, ...] = (True,)  # the suggested sweep (always with the hard-label run)
    temperatures: tuple[float, ...] = SUGGESTED_T
    alphas: tuple[float, ...] = (SUGGESTED_ALPHA,)
    default_t: float = DEFAULT_T

    def at(self, temperature: float, standardized: bool = False) -> Informativeness:
        rows = self.standardized if standardized else self.plain
        return next(r for r in rows if r.temperature == temperature)

    def command(self, ref: str, labeled: bool) -> str:
        """The suggested `kdstore train` sweep (student, epochs and --eval are the user's)."""
        std = ",".join("on" if s else "off" for s in self.standardize)
        temps, alphas = (",".join(f"{v:g}" for v in vs) for vs in (self.temperatures, self.alphas))
        losses = "hard,kd" if labeled else "kd"
        val = " --val-fraction 0.1" if labeled else " --val LABELED.parquet"
        return (f"kdstore train --targets {ref} --student SPEC --loss {losses} --standardize {std} -T {temps} "
                f"--alpha {alphas}{val} --seed 0,1,2 --out RUN")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("standardize", "temperatures", "alphas"):
            d[k] = list(d[k])
        return d


def sample_ranges(num_rows: int, rows: int = SAMPLE_ROWS, chunks: int = CHUNKS) -> list[tuple[int, int]]:
    """`chunks` [start, stop) runs of about rows / chunks rows each, spread evenly over [0, num_rows)."""
    if num_rows <= rows:
        return [(0, num_rows)]
    size = max(1, rows // chunks)
    starts = np.linspace(0, num_rows - size, chunks).astype(np.int64)
    return [(int(a), int(a) + size) for a in starts]


def measure(log_p: torch.Tensor) -> tuple[float, float, float]:
    """(mean entropy in nats, mean largest probability, mean second-largest probability) of (N, C) log-probs."""
    p = log_p.exp()
    ent = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(1)
    top2 = p.topk(min(2, p.shape[1]), dim=1).values
    second = top2[:, 1] if top2.shape[1] > 1 else torch.zeros(len(p))
    return float(ent.double().mean()), float(top2[:, 0].double().mean()), float(second.double().mean())


def advise(version: Version, teacher: str | None = None, *, rows: int = SAMPLE_ROWS) -> list[Advice]:
    """Advice for each teacher of `version` (or only `teacher`), from at most `rows` sampled rows."""
    ids = [teacher_id(version, teacher)] if teacher else version.teacher_ids
    label = version.column_for("label") if version.has_labels else None
    names = list(dict.fromkeys(c for t in ids for c in columns_for(version, t))) + ([label] if label else [])
    parts = [version.read_rows(a, b, names) for a, b in sample_ranges(version.num_rows, rows)]
    block = {n: np.concatenate([p[n] for p in parts]) for n in names}
    out = []
    for tid in ids:
        lp1 = log_probs(version, block, tid, 1.0)
        z = standardize(lp1)  # log-probs at T = 1 are the logits up to a per-row shift, which the z-score removes
        plain = [Informativeness(t, False, *measure(log_probs(version, block, tid, t))) for t in TEMPERATURES]
        std = [Informativeness(t, True, *measure(torch.log_softmax(z / t, dim=1))) for t in TEMPERATURES]
        acc = None if label is None else float((lp1.argmax(1).numpy() == block[label]).mean())
        advice = Advice(tid, len(lp1), version.num_classes, acc, plain, std)
        _rule(advice)
        out.append(advice)
    return out


def _rule(a: Advice) -> None:
    """Fill in the verdict and the words (the rule in the module's constants); the suggested sweep is always
    hard labels beside standardised KD at alpha 1 and T 0.5-2, the only setting that beat hard labels in the
    benchmark, chosen on validation so that a teacher with nothing to give loses to the labels, not the user."""
    d, c = a.at(DEFAULT_T), a.num_classes
    flat = UNIFORM_ENTROPY * math.log(c)
    usable = [r.temperature for r in a.plain if r.second_prob >= ONE_HOT_P2 and r.entropy <= flat]
    t_range = f"T {usable[0]:g}-{usable[-1]:g}" if usable else "no T of " + "/".join(f"{t:g}" for t in TEMPERATURES)
    std = (f"--standardize -T {','.join(f'{t:g}' for t in SUGGESTED_T)} --alpha {SUGGESTED_ALPHA:g} (z-scored "
           f"logits: {_stats(a.at(1.0, True))} at T = 1)")
    at = f"At the default T = {DEFAULT_T:g} ({_stats(d)})"
    if d.entropy > flat:  # first: with many classes a near-uniform row's 2nd probability (~1/C) is small too
        a.verdict = "near uniform"
        a.words = [f"{at} the soft targets are near uniform: the label's signal fades.",
                   f"Plain KD wants a lower temperature ({t_range}); standardised KD did best in the benchmark: {std}."]
    elif d.second_prob < ONE_HOT_P2:
        a.verdict = "near one-hot"
        a.words = [f"{at} the soft targets are near one-hot: they carry little beyond the label, and plain KD can "
                   "do worse than hard labels.",
                   f"Plain targets are informative at {t_range}, but a teacher this sure of itself taught worse at "
                   f"high T too; standardise instead: {std}."]
    else:
        a.verdict = "informative"
        a.words = [f"{at} the soft targets are informative for plain KD ({t_range}).",
                   f"Standardised KD still did best in the benchmark: {std}."]
    if a.accuracy is not None and a.accuracy < WEAK_ACCURACY:
        a.words.append(f"The teacher is right on only {100 * a.accuracy:.2f}% of the labeled transfer rows: a student "
                       "that learns the labels better gains nothing by imitating it. Expect the hard-label run to "
                       "win.")
    elif a.accuracy is not None:
        a.words.append(f"The teacher is right on {100 * a.accuracy:.2f}% of the labeled transfer rows.")
    a.words.append("Keep the hard-label run in the sweep and let the validation split choose.")


def _stats(r: Informativeness) -> str:
    return f"mean entropy {r.entropy:.3g} nats, max p {r.max_prob:.3f}, 2nd p {r.second_prob:.3g}"
