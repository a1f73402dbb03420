"""Combine the stored targets of several teachers at train time (Hinton et al. 2015; Bucilua et al. 2006).

Every function takes per-teacher tensors stacked on dim 1, ``(N, M, C)``, and normalised member weights
``(M,)`` (see `normalise_weights`), and returns one teacher's worth of targets ``(N, C)`` in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdstore.errors import ConfigError, ShapeMismatchError, arg
from kdstore.options import ENSEMBLES

COMBINE = ENSEMBLES


def normalise_weights(weights: Sequence[float] | None, members: int) -> Tensor:
    """Member weights summing to 1 (uniform if None); ConfigError if the count or a value is wrong."""
    if weights is None or len(weights) == 0:
        return torch.full((members,), 1.0 / members)
    if len(weights) != members:
        raise ConfigError(f"{arg('teacher_weights')} has {len(weights)} values for {members} teachers; give one per "
                          "teacher")
    w = torch.tensor([float(x) for x in weights])
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ConfigError(f"{arg('teacher_weights')} {list(weights)}: must be finite and >= 0 with a positive sum")
    return w / w.sum()


def mean_prob_log_targets(log_probs: Tensor, weights: Tensor) -> Tensor:
    """Arithmetic mean of the members' soft targets, returned as log-probabilities.

    ``log sum_m w_m p_m = logsumexp_m(log w_m + log p_m)``; Hinton et al. 2015 average the ensemble's
    soft targets this way.

    Args:
        log_probs: (N, M, C) each member's log soft targets at the training temperature.
        weights: (M,) summing to 1.

    Returns:
        (N, C) float32 log-probabilities.
    """
    if log_probs.ndim != 3 or log_probs.shape[1] != weights.shape[0]:
        raise ShapeMismatchError(f"log_probs {tuple(log_probs.shape)} must be (N, M, C) with M = {weights.shape[0]}")
    logw = torch.log(weights.to(log_probs.device, torch.float32))[None, :, None]
    return torch.logsumexp(log_probs.float() + logw, dim=1)


def mean_logits(logits: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean of the members' logits, (N, M, C) -> (N, C) float32.

    Softening it, ``softmax(mean_m z_m / T)``, gives the normalised geometric mean of the members' soft targets
    (the ``mean-logit`` combination); it is also the L2 regression target of an ensemble (Ba & Caruana 2014).
    """
    if logits.ndim != 3 or logits.shape[1] != weights.shape[0]:
        raise ShapeMismatchError(f"logits {tuple(logits.shape)} must be (N, M, C) with M = {weights.shape[0]}")
    return (logits.float() * weights.to(logits.device, torch.float32)[None, :, None]).sum(dim=1)
