"""Per-token targets of a language-model version: its columns, the manifest's ``targets`` block, and the targets of
one chunk of positions (docs/format.md, "Per-token targets").

A row is a sequence of L tokens. Position t of a row holds the teacher's distribution over token t + 1 given tokens
0..t, stored as a top-k with format 2's exact tail (the same rebuild as classification, position by position) and/or
as sampled ids with counts and the teacher's log-probabilities (`kdstore.sampling`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdstore import targets, versioning
from kdstore.errors import TeacherError, arg
from kdstore.sampling import SampledTokens, sample_tokens
from kdstore.store.ragged import Ragged

MASKS = ("attention_mask", "loss_mask", "target_mask")
TOKEN_ROLES = ("input_ids", *MASKS, "topk_indices", "topk_values", "logsumexp", "tail_logmass", "sample_ids",
               "sample_counts", "sample_logprobs")
MAX_TOP_K = 1024
MAX_DRAWS = 32767  # counts are int16


def token_columns(teacher: str, seq_len: int, vocab_size: int, *, k: int | None, draws: int | None,
                  logprobs: bool, dtype: str) -> list[dict[str, Any]]:
    """The column specs of a per-token version, in file order: sample_id, input_ids, the masks, then the teacher's
    top-k (indices, values, log-sum-exp, log tail mass) and sampled targets (ids, counts, log-probs)."""
    L = [seq_len]

    def col(name: str, role: str, dt: str, shape: list[int], teacher_id: str | None = None,
            **extra: Any) -> dict[str, Any]:
        return {"name": name, "role": role, "teacher": teacher_id, "dtype": dt, "shape": shape, **extra}

    prec = {"precision": dtype} if dtype != "float32" else {}
    cols = [col("sample_id", "sample_id", "int64", []), col("input_ids", "input_ids", "int32", L)]
    cols += [col(m, m, "int8", L) for m in MASKS]
    if k:
        cols += [col(f"{teacher}_topk_indices", "topk_indices", versioning.index_dtype(vocab_size), [seq_len, k],
                     teacher),
                 col(f"{teacher}_topk_values", "topk_values", "float32", [seq_len, k], teacher, **prec),
                 col(f"{teacher}_logsumexp", "logsumexp", "float32", L, teacher),
                 col(f"{teacher}_tail_logmass", "tail_logmass", "float32", L, teacher)]
    if draws:
        cols += [col(f"{teacher}_sample_ids", "sample_ids", "int32", L, teacher, ragged=True),
                 col(f"{teacher}_sample_counts", "sample_counts", "int16", L, teacher, ragged=True)]
        if logprobs:
            cols.append(col(f"{teacher}_sample_logprobs", "sample_logprobs", "float32", L, teacher, ragged=True,
                            **prec))
    return cols


def targets_block(seq_len: int, vocab_size: int, *, k: int | None, draws: int | None, logprobs: bool, seed: int,
                  dtype: str, source: str = "teacher logits") -> dict[str, Any]:
    """The manifest's ``targets`` block of a per-token version (docs/format.md)."""
    return {
        "kind": "tokens", "seq_len": seq_len, "vocab_size": vocab_size, "positions": "next-token",
        "logits": None,
        "top_k": ({"k": k, "values_dtype": dtype, "indices_dtype": versioning.index_dtype(vocab_size),
                   "tail": "uniform", "tail_logmass": True} if k else None),
        "sampled": ({"draws": draws, "seed": seed, "temperature": 1.0, "counts_dtype": "int16",
                     "logprobs_dtype": dtype if logprobs else None, "from": source} if draws else None),
        "logsumexp": {"dtype": "float32"} if k else None,
        "masks": list(MASKS),
        "labels": False,
    }


def positions_per_chunk(batch_rows: int, vocab_size: int) -> int:
    """Positions per chunk of the output head so that a chunk holds about CHUNK_ELEMENTS logits (64 MiB); fixed by
    the batch size and the vocabulary, so a resumed or sharded run chunks the same way."""
    return max(1, versioning.CHUNK_ELEMENTS // max(1, batch_rows * vocab_size))


@dataclass
class ChunkTargets:
    """The targets of a chunk of n = rows x positions (row-major), as a reader of the version sees them."""

    values: Tensor | None  # (n, k) float32 rounded to the storage precision, largest first
    indices: Tensor | None  # (n, k) int64
    lse: Tensor  # (n,) float32: of the unrounded logits (top-k), or the sampler's
    tail: Tensor | None  # (n,) float32 log mass outside the top-k
    sampled: SampledTokens | None

    def entropy(self, vocab_size: int) -> Tensor:
        """(n,) float64 entropy in nats of each position's targets at T = 1: of the top-k rebuild (O(k)), else the
        unbiased sampled estimate ``-sum_i (c_i / N) log p_i``."""
        if self.values is not None and self.tail is not None:
            return targets.topk_entropy(self.values, self.lse, self.tail, vocab_size).double()
        s = self.sampled
        assert s is not None
        per_entry = -(s.counts.double() / s.draws) * s.logprobs.double()
        owner = torch.repeat_interleave(torch.arange(s.num_unique.numel()), s.num_unique.reshape(-1).long())
        return torch.zeros(s.num_unique.numel(), dtype=torch.float64).index_add_(0, owner, per_entry)


def chunk_targets(z: Tensor, *, k: int | None, precision: str, draws: int | None, seed: int, rows: Tensor,
                  start: int, scratch: Tensor | None, where: str) -> ChunkTargets:
    """The targets of the logits `z` (B, c, V) of rows `rows` (global ids) at positions [start, start + c).

    Top-k: `targets.top_k` (largest first, ties by the lower id) and one exponential pass for the log-sum-exp and
    the exact tail (`targets.logsumexp_and_tail`, in `scratch`). Sampled: `sample_tokens` (draws keyed by seed, row
    and position). Memory: `z`, `scratch` and the sampler's one softmax copy: a chunk, never a shard.

    Raises:
        TeacherError: NaN or infinite logits (`where` names the teacher and file).
    """
    b, c, v = z.shape
    flat = z.reshape(b * c, v)
    values = indices = tail = lse = None
    if k:
        vals, indices = targets.top_k(flat, k)
        lse, tail = targets.logsumexp_and_tail(flat, indices, scratch[: b * c] if scratch is not None
                                               else torch.empty_like(flat), maximum=vals[:, 0])
        values = versioning.as_stored(vals, precision)
        bad = torch.nonzero(~torch.isfinite(lse)).flatten()  # a NaN or +inf logit, or a position of only -inf
        if len(bad):
            i = int(bad[0])
            raise TeacherError(f"{arg('teacher')} {where}: NaN or Inf logits at row {int(rows[i // c])}, position "
                               f"{start + i % c}; nothing was committed; check the teacher")
    sampled = None
    if draws:
        try:
            s = sample_tokens(z, seed=seed, rows=rows, start=start, draws=draws)
        except TeacherError as e:
            raise TeacherError(f"{arg('teacher')} {where}: {e}, rows {int(rows[0])}-{int(rows[-1])}; nothing was "
                               "committed; check the teacher") from None
        sampled = SampledTokens(draws, s.num_unique, s.ids, s.counts, versioning.as_stored(s.logprobs, precision),
                                s.logsumexp)
        lse = lse if lse is not None else s.logsumexp.reshape(-1)
    assert lse is not None  # k or draws is set (LMLabelConfig)
    return ChunkTargets(values, indices, lse, tail, sampled)


def assemble_sampled(chunks: list[SampledTokens], rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sampled targets of a batch (`rows` rows) from its chunks of positions (in order): (lengths (rows, L),
    ids, counts, logprobs), entries in row-major (row, position) order."""
    lengths = np.concatenate([s.num_unique.numpy().reshape(rows, -1) for s in chunks], axis=1)
    row_off = [np.concatenate([[0], np.cumsum(s.num_unique.numpy().reshape(rows, -1).sum(1))]) for s in chunks]
    order = [(j, int(ro[r]), int(ro[r + 1])) for r in range(rows) for j, ro in enumerate(row_off)]

    def gather(get: Any) -> np.ndarray:
        arrays = [get(s).numpy() for s in chunks]
        return np.concatenate([arrays[j][a:e] for j, a, e in order]) if order else np.empty(0)

    return (lengths.astype(np.int32), gather(lambda s: s.ids).astype(np.int32),
            gather(lambda s: s.counts).astype(np.int16), gather(lambda s: s.logprobs).astype(np.float32))


def ragged_columns(teacher: str, lengths: np.ndarray, ids: np.ndarray, counts: np.ndarray, logprobs: np.ndarray,
                   with_logprobs: bool) -> dict[str, Ragged]:
    """The sampled columns of a block of rows."""
    out = {f"{teacher}_sample_ids": Ragged(ids, lengths), f"{teacher}_sample_counts": Ragged(counts, lengths)}
    if with_logprobs:
        out[f"{teacher}_sample_logprobs"] = Ragged(logprobs, lengths)
    return out
