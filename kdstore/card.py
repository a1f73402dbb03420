"""`kdstore inspect`: a dataset card, in the terminal and as ``card/README.md`` with PNG plots.

The terminal card is made from the manifest alone (provenance, stored targets, label-time statistics, top-k
fidelity). `compute_statistics` reads the data once, streaming file by file, for what the manifest does not hold:
confidence histogram, reliability diagram and expected calibration error (where labels exist), per-row top-k
probability mass, and the class-similarity matrix (mean soft targets at a chosen temperature, rows grouped by
true class, or by argmax where there are no labels: the "dark knowledge" structure KD transfers at high T).

Card files are *derived*: they are written to ``vN/card/`` (each file atomically, README.md last), are not listed
in the manifest and do not change it, so a version's checksummed content never changes (docs/format.md).
Plots use matplotlib's object API with the Agg canvas: no pyplot, no global backend state.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore import __version__
from kdstore.errors import ConfigError, arg
from kdstore.soft_targets import columns_for, log_probs, teacher_id
from kdstore.store import Version
from kdstore.store.catalog import class_names, human_bytes, short_source, targets_text
from kdstore.store.files import atomic_write_bytes
from kdstore.targets import check_temperature

CARD_DIR = "card"
CONF_BINS = 20
ECE_BINS = 15
MASS_BINS = 20
PLOTS = {
    "confidence": "confidence.png",
    "reliability": "reliability.png",
    "similarity": "class_similarity.png",
    "topk_mass": "topk_mass.png",
}


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

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able statistics (what `kdstore inspect --card --json` prints as ``card_statistics``)."""
        return {
            "temperature": self.temperature, "similarity_teacher": self.similarity_teacher,
            "grouped_by": self.grouped_by, "similarity": self.similarity.tolist(),
            "teachers": {s.teacher: {"accuracy": s.accuracy, "ece": s.ece, "mean_confidence": s.mean_confidence,
                                     "mean_entropy_nats": s.mean_entropy,
                                     "topk_mass_mean": {str(k): s.mass_mean(k) for k in self.topk_ks}}
                         for s in self.teachers},
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
            names += [version.column_for(r, tid) or "" for r in ("topk_values", "logsumexp")]
    names = list(dict.fromkeys(names))
    stats = [TeacherStats(tid) for tid in version.teacher_ids]
    for s in stats:
        s.mass_hist = {k: np.zeros(MASS_BINS, np.int64) for k in ks}
        s.mass_sum = {k: 0.0 for k in ks}
    sim = torch.zeros(c, c, dtype=torch.float64)
    group_rows = np.zeros(c, np.int64)
    for block in version.iter_files(names):
        y = block[label_col].astype(np.int64) if label_col else None
        for s in stats:
            lp = log_probs(version, block, s.teacher, 1.0)
            p = lp.exp()
            conf, pred = p.max(1)
            conf_np, pred_np = conf.double().numpy(), pred.numpy()
            s.rows += len(conf_np)
            s.confidence_sum += float(conf_np.sum())
            s.entropy_sum += float(-(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum(1).double().sum())
            s.conf_hist += np.histogram(conf_np, CONF_BINS, (0.0, 1.0))[0]
            if y is not None:
                ok = pred_np == y
                s.correct += int(ok.sum())
                s.labeled += len(y)
                b = np.minimum((conf_np * ECE_BINS).astype(np.int64), ECE_BINS - 1)
                s.rel_count += np.bincount(b, minlength=ECE_BINS)
                s.rel_conf += np.bincount(b, conf_np, minlength=ECE_BINS)
                s.rel_correct += np.bincount(b, ok.astype(np.float64), minlength=ECE_BINS)
            for k in ks:
                if k_stored:
                    v = np.asarray(block[version.column_for("topk_values", s.teacher) or ""], np.float64)
                    lse = np.asarray(block[version.column_for("logsumexp", s.teacher) or ""], np.float64)
                    mass = np.exp(v[:, :k] - lse[:, None]).sum(1)
                else:
                    mass = torch.topk(p, k, dim=1).values.sum(1).double().numpy()
                mass = np.clip(mass, 0.0, 1.0)
                s.mass_hist[k] += np.histogram(mass, MASS_BINS, (0.0, 1.0))[0]
                s.mass_sum[k] += float(mass.sum())
            if s.teacher == sim_t:
                pt = log_probs(version, block, s.teacher, temperature).exp().double()
                ref = torch.from_numpy(y if y is not None else pred_np).long()
                sim.index_add_(0, ref, pt)
                group_rows += np.bincount(ref.numpy(), minlength=c)[:c]
    mean_sim = (sim / torch.from_numpy(np.maximum(group_rows, 1)).double()[:, None]).numpy()
    return CardStatistics(float(temperature), sim_t, "label" if label_col else "argmax", mean_sim, group_rows, ks,
                          "stored top-k" if k_stored else "full logits", stats)


# --- text ----------------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "inf" if x is None else format(x, fmt)


def _created(iso: str) -> str:
    try:
        t = _dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if t.tzinfo else iso


def _parent_text(parent: dict[str, Any] | None) -> str | None:
    if not parent:
        return None
    settings = ", ".join(f"{k}={v}" for k, v in (parent.get("settings") or {}).items() if k != "source")
    return f"{parent['name']}@v{parent['version']} by {parent['relation']}" + (f" ({settings})" if settings else "")


def _fidelity_temps(m: dict[str, Any]) -> list[str]:
    temps: list[str] = []
    for s in m["statistics"].get("teachers", {}).values():
        for t in (s.get("topk_fidelity_kl") or {}):
            if t not in temps:
                temps.append(t)
    return sorted(temps, key=float)


def card_text(m: dict[str, Any], where: str, stats: CardStatistics | None = None) -> str:
    """The terminal dataset card of manifest `m` (found at `where`): provenance, stored targets, statistics,
    top-k fidelity, and the data statistics if computed."""
    ts, lab, tg = m["transfer_set"], m["labeling"], m["targets"]
    size = sum(f["bytes"] for f in m["files"])
    out = [f"{m['name']}@v{m['version']}   {where}",
           f"  {m['num_rows']} rows x {m['num_classes']} classes; {m['storage']['format']}, {len(m['files'])} file(s), "
           f"{human_bytes(size)}; created {_created(m['created_at'])} by kdstore {m['kdstore_version']}"]
    parent = _parent_text(m.get("parent"))
    if parent:
        out.append(f"  derived from {parent}")
    out += ["", "provenance"]
    for t in m["teachers"]:
        out.append(f"  teacher {t['id']:<4} {short_source(t['source'])}  ({t['kind']}, sha256 {t['sha256'][:12]})")
        out.append(f"  {'':12} {t['source']}")
    labels = f"labels in {ts['label_column']!r}" if ts["label_column"] else "no labels"
    out.append(f"  transfer set {Path(ts['path']).name}  ({ts['kind']}, {ts['rows']} rows, {labels}, "
               f"sha256 {ts['sha256'][:12]})")
    out.append(f"  {'':12} {ts['path']}")
    out.append(f"  inputs       {', '.join(ts['inputs']['columns'])}: {ts['inputs']['dtype']} {ts['inputs']['shape']}")
    if ts.get("generator"):
        g = ts["generator"]
        out.append(f"  generator    {g.get('generator')}: "
                   + ", ".join(f"{k}={v}" for k, v in g.get("settings", {}).items()))
    out.append(f"  labeling     {lab['device']}, {lab['precision']}, batch {lab['batch_size']}"
               + (f", torch {lab['torch_version']}" if lab.get("torch_version") else "")
               + (f", {lab['seconds']:.1f} s" if lab.get("seconds") is not None else ""))
    tk = tg["top_k"]
    stored = targets_text(tg) + (f" ({tk['indices_dtype']} indices, {tk['values_dtype']} values, {tk['tail']} tail)"
                                 if tk else "") + ", log-sum-exp" + (", labels" if tg["labels"] else "")
    out += ["", "targets", f"  stored       {stored}"]
    st = m["statistics"]
    out += ["", "statistics (label time, T = 1)" + ("; data: ECE and confidence at T = 1" if stats else ""),
            f"  {'teacher':<8} {'accuracy':>9} {'errors':>7} {'entropy':>8} {'top-k mass':>10}"
            + (f" {'ECE':>7} {'mean conf':>9}" if stats else "")]
    by_id = {s.teacher: s for s in stats.teachers} if stats else {}
    for tid, s in st.get("teachers", {}).items():
        line = (f"  {tid:<8} {_pct(s.get('accuracy')):>9} {s.get('errors') if s.get('errors') is not None else '-':>7} "
                f"{s.get('mean_entropy_nats', float('nan')):8.3f} "
                f"{(format(s['topk_mass_mean'], '.4f') if s.get('topk_mass_mean') is not None else '-'):>10}")
        if stats and tid in by_id:
            d = by_id[tid]
            line += f" {(format(d.ece, '.4f') if d.ece is not None else '-'):>7} {d.mean_confidence:9.4f}"
        out.append(line)
    if st.get("ensemble"):
        e = st["ensemble"]
        out.append(f"  ensemble ({e.get('combine', 'mean-prob')}): accuracy {_pct(e.get('accuracy'))}, "
                   f"errors {e.get('errors')}")
    temps = _fidelity_temps(m)
    if tk:
        out += ["", f"top-k fidelity: mean KL(exact || rebuilt from top-{tk['k']}, {tk['tail']} tail) in nats"]
        if temps:
            out.append(f"  {'teacher':<8} " + " ".join(f"{'T=' + format(float(t), 'g'):>9}" for t in temps))
            for tid, s in st.get("teachers", {}).items():
                fid = s.get("topk_fidelity_kl") or {}
                out.append(f"  {tid:<8} " + " ".join(f"{_num(fid.get(t)) if t in fid else '-':>9}" for t in temps))
        else:
            out.append("  not measured (this version was made from a top-k without full logits)")
    if stats:
        names = class_names(m)
        pairs = stats.similar_pairs(names)
        out += ["", f"most similar classes at T={stats.temperature:g} ({stats.similarity_teacher}, rows grouped by "
                    f"{stats.grouped_by}): mean probability of the second class on rows of the first"]
        out += [f"  {a} -> {b}: {p:.4f}" for a, b, p in pairs]
    return "\n".join(out)


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
    readme = card_markdown(version, stats, [k for k in PLOTS if k in plots])
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


def card_markdown(version: Version, stats: CardStatistics, plots: list[str]) -> str:
    """README.md of the card (GitHub-flavoured Markdown, images relative to the card directory)."""
    m = version.manifest
    ts, tg, lab, st = m["transfer_set"], m["targets"], m["labeling"], m["statistics"]
    tk = tg["top_k"]
    title = f"{m['name']} v{m['version']}"
    lines = [
        f"# {title}",
        "",
        f"A kdstore target dataset: {m['num_rows']} rows x {m['num_classes']} classes of teacher targets "
        f"({targets_text(tg)}), {m['storage']['format']}, {human_bytes(sum(f['bytes'] for f in m['files']))} in "
        f"{len(m['files'])} file(s).",
        "",
        f"*This card is derived: generated by `kdstore inspect --card` (kdstore {__version__}) and not part of the "
        "checksummed version (its manifest does not list it). Check the data with `kdstore verify`.*",
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        f"| created | {_created(m['created_at'])}, kdstore {m['kdstore_version']} |",
    ]
    parent = _parent_text(m.get("parent"))
    if parent:
        lines.append(f"| derived from | {parent} |")
    for t in m["teachers"]:
        lines.append(f"| teacher `{t['id']}` | `{t['source']}` ({t['kind']}), sha256 `{t['sha256']}` |")
    lines += [
        f"| transfer set | `{ts['path']}` ({ts['kind']}, {ts['rows']} rows, {ts['format']}), sha256 `{ts['sha256']}` |",
        f"| inputs | {', '.join(ts['inputs']['columns'])}: {ts['inputs']['dtype']} {ts['inputs']['shape']} |",
        f"| labels | {('`' + ts['label_column'] + '`') if ts['label_column'] else 'none'} |",
        f"| labeling | {lab['device']}, {lab['precision']}, batch {lab['batch_size']}"
        + (f", torch {lab['torch_version']}" if lab.get("torch_version") else "") + " |",
        f"| stored | {targets_text(tg)}"
        + (f"; top-{tk['k']} {tk['values_dtype']} values, {tk['indices_dtype']} indices, {tk['tail']} tail"
           if tk else "")
        + "; float32 log-sum-exp |",
    ]
    if ts.get("generator"):
        lines.append(f"| generator | `{ts['generator']}` |")
    lines += ["", "## Statistics", "",
              "Accuracy, entropy and top-k mass at T = 1 from the manifest (label time); ECE and mean confidence "
              f"computed from the stored targets ({ECE_BINS} equal-width bins).", "",
              "| teacher | accuracy | errors | mean entropy (nats) | top-k mass | ECE | mean confidence |",
              "|---|---|---|---|---|---|---|"]
    by_id = {s.teacher: s for s in stats.teachers}
    for tid, s in st.get("teachers", {}).items():
        d = by_id.get(tid)
        lines.append(f"| {tid} | {_pct(s.get('accuracy'))} | "
                     f"{s.get('errors') if s.get('errors') is not None else '-'} | "
                     f"{s.get('mean_entropy_nats', float('nan')):.4f} | "
                     f"{format(s['topk_mass_mean'], '.4f') if s.get('topk_mass_mean') is not None else '-'} | "
                     f"{format(d.ece, '.4f') if d and d.ece is not None else '-'} | "
                     f"{format(d.mean_confidence, '.4f') if d else '-'} |")
    if st.get("ensemble"):
        lines += ["", f"Ensemble ({st['ensemble'].get('combine', 'mean-prob')}): accuracy "
                      f"{_pct(st['ensemble'].get('accuracy'))}."]
    temps = _fidelity_temps(m)
    if tk:
        lines += ["", "## Top-k fidelity", "",
                  "Mean KL(exact soft targets ‖ soft targets rebuilt from the stored "
                  f"top-{tk['k']}, {tk['tail']} tail), "
                  "in nats, per temperature (docs/format.md, \"The tail model\"). Smaller is better; "
                  "\"inf\" means the rebuilt targets give zero probability somewhere (the drop tail).", ""]
        if temps:
            lines += ["| teacher | " + " | ".join(f"T = {float(t):g}" for t in temps) + " |",
                      "|---|" + "---|" * len(temps)]
            for tid, s in st.get("teachers", {}).items():
                fid = s.get("topk_fidelity_kl") or {}
                lines.append(f"| {tid} | " + " | ".join(_num(fid.get(t)) if t in fid else "-" for t in temps) + " |")
        else:
            lines.append("Not measured: this version was made from a top-k without full logits.")
    names = class_names(m)
    pairs = stats.similar_pairs(names)
    if pairs:
        lines += ["", f"## Most similar classes at T = {stats.temperature:g}", "",
                  f"Mean probability that teacher {stats.similarity_teacher} gives the second class on rows of the "
                  f"first (rows grouped by {stats.grouped_by}).", "", "| class | similar class | mean probability |",
                  "|---|---|---|"]
        lines += [f"| {a} | {b} | {p:.4f} |" for a, b, p in pairs]
    captions = {
        "confidence": "Teacher confidence (max probability at T = 1).",
        "reliability": "Reliability diagram: accuracy against confidence per bin; the diagonal is perfect calibration.",
        "similarity": f"Class similarity: mean soft targets at T = {stats.temperature:g}, one row per class.",
        "topk_mass": f"Probability mass in the top-k per row ({stats.topk_source}).",
    }
    lines += ["", "## Plots", ""]
    for key in plots:
        lines += [f"![{key}]({PLOTS[key]})", "", captions[key], ""]
    return "\n".join(lines).rstrip() + "\n"
