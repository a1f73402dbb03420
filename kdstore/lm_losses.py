"""Per-token distillation losses for language models: small pure functions of tensors (torchtune ``kd_losses.py``
style), over positions flattened to rows.

Conventions:
    * Positions are rows: student logits (P, V), one stored target per position. A per-position function returns a
      float32 (P,) vector; `masked_mean` reduces it over the counted positions (the mean per counted token, as
      torchtune's ``ForwardKLLoss``; 0, not NaN, when nothing is counted).
    * ``log_softmax`` in float32 (float64 stays float64), so bf16 student logits give a float32 loss.
    * The teacher is a stored target: it carries no gradient. Soft terms are multiplied by T^2 (Hinton et al. 2015)
      in `lm_kd_loss`, never inside the per-position functions.
    * Top-k targets are rebuilt exactly as docs/format.md states ("Per-token targets", the uniform tail): stored
      logits ``v_i`` at ids ``x_i``, every other id the logit ``z_tail = L + t - log(V - k)`` (L the stored
      log-sum-exp, t the exact tail log-mass at T = 1), then ``q_T = softmax(z' / T)``. The V - k tail ids share
      one logit, so nothing of size V is built for the teacher: O(k) per position plus the student's log-softmax.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdstore.errors import ConfigError, ShapeMismatchError, arg
from kdstore.sampling import draw_weights, sampled_cross_entropy
from kdstore.targets import check_temperature

__all__ = ["IGNORE", "SOFT_LOSSES", "hard_nll", "lm_kd_loss", "masked_mean", "next_token_labels", "sampled_ce",
           "sampled_kl", "topk_ce", "topk_jsd", "topk_kl", "topk_reverse_kl", "topk_teacher_logprobs"]

IGNORE = -100  # a label that counts for nothing (the Hugging Face convention)
SOFT_LOSSES = ("topk", "sampled", "rkl", "jsd")  # soft terms of `lm_kd_loss`; rkl and jsd read the stored top-k


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _check_topk(student_logits: Tensor, values: Tensor, indices: Tensor, lse: Tensor, tail: Tensor) -> None:
    if student_logits.ndim != 2:
        raise ShapeMismatchError(f"student_logits must be (P, V), got shape {tuple(student_logits.shape)}")
    p, v = student_logits.shape
    if values.ndim != 2 or values.shape[0] != p or indices.shape != values.shape:
        raise ShapeMismatchError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be "
                                 f"(P, k) with P = {p} (student_logits {tuple(student_logits.shape)})")
    if values.shape[1] > v:
        raise ShapeMismatchError(f"k = {values.shape[1]} exceeds the student's vocabulary of {v}")
    if lse.shape != (p,) or tail.shape != (p,):
        raise ShapeMismatchError(f"lse {tuple(lse.shape)} and tail {tuple(tail.shape)} must both be (P,) = ({p},)")


def topk_teacher_logprobs(values: Tensor, lse: Tensor, tail: Tensor, vocab_size: int,
                          temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Log-probabilities at T of the rebuilt teacher: of each stored id, and of each one of the V - k tail ids.

    ``a_i = v_i / T``, ``a_tail = (L + t - log(V - k)) / T``, ``M = logsumexp(a_1..a_k, a_tail + log(V - k))``;
    returns ``(a - M, a_tail - M)``. With k = V or t = -inf the tail has probability 0 (log-prob -inf).

    Args:
        values: (P, k) stored top-k logits (T = 1). lse: (P,) log-sum-exp of all V logits. tail: (P,) log mass
            outside the top-k at T = 1.
        vocab_size: V.
        temperature: T > 0.

    Returns:
        (P, k) and (P,) float32 (float64 for float64 inputs).
    """
    check_temperature(temperature)
    k = values.shape[-1]
    a = _f32(values) / temperature
    n_tail = vocab_size - k
    if n_tail > 0:
        log_n = math.log(n_tail)
        a_tail = (_f32(lse) + _f32(tail) - log_n) / temperature
        m = torch.logsumexp(torch.cat([a, (a_tail + log_n).unsqueeze(-1)], -1), -1)
    else:
        a_tail = torch.full_like(_f32(lse), float("-inf"))
        m = torch.logsumexp(a, -1)
    return a - m.unsqueeze(-1), a_tail - m


def _topk_terms(student_logits: Tensor, values: Tensor, indices: Tensor, lse: Tensor, tail: Tensor,
                temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_topk(student_logits, values, indices, lse, tail)
    v = student_logits.shape[1]
    k = values.shape[1]
    log_q, log_q_tail = topk_teacher_logprobs(values, lse, tail, v, temperature)
    log_s = torch.log_softmax(_f32(student_logits) / temperature, -1)
    s_top = log_s.gather(1, indices.long())
    s_tail_sum = log_s.sum(-1) - s_top.sum(-1)  # sum of log s over the V - k tail ids
    q, q_tail = log_q.exp(), log_q_tail.exp()
    return log_q, q, s_top, torch.where(q_tail > 0, q_tail * s_tail_sum, 0.0), \
        torch.where(q_tail > 0, (v - k) * q_tail * log_q_tail, 0.0)


def topk_ce(student_logits: Tensor, values: Tensor, indices: Tensor, lse: Tensor, tail: Tensor,
            temperature: float = 1.0) -> Tensor:
    """Cross-entropy of the student at T against the top-k rebuild at T, per position (its gradient is the KL's).

    ``CE = -[sum_i q_i log s_T(x_i) + q_tail * sum_{v not in top-k} log s_T(v)]`` with ``q = softmax(z' / T)``
    (module docstring) and ``s_T = softmax(student / T)``; the tail sum is ``sum_v log s_T(v) - sum_i log s_T(x_i)``.
    Top-k KD with an exact tail (the uniform-tail rebuild of Tang et al. 2020's KD-topk; Anshumann et al. 2025
    show dropping the tail biases the student, which the stored tail mass avoids).

    Args:
        student_logits: (P, V). values: (P, k) stored teacher logits, indices: (P, k) their ids. lse: (P,).
        tail: (P,) exact log tail mass at T = 1.
        temperature: T > 0, for teacher and student.

    Returns:
        float32 (P,) nats.
    """
    _check_topk(student_logits, values, indices, lse, tail)
    log_q, log_q_tail = topk_teacher_logprobs(values, lse, tail, student_logits.shape[1], temperature)
    return _RebuildCE.apply(_f32(student_logits), temperature, indices.long(), log_q.exp(), log_q_tail.exp())


class _RebuildCE(torch.autograd.Function):
    """Per row, ``-sum_v q_v log_softmax(z / T)_v`` for the target ``q_v = q_i`` at the k ids and ``q_tail`` at
    every other id, without building it: forward ``log_softmax`` once, a gather and (with a tail) a sum over V;
    backward ``g / T * (m softmax(z / T) - q)`` in place (m = the target's mass: 1, or 0 for a row without draws).
    Same value and gradient as autograd through ``log_softmax`` (`topk_kl`'s path), with two fewer passes over
    (P, V), so KD trains about as fast as the true next tokens (docs/lm.md, "Training").

    Shapes: z (P, V) float, the student's logits before T; indices (P, k) int64, distinct per row where q > 0;
    q (P, k); q_tail (P,) or None (no tail: sampled targets). Returns (P,)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, z: Tensor, temperature: float, indices: Tensor, q: Tensor,
                q_tail: Tensor | None) -> Tensor:
        ctx.temperature = temperature  # type: ignore[attr-defined]
        log_s = torch.log_softmax(z if temperature == 1.0 else z / temperature, -1)
        s_top = log_s.gather(1, indices)
        ce = -(q * s_top).sum(-1)
        mass = q.sum(-1)
        if q_tail is not None:
            tail_sum = log_s.sum(-1) - s_top.sum(-1)  # sum of log s over the V - k tail ids
            ce = ce - torch.where(q_tail > 0, q_tail * tail_sum, 0.0)
            mass = mass + (z.shape[1] - indices.shape[1]) * q_tail
        ctx.save_for_backward(log_s, indices, q, mass, q_tail)
        return ce

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: Tensor) -> tuple[Tensor, None, None, None, None]:
        log_s, indices, q, mass, q_tail = ctx.saved_tensors  # type: ignore[attr-defined]
        grad = log_s.exp().mul_(mass.unsqueeze(1))
        if q_tail is not None:
            grad.sub_(q_tail.unsqueeze(1))
            q = q - q_tail.unsqueeze(1)
        grad.scatter_add_(1, indices, -q)
        return grad.mul_(g.unsqueeze(1) / ctx.temperature), None, None, None, None  # type: ignore[attr-defined]


def topk_kl(student_logits: Tensor, values: Tensor, indices: Tensor, lse: Tensor, tail: Tensor,
            temperature: float = 1.0) -> Tensor:
    """KL(q_T || s_T) per position: `topk_ce` minus the rebuild's entropy ``-sum_i q_i log q_i - (V-k) q_t log q_t``.

    Returns:
        float32 (P,) nats (>= 0 up to rounding).
    """
    log_q, q, s_top, tail_term, tail_ent = _topk_terms(student_logits, values, indices, lse, tail, temperature)
    return (q * log_q).sum(-1) + tail_ent - ((q * s_top).sum(-1) + tail_term)


def _rebuild_and_student(student_logits: Tensor, values: Tensor, indices: Tensor, lse: Tensor, tail: Tensor,
                         temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(log q (P, k), log q_tail (P,), log s_T (P, V), log s_T at the k ids (P, k), q_tail > 0 or k = V (P,))."""
    _check_topk(student_logits, values, indices, lse, tail)
    v, k = student_logits.shape[1], values.shape[1]
    log_q, log_q_tail = topk_teacher_logprobs(values, lse, tail, v, temperature)
    log_s = torch.log_softmax(_f32(student_logits) / temperature, -1)
    finite = (log_q_tail > float("-inf")) | (k == v)  # k = V: no tail ids, nothing to lose
    return log_q, log_q_tail, log_s, log_s.gather(1, indices.long()), finite


def topk_reverse_kl(student_logits: Tensor, values: Tensor, indices: Tensor, lse: Tensor, tail: Tensor,
                    temperature: float = 1.0) -> Tensor:
    """Reverse KL, KL(s_T || q_T), per position, against the top-k rebuild (module docstring): mode-seeking, the
    student is pushed off the ids the teacher finds unlikely rather than made to cover all of the teacher's mass.

    Every tail id has the one log-prob ``l_t = log q_tail``, so with ``sum_v s_v = 1``
    ``KL = sum_v s_v log s_v - l_t + sum_i s(x_i) (l_t - log q_i)``: one pass over the student's (P, V) log-probs,
    O(k) for the teacher. A tail of mass 0 (t = -inf) with k < V gives +inf (the student has mass the teacher has
    not); k = V gives the plain KL over the stored ids. Autograd gives the gradient.

    Args:
        student_logits: (P, V). values: (P, k) stored teacher logits, indices: (P, k) their ids. lse: (P,).
        tail: (P,) exact log tail mass at T = 1.
        temperature: T > 0, for teacher and student.

    Returns:
        float32 (P,) nats (>= 0 up to rounding); float64 for float64 inputs.
    """
    log_q, log_q_tail, log_s, s_top_log, finite = _rebuild_and_student(student_logits, values, indices, lse, tail,
                                                                       temperature)
    l_t = torch.where(finite & (log_q_tail > float("-inf")), log_q_tail, 0.0)  # no -inf: no NaN gradient
    neg_entropy = (log_s.exp() * log_s).sum(-1)
    kl = neg_entropy - l_t + (s_top_log.exp() * (l_t.unsqueeze(-1) - log_q)).sum(-1)
    return torch.where(finite, kl, float("inf"))


def topk_jsd(student_logits: Tensor, values: Tensor, indices: Tensor, lse: Tensor, tail: Tensor,
             temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon divergence per position, in the convention of Agarwal et al., ICLR 2024
    ("On-Policy Distillation of Language Models", GKD) with p = the teacher's top-k rebuild q_T (module
    docstring) and q = the student s_T:

        ``JSD_beta(p || q) = beta KL(p || m) + (1 - beta) KL(q || m)``,  ``m = beta p + (1 - beta) q``.

    Bounded by ``h(beta) = -beta log beta - (1-beta) log(1-beta)`` (log 2 at beta = 0.5, where it is symmetric);
    ``JSD / beta -> KL(p || q)`` (forward KL) as beta -> 0 and ``JSD / (1 - beta) -> KL(q || p)`` (reverse KL) as
    beta -> 1. Tail ids share the teacher's one log-prob, so ``log m`` is computed V-wide with the tail value and
    corrected at the k stored ids; the teacher side stays O(k). Autograd gives the gradient.

    Args:
        student_logits: (P, V). values: (P, k), indices: (P, k), lse: (P,), tail: (P,) as for `topk_ce`.
        temperature: T > 0. beta: in (0, 1), the teacher's weight in the mixture.

    Returns:
        float32 (P,) nats in [0, h(beta)]; float64 for float64 inputs.
    """
    if not 0.0 < beta < 1.0:
        raise ConfigError(f"{arg('beta')} {beta:g}: must be in (0, 1) (0 and 1 make the mixture one of the two "
                          "distributions; use --loss topk or rkl for forward or reverse KL)")
    log_q, log_q_tail, log_s, s_top_log, _ = _rebuild_and_student(student_logits, values, indices, lse, tail,
                                                                  temperature)
    lb, l1b = math.log(beta), math.log1p(-beta)
    has_tail = log_q_tail > float("-inf")
    l_t = torch.where(has_tail, log_q_tail, 0.0)  # no -inf in arithmetic whose gradient is taken
    tail_p = torch.where(has_tail, lb + l_t, float("-inf")).unsqueeze(-1)
    log_m = torch.logaddexp(l1b + log_s, tail_p)  # (P, V): m with the teacher's tail value at every id
    log_m_top = torch.logaddexp(l1b + s_top_log, lb + log_q)  # (P, k): m at the stored ids
    log_m_wrong = log_m.gather(1, indices.long())  # what log_m holds at the stored ids
    kl_s = (log_s.exp() * (log_s - log_m)).sum(-1) + (s_top_log.exp() * (log_m_wrong - log_m_top)).sum(-1)
    n_tail = student_logits.shape[1] - values.shape[1]
    tail_sum = n_tail * l_t - (log_m.sum(-1) - log_m_wrong.sum(-1))  # sum over the tail ids of log q_t - log m
    q_t = torch.where(has_tail, l_t.exp(), 0.0)
    kl_p = (log_q.exp() * (log_q - log_m_top)).sum(-1) + torch.where(has_tail, q_t * tail_sum, 0.0)
    return beta * kl_p + (1.0 - beta) * kl_s


def sampled_ce(student_logits: Tensor, ids: Tensor, counts: Tensor, logprobs: Tensor,
               temperature: float = 1.0) -> Tensor:
    """Sampled KD (Anshumann et al., ACL 2025, "Sparse Logit Sampling"): per position, the estimate
    ``-sum_i w_i log s_T(x_i)`` of the cross-entropy to the teacher at T from N stored draws, with
    ``w_i = c_i / N`` at T = 1 (unbiased: its expectation is the full-vocabulary CE, so the gradient is the full
    KL's in expectation) and self-normalised ``w_i ∝ c_i p_i^(1/T - 1)`` elsewhere (`kdstore.sampling`).

    Args:
        student_logits: (P, V). ids, counts, logprobs: (P, K) padded draws (id -1 / count 0 in empty slots).
        temperature: T > 0.

    Returns:
        float32 (P,); 0 at positions without draws.
    """
    check_temperature(temperature)
    if (ids.shape != counts.shape or ids.ndim != 2 or student_logits.ndim != 2
            or ids.shape[0] != student_logits.shape[0]):
        raise ShapeMismatchError(f"student_logits {tuple(student_logits.shape)}, ids {tuple(ids.shape)}, counts "
                                 f"{tuple(counts.shape)}: expected (P, V) and (P, K)")
    z = _f32(student_logits)
    w = torch.where(counts > 0, draw_weights(counts, logprobs, temperature), 0.0)  # empty slots (id -1 read as 0)
    return _RebuildCE.apply(z, temperature, ids.long().clamp(min=0), w.to(z.dtype), None)


def sampled_kl(student_logits: Tensor, ids: Tensor, counts: Tensor, logprobs: Tensor) -> Tensor:
    """Estimate of KL(p || s) at T = 1 per position: ``sum_i (c_i / N)(log p_i - log s(x_i))`` (unbiased).

    Returns:
        float32 (P,).
    """
    ce = sampled_cross_entropy(student_logits, ids, counts, logprobs, 1.0)
    w = draw_weights(counts, logprobs, 1.0)
    return ce + (w * torch.where(counts > 0, logprobs.float(), 0.0)).sum(-1)


def next_token_labels(input_ids: Tensor, loss_mask: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Position t's hard target: token t + 1 where that token is counted (`loss_mask`, and `attention_mask`), else
    IGNORE; the last position of a row has no next token in the row (IGNORE).

    Args:
        input_ids, loss_mask, attention_mask: (B, L).

    Returns:
        int64 (B, L).
    """
    if input_ids.shape != loss_mask.shape or input_ids.ndim != 2:
        raise ShapeMismatchError(f"input_ids {tuple(input_ids.shape)} and loss_mask {tuple(loss_mask.shape)} "
                                 "must both be (B, L)")
    keep = loss_mask[:, 1:].bool()
    if attention_mask is not None:
        keep = keep & attention_mask[:, 1:].bool()
    labels = torch.full_like(input_ids, IGNORE, dtype=torch.int64)
    labels[:, :-1] = torch.where(keep, input_ids[:, 1:].long(), IGNORE)
    return labels


def hard_nll(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy on the true tokens, per position: ``-log_softmax(s)[y]``, 0 where y = IGNORE.

    Args:
        student_logits: (P, V). labels: (P,) int ids or IGNORE.

    Returns:
        float32 (P,).
    """
    if student_logits.ndim != 2 or labels.shape != student_logits.shape[:1]:
        raise ShapeMismatchError(f"student_logits {tuple(student_logits.shape)} and labels {tuple(labels.shape)}: "
                                 "expected (P, V) and (P,)")
    return torch.nn.functional.cross_entropy(_f32(student_logits), labels.long(), ignore_index=IGNORE,
                                             reduction="none")


def masked_mean(per_position: Tensor, mask: Tensor) -> Tensor:
    """Mean of `per_position` over the positions where `mask` is nonzero; 0 (with a gradient path) if none."""
    if per_position.shape != mask.shape:
        raise ShapeMismatchError(f"values {tuple(per_position.shape)} and mask {tuple(mask.shape)} differ")
    keep = mask.bool()
    # where, not a product: a NaN or inf at an uncounted position (a padding slot) must not leak into the mean
    return torch.where(keep, per_position, 0.0).sum() / keep.sum().clamp(min=1).to(per_position.dtype)


def lm_kd_loss(student_logits: Tensor, batch: dict[str, Tensor], *, loss: str, temperature: float,
               alpha: float, beta: float = 0.5) -> Tensor:
    """The training loss of one batch of sequences:
    ``alpha * T^2 * mean_{target positions} D(teacher_T, student_T) + (1 - alpha) * mean_{labels} NLL(y)``
    (Hinton et al. 2015 mixing; the hard term at T = 1 on the true next tokens). ``loss="hard"`` is the NLL alone.
    D is `topk_ce` ("topk"), `sampled_ce` ("sampled"), `topk_reverse_kl` ("rkl") or `topk_jsd` with `beta`
    ("jsd"); every soft term is scaled by T^2.

    Args:
        student_logits: (B, L, V).
        batch: from `kdstore.lm_data` (`collate`): ``labels`` (B, L); ``target_mask`` (B, L); for "topk", "rkl"
            and "jsd" ``topk_values``/``topk_indices`` (B, L, k), ``logsumexp``/``tail_logmass`` (B, L); for
            "sampled" ``sample_ids``/``sample_counts``/``sample_logprobs`` (B, L, K).
        loss: "topk", "sampled", "rkl", "jsd" or "hard".
        temperature: T > 0. alpha: weight of the soft term in [0, 1]. beta: the JSD's teacher weight in (0, 1).

    Returns:
        Scalar float32.
    """
    if loss not in (*SOFT_LOSSES, "hard"):
        raise ConfigError(f"{arg('loss')} {loss!r}: expected {', '.join(SOFT_LOSSES)} or hard")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"{arg('alpha')} {alpha}: must be in [0, 1]")
    check_temperature(temperature)
    if student_logits.ndim != 3:
        raise ShapeMismatchError(f"student_logits must be (B, L, V), got shape {tuple(student_logits.shape)}")
    v = student_logits.shape[-1]
    flat = student_logits.reshape(-1, v)
    labels = batch["labels"].reshape(-1)
    if loss == "hard" or alpha == 0.0:
        return masked_mean(hard_nll(flat, labels), labels != IGNORE)
    soft = _soft_term(flat, batch, loss, temperature, beta)
    out = alpha * temperature**2 * masked_mean(soft, batch["target_mask"].reshape(-1))
    if alpha < 1.0:
        out = out + (1.0 - alpha) * masked_mean(hard_nll(flat, labels), labels != IGNORE)
    return out


def _soft_term(flat: Tensor, batch: dict[str, Tensor], loss: str, temperature: float, beta: float) -> Tensor:
    """The per-position soft term (P,) of `lm_kd_loss` for a soft `loss`, the batch's targets flattened to rows."""
    if loss == "sampled":
        k = batch["sample_ids"].shape[-1]
        return sampled_ce(flat, batch["sample_ids"].reshape(-1, k), batch["sample_counts"].reshape(-1, k),
                          batch["sample_logprobs"].reshape(-1, k), temperature)
    k = batch["topk_values"].shape[-1]
    args = (flat, batch["topk_values"].reshape(-1, k), batch["topk_indices"].reshape(-1, k),
            batch["logsumexp"].reshape(-1), batch["tail_logmass"].reshape(-1), temperature)
    if loss == "rkl":
        return topk_reverse_kl(*args)
    if loss == "jsd":
        return topk_jsd(*args, beta)
    return topk_ce(*args)
