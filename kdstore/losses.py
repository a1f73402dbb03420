"""Distillation losses: small pure functions of tensors (in the style of torchtune's ``kd_losses.py``).

Conventions shared by every function here:
    * Shapes are checked up front; a mismatch raises :class:`~kdstore.errors.ShapeMismatchError` (a
      ``ValueError``) naming the shapes found. Bad options raise :class:`~kdstore.errors.ConfigError`.
    * Inputs are upcast to float32 before ``log_softmax`` (float64 stays float64), so float16/bfloat16
      logits, or logits produced under bf16 autocast, give a float32 loss.
    * Reduction is the batch mean: the per-row loss (summed over classes) averaged over the N rows, i.e.
      ``F.kl_div(..., reduction="batchmean")`` semantics, never ``"mean"`` (which divides by N * C).
    * Teacher tensors are used as given; stored targets carry no gradient, so only the student is trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdstore.errors import ConfigError, ShapeMismatchError
from kdstore.targets import TailModel, check_temperature, rebuild_logits
from kdstore.targets import standardize as standardize_rows

__all__ = [
    "hard_loss", "kd_loss", "label_smoothing_loss", "mse_logit_loss", "soft_cross_entropy", "soft_kl", "topk_kd_loss"
]  # fmt: skip


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _check_logits(student_logits: Tensor) -> None:
    if student_logits.ndim != 2:
        raise ShapeMismatchError(f"student_logits must be (N, C), got shape {tuple(student_logits.shape)}")


def _check_pair(student_logits: Tensor, teacher: Tensor, name: str) -> None:
    _check_logits(student_logits)
    if teacher.shape != student_logits.shape:
        raise ShapeMismatchError(
            f"{name} shape {tuple(teacher.shape)} does not match student_logits shape "
            f"{tuple(student_logits.shape)}; both must be (N, C)"
        )


def _check_labels(student_logits: Tensor, labels: Tensor) -> None:
    _check_logits(student_logits)
    n, c = student_logits.shape
    if labels.shape != (n,):
        raise ShapeMismatchError(f"labels must be (N,) = ({n},), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ConfigError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.device.type != "cpu":
        return  # a range check would force a host sync every step; the trainer checks labels once at load
    lo, hi = (int(labels.min()), int(labels.max())) if n else (0, 0)
    if lo < 0 or hi >= c:
        raise ConfigError(f"labels must be in [0, {c - 1}], got range [{lo}, {hi}]")


def _soft_terms(student_logits: Tensor, teacher_log_probs: Tensor, temperature: float) -> tuple[Tensor, ...]:
    # (log q_s at T, log p_t, p_t, mask p_t > 0), validated and at least float32.
    _check_pair(student_logits, teacher_log_probs, "teacher_log_probs")
    check_temperature(temperature)
    log_q = torch.log_softmax(_f32(student_logits) / temperature, dim=1)
    log_p = _f32(teacher_log_probs)
    p = log_p.exp()
    return log_q, log_p, p, p > 0


def soft_cross_entropy(student_logits: Tensor, teacher_log_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy of the student at T against teacher soft targets (Hinton et al. 2015).

    ``loss = mean_n [ -sum_c p_t[n, c] * log_softmax(s[n] / T)[c] ]`` with ``p_t = exp(teacher_log_probs)``.
    Classes with ``p_t = 0`` (teacher log-prob ``-inf``, e.g. the ``"drop"`` top-k tail) contribute exactly 0.

    Args:
        student_logits: (N, C) student logits (any float dtype).
        teacher_log_probs: (N, C) teacher log soft targets, already at temperature T.
        temperature: T > 0 applied to the student logits.

    Returns:
        Scalar float32 loss (no T^2 factor).
    """
    log_q, _, p, keep = _soft_terms(student_logits, teacher_log_probs, temperature)
    # Mask before multiplying so 0 * (-inf) never appears, in the forward or the backward pass.
    return -(p * torch.where(keep, log_q, torch.zeros_like(log_q))).sum(dim=1).mean()


def soft_kl(student_logits: Tensor, teacher_log_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch-mean KL divergence KL(p_t || q_s) of the student at T from teacher soft targets, for reporting.

    ``loss = mean_n sum_c p_t[n, c] * (log p_t[n, c] - log_softmax(s[n] / T)[c])``
    = ``soft_cross_entropy - mean_n H(p_t[n])``; equals ``F.kl_div(log_q, log_p, reduction="batchmean",
    log_target=True)``, not ``reduction="mean"`` (which also divides by C). Terms with p_t = 0 are 0.

    Args:
        student_logits: (N, C) student logits.
        teacher_log_probs: (N, C) teacher log soft targets at temperature T.
        temperature: T > 0 applied to the student logits.

    Returns:
        Scalar float32 KL in nats.
    """
    log_q, log_p, p, keep = _soft_terms(student_logits, teacher_log_probs, temperature)
    return (p * torch.where(keep, log_p - log_q, torch.zeros_like(log_q))).sum(dim=1).mean()


def hard_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Plain cross-entropy with hard labels: ``mean_n -log_softmax(s[n])[y_n]``.

    Args:
        student_logits: (N, C) student logits.
        labels: (N,) integer class indices in [0, C).

    Returns:
        Scalar float32 loss.
    """
    _check_labels(student_logits, labels)
    return F.cross_entropy(_f32(student_logits), labels.long(), reduction="mean")


def label_smoothing_loss(student_logits: Tensor, labels: Tensor, *, smoothing: float) -> Tensor:
    """Cross-entropy against label-smoothed targets (Szegedy et al. 2016, "Rethinking the Inception ...").

    ``y_ls = (1 - eps) * onehot(y) + eps / K`` (the eps/K also goes to the true class), and
    ``loss = mean_n -sum_c y_ls[n, c] * log_softmax(s[n])[c]``; matches ``F.cross_entropy(label_smoothing=eps)``.

    Args:
        student_logits: (N, C) student logits, K = C.
        labels: (N,) integer class indices.
        smoothing: eps in [0, 1].

    Returns:
        Scalar float32 loss.
    """
    _check_labels(student_logits, labels)
    if not 0.0 <= smoothing <= 1.0:
        raise ConfigError(f"smoothing must be in [0, 1], got {smoothing}")
    log_q = torch.log_softmax(_f32(student_logits), dim=1)
    nll = -log_q.gather(1, labels.long()[:, None]).squeeze(1)
    uniform = -log_q.mean(dim=1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()


def mse_logit_loss(student_logits: Tensor, teacher_logits: Tensor, *, zero_mean: bool = True,
                   standardize: bool = False) -> Tensor:
    """L2 regression on logits, "mimic learning" (Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?").

    ``loss = mean_n 0.5 * sum_c (s[n, c] - t[n, c])^2`` (halved sum over classes, mean over rows), so the
    gradient w.r.t. ``s[n]`` is ``(s[n] - t[n]) / N``. With ``zero_mean`` each row of s and t first has its
    mean over classes subtracted (softmax is shift-invariant; Hinton et al. 2015 show that T^2 * soft CE
    tends to this loss divided by C as T -> infinity for zero-meaned logits). With ``standardize`` both rows are
    z-scored first (`kdstore.targets.standardize`; Sun et al. 2024), so the student matches the *shape* of the
    teacher's logits, not their size; each z-scored row has squared norm C, so the loss lies in [0, 2C].

    Args:
        student_logits: (N, C) student logits.
        teacher_logits: (N, C) teacher logits at T = 1.
        zero_mean: subtract each row's mean from both before comparing (implied by ``standardize``).
        standardize: z-score each row of both before comparing.

    Returns:
        Scalar float32 loss.
    """
    _check_pair(student_logits, teacher_logits, "teacher_logits")
    s, t = _f32(student_logits), _f32(teacher_logits)
    if standardize:
        s, t = standardize_rows(s), standardize_rows(t)
    elif zero_mean:
        s = s - s.mean(dim=1, keepdim=True)
        t = t - t.mean(dim=1, keepdim=True)
    return 0.5 * (s - t).pow(2).sum(dim=1).mean()


def kd_loss(
    student_logits: Tensor,
    teacher_log_probs: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    standardize: bool = False,
) -> Tensor:
    """Knowledge-distillation loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

    ``loss = alpha * T^2 * CE(p_t^T, q_s^T) + (1 - alpha) * CE(y, q_s^1)`` where ``p_t^T`` are the teacher's
    soft targets at T, ``q_s^T = softmax(s / T)``, and the hard term uses the student at T = 1. The T^2
    keeps the soft-term gradients on the same scale as T changes. Cross-entropy differs from
    KL(p_t || q_s) only by the teacher entropy, a constant in the student, so the gradients are identical;
    use :func:`soft_kl` to report the KL itself.

    With ``standardize`` (logit standardisation, Sun et al. 2024, CVPR) the soft term compares z-scored rows:
    ``q_s^T = softmax(Z(s) / T)`` with ``Z`` = `kdstore.targets.standardize`, and the teacher's targets must be
    ``softmax(Z(z_t) / T)`` too (``log_soft_targets(standardize(z_t), T)``; `kdstore.soft_targets` builds them
    with ``standardize=True``). Neither side's logit scale then matters, only the ranking and spacing of the
    classes; the hard term still uses the raw student logits.

    Args:
        student_logits: (N, C) student logits.
        teacher_log_probs: (N, C) teacher log soft targets already at T (built with
            ``kdstore.targets.log_soft_targets`` or ``log_soft_targets_topk``; from standardised logits when
            ``standardize``).
        labels: (N,) integer labels; required when alpha < 1, ignored when alpha == 1.
        temperature: T > 0.
        alpha: weight of the soft term, in [0, 1].
        standardize: z-score the student's logits in the soft term.

    Returns:
        Scalar float32 loss.
    """
    check_temperature(temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    _check_pair(student_logits, teacher_log_probs, "teacher_log_probs")
    soft_in = standardize_rows(student_logits) if standardize else student_logits
    if alpha == 1.0:
        return soft_cross_entropy(soft_in, teacher_log_probs, temperature) * temperature**2
    if labels is None:
        raise ConfigError(
            f"alpha={alpha} < 1 weights the hard-label term by {1.0 - alpha:g}, but labels is None: "
            "hard-label terms need labels (pass labels or set alpha=1)"
        )
    hard = hard_loss(student_logits, labels)
    if alpha == 0.0:  # skip the soft term entirely (no 0 * inf from a degenerate teacher row)
        return hard
    soft = soft_cross_entropy(soft_in, teacher_log_probs, temperature) * temperature**2
    return alpha * soft + (1.0 - alpha) * hard


def topk_kd_loss(
    student_logits: Tensor,
    values: Tensor,
    indices: Tensor,
    lse: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    tail: TailModel = "uniform",
    standardize: bool = False,
) -> Tensor:
    """KD from top-k teacher storage (Tang et al. 2020, "Understanding and Improving Knowledge Distillation").

    The teacher's log soft targets at T are rebuilt with ``kdstore.targets.log_soft_targets_topk`` (tail
    ``"uniform"``: leftover mass spread over the other C - k classes; ``"drop"``: renormalised over the top-k,
    the paper's KD-topk) and the loss is then exactly :func:`kd_loss`. With k = C it equals ``kd_loss`` on the
    full logits for either tail.

    With ``standardize`` the rebuilt dense row is z-scored before the temperature: under the uniform tail the
    C - k tail classes enter the mean and SD with their rebuilt logit ``z_tail`` (the log of their share of the
    leftover mass, docs/format.md), under the drop tail they are left out (mean and SD of the k stored logits,
    the tail stays at probability 0); the student's row is z-scored over all C classes.

    Args:
        student_logits: (N, C) student logits.
        values: (N, k) teacher top-k logits at T = 1, k <= C.
        indices: (N, k) their class indices.
        lse: (N,) log-sum-exp of all C teacher logits at T = 1.
        labels: (N,) integer labels; required when alpha < 1.
        temperature: T > 0.
        alpha: weight of the soft term, in [0, 1].
        tail: ``"uniform"`` or ``"drop"``.
        standardize: z-score the rebuilt teacher row and the student's row (see above).

    Returns:
        Scalar float32 loss.
    """
    _check_logits(student_logits)
    n, c = student_logits.shape
    if values.ndim != 2 or values.shape[0] != n or indices.shape != values.shape:
        raise ShapeMismatchError(
            f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be (N, k) with "
            f"N = {n} (student_logits shape {tuple(student_logits.shape)})"
        )
    if values.shape[1] > c:
        raise ShapeMismatchError(f"k={values.shape[1]} exceeds the student's C={c} classes")
    if lse.shape != (n,):
        raise ShapeMismatchError(f"lse must be (N,) = ({n},), got shape {tuple(lse.shape)}")
    check_temperature(temperature)
    dense = rebuild_logits(values, indices, lse, c, tail)
    log_p = torch.log_softmax((standardize_rows(dense) if standardize else dense) / temperature, dim=1)
    return kd_loss(student_logits, log_p, labels, temperature=temperature, alpha=alpha, standardize=standardize)
