"""Pure target math: top-k, log-sum-exp, soft targets at any temperature, exact or rebuilt from top-k.

All functions take and return tensors and compute in float32 whatever the input dtype, so targets stored
as float16/bfloat16 are softened at full precision.

The tail model (how soft targets are rebuilt from top-k storage; docs/format.md states it for readers):
    A row stores its k largest logits ``v_i`` (rounded to the storage precision), ``L = logsumexp_j z_j`` over
    *all* C logits and, in format 2, ``t = logsumexp_{j not in top-k} z_j - L``, the log of the probability mass
    outside the top-k at T = 1 (both float32, computed from the unrounded logits; ``t = -inf`` when nothing is
    left). The ``uniform`` tail gives each of the C - k other classes the logit ``L + t - log(C - k)``, i.e. the
    leftover mass spread evenly at T = 1, and the rebuilt logit vector z' is tempered like any other:
    ``q(T) = softmax(z' / T)``. It needs no clamping and is exact for k = C; its error at other temperatures is
    the "top-k fidelity" recorded in each manifest. Format 1 stored no ``t``; its readers derive it as
    ``log(1 - sum_i exp(v_i - L))``, clamped where rounding makes that sum reach 1. The ``"drop"`` tail instead
    renormalises over the top-k alone (Tang et al. 2020, KD-topk).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from kdstore.errors import ConfigError, ShapeMismatchError, arg
from kdstore.options import TAIL_MODELS

TailModel = Literal["uniform", "drop"]


def check_temperature(temperature: float, argument: str = "temperature") -> None:
    """A temperature is a finite number > 0 (ConfigError otherwise, naming `argument`)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"{arg(argument)} {temperature}: must be a finite number > 0")


TOPK_BLOCK = 64  # classes per block of the top-k's pre-selection (`_select_by_blocks`)


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest logits of each row, largest first.

    Args:
        logits: (N, C) teacher logits.
        k: 1 <= k <= C.

    Returns:
        values (N, k) float32 and indices (N, k) int64; ties are broken by the lower class index.
    """
    if logits.ndim != 2:
        raise ShapeMismatchError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ConfigError(f"{arg('k')} {k}: must be in [1, {logits.shape[1]}]")
    x = logits.float()
    # the pre-selection reads every logit once more and runs torch.topk over (k + 1) blocks: worth it while those
    # blocks are a small part of the row (at C = 49,152 and k = 64, 4,160 of the 49,152 logits: ~2x faster on one
    # thread; at k = 200, a third of the row, slower)
    idx = _select_by_blocks(x, k) if 8 * (k + 1) * TOPK_BLOCK <= x.shape[1] else _select(x, k)
    # the k are a set (no tie crosses the cut, or ties went to the lower index): order them by value, ties by the
    # lower class index, whatever order the kernel left them in
    idx = torch.sort(idx, dim=1).values
    vals = torch.gather(x, 1, idx)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return torch.gather(vals, 1, order), torch.gather(idx, 1, order)


def _select(x: Tensor, k: int) -> Tensor:
    """(N, k) the indices of each row's k largest float32 logits, in no particular order; ties at the cut go to the
    lower index."""
    c = x.shape[1]
    # torch.topk is O(C) but leaves the order of ties to the kernel; stored bytes must not depend on it. Take the
    # k + 1 largest: where the (k+1)-th ties the k-th, a tie may cross the cut, and only those rows get a stable
    # full sort.
    v, idx = torch.topk(x, min(k + 1, c), dim=1)
    if k < c:
        crossing = torch.nonzero(v[:, k] == v[:, k - 1]).flatten()
        v, idx = v[:, :k], idx[:, :k]
        if len(crossing):
            idx = idx.clone()
            idx[crossing] = torch.sort(x[crossing], dim=1, descending=True, stable=True).indices[:, :k]
    return idx


def _select_by_blocks(x: Tensor, k: int, size: int = TOPK_BLOCK) -> Tensor:
    """`_select` (the same set of k indices per row) from the rows' blocks of `size` classes with the k + 1 largest
    maxima: a torch.topk over (k + 1) x `size` candidates instead of C. Needs C >= (k + 1) x `size`.

    Exact: with M the (k+1)-th largest block maximum, every logit above M lies in a chosen block, and the chosen
    blocks hold k + 1 logits >= M (their maxima), so the candidates' k + 1 largest values are the row's. Where the
    k-th and (k+1)-th differ, the k largest are the row's unique top-k and all exceed M: they are all candidates.
    Rows where they tie (ties crossing the cut, which may reach outside the chosen blocks) or with a NaN go through
    `_select` itself.
    """
    n, c = x.shape
    x = x.contiguous()
    full = (c // size) * size
    bmax = x[:, :full].view(n, full // size, size).amax(2)
    if full < c:  # the last, shorter block
        bmax = torch.cat([bmax, x[:, full:].amax(1, keepdim=True)], 1)
    first = torch.topk(bmax, k + 1, dim=1).indices * size
    # a block's candidates are `size` consecutive logits of its row (one index_select of windows of the flat logits);
    # the short last block's window is the row's last `size` logits, those before the block masked below everything
    start = first.clamp(max=c - size)
    windows = x.view(-1).unfold(0, size, 1)
    vals = windows.index_select(0, (start + torch.arange(n)[:, None] * c).view(-1)).view(n, -1)
    cand = (start[:, :, None] + torch.arange(size)).view(n, -1)
    if full < c:
        vals.masked_fill_(cand < first.repeat_interleave(size, dim=1), float("-inf"))
    v, pos = torch.topk(vals, k + 1, dim=1)
    idx = torch.gather(cand, 1, pos[:, :k])
    redo = torch.nonzero((v[:, k] == v[:, k - 1]) | torch.isnan(bmax).any(1)).flatten()
    if len(redo):
        idx[redo] = _select(x[redo], k)
    return idx


def logsumexp_into(logits: Tensor, scratch: Tensor) -> Tensor:
    """``logsumexp(logits, dim=1)`` of (N, C) float32 logits, computed in `scratch` (N, C) instead of temporaries:
    the same operations in the same order as `torch.logsumexp` (max, subtract, exp, sum, log, add), so the same
    bits, without allocating two (N, C) arrays per call (at LLM-sized C those allocations cost more than the math)."""
    m = logits.amax(dim=1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows of only +-inf: no inf - inf
    torch.sub(logits, m, out=scratch)
    return scratch.exp_().sum(dim=1).log_().add_(m.squeeze(1))


def logsumexp_and_tail(logits: Tensor, indices: Tensor, scratch: Tensor,
                       maximum: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`logsumexp` and `tail_logmass` of (N, C) float32 logits in one exponential pass over `scratch` (N, C).

    ``s = exp(z - max z)`` is summed whole (``L = log sum s + max z``, the same operations and bits as
    `torch.logsumexp`) and again with the top-k zeroed (``t = log sum_tail s - log sum s``). Where the tail
    underflows against the top-1 (a tail sum below 2^-100, the exponent range of float32 running out), the tail of
    those rows is recomputed with its own shift, as `tail_logmass` does.

    Args:
        maximum: (N,) the rows' largest logits when the caller has them (the top-1 of `top_k`: the same floats as
            ``amax``), saving a pass over the logits.
    """
    m = logits.amax(dim=1, keepdim=True) if maximum is None else maximum.reshape(-1, 1).to(logits.dtype)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows of only +-inf: no inf - inf
    torch.sub(logits, m, out=scratch)
    scratch.exp_()
    s_all = scratch.sum(dim=1)
    s_tail = scratch.scatter_(1, indices.long(), 0.0).sum(dim=1)
    lse = s_all.log().add_(m.squeeze(1))
    tail = s_tail.log() - s_all.log()
    low = torch.nonzero((s_tail < 2.0**-100) & (indices.shape[1] < logits.shape[1])).flatten()
    if len(low):
        tail[low] = tail_logmass(logits[low], indices[low], lse[low])
    return lse, tail


def tail_logmass(logits: Tensor, indices: Tensor, lse: Tensor, *, inplace: bool = False,
                 scratch: Tensor | None = None) -> Tensor:
    """Log of the probability mass outside the top-k at T = 1, float32 (N,): ``logsumexp_{j not in top-k} z_j - L``.

    Computed from the logits themselves, never as ``log(1 - sum of the top-k probabilities)``, which cancels when
    the top-k mass is close to 1. ``-inf`` where nothing is left (k = C, or every tail logit is -inf).

    Args:
        logits: (N, C) the exact logits (float32; overwritten if `inplace`).
        indices: (N, k) the top-k class indices.
        lse: (N,) ``logsumexp`` of all C logits.
    """
    if inplace and logits.dtype == torch.float32:
        masked = logits.scatter_(1, indices.long(), float("-inf"))
    else:
        masked = logits.float().scatter(1, indices.long(), float("-inf"))
    tail = logsumexp_into(masked, scratch) if scratch is not None else torch.logsumexp(masked, dim=1)
    return tail - lse.float()


def truncate_topk(values: Tensor, indices: Tensor, lse: Tensor, tail_logmass: Tensor | None,
                  k: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The first `k` entries of a stored top-k (largest first), with the tail grown by the dropped entries:
    ``t' = logaddexp(t, logsumexp(v_dropped - L))``. Format-1 top-k (no tail) is cut as is."""
    if tail_logmass is None or k >= values.shape[-1]:
        return values[..., :k], indices[..., :k], tail_logmass
    dropped = torch.logsumexp(values[..., k:].float() - lse.float()[..., None], dim=-1)
    return values[..., :k], indices[..., :k], torch.logaddexp(tail_logmass.float(), dropped)


def logsumexp(logits: Tensor) -> Tensor:
    """Row-wise log-sum-exp of (N, C) logits, float32 (N,)."""
    return torch.logsumexp(logits.float(), dim=1)


def log_soft_targets(logits: Tensor, temperature: float) -> Tensor:
    """Exact log soft targets ``log softmax(z / T)`` of (N, C) logits, float32 (N, C) (Hinton et al. 2015)."""
    check_temperature(temperature)
    return torch.log_softmax(logits.float() / temperature, dim=1)


def soft_targets(logits: Tensor, temperature: float) -> Tensor:
    """Exact soft targets ``softmax(z / T)`` of (N, C) logits, float32 (N, C)."""
    return log_soft_targets(logits, temperature).exp()


def rebuild_logits(
    values: Tensor, indices: Tensor, lse: Tensor, num_classes: int, tail: TailModel = "uniform",
    tail_logmass: Tensor | None = None,
) -> Tensor:
    """Dense (N, C) logits rebuilt from top-k storage under the tail model (see module docstring).

    Args:
        values: (N, k) top-k logits.
        indices: (N, k) their class indices.
        lse: (N,) log-sum-exp of the full logits at T = 1 (unused for ``tail="drop"``).
        num_classes: C.
        tail: ``"uniform"`` (leftover mass spread over the other classes) or ``"drop"`` (-inf outside top-k).
        tail_logmass: (N,) the stored log tail mass (format 2); None derives it from the top-k (format 1).

    Returns:
        float32 (N, C) logits; softmax of them at T = 1 reproduces the stored top-k probabilities.
    """
    if values.shape != indices.shape or values.ndim != 2:
        raise ShapeMismatchError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be (N, k)")
    n, k = values.shape
    if k > num_classes:
        raise ShapeMismatchError(f"k={k} exceeds num_classes={num_classes}")
    v = values.float()
    if tail == "drop" or k == num_classes:
        fill = torch.full((n, 1), float("-inf"), dtype=torch.float32, device=v.device).expand(n, num_classes)
    elif tail == "uniform":
        if lse.shape != (n,):
            raise ShapeMismatchError(f"lse must be (N,) = ({n},), got {tuple(lse.shape)}")
        lse32 = lse.float()
        if tail_logmass is None:  # format 1: derived from the rounded top-k, clamped below 1
            log_mass = torch.logsumexp(v - lse32[:, None], dim=1).clamp(max=0.0)
            log_rest = torch.log1p(-torch.exp(log_mass).clamp(max=1.0 - 1e-7))
        elif tail_logmass.shape != (n,):
            raise ShapeMismatchError(f"tail_logmass must be (N,) = ({n},), got {tuple(tail_logmass.shape)}")
        else:
            log_rest = tail_logmass.float()
        tail_logit = lse32 + log_rest - math.log(num_classes - k)
        fill = tail_logit[:, None].expand(n, num_classes)
    else:
        raise ConfigError(f"{arg('tail')} {tail!r}: expected one of {', '.join(TAIL_MODELS)}")
    out = fill.clone()
    out.scatter_(1, indices.long(), v)
    return out


def log_soft_targets_topk(
    values: Tensor,
    indices: Tensor,
    lse: Tensor,
    num_classes: int,
    temperature: float,
    tail: TailModel = "uniform",
    tail_logmass: Tensor | None = None,
) -> Tensor:
    """Log soft targets at T rebuilt from top-k storage, float32 (N, C); -inf outside top-k for ``drop``."""
    check_temperature(temperature)
    rebuilt = rebuild_logits(values, indices, lse, num_classes, tail, tail_logmass)
    return torch.log_softmax(rebuilt / temperature, dim=1)


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Row-wise KL(p || q) = sum_i p_i (log p_i - log q_i) of (N, C) log-probabilities, (N,) float32.

    Terms with p_i = 0 contribute 0, even where log q_i = -inf.
    """
    p = log_p.float().exp()
    diff = torch.where(p > 0, log_p.float() - log_q.float(), torch.zeros_like(p))
    return (p * diff).sum(dim=1)


def entropy(log_p: Tensor) -> Tensor:
    """Row-wise entropy in nats of (N, C) log-probabilities, (N,) float32."""
    p = log_p.float().exp()
    return -(p * torch.where(p > 0, log_p.float(), torch.zeros_like(p))).sum(dim=1)


def topk_entropy(values: Tensor, lse: Tensor, tail_logmass: Tensor, num_classes: int,
                 tail: TailModel = "uniform") -> Tensor:
    """Entropy in nats of the soft targets at T = 1 rebuilt from a top-k (`rebuild_logits`), without building the
    (N, C) vector: O(k) per row. Equals ``entropy(log_softmax(rebuild_logits(...)))``.

    Args:
        values: (N, k) stored top-k logits; lse: (N,); tail_logmass: (N,) (format 2).
    """
    v = values.float()
    n, k = v.shape
    if tail == "drop" or k == num_classes:
        logq = torch.log_softmax(v, dim=1)
        return -(logq.exp() * logq).sum(dim=1)
    tail_total = lse.float() + tail_logmass.float()  # log of the tail's total (unnormalised) mass
    norm = torch.logaddexp(torch.logsumexp(v, dim=1), tail_total)
    logq = v - norm[:, None]
    tail_logq = tail_total - norm  # log of the tail's total probability
    per_class = tail_logq - math.log(num_classes - k)
    tail_h = torch.where(torch.isfinite(tail_logq), -tail_logq.exp() * per_class, torch.zeros_like(tail_logq))
    return -(logq.exp() * logq).sum(dim=1) + tail_h


def topk_fidelity(
    logits: Tensor,
    values: Tensor,
    indices: Tensor,
    lse: Tensor,
    temperatures: Sequence[float],
    tail: TailModel = "uniform",
    tail_logmass: Tensor | None = None,
) -> dict[float, Tensor]:
    """Per-row KL(reference soft targets || soft targets rebuilt from the top-k) at each temperature.

    ``KL_n(T) = sum_c p_c (log p_c - log q_c)`` with ``p = softmax(z / T)`` of the reference logits and
    ``q = softmax(z' / T)`` of the rebuilt ones (`rebuild_logits`); terms with ``p_c = 0`` are 0.

    Args:
        logits: (N, C) reference logits (the stored full logits, or the teacher's at label time).
        values, indices, lse, tail_logmass: the top-k storage as a reader sees it (values at stored precision).
        temperatures: the temperatures to measure at.

    Returns:
        {T: (N,) float64 KL in nats}. Memory: a few (N, C) float64 arrays; callers bound N for large C.
    """
    for t in temperatures:
        check_temperature(t)
    # float64: a statistic that a reader recomputes from the stored data must not carry float32 rounding (at C in
    # the hundreds of thousands a float32 KL is off by ~1e-5 absolute per row)
    ref = logits.double()
    rebuilt = rebuild_logits(values, indices, lse, ref.shape[1], tail, tail_logmass).double()
    out = {}
    for t in temperatures:
        exact = torch.log_softmax(ref / t, dim=1)
        p = exact.exp()
        diff = torch.where(p > 0, exact - torch.log_softmax(rebuilt / t, dim=1), torch.zeros_like(p))
        out[float(t)] = (p * diff).sum(dim=1).clamp(min=0.0)
    return out


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Each row of logits z-scored (Sun et al. 2024, "Logit Standardization in Knowledge Distillation", CVPR).

    ``Z(z) = (z - mean(z)) / (std(z) + eps)`` per row, with the population SD ``sqrt(mean((z - mean)^2))`` of the
    paper's equation (the authors' code divides by the unbiased SD, which is the same as using this one at
    temperature ``T * sqrt(C / (C - 1))``). Softmax is shift-invariant, so the z-score only removes the row's
    scale: a teacher whose logits span hundreds and one whose logits span a few units give the same targets if
    they rank and space the classes alike. ``-inf`` entries (the ``"drop"`` top-k tail) stay ``-inf`` and the mean
    and SD are taken over the finite entries; a row with one finite entry (or all equal) becomes 0 there.

    Args:
        logits: (N, C) logits, any float dtype; may carry gradients (the student's).
        eps: added to the SD (a constant row maps to zeros, not NaN).

    Returns:
        float32 (N, C) standardised logits (float64 stays float64).
    """
    if logits.ndim != 2:
        raise ShapeMismatchError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    z = logits if logits.dtype == torch.float64 else logits.float()
    finite = torch.isfinite(z)
    # Zero the -inf entries before any arithmetic, so no inf (or inf * 0 in the backward pass) appears.
    zf = torch.where(finite, z, torch.zeros_like(z))
    n = finite.sum(dim=1, keepdim=True).clamp(min=1)
    mean = zf.sum(dim=1, keepdim=True) / n
    d = torch.where(finite, zf - mean, torch.zeros_like(z))
    # clamp: d sqrt(v) / dv is infinite at v = 0, and a constant student row must not turn its gradient into NaN
    std = (d.pow(2).sum(dim=1, keepdim=True) / n).clamp(min=1e-24).sqrt()
    return torch.where(finite, d / (std + eps), torch.full_like(z, float("-inf")))
