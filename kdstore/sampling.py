"""Reproducible sampled per-token targets (Anshumann et al., ACL 2025, "Sparse Logit Sampling") and the estimator
that trains on them.

Draws. Draw j at position `pos` of row `row` inverts the position's CDF at ``u = uniforms(seed, row, pos)[j]``,
the j-th output of a SplitMix64 stream whose seed is a hash of (seed, row, pos); u depends on nothing else. The
CDF is two-level: the probabilities (``torch.softmax``, float32) are summed in blocks of BLOCK ids (float32, 64
terms), the block masses are accumulated in float64 to pick a block, and a float64 running sum inside the block
picks the id. So the accumulated rounding is ~1e-7 of a block's mass instead of the ~1e-3 drift of a float32 running
sum over 150,000 ids, and the cost is one softmax plus O(V / 64 + N * 64) per position instead of a float64 scan
over V (1.8x slower here). Every step works on one position at a time with a fixed instruction sequence (softmax and the
block sums are row-wise kernels, the running sums are sequential), so a position's draws, log-probs and
log-sum-exp are the same bits whatever the batch, the chunk of positions, the thread count, a resume or the rank,
given the same logits (tested). Whether the *logits* are bitwise reproducible is the forward pass's business:
the labeler keeps its batch boundaries fixed. Zero-probability ids are never drawn.

Storage. The N draws of a position are sorted, so ids come out ascending and unique ids with counts are run
lengths. The result is variable-length (``num_unique`` per position, then flat ``ids``/``counts``/``logprobs``):
a position has 1..N distinct ids (about 20 of 50 for SmolLM2), so padding every position to N would store 2.5x
the entries; Parquet list columns hold variable-length lists as they are. `to_padded` makes fixed (P, K) tensors
for training.

Estimator (see docs/lm.md). With N draws from the teacher p (T = 1) and counts c_i of the distinct ids x_i,
``sum_v p_v f(v)`` is estimated without bias by ``sum_i (c_i / N) f(x_i)``; with f = log s (the student's
log-probabilities) that is the cross-entropy term of the KL. At T != 1 the target is p_T ∝ p^(1/T); the stored
teacher log-probs give importance weights ``c_i p_i^(1/T - 1)``, normalised over the position's draws
(`draw_weights`): consistent for every T, with a bias of order 1/N (exactly unbiased only at T = 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdstore.counters import uniforms
from kdstore.errors import ConfigError, ShapeMismatchError, TeacherError, arg

BLOCK = 64  # ids per block of the two-level inverse CDF; part of the draws' definition (changing it moves draws)


@dataclass(frozen=True)
class SampledTokens:
    """Distinct sampled ids per position, positions in row-major order ((row, position) of the logits given).

    ``num_unique[r, l]`` entries of the flat arrays belong to position (r, l); within a position ids ascend.
    """

    draws: int
    num_unique: torch.Tensor  # int32 (R, L)
    ids: torch.Tensor  # int32 (E,)
    counts: torch.Tensor  # int32 (E,): how many of the `draws` draws gave the id; they sum to `draws` per position
    logprobs: torch.Tensor  # float32 (E,): the teacher's log p(id) at T = 1
    logsumexp: torch.Tensor  # float32 (R, L): log sum_v exp(z_v), the normaliser of `logprobs`

    def offsets(self) -> torch.Tensor:
        """int64 (R * L + 1,): position i owns entries [offsets[i], offsets[i + 1])."""
        return torch.cat([torch.zeros(1, dtype=torch.int64), self.num_unique.reshape(-1).to(torch.int64).cumsum(0)])


def sample_tokens(logits: torch.Tensor, *, seed: int, rows: Sequence[int] | torch.Tensor, start: int = 0,
                  draws: int) -> SampledTokens:
    """Draw `draws` tokens per position from softmax(logits) (T = 1), reproducibly.

    Args:
        logits: (R, L, V) teacher logits of positions [start, start + L) of the rows `rows`.
        seed: the labeling run's seed.
        rows: (R,) stable global row ids (row i of the transfer set is i, whatever the batch or rank).
        start: the absolute position of logits[:, 0] in its row (for chunks of positions).
        draws: N, draws per position.

    Returns:
        SampledTokens with ids ascending per position, and the log-sum-exp of every position (computed on the way:
        the labeler can take its top-k log-probabilities from it). Memory: one float32 copy of the logits.

    Raises:
        ShapeMismatchError: logits not (R, L, V) or `rows` of the wrong length. ConfigError: bad seed or draws.
        TeacherError: a position whose logits are NaN or all -inf.
    """
    if logits.ndim != 3:
        raise ShapeMismatchError(f"logits of shape {tuple(logits.shape)}: expected (rows, positions, vocabulary)")
    n_rows, n_pos, vocab = logits.shape
    row_ids = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
    if row_ids.numel() != n_rows:
        raise ShapeMismatchError(f"{row_ids.numel()} row ids for logits of {n_rows} rows")
    if start < 0:
        raise ConfigError(f"{arg('start')} {start}: must be >= 0")
    n = n_rows * n_pos
    u = uniforms(seed, row_ids, np.arange(start, start + n_pos), draws).sort(-1).values.reshape(n, draws)
    z = logits.detach().float().reshape(n, vocab)
    # softmax works row by row with one fixed instruction sequence per row: a position's probabilities are the same
    # bits whatever the batch, chunk or thread count (a plain exp(z - max) is not: its vector/scalar split moves).
    p = torch.softmax(z, -1)
    mass, cum = _block_masses(p, vocab)
    bad = ~(cum[:, -1] > 0)  # NaN logits give NaN masses; all -inf gives 0
    if bool(bad.any()):
        raise TeacherError(f"teacher logits with no finite probability distribution at {int(bad.sum())} of {n} "
                           "positions (NaN, or all -inf)")
    ids = _draw_ids(p, u, mass, cum)
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = new.reshape(-1).nonzero().squeeze(1)  # first draw of each run of equal ids
    ends = torch.cat([starts[1:], torch.tensor([ids.numel()], dtype=torch.int64)])
    flat_ids = ids.reshape(-1)[starts]
    pos = starts // draws  # the position of each entry
    # log-sum-exp: softmax multiplied exp(z - z_max) by 1 / S (S its float32 sum), so the largest probability is
    # exactly fl(1 / S); the float64 total of the block masses corrects S's rounding: lse = z_max + log S + log total.
    lse = z.amax(-1).double() - p.amax(-1).double().log() + cum[:, -1].log()
    lp = z[pos, flat_ids].double() - lse[pos]
    lse = lse.float().view(n_rows, n_pos)
    return SampledTokens(draws, new.sum(-1).to(torch.int32).view(n_rows, n_pos), flat_ids.to(torch.int32),
                         (ends - starts).to(torch.int32), lp.float(), lse)


def _block_masses(p: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Level 1's table: the (n, blocks) masses of each block of BLOCK ids (float32 sums of BLOCK terms, as float64)
    and their float64 running sum."""
    n, full = p.shape[0], (vocab // BLOCK) * BLOCK
    mass = p[:, :full].view(n, full // BLOCK, BLOCK).sum(-1)
    if full < vocab:
        mass = torch.cat([mass, p[:, full:].sum(-1, keepdim=True)], -1)
    mass = mass.double()
    cum = mass.cumsum(-1)  # (n, nb)
    return mass, cum


def _draw_ids(p: torch.Tensor, u: torch.Tensor, mass: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """(n, N) ids, non-decreasing per position, for the sorted uniforms `u` (n, N): level 1 picks a block from the
    running block masses `cum`, level 2 the id inside it from a float64 running sum of the block's terms."""
    (n, vocab), draws = p.shape, u.shape[1]
    nb, full = -(-vocab // BLOCK), (vocab // BLOCK) * BLOCK
    # Level 1: which block of BLOCK ids.
    total = cum[:, -1:]
    t = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # < total even after rounding
    # right=True: the first block (then id) whose running mass exceeds the target; zero mass never qualifies.
    blk = torch.searchsorted(cum, t, right=True).clamp_(max=nb - 1)  # (n, N), non-decreasing as u is sorted
    before = torch.where(blk > 0, cum.gather(1, (blk - 1).clamp(min=0)), 0.0)
    frac = ((t - before) / mass.gather(1, blk)).clamp_(0.0, 1.0 - 2.0**-53)  # where in the block, in [0, 1)
    # Level 2: which id inside the chosen block, from a float64 running sum of the block's terms.
    width = min(BLOCK, vocab)
    idx = blk.unsqueeze(-1) * BLOCK + torch.arange(width)  # (n, N, width)
    past_end = idx >= vocab if full < vocab and vocab > BLOCK else None  # the last block's empty slots
    inside = p.gather(1, idx.clamp_(max=vocab - 1).view(n, -1)).view(n, draws, width)
    if past_end is not None:
        inside[past_end] = 0.0
    icum = inside.double().cumsum_(-1)
    off = torch.searchsorted(icum, (frac * icum[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    ids = (blk * BLOCK + off.clamp_(max=width - 1)).clamp_(max=vocab - 1)  # (n, N), non-decreasing
    return ids


def to_padded(num_unique: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, logprobs: torch.Tensor,
              k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat per-position entries -> (P, K) tensors: ids (int64, -1 where empty), counts (0 where empty),
    logprobs (float32, -inf where empty). K = `k` or the largest num_unique; positions with more entries than
    `k` raise (dropping draws would bias the estimator)."""
    nu = num_unique.reshape(-1).to(torch.int64)
    kk = int(nu.max()) if k is None and nu.numel() else (k or 0)
    if nu.numel() and int(nu.max()) > kk:
        raise ConfigError(f"{arg('k')} {kk}: a position has {int(nu.max())} distinct sampled ids")
    if int(nu.sum()) != ids.numel() or ids.numel() != counts.numel() or ids.numel() != logprobs.numel():
        raise ShapeMismatchError(f"num_unique sums to {int(nu.sum())} but there are {ids.numel()} ids, "
                                 f"{counts.numel()} counts and {logprobs.numel()} logprobs")
    p = nu.numel()
    slot = torch.arange(ids.numel()) - torch.repeat_interleave(torch.cumsum(nu, 0) - nu, nu)
    row = torch.repeat_interleave(torch.arange(p), nu)
    out_ids = torch.full((p, kk), -1, dtype=torch.int64)
    out_c = torch.zeros((p, kk), dtype=counts.dtype)
    out_lp = torch.full((p, kk), float("-inf"), dtype=torch.float32)
    out_ids[row, slot], out_c[row, slot], out_lp[row, slot] = ids.to(torch.int64), counts, logprobs.float()
    return out_ids, out_c, out_lp


def draw_weights(counts: torch.Tensor, logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Weights of a position's distinct draws for estimating sums over the teacher's distribution at T.

    ``w_i = c_i p_i^(1/T - 1) / sum_j c_j p_j^(1/T - 1)``; at T = 1 exactly ``c_i / N`` (unbiased); at other T a
    self-normalised importance-sampling estimate (consistent, bias O(1/N)).

    Args:
        counts: (P, K) draw counts, 0 for empty slots. logprobs: (P, K) teacher log p at T = 1.
        temperature: T > 0.

    Returns:
        float32 (P, K), each row summing to 1 (0 in empty slots).
    """
    if counts.shape != logprobs.shape:
        raise ShapeMismatchError(f"counts {tuple(counts.shape)} and logprobs {tuple(logprobs.shape)} differ")
    if not temperature > 0:
        raise ConfigError(f"{arg('temperature')} {temperature}: must be > 0")
    c = counts.double()
    logw = c.log() + (1.0 / temperature - 1.0) * torch.where(c > 0, logprobs.double(), 0.0)
    return torch.softmax(logw, -1).float()


def sampled_cross_entropy(student_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                          logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Estimate ``-sum_v p_T(v) log s_T(v)`` per position from sampled teacher ids (its gradient is the KL's).

    Args:
        student_logits: (P, V). ids, counts, logprobs: (P, K) from `to_padded` (ids -1 where empty).
        temperature: T applied to both teacher and student.

    Returns:
        float32 (P,).
    """
    if (ids.shape != counts.shape or ids.ndim != 2 or student_logits.ndim != 2
            or ids.shape[0] != student_logits.shape[0]):
        raise ShapeMismatchError(f"student_logits {tuple(student_logits.shape)}, ids {tuple(ids.shape)}, counts "
                                 f"{tuple(counts.shape)}: expected (P, V) and (P, K)")
    log_s = torch.log_softmax(student_logits.float() / temperature, -1)
    picked = log_s.gather(-1, ids.clamp(min=0))
    w = draw_weights(counts, logprobs, temperature)
    return -(w * torch.where(counts > 0, picked, 0.0)).sum(-1)
