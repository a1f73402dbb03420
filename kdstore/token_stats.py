"""Statistics of a per-token version, accumulated chunk of positions by chunk (`TokenStatistics`): partial sums per
shard (kept in its sidecar, so a resumed run keeps them), combined at commit. Definitions: docs/format.md,
"Per-token targets" -> "Statistics".

Every statistic counts the *target positions* (``target_mask``: every real position of text, the positions that
predict an assistant token in a chat). Next-token statistics (perplexity, accuracy) count the target positions whose
next token is in the row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdstore import reproducible, targets
from kdstore.token_targets import ChunkTargets
from kdstore.versioning import FIDELITY_TEMPERATURES, mean_fidelity

# fidelity on 1 in ceil(V / 64) positions: ten float64 softmaxes over V per measured position cost as much as the
# forward of ~10 tokens (measured on SmolLM2: 1 in 192 positions cost ~4% of labeling, 1 in 768 ~1%)
FIDELITY_VOCAB = 64
ENTROPY_BIN = 0.5  # nats per bin of the entropy histogram
MASS_BINS = 20


def fidelity_stride(vocab_size: int) -> int:
    """Fidelity is measured on the target positions whose flat index ``row * L + position`` is a multiple of this."""
    return max(1, math.ceil(vocab_size / FIDELITY_VOCAB))


def entropy_edges(vocab_size: int) -> np.ndarray:
    """Bin edges of the entropy histogram: 0, 0.5, ... nats up to log V (the largest possible entropy)."""
    return np.arange(math.ceil(math.log(vocab_size) / ENTROPY_BIN) + 1) * ENTROPY_BIN


class TokenStatistics:
    """Partial sums of the statistics of a per-token version (see the module docstring)."""

    def __init__(self, vocab_size: int, seq_len: int, k: int | None, draws: int | None) -> None:
        self.v, self.seq_len, self.k, self.draws = vocab_size, seq_len, k, draws
        self.stride = fidelity_stride(vocab_size)
        self.edges = entropy_edges(vocab_size)
        self.sums: dict[str, Any] = {
            "rows": 0, "tokens": 0, "positions": 0, "next_positions": 0, "correct": 0, "nll_sum": 0.0,
            "entropy_sum": 0.0, "topk_mass_sum": 0.0, "unique_sum": 0, "fidelity_positions": 0,
            "fidelity_sum": {str(t): 0.0 for t in FIDELITY_TEMPERATURES},
            "entropy_hist": [0] * (len(self.edges) - 1), "mass_hist": [0] * MASS_BINS}

    def add_rows(self, rows: int, tokens: int) -> None:
        self.sums["rows"] += rows
        self.sums["tokens"] += tokens

    def add(self, z: Tensor | None, t: ChunkTargets, flat_index: Tensor, target: Tensor, next_ids: Tensor) -> None:
        """Add a chunk of n = B x c positions (row-major), on one intra-op thread (`reproducible.one_thread`: every
        operation here is small, O(k) per position or a few positions of V).

        Args:
            z: (B, c, V) the teacher's exact float32 logits (for the next-token log-likelihood and the fidelity);
                None when they are not at hand (`convert`): those statistics are then not added.
            t: the chunk's stored targets.
            flat_index: (n,) int64 ``row * L + position`` of each position in the version.
            target: (n,) bool, the target mask.
            next_ids: (n,) int64, the true next token, -1 where it is not in the row.
        """
        with reproducible.one_thread():
            self._add(z, t, flat_index, target, next_ids)

    def _add(self, z: Tensor | None, t: ChunkTargets, flat_index: Tensor, target: Tensor, next_ids: Tensor) -> None:
        s = self.sums
        flat = z.reshape(-1, z.shape[-1]) if z is not None else None
        m = target
        s["positions"] += int(m.sum())
        h = t.entropy(self.v)[m].numpy()
        s["entropy_sum"] += float(h.sum())
        s["entropy_hist"] = _add_hist(s["entropy_hist"], h, self.edges)
        if t.sampled is not None:
            s["unique_sum"] += int(t.sampled.num_unique.reshape(-1)[m].sum())
        nxt = m & (next_ids >= 0)
        if flat is not None and bool(nxt.any()):
            pos = torch.nonzero(nxt).flatten()
            nll = t.lse[pos].double() - flat[pos, next_ids[pos]].double()
            top1 = t.indices[pos, 0] if t.indices is not None else flat[pos].argmax(1)
            s["next_positions"] += len(pos)
            s["nll_sum"] += float(nll.sum())
            s["correct"] += int((top1 == next_ids[pos]).sum())
        if t.tail is not None and t.values is not None and t.indices is not None:
            mass = (-torch.expm1(t.tail.double()))[m].numpy()
            s["topk_mass_sum"] += float(mass.sum())
            s["mass_hist"] = _add_hist(s["mass_hist"], mass, np.linspace(0.0, 1.0, MASS_BINS + 1))
            fid = torch.nonzero(m & (flat_index % self.stride == 0)).flatten()
            if flat is not None and len(fid):
                kl = targets.topk_fidelity(flat[fid], t.values[fid], t.indices[fid], t.lse[fid],
                                           FIDELITY_TEMPERATURES, "uniform", t.tail[fid])
                s["fidelity_positions"] += len(fid)
                for temp, v in kl.items():
                    s["fidelity_sum"][str(temp)] += float(v.sum())

    def partial(self) -> dict[str, Any]:
        """The JSON-able partial sums (kept in a shard's sidecar)."""
        return json.loads(json.dumps(self.sums))

    def combine(self, parts: Sequence[Mapping[str, Any]], teacher: str) -> dict[str, Any]:
        """The manifest's ``statistics`` from the shards' partial sums."""

        def total(key: str) -> Any:
            return sum(p[key] for p in parts)

        positions, nxt = max(total("positions"), 1), total("next_positions")
        correct, fid = total("correct"), total("fidelity_positions")
        entry: dict[str, Any] = {
            "accuracy": correct / nxt if nxt else None, "errors": nxt - correct if nxt else None,
            "next_token_positions": nxt,
            "perplexity": math.exp(total("nll_sum") / nxt) if nxt else None,
            "nll_mean_nats": total("nll_sum") / nxt if nxt else None,
            "mean_entropy_nats": total("entropy_sum") / positions,
            "entropy_source": "top-k rebuild" if self.k else "sampled estimate",
            "entropy_histogram": {"edges": [round(float(e), 6) for e in self.edges],
                                  "counts": np.sum([p["entropy_hist"] for p in parts], axis=0).tolist()},
        }
        if self.k:
            entry.update(
                topk_mass_mean=total("topk_mass_sum") / positions,
                topk_mass_histogram={"edges": [round(float(e), 6) for e in np.linspace(0.0, 1.0, MASS_BINS + 1)],
                                     "counts": np.sum([p["mass_hist"] for p in parts], axis=0).tolist()},
                topk_fidelity_kl=mean_fidelity([p["fidelity_sum"] for p in parts], fid) if fid else None,
                topk_fidelity_rows=fid,
                topk_fidelity_reference="teacher logits at label time (float32)" if fid else None)
        if self.draws:
            entry["sampled_unique_mean"] = total("unique_sum") / positions
        return {"rows": total("rows"), "labeled_rows": 0, "tokens": total("tokens"),
                "target_positions": total("positions"), "fidelity_stride": self.stride, "teachers": {teacher: entry}}


def _add_hist(counts: list[int], values: np.ndarray, edges: np.ndarray) -> list[int]:
    clipped = np.clip(values, edges[0], edges[-1])
    return (np.asarray(counts, np.int64) + np.histogram(clipped, edges)[0]).tolist()
