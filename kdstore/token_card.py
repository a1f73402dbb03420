"""`kdstore inspect` of a per-token (language-model) version: the terminal card from the manifest alone
(`token_card_text`: provenance with the tokenizer's fingerprint, label-time statistics, entropy and top-k mass
histograms as text) and, with ``--card``, statistics read from the stored targets (`compute_token_statistics`) and
a card directory with plots (`write_token_card`): the same derived-files rules as the classification card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore import features, targets
from kdstore.card import _atomic_write, _save_png, prepare_card_dir
from kdstore.soft_targets import tensor
from kdstore.store import Version
from kdstore.store.catalog import human_bytes, short_source
from kdstore.token_stats import MASS_BINS, entropy_edges

TOKEN_PLOTS = {"entropy": "token_entropy.png", "topk_mass": "topk_mass.png"}


@dataclass
class TokenCardStatistics:
    """What the stored targets say, over the target positions: see `compute_token_statistics`."""

    positions: int = 0
    next_positions: int = 0
    nll_sum: float = 0.0  # of the stored targets (top-k rebuild) on the true next tokens
    next_in_topk: int = 0
    entropy_hist: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    entropy_edges: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mass_hist: np.ndarray = field(default_factory=lambda: np.zeros(MASS_BINS, np.int64))
    entropy_sum: float = 0.0

    @property
    def rebuilt_perplexity(self) -> float | None:
        return math.exp(self.nll_sum / self.next_positions) if self.next_positions else None

    def to_json(self) -> dict[str, Any]:
        return {"positions": self.positions, "next_token_positions": self.next_positions,
                "rebuilt_perplexity": self.rebuilt_perplexity,
                "next_token_in_topk": self.next_in_topk / self.next_positions if self.next_positions else None,
                "mean_entropy_nats": self.entropy_sum / max(self.positions, 1),
                "entropy_histogram": {"edges": self.entropy_edges.tolist(), "counts": self.entropy_hist.tolist()},
                "topk_mass_histogram": self.mass_hist.tolist()}


def compute_token_statistics(version: Version) -> TokenCardStatistics:
    """Read the stored targets once, a row group at a time: per-token entropy histogram, top-k mass histogram, and
    the perplexity of the *stored* targets on the true next tokens (a next token outside the top-k gets the uniform
    tail's share, ``t - log(V - k)``), against which the manifest's exact teacher perplexity can be compared."""
    tg = version.manifest["targets"]
    v, k = int(tg["vocab_size"]), version.top_k
    out = TokenCardStatistics(entropy_edges=entropy_edges(v))
    out.entropy_hist = np.zeros(len(out.entropy_edges) - 1, np.int64)
    names = ["input_ids", "attention_mask", "target_mask"]
    names += ["t0_topk_values", "t0_topk_indices", "t0_logsumexp", "t0_tail_logmass"] if k else \
        ["t0_sample_counts", "t0_sample_logprobs"]
    for block in version.iter_blocks([n for n in names if n in version.columns]):
        mask = block["target_mask"] == 1
        out.positions += int(mask.sum())
        if k:
            h, nll, inside = _topk_block(block, v, k, mask)
            out.nll_sum += float(nll.sum())
            out.next_positions += len(nll)
            out.next_in_topk += int(inside.sum())
            mass = -np.expm1(block["t0_tail_logmass"][mask].astype(np.float64))
            out.mass_hist += np.histogram(np.clip(mass, 0, 1), np.linspace(0, 1, MASS_BINS + 1))[0]
        elif "t0_sample_logprobs" in block:
            c, lp = block["t0_sample_counts"], block["t0_sample_logprobs"]  # unbiased: -sum_i (c_i / N) log p_i
            owner = np.repeat(np.arange(c.lengths.size), c.lengths.reshape(-1))
            per = np.bincount(owner, -(c.values / tg["sampled"]["draws"]) * lp.values, minlength=c.lengths.size)
            h = per.reshape(mask.shape)[mask]
        else:  # counts only: no entropy estimate
            continue
        out.entropy_sum += float(h.sum())
        out.entropy_hist += np.histogram(np.clip(h, 0, out.entropy_edges[-1]), out.entropy_edges)[0]
    return out


def _topk_block(block: dict[str, Any], v: int, k: int, mask: np.ndarray) -> tuple[np.ndarray, ...]:
    vals, lse, tail = (tensor(block[n]) for n in ("t0_topk_values", "t0_logsumexp", "t0_tail_logmass"))
    m = torch.from_numpy(mask)
    h = targets.topk_entropy(vals[m], lse[m], tail[m], v).double().numpy()
    ids, att = block["input_ids"], block["attention_mask"]
    nxt = np.full(ids.shape, -1, np.int64)
    nxt[:, :-1] = np.where(att[:, 1:] == 1, ids[:, 1:], -1)
    sel = mask & (nxt >= 0)
    idx = block["t0_topk_indices"][sel].astype(np.int64)
    hit = idx == nxt[sel][:, None]
    inside = hit.any(1)
    lp_top = (block["t0_topk_values"][sel].astype(np.float64) * hit).sum(1) - block["t0_logsumexp"][sel]
    lp_tail = block["t0_tail_logmass"][sel].astype(np.float64) - (math.log(v - k) if v > k else 0.0)
    return h, -np.where(inside, lp_top, lp_tail), inside


def _yes(x: Any) -> str:
    return "yes" if x else "no"


# --- text -------------------------------------------------------------------------------------------------------


def _bars(counts: list[int] | np.ndarray, edges: list[float] | np.ndarray, unit: str, width: int = 40) -> list[str]:
    counts = np.asarray(counts)
    total = max(int(counts.sum()), 1)
    top = max(int(counts.max()), 1) if len(counts) else 1
    return [f"  {edges[i]:5.2f}-{edges[i + 1]:<5.2f}{unit} {'#' * round(width * c / top):<{width}} "
            f"{100 * c / total:5.1f}%" for i, c in enumerate(counts) if c]


def token_card_text(m: dict[str, Any], where: str, data: TokenCardStatistics | None = None) -> str:
    """The terminal card of a per-token version, from its manifest (and the data statistics if computed)."""
    tg, st, ts = m["targets"], m["statistics"], m["transfer_set"]
    size = sum(f["bytes"] for f in m["files"])
    t = m["teachers"][0]
    fp = t.get("tokenizer") or {}
    out = [f"{m['name']}@v{m['version']}   {where}",
           f"  {m['num_rows']} rows x {tg['seq_len']} tokens ({st['tokens']} tokens, {st['target_positions']} target "
           f"positions), vocabulary {tg['vocab_size']}; {m['storage']['format']}, {len(m['files'])} file(s), "
           f"{human_bytes(size)} = {size / max(st['tokens'], 1):.1f} B/token",
           "", "provenance",
           f"  teacher      {short_source(t['source'])}  ({t['kind']}, {t.get('architecture')}, "
           f"{t.get('parameters')} parameters, sha256 {t['sha256'][:12]})",
           f"  tokenizer    {fp.get('size')} ids (model {fp.get('model_vocab_size')}), vocabulary sha256 "
           f"{str(fp.get('vocab_sha256'))[:12]}, chat template {_yes((fp.get('chat_template') or {}).get('present'))}",
           f"  transfer set {Path(ts['path']).name}  ({ts['format']}, {ts['source']}, {ts['documents']} documents, "
           f"packing {ts['packing']['policy']}, sha256 {ts['sha256'][:12]})",
           "", "targets"]
    if tg["top_k"]:
        tk = tg["top_k"]
        out.append(f"  top-{tk['k']} per position ({tk['indices_dtype']} indices, {tk['values_dtype']} values, exact "
                   "tail: any T)")
    if tg["sampled"]:
        s = tg["sampled"]
        lp = f"{s['logprobs_dtype']} log-probs: any T" if s["logprobs_dtype"] else "no log-probs: T = 1 only"
        out.append(f"  sampled: {s['draws']} draws per position, seed {s['seed']}, int16 counts, {lp}"
                   + (f" (drawn from the {s['from']})" if s.get("from", "teacher logits") != "teacher logits" else ""))
    for tid, s in st["teachers"].items():
        out += ["", f"statistics ({tid}, label time, T = 1, over target positions)"]
        if s.get("perplexity") is not None:
            out.append(f"  teacher perplexity {s['perplexity']:.4f} on {s['next_token_positions']} next tokens "
                       f"(next-token accuracy {100 * s['accuracy']:.2f}%)")
        out.append(f"  mean entropy       {s['mean_entropy_nats']:.4f} nats ({s['entropy_source']})")
        if tg["top_k"]:
            out.append(f"  top-{tg['top_k']['k']} mass        {s['topk_mass_mean']:.4f}")
            fid = s.get("topk_fidelity_kl")
            if fid:
                out.append("  fidelity KL        " + "  ".join(f"T={float(T):g}: {v:.3g}" if v is not None
                                                                 else f"T={float(T):g}: inf" for T, v in fid.items())
                           + f"  ({s['topk_fidelity_rows']} positions, 1 in {st['fidelity_stride']})")
        if s.get("sampled_unique_mean") is not None:
            out.append(f"  sampled            {s['sampled_unique_mean']:.2f} distinct ids per position")
        hist = s["entropy_histogram"]
        out += ["", "per-token entropy (nats)", *_bars(hist["counts"], hist["edges"], "")]
        if s.get("topk_mass_histogram"):
            mh = s["topk_mass_histogram"]
            out += ["", "top-k mass per token", *_bars(mh["counts"], mh["edges"], "")]
    feats = features.facts(m)
    if feats:
        out += ["", "teacher features per token (kdstore train --hint LAYER:MODULE)", *(f"  {x}" for x in feats)]
    if data is not None:
        d = data.to_json()
        out += ["", "from the stored targets (--card)",
                f"  mean entropy {d['mean_entropy_nats']:.4f} nats over {d['positions']} positions"]
        if d["rebuilt_perplexity"] is not None:
            out.append(f"  perplexity of the stored top-k (uniform tail) {d['rebuilt_perplexity']:.4f}; next token in "
                       f"the top-k at {100 * d['next_token_in_topk']:.2f}% of positions")
    return "\n".join(out)


def write_token_card(version: Version, data: TokenCardStatistics, out_dir: Path | None = None) -> list[Path]:
    """README.md and the plots in `out_dir` (default ``vN/card/``), each file atomically, README.md last."""
    from matplotlib.figure import Figure

    out = prepare_card_dir(version, out_dir)
    m = version.manifest
    written = []
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.stairs(data.entropy_hist / max(data.positions, 1), data.entropy_edges, fill=True)
    ax.set(xlabel="entropy of the stored targets at T = 1 (nats)", ylabel="fraction of target positions",
           title=f"{m['name']}@v{m['version']}: per-token entropy")
    written.append(_save_png(fig, out / TOKEN_PLOTS["entropy"]))
    plots = ["entropy"]
    if version.top_k:
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.add_subplot()
        ax.stairs(data.mass_hist / max(data.positions, 1), np.linspace(0, 1, MASS_BINS + 1), fill=True)
        ax.set(xlabel=f"probability mass in the top-{version.top_k} at T = 1", ylabel="fraction of target positions",
               title="top-k mass per token")
        written.append(_save_png(fig, out / TOKEN_PLOTS["topk_mass"]))
        plots.append("topk_mass")
    text = token_card_text(m, str(version.path), data)
    readme = (f"# {m['name']} v{m['version']}: per-token teacher targets\n\n```text\n{text}\n```\n\n"
              + "".join(f"![{p}]({TOKEN_PLOTS[p]})\n\n" for p in plots)
              + "Format: docs/format.md, \"Per-token targets\". This card is derived from the version; it is not "
                "listed in the manifest.\n")
    written.append(_atomic_write(out / "README.md", readme.encode("utf-8")))
    return written
