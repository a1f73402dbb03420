"""`kdstore inspect`: a dataset card, in the terminal and as ``card/README.md`` with PNG plots.

The terminal card (`kdstore.card_render`) is made from the manifest alone (provenance, stored targets, label-time
statistics, top-k fidelity). `compute_statistics` reads the data once, streaming file by file, for what the manifest
does not hold: confidence histogram, reliability diagram and expected calibration error (where labels exist),
per-row top-k probability mass, and the class-similarity matrix (mean soft targets at a chosen temperature, rows
grouped by true class, or by argmax where there are no labels: the "dark knowledge" structure KD transfers at high T),
and the advice of `kdstore.advice` (soft targets per temperature, from a sample of rows).

Card files are *derived*: they are written to ``vN/card/`` (each file atomically, README.md last), are not listed
in the manifest and do not change it, so a version's checksummed content never changes (docs/format.md).
Plots use matplotlib's object API with the Agg canvas: no pyplot, no global backend state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore.advice import Advice, advise
from kdstore.card_render import ECE_BINS, PLOTS, card_markdown
from kdstore.errors import ConfigError, arg
from kdstore.soft_targets import columns_for, log_probs, teacher_id
from kdstore.store import Version
from kdstore.store.catalog import class_names
from kdstore.store.files import atomic_write_bytes
from kdstore.targets import check_temperature
from kdstore.versioning import rows_per_chunk

CARD_DIR = "card"
CONF_BINS = 20
MASS_BINS = 20


@dataclass
class TeacherStats:
    teacher: str
    rows: int = 0
    correct: int = 0
    labeled: int = 0
    confidence_sum: float = 0.0
    entropy_sum: float = 0.0
    conf_hist: np.ndarray = field(default_factory=lambda: np.zeros(CONF_BINS, np.int64))
    rel_count: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS, np.int64))
    rel_conf: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS, np.float64))
    rel_correct: np.ndarray = field(default_factory=lambda: np.zeros(ECE_BINS, np.float64))
    mass_hist: dict[int, np.ndarray] = field(default_factory=dict)
    mass_sum: dict[int, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labeled if self.labeled else None

    @property
    def mean_confidence(self) -> float:
        return self.confidence_sum / max(self.rows, 1)

    @property
    def mean_entropy(self) -> float:
        return self.entropy_sum / max(self.rows, 1)

    @property
    def ece(self) -> float | None:
        """Expected calibration error: sum over bins of (rows in bin / rows) * |accuracy - mean confidence|."""
        if not self.labeled:
            return None
        n = self.rel_count
        nz = n > 0
        gaps = np.abs(self.rel_correct[nz] / n[nz] - self.rel_conf[nz] / n[nz])
        return float((n[nz] / n.sum() * gaps).sum())

    def mass_mean(self, k: int) -> float:
        return self.mass_sum[k] / max(self.rows, 1)

    def add(self, lp: torch.Tensor, y: np.ndarray | None) -> np.ndarray:
        """Add a block of rows from their (N, C) log soft targets at T = 1; returns the teacher's argmax."""
        p = lp.exp()
        conf, pred = p.max(1)
        conf_np, pred_np = conf.double().numpy(), pred.numpy()
        self.rows += len(conf_np)
        self.confidence_sum += float(conf_np.sum())
        self.entropy_sum += float(-(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum(1).double().sum())
        self.conf_hist += np.histogram(conf_np, CONF_BINS, (0.0, 1.0))[0]
        if y is not None:
            ok = pred_np == y
            self.correct += int(ok.sum())
            self.labeled += len(y)
            b = np.minimum((conf_np * ECE_BINS).astype(np.int64), ECE_BINS - 1)
            self.rel_count += np.bincount(b, minlength=ECE_BINS)
            self.rel_conf += np.bincount(b, conf_np, minlength=ECE_BINS)
            self.rel_correct += np.bincount(b, ok.astype(np.float64), minlength=ECE_BINS)
        return pred_np

    def add_mass(self, k: int, mass: np.ndarray) -> None:
        """Add the top-k probability mass of a block of rows."""
        mass = np.clip(mass, 0.0, 1.0)
        self.mass_hist.setdefault(k, np.zeros(MASS_BINS, np.int64))
        self.mass_hist[k] += np.histogram(mass, MASS_BINS, (0.0, 1.0))[0]
        self.mass_sum[k] = self.mass_sum.get(k, 0.0) + float(mass.sum())


@dataclass
class CardStatistics:
    """What the data says beyond the manifest (see module docstring)."""

    temperature: float
    similarity_teacher: str
    grouped_by: str  # "label" or "argmax"
    similarity: np.ndarray  # (C, C): row c = mean soft targets at T over rows of class c
    group_rows: np.ndarray  # (C,)
    topk_ks: list[int]
    topk_source: str  # "stored top-k" or "full logits"
    teachers: list[TeacherStats]
    advice: list[Advice] = field(default_factory=list)  # soft targets per temperature (kdstore.advice)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able statistics (what `kdstore inspect --card --json` prints as ``card_statistics``)."""
        return {
            "temperature": self.temperature, "similarity_teacher": self.similarity_teacher,
            "grouped_by": self.grouped_by, "similarity": self.similarity.tolist(),
            "teachers": {s.teacher: {"accuracy": s.accuracy, "ece": s.ece, "mean_confidence": s.mean_confidence,
                                     "mean_entropy_nats": s.mean_entropy,
                                     "topk_mass_mean": {str(k): s.mass_mean(k) for k in self.topk_ks}}
                         for s in self.teachers},
            "advice": [a.to_json() for a in self.advice],
        }

    def similar_pairs(self, names: list[str], n: int = 5) -> list[tuple[str, str, float]]:
        """The `n` largest off-diagonal entries of the similarity matrix: (class, most similar class, mean prob)."""
        m = self.similarity.copy()
        np.fill_diagonal(m, -1.0)
        m[self.group_rows == 0] = -1.0
        flat = np.argsort(m, axis=None)[::-1][:n]
        return [(names[i], names[j], float(m[i, j]))
                for i, j in zip(*np.unravel_index(flat, m.shape), strict=True) if m[i, j] >= 0]


def compute_statistics(version: Version, *, temperature: float = 4.0, teacher: str | None = None) -> CardStatistics:
    """Read every row once and compute the card's statistics for every teacher.

    Args:
        temperature: the temperature of the class-similarity matrix (the other statistics are at T = 1).
        teacher: whose soft targets make the similarity matrix (default: the first teacher).
    """
    check_temperature(temperature)
    sim_t = teacher_id(version, teacher)
    c = version.num_classes
    k_stored = version.top_k
    ks = [k_stored] if k_stored else sorted({1, min(5, c - 1)})
    label_col = version.column_for("label") if version.has_labels else None
    names: list[str] = [label_col] if label_col else []
    for tid in version.teacher_ids:
        names += columns_for(version, tid)
        if k_stored:
            names += [c for c in (version.column_for(r, tid) for r in ("topk_values", "logsumexp", "tail_logmass"))
                      if c]
    names = list(dict.fromkeys(names))
    stats = [TeacherStats(tid) for tid in version.teacher_ids]
    sim = torch.zeros(c, c, dtype=torch.float64)
    group_rows = np.zeros(c, np.int64)
    for block in version.iter_blocks(names, rows_per_chunk(c)):  # memory bounded by a chunk, whatever C
        y = block[label_col].astype(np.int64) if label_col else None
        for s in stats:
            lp = log_probs(version, block, s.teacher, 1.0)
            pred_np = s.add(lp, y)
            for k in ks:
                tcol = version.column_for("tail_logmass", s.teacher)
                if k_stored and tcol:  # format 2: exactly 1 - exp(tail)
                    s.add_mass(k, -np.expm1(np.asarray(block[tcol], np.float64)))
                elif k_stored:
                    v = np.asarray(block[version.column_for("topk_values", s.teacher) or ""], np.float64)
                    lse = np.asarray(block[version.column_for("logsumexp", s.teacher) or ""], np.float64)
                    s.add_mass(k, np.exp(v[:, :k] - lse[:, None]).sum(1))
                else:
                    s.add_mass(k, torch.topk(lp.exp(), k, dim=1).values.sum(1).double().numpy())
            if s.teacher == sim_t:
                pt = log_probs(version, block, s.teacher, temperature).exp().double()
                ref = torch.from_numpy(y if y is not None else pred_np).long()
                sim.index_add_(0, ref, pt)
                group_rows += np.bincount(ref.numpy(), minlength=c)[:c]
    mean_sim = (sim / torch.from_numpy(np.maximum(group_rows, 1)).double()[:, None]).numpy()
    return CardStatistics(float(temperature), sim_t, "label" if label_col else "argmax", mean_sim, group_rows, ks,
                          "stored top-k" if k_stored else "full logits", stats, advise(version))


# --- the card files ------------------------------------------------------------------------------------------------


def card_dir(version: Version) -> Path:
    return version.path / CARD_DIR


def prepare_card_dir(version: Version, out_dir: Path | None = None) -> Path:
    """Create the card directory (default ``vN/card/``) and return it; fails early if it cannot be written."""
    out = Path(out_dir) if out_dir is not None else card_dir(version)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {out}: {e.strerror}; "
                          f"pass {arg('card_dir')} DIR to write the card elsewhere") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"{out} is not writable; pass {arg('card_dir')} DIR to write the card elsewhere")
    return out


def write_card(version: Version, stats: CardStatistics, out_dir: Path | None = None) -> list[Path]:
    """Write README.md and the PNG plots into `out_dir` (default ``vN/card/``); return the files written.

    Every file is written to a temporary name and renamed, README.md last, so a reader sees either the previous
    card or the new one, file by file; the manifest and data files are never touched.
    """
    out = prepare_card_dir(version, out_dir)
    names = class_names(version.manifest)
    written = []
    plots = _plots(version, stats, names)
    for key, fig in plots.items():
        written.append(_save_png(fig, out / PLOTS[key]))
    readme = card_markdown(version.manifest, stats, [k for k in PLOTS if k in plots])
    written.append(_atomic_write(out / "README.md", readme.encode("utf-8")))
    return written


def _atomic_write(path: Path, data: bytes) -> Path:
    try:
        return atomic_write_bytes(path, data)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}; "
                          f"pass {arg('card_dir')} DIR to write the card elsewhere") from None


def _save_png(fig: Any, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return _atomic_write(path, buf.getvalue())


def _plots(version: Version, stats: CardStatistics, names: list[str]) -> dict[str, Any]:
    from matplotlib.figure import Figure

    figs: dict[str, Any] = {}
    many = len(stats.teachers) > 1
    edges = np.linspace(0, 1, CONF_BINS + 1)

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for s in stats.teachers:
        ax.stairs(s.conf_hist / max(s.rows, 1), edges, label=s.teacher, fill=not many, alpha=0.8 if not many else 1.0)
    ax.set(xlabel="teacher confidence (max probability at T = 1)", ylabel="fraction of rows", xlim=(0, 1),
           title=f"{version.manifest['name']}@v{version.manifest['version']}: teacher confidence")
    _log_if_concentrated(ax, [s.conf_hist / max(s.rows, 1) for s in stats.teachers])
    if many:
        ax.legend()
    figs["confidence"] = fig

    if any(s.labeled for s in stats.teachers):
        fig = Figure(figsize=(5, 5), layout="constrained")
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        for s in stats.teachers:
            nz = s.rel_count > 0
            conf = s.rel_conf[nz] / s.rel_count[nz]
            acc = s.rel_correct[nz] / s.rel_count[nz]
            ax.plot(conf, acc, marker="o", label=f"{s.teacher} (ECE {s.ece:.4f})")
        ax.set(xlabel="mean confidence in bin", ylabel="accuracy in bin", xlim=(0, 1), ylim=(0, 1),
               title=f"reliability diagram ({ECE_BINS} bins)")
        ax.legend(loc="upper left")
        figs["reliability"] = fig

    c = len(names)
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(stats.similarity, cmap="viridis", vmin=0.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="mean probability")
    ax.set(xlabel="class (soft-target probability)", ylabel=f"rows of class ({stats.grouped_by})",
           title=f"class similarity: mean soft targets at T = {stats.temperature:g} ({stats.similarity_teacher})")
    if c <= 30:
        ax.set_xticks(range(c), [n[:10] for n in names], rotation=90, fontsize=7)
        ax.set_yticks(range(c), [n[:10] for n in names], fontsize=7)
    figs["similarity"] = fig

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    medges = np.linspace(0, 1, MASS_BINS + 1)
    for s in stats.teachers:
        for k in stats.topk_ks:
            ax.stairs(s.mass_hist[k] / max(s.rows, 1), medges, label=f"{s.teacher} top-{k} (mean {s.mass_mean(k):.3f})")
    ax.set(xlabel="probability mass in the top-k at T = 1", ylabel="fraction of rows", xlim=(0, 1),
           title=f"top-k probability mass ({stats.topk_source})")
    _log_if_concentrated(ax, [s.mass_hist[k] / max(s.rows, 1) for s in stats.teachers for k in stats.topk_ks])
    ax.legend(loc="upper left")
    figs["topk_mass"] = fig
    return figs


def _log_if_concentrated(ax: Any, hists: list[np.ndarray]) -> None:
    """A log y axis when one bin holds most rows (a confident teacher), so the tail stays visible."""
    if hists and max(float(h.max()) for h in hists) > 0.5:
        ax.set_yscale("log")
        ax.set_ylabel("fraction of rows (log scale)")


