"""`kdstore diff` of two per-token (language-model) versions of the same tokenised corpus, position by position.

Over the target positions: agreement of the two top-1 ids, KL(A || B) at T between the distributions each version's
top-k rebuilds (uniform tail, docs/format.md), and the label-time statistics of both (perplexity, entropy). Both
versions need a top-k (draws alone do not give a distribution to compare). Memory: a row group of stored targets and
a chunk of positions x V floats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore import targets
from kdstore.errors import ShapeMismatchError
from kdstore.soft_targets import tensor
from kdstore.store import Version
from kdstore.token_targets import positions_per_chunk

_COLS = ("t0_topk_values", "t0_topk_indices", "t0_logsumexp", "t0_tail_logmass")


@dataclass
class TokenDiffResult:
    a: str
    b: str
    temperature: float
    rows: int
    seq_len: int
    vocab_size: int
    positions: int  # target positions compared
    top1_agreement: float
    kl_mean: float | None  # None when some positions have infinite KL
    kl_max: float | None
    kl_infinite_positions: int
    perplexity_a: float | None
    perplexity_b: float | None
    entropy_a: float
    entropy_b: float
    transfer_file: str
    transfer_sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_comparable(va: Version, vb: Version) -> None:
    """Both per-token with a top-k, labeled on the same corpus with the same tokenisation and shape."""
    kinds = [v.manifest["targets"].get("kind", "classification") for v in (va, vb)]
    if kinds[0] != kinds[1]:
        raise ShapeMismatchError(f"{va.ref} holds {kinds[0]} targets and {vb.ref} {kinds[1]} targets; diff compares "
                                 "two versions of the same kind")
    ta, tb = va.manifest["targets"], vb.manifest["targets"]
    sa, sb = va.manifest["transfer_set"], vb.manifest["transfer_set"]
    if sa["sha256"] != sb["sha256"]:
        raise ShapeMismatchError(f"{va.ref} was labeled on {Path(sa['path']).name} and {vb.ref} on "
                                 f"{Path(sb['path']).name} (different sha256); diff compares the same corpus")
    if (va.num_rows, ta["seq_len"], ta["vocab_size"]) != (vb.num_rows, tb["seq_len"], tb["vocab_size"]):
        raise ShapeMismatchError(f"{va.ref} has {va.num_rows} rows x {ta['seq_len']} tokens over {ta['vocab_size']} "
                                 f"ids, {vb.ref} {vb.num_rows} x {tb['seq_len']} over {tb['vocab_size']}; expected "
                                 "the same shape (same tokenizer, --seq-len and packing)")
    for v in (va, vb):
        if not v.top_k:
            raise ShapeMismatchError(f"{v.ref} stores only sampled draws; diff compares the distributions of two "
                                     "top-k versions (convert is the way from a top-k to draws, not back)")


def diff_tokens(va: Version, vb: Version, shown_a: str, shown_b: str, temperature: float) -> TokenDiffResult:
    """Compare per-token versions A and B (see the module docstring)."""
    check_comparable(va, vb)
    v, seq_len = int(va.manifest["targets"]["vocab_size"]), int(va.manifest["targets"]["seq_len"])
    step = positions_per_chunk(1, v)
    n = agree = inf = 0
    kl_sum = kl_max = 0.0
    first = 0
    for block_a in va.iter_blocks(["input_ids", "target_mask", *_COLS]):
        rows = len(block_a["input_ids"])
        block_b = vb.read_rows(first, first + rows, ["input_ids", *_COLS])
        if not np.array_equal(block_a["input_ids"], block_b["input_ids"]):
            raise ShapeMismatchError(f"{va.ref} and {vb.ref} hold different token ids in rows {first}..{first + rows}"
                                     " (another tokenizer or packing); diff compares the same tokens")
        first += rows
        sel = torch.from_numpy(block_a["target_mask"].reshape(-1) == 1)
        pa, pb = (_flat(b, sel) for b in (block_a, block_b))
        agree += int((pa[1][:, 0] == pb[1][:, 0]).sum())
        for s in range(0, len(pa[0]), step):
            lpa, lpb = (targets.log_soft_targets_topk(x[0][s:s + step], x[1][s:s + step], x[2][s:s + step], v,
                                                      temperature, "uniform", x[3][s:s + step]) for x in (pa, pb))
            kl = targets.kl_divergence(lpa, lpb).clamp(min=0.0).double()
            ok = torch.isfinite(kl)
            inf += int((~ok).sum())
            kl_sum += float(kl[ok].sum())
            kl_max = max(kl_max, float(kl[ok].max())) if bool(ok.any()) else kl_max
        n += int(sel.sum())
    sa, sb = (x.manifest["statistics"]["teachers"]["t0"] for x in (va, vb))
    ts = va.manifest["transfer_set"]
    return TokenDiffResult(shown_a, shown_b, float(temperature), va.num_rows, seq_len, v, n, agree / max(n, 1),
                           None if inf else kl_sum / max(n, 1), None if inf else kl_max, inf, sa.get("perplexity"),
                           sb.get("perplexity"), sa["mean_entropy_nats"], sb["mean_entropy_nats"],
                           Path(ts["path"]).name, ts["sha256"])


def _flat(block: dict[str, Any], sel: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(values, indices, lse, tail) of the selected positions, flattened over (row, position)."""
    vals, idx = tensor(block["t0_topk_values"]), tensor(block["t0_topk_indices"], np.int64)
    k = vals.shape[-1]
    return (vals.reshape(-1, k)[sel], idx.reshape(-1, k)[sel], tensor(block["t0_logsumexp"]).reshape(-1)[sel],
            tensor(block["t0_tail_logmass"]).reshape(-1)[sel])


def format_token_diff(r: TokenDiffResult) -> str:
    """The report `kdstore diff` prints for two per-token versions."""
    kl = (f"inf at {r.kl_infinite_positions} positions" if r.kl_mean is None
          else f"mean {r.kl_mean:.4g} nats, max {r.kl_max:.4g}")
    ppl = " ".join(f"{x}: {'-' if p is None else f'{p:.4f}'}" for x, p in (("A", r.perplexity_a),
                                                                          ("B", r.perplexity_b)))
    return "\n".join([
        f"A: {r.a}", f"B: {r.b}",
        f"transfer set {r.transfer_file} (sha256 {r.transfer_sha256[:12]}...), {r.rows} rows x {r.seq_len} tokens, "
        f"vocabulary {r.vocab_size}; {r.positions} target positions compared",
        "",
        f"top-1 agreement     {100 * r.top1_agreement:.2f}%",
        f"KL(A||B) at T={r.temperature:g}   {kl} (top-k rebuilds, uniform tail)",
        f"teacher perplexity  {ppl}",
        f"mean entropy        A: {r.entropy_a:.4f}  B: {r.entropy_b:.4f} nats",
    ])
