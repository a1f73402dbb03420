"""Pure target math: top-k, log-sum-exp, soft targets at any temperature, exact or rebuilt from top-k.

All functions take and return tensors and compute in float32 whatever the input dtype, so targets stored
as float16/bfloat16 are softened at full precision.

The tail model (how soft targets are rebuilt from top-k storage):
    A row stores its k largest logits ``z_i`` and the log-sum-exp ``L = log sum_j exp(z_j)`` of *all* C
    logits (at T = 1). The probability mass outside the top-k at T = 1 is ``r = 1 - sum_i exp(z_i - L)``.
    The ``C - k`` tail classes are each given the logit ``z_tail = L + log(r / (C - k))``, i.e. the leftover
    mass spread evenly over them at T = 1, and the rebuilt logit vector is then tempered like any other:
    ``q(T) = softmax(z' / T)``. This is exact for k = C, exact in the top-k probabilities and total tail
    mass at T = 1, and its error at other temperatures is the "top-k fidelity" recorded in each manifest.
    The ``"drop"`` tail instead renormalises over the top-k alone (Tang et al. 2020, KD-topk).
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
    # A stable sort makes ties deterministic (lower index first), so stored bytes never depend on
    # the kernel that ran the teacher.
    order = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(x, 1, order), order


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
    values: Tensor, indices: Tensor, lse: Tensor, num_classes: int, tail: TailModel = "uniform"
) -> Tensor:
    """Dense (N, C) logits rebuilt from top-k storage under the tail model (see module docstring).

    Args:
        values: (N, k) top-k logits.
        indices: (N, k) their class indices.
        lse: (N,) log-sum-exp of the full logits at T = 1 (unused for ``tail="drop"``).
        num_classes: C.
        tail: ``"uniform"`` (leftover mass spread over the other classes) or ``"drop"`` (-inf outside top-k).

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
        # log of the top-k mass; log1p(-exp(.)) keeps precision when the mass is close to 1.
        log_mass = torch.logsumexp(v - lse32[:, None], dim=1).clamp(max=0.0)
        log_rest = torch.log1p(-torch.exp(log_mass).clamp(max=1.0 - 1e-7))
        tail_logit = lse32 + log_rest - torch.log(torch.tensor(float(num_classes - k), device=v.device))
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
) -> Tensor:
    """Log soft targets at T rebuilt from top-k storage, float32 (N, C); -inf outside top-k for ``drop``."""
    check_temperature(temperature)
    return torch.log_softmax(rebuild_logits(values, indices, lse, num_classes, tail) / temperature, dim=1)


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


def topk_fidelity(
    logits: Tensor,
    values: Tensor,
    indices: Tensor,
    lse: Tensor,
    temperatures: Sequence[float],
    tail: TailModel = "uniform",
) -> dict[float, Tensor]:
    """Per-row KL(exact soft targets || soft targets rebuilt from top-k) at each temperature.

    Args:
        logits: (N, C) exact teacher logits.
        values, indices, lse: the top-k storage as written (pass values already cast to the stored dtype).
        temperatures: the temperatures to measure at.

    Returns:
        {T: (N,) float32 KL in nats}.
    """
    for t in temperatures:
        check_temperature(t)
    c = logits.shape[1]
    # All temperatures in one batched pass: (len(T), N, C). Labeling calls this for every batch, and a few
    # large ops cost far less than many small ones.
    temps = torch.tensor([float(t) for t in temperatures], device=logits.device)[:, None, None]
    exact = torch.log_softmax(logits.float()[None] / temps, dim=2)
    rebuilt = torch.log_softmax(rebuild_logits(values, indices, lse, c, tail)[None] / temps, dim=2)
    p = exact.exp()
    kl = (p * torch.where(p > 0, exact - rebuilt, torch.zeros_like(p))).sum(dim=2).clamp(min=0.0)
    return {float(t): kl[i] for i, t in enumerate(temperatures)}


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
