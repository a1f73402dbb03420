"""A dataset card as text: for the terminal (`card_text`, from the manifest alone) and as the card's README.md
(`card_markdown`, with the statistics `kdstore.card.compute_statistics` reads from the data)."""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdstore import __version__, augment, features
from kdstore.store.catalog import class_names, human_bytes, short_source, targets_text

if TYPE_CHECKING:
    from kdstore.advice import Advice
    from kdstore.card import CardStatistics

ECE_BINS = 15
PLOTS = {
    "confidence": "confidence.png",
    "reliability": "reliability.png",
    "similarity": "class_similarity.png",
    "topk_mass": "topk_mass.png",
}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "inf" if x is None else format(x, fmt)


def _opt(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


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


def _labeling_text(lab: dict[str, Any], seconds: bool) -> str:
    return (f"{lab['device']}, {lab['precision']}, batch {lab['batch_size']}"
            + (f", torch {lab['torch_version']}" if lab.get("torch_version") else "")
            + (f", {lab['seconds']:.1f} s" if seconds and lab.get("seconds") is not None else ""))


# --- the terminal card -----------------------------------------------------------------------------------------------


def card_text(m: dict[str, Any], where: str, stats: CardStatistics | None = None,
              advice: list[Advice] | None = None) -> str:
    """The terminal dataset card of manifest `m` (found at `where`): provenance, stored targets, statistics,
    top-k fidelity, the data statistics if computed, and the advice (`kdstore.advice`) if measured."""
    size = sum(f["bytes"] for f in m["files"])
    out = [f"{m['name']}@v{m['version']}   {where}",
           f"  {m['num_rows']} rows x {m['num_classes']} classes; {m['storage']['format']}, {len(m['files'])} file(s), "
           f"{human_bytes(size)}; created {_created(m['created_at'])} by kdstore {m['kdstore_version']}"]
    parent = _parent_text(m.get("parent"))
    if parent:
        out.append(f"  derived from {parent}")
    out += _provenance_text(m)
    out += _statistics_text(m, stats)
    out += _views_text(m)
    feats = features.facts(m)
    if feats:
        out += ["", f"teacher features (from {m['features']['teacher']}; kdstore train --hint LAYER:MODULE)",
                *(f"  {line}" for line in feats)]
    out += _fidelity_text(m)
    if stats:
        pairs = stats.similar_pairs(class_names(m))
        out += ["", f"most similar classes at T={stats.temperature:g} ({stats.similarity_teacher}, rows grouped by "
                    f"{stats.grouped_by}): mean probability of the second class on rows of the first"]
        out += [f"  {a} -> {b}: {p:.4f}" for a, b, p in pairs]
    if advice:
        vdir = Path(where)
        ref = f"{vdir.parent}@v{m['version']}" if vdir.name == f"v{m['version']}" else f"{m['name']}@v{m['version']}"
        out += ["", *advice_text(advice, ref, bool(m["targets"]["labels"]))]
    return "\n".join(out)


def advice_text(advice: list[Advice], ref: str, labeled: bool) -> list[str]:
    """The advice as terminal lines: per teacher a table of T x (mean entropy, max p, 2nd p), plain and
    standardised, then the advice in words and the suggested `kdstore train` sweep."""
    out: list[str] = []
    for a in advice:
        out += [f"soft targets of {a.teacher} per temperature ({a.rows} sampled rows; entropy in nats, at most "
                f"{math.log(a.num_classes):.2f})",
                f"  {'T':>5}  {'entropy':>8} {'max p':>6} {'2nd p':>8}   standardised: {'entropy':>8} {'max p':>6} "
                f"{'2nd p':>8}"]
        for p, s in zip(a.plain, a.standardized, strict=True):
            mark = "  <- default T" if p.temperature == a.default_t else ""
            out.append(f"  {p.temperature:5g}  {p.entropy:8.3g} {p.max_prob:6.3f} {p.second_prob:8.3g}   "
                       f"{'':>13} {s.entropy:8.3g} {s.max_prob:6.3f} {s.second_prob:8.3g}{mark}")
        out += [*(f"  {w}" for w in a.words), f"  try: {a.command(ref, labeled)}"]
    return out


def _advice_markdown(advice: list[Advice], ref: str, labeled: bool) -> list[str]:
    lines = ["", "## Soft targets per temperature", "",
             "Measured on a sample of the stored rows (`kdstore.advice`; the rule is explained in "
             "docs/benchmarks.md, \"Teachers of different confidence\"). Entropy in nats; max p and 2nd p are the "
             "mean largest and second-largest probability; *standardised*: z-scored logits (`--standardize`)."]
    for a in advice:
        lines += ["", f"**{a.teacher}** ({a.rows} rows): {a.verdict}.", "",
                  "| T | entropy | max p | 2nd p | standardised entropy | max p | 2nd p |",
                  "|---|---|---|---|---|---|---|"]
        for p, s in zip(a.plain, a.standardized, strict=True):
            t = f"**{p.temperature:g}** (default)" if p.temperature == a.default_t else f"{p.temperature:g}"
            lines.append(f"| {t} | {p.entropy:.3g} | {p.max_prob:.3f} | {p.second_prob:.3g} | {s.entropy:.3g} | "
                         f"{s.max_prob:.3f} | {s.second_prob:.3g} |")
        lines += ["", *a.words, "", f"`{a.command(ref, labeled)}`"]
    return lines


def _provenance_text(m: dict[str, Any]) -> list[str]:
    ts, tg = m["transfer_set"], m["targets"]
    out = ["", "provenance"]
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
    out.append(f"  labeling     {_labeling_text(m['labeling'], seconds=True)}")
    tk = tg["top_k"]
    stored = targets_text(tg) + (f" ({tk['indices_dtype']} indices, {tk['values_dtype']} values, {tk['tail']} tail)"
                                 if tk else "") + ", log-sum-exp" + (", labels" if tg["labels"] else "")
    return [*out, "", "targets", f"  stored       {stored}"]


def _statistics_text(m: dict[str, Any], stats: CardStatistics | None) -> list[str]:
    st = m["statistics"]
    out = ["", "statistics (label time, T = 1)" + ("; data: ECE and confidence at T = 1" if stats else ""),
           f"  {'teacher':<8} {'accuracy':>9} {'errors':>7} {'entropy':>8} {'top-k mass':>10}"
           + (f" {'ECE':>7} {'mean conf':>9}" if stats else "")]
    by_id = {s.teacher: s for s in stats.teachers} if stats else {}
    for tid, s in st.get("teachers", {}).items():
        line = (f"  {tid:<8} {_pct(s.get('accuracy')):>9} {s.get('errors') if s.get('errors') is not None else '-':>7} "
                f"{s.get('mean_entropy_nats', float('nan')):8.3f} {_opt(s.get('topk_mass_mean')):>10}")
        if stats and tid in by_id:
            d = by_id[tid]
            line += f" {_opt(d.ece):>7} {d.mean_confidence:9.4f}"
        out.append(line)
    if st.get("ensemble"):
        e = st["ensemble"]
        out.append(f"  ensemble ({e.get('combine', 'mean-prob')}): accuracy {_pct(e.get('accuracy'))}, "
                   f"errors {e.get('errors')}")
    return out



def _views_facts(m: dict[str, Any]) -> tuple[list[str], list[str]] | None:
    """(description lines, per-teacher accuracy lines) of a version labeled with `--views`; None without views."""
    v = m.get("views")
    if not v:
        return None
    n = v["count"]
    first = "view 0 is the unaugmented input" if v.get("identity_first") else "every view augmented"
    desc = [f"{n} per transfer-set row, sample-major (row s*{n}+v is view v of sample s); {first}; seed {v['seed']}",
            f"augment {v['augment']}",
            *augment.describe(augment.parse_augment(v["augment"], argument="views"), tuple(v["input_shape"]))]
    acc = [f"{tid}: unaugmented {_pct(s['accuracy_identity_views'])}, "
           f"augmented {_pct(s.get('accuracy_augmented_views'))}"
           for tid, s in m["statistics"].get("teachers", {}).items() if s.get("accuracy_identity_views") is not None]
    return desc, acc


def _views_text(m: dict[str, Any]) -> list[str]:
    facts = _views_facts(m)
    if facts is None:
        return []
    desc, acc = facts
    out = ["", "views (kdstore train replays one per row per epoch)", *(f"  {d}" for d in desc)]
    return out + ([f"  teacher accuracy on views, {a}" for a in acc] if acc else [])


def _views_markdown(m: dict[str, Any]) -> list[str]:
    facts = _views_facts(m)
    if facts is None:
        return []
    desc, acc = facts
    lines = ["", "## Augmentation views", "", "`kdstore train` replays one stored view per row per epoch (its "
             "parameters re-applied to the stored input, its targets used).", "", *(f"- {d}" for d in desc)]
    return lines + ([f"- teacher accuracy on views, {a}" for a in acc] if acc else [])

def _fidelity_text(m: dict[str, Any]) -> list[str]:
    tk = m["targets"]["top_k"]
    if not tk:
        return []
    temps = _fidelity_temps(m)
    out = ["", f"top-k fidelity: mean KL(exact || rebuilt from top-{tk['k']}, {tk['tail']} tail) in nats"]
    if not temps:
        return [*out, "  not measured (this version was made from a top-k without full logits)"]
    out.append(f"  {'teacher':<8} " + " ".join(f"{'T=' + format(float(t), 'g'):>9}" for t in temps))
    for tid, s in m["statistics"].get("teachers", {}).items():
        fid = s.get("topk_fidelity_kl") or {}
        out.append(f"  {tid:<8} " + " ".join(f"{_num(fid.get(t)) if t in fid else '-':>9}" for t in temps))
    return out


# --- README.md -------------------------------------------------------------------------------------------------------


def card_markdown(m: dict[str, Any], stats: CardStatistics, plots: list[str]) -> str:
    """README.md of the card of manifest `m` (GitHub-flavoured Markdown, images relative to the card directory)."""
    tg = m["targets"]
    lines = [
        f"# {m['name']} v{m['version']}",
        "",
        f"A kdstore target dataset: {m['num_rows']} rows x {m['num_classes']} classes of teacher targets "
        f"({targets_text(tg)}), {m['storage']['format']}, {human_bytes(sum(f['bytes'] for f in m['files']))} in "
        f"{len(m['files'])} file(s).",
        "",
        f"*This card is derived: generated by `kdstore inspect --card` (kdstore {__version__}) and not part of the "
        "checksummed version (its manifest does not list it). Check the data with `kdstore verify`.*",
    ]
    lines += _provenance_markdown(m)
    lines += _statistics_markdown(m, stats)
    lines += _views_markdown(m)
    feats = features.facts(m)
    if feats:
        lines += ["", "## Teacher features", "", f"Intermediate outputs of teacher {m['features']['teacher']}, for "
                  "hint distillation (`kdstore train --hint LAYER:MODULE`):", "", *(f"- {line}" for line in feats)]
    lines += _fidelity_markdown(m)
    if stats.advice:
        lines += _advice_markdown(stats.advice, f"{m['name']}@v{m['version']}", bool(tg["labels"]))
    pairs = stats.similar_pairs(class_names(m))
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


def _provenance_markdown(m: dict[str, Any]) -> list[str]:
    ts, tg = m["transfer_set"], m["targets"]
    tk = tg["top_k"]
    lines = ["", "## Provenance", "", "| | |", "|---|---|",
             f"| created | {_created(m['created_at'])}, kdstore {m['kdstore_version']} |"]
    parent = _parent_text(m.get("parent"))
    if parent:
        lines.append(f"| derived from | {parent} |")
    for t in m["teachers"]:
        lines.append(f"| teacher `{t['id']}` | `{t['source']}` ({t['kind']}), sha256 `{t['sha256']}` |")
    lines += [
        f"| transfer set | `{ts['path']}` ({ts['kind']}, {ts['rows']} rows, {ts['format']}), sha256 `{ts['sha256']}` |",
        f"| inputs | {', '.join(ts['inputs']['columns'])}: {ts['inputs']['dtype']} {ts['inputs']['shape']} |",
        f"| labels | {('`' + ts['label_column'] + '`') if ts['label_column'] else 'none'} |",
        f"| labeling | {_labeling_text(m['labeling'], seconds=False)} |",
        f"| stored | {targets_text(tg)}"
        + (f"; top-{tk['k']} {tk['values_dtype']} values, {tk['indices_dtype']} indices, {tk['tail']} tail"
           if tk else "")
        + "; float32 log-sum-exp |",
    ]
    if ts.get("generator"):
        lines.append(f"| generator | `{ts['generator']}` |")
    return lines


def _statistics_markdown(m: dict[str, Any], stats: CardStatistics) -> list[str]:
    st = m["statistics"]
    lines = ["", "## Statistics", "",
             "Accuracy, entropy and top-k mass at T = 1 from the manifest (label time); ECE and mean confidence "
             f"computed from the stored targets ({ECE_BINS} equal-width bins).", "",
             "| teacher | accuracy | errors | mean entropy (nats) | top-k mass | ECE | mean confidence |",
             "|---|---|---|---|---|---|---|"]
    by_id = {s.teacher: s for s in stats.teachers}
    for tid, s in st.get("teachers", {}).items():
        d = by_id.get(tid)
        lines.append(f"| {tid} | {_pct(s.get('accuracy'))} | "
                     f"{s.get('errors') if s.get('errors') is not None else '-'} | "
                     f"{s.get('mean_entropy_nats', float('nan')):.4f} | {_opt(s.get('topk_mass_mean'))} | "
                     f"{_opt(d.ece) if d else '-'} | {format(d.mean_confidence, '.4f') if d else '-'} |")
    if st.get("ensemble"):
        lines += ["", f"Ensemble ({st['ensemble'].get('combine', 'mean-prob')}): accuracy "
                      f"{_pct(st['ensemble'].get('accuracy'))}."]
    return lines


def _fidelity_markdown(m: dict[str, Any]) -> list[str]:
    tk = m["targets"]["top_k"]
    if not tk:
        return []
    temps = _fidelity_temps(m)
    lines = ["", "## Top-k fidelity", "",
             "Mean KL(exact soft targets ‖ soft targets rebuilt from the stored "
             f"top-{tk['k']}, {tk['tail']} tail), "
             "in nats, per temperature (docs/format.md, \"The tail model\"). Smaller is better; "
             "\"inf\" means the rebuilt targets give zero probability somewhere (the drop tail).", ""]
    if not temps:
        return [*lines, "Not measured: this version was made from a top-k without full logits."]
    lines += ["| teacher | " + " | ".join(f"T = {float(t):g}" for t in temps) + " |",
              "|---|" + "---|" * len(temps)]
    for tid, s in m["statistics"].get("teachers", {}).items():
        fid = s.get("topk_fidelity_kl") or {}
        lines.append(f"| {tid} | " + " | ".join(_num(fid.get(t)) if t in fid else "-" for t in temps) + " |")
    return lines
