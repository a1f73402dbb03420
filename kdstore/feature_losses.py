"""Feature (hint) losses: small pure functions of tensors, like `kdstore.losses`, for stored intermediate outputs.

FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", eq. 3) trains a student's middle layer to predict
the teacher's through a learned regressor r: ``L_HT = 1/2 || u_h(x) - r(v_g(x)) ||^2``. TinyBERT (Jiao et al. 2019,
eq. 7) does the same per token with a linear map of the student's hidden state: ``MSE(H^S W_h, H^T)``. Both are a
mean squared error between the regressed student feature and the teacher's; `feature_mse` is that error in units of
the teacher feature's variance (``scale``, recorded per feature at label time), so a weight of 1 means the same
at every layer and width: predicting the teacher's mean costs 1, a perfect hint 0.

TinyBERT's attention loss (eq. 6) compares the attention probabilities of a mapped pair of layers head by head,
``(1/h) sum_i MSE(A_i^S, A_i^T)`` with A (L x L); `attention_mse` sums the squared errors over the keys of a query
row instead of averaging them (L times eq. 6 when every query counts), so a weight of 1 means the same at every
sequence length: a row's error is at most 2 (two disjoint one-hot rows), and a uniform row against a one-hot one
costs about 1.
"""

from __future__ import annotations

from torch import Tensor

from kdstore.errors import ShapeMismatchError

__all__ = ["attention_mse", "feature_mse"]


def feature_mse(pred: Tensor, target: Tensor, *, scale: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Mean squared error of regressed student features against the teacher's, divided by `scale`.

    Args:
        pred: (N, D) per row, or (B, L, D) per token: the student's feature through its regressor.
        target: same shape: the teacher's stored feature (any float dtype; compared in float32).
        scale: the teacher feature's variance per dimension (``statistics.features[COLUMN].stored_variance``).
        mask: (B, L) bool for per-token features: only True positions count (padding, prompt tokens).

    Returns:
        scalar float32: ``sum_{rows} mean_d (pred - target)^2 / scale`` divided by the rows (or unmasked
        positions) counted; 0 when no position counts.
    """
    if pred.shape != target.shape:
        raise ShapeMismatchError(f"feature_mse: pred shape {tuple(pred.shape)} does not match target shape "
                                 f"{tuple(target.shape)}")
    if not scale > 0:
        raise ValueError(f"feature_mse: scale must be > 0, got {scale}")
    per_row = (pred.float() - target.float()).pow(2).mean(-1)
    if mask is not None:
        if mask.shape != per_row.shape:
            raise ShapeMismatchError(f"feature_mse: mask shape {tuple(mask.shape)} does not match the positions "
                                     f"{tuple(per_row.shape)}")
        m = mask.to(per_row.dtype)
        return (per_row * m).sum() / m.sum().clamp(min=1.0) / scale
    return per_row.mean() / scale


def attention_mse(pred: Tensor, target: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """TinyBERT's attention loss: squared error of the student's attention probabilities against the teacher's.

    Args:
        pred: (B, H, L, L) the student's probabilities per head (query x key), or (B, L, L) averaged over heads.
        target: (B, H, L, L) the teacher's stored probabilities per head, or (B, L, L) their mean over the heads
            (any float dtype; compared in float32). A (B, H, L, L) `pred` against a (B, L, L) target is averaged
            over its heads first.
        mask: (B, L) bool over query positions: only True rows count (padding, prompt tokens).

    Returns:
        scalar float32: ``sum_k (pred - target)^2`` over the keys k of a query row, averaged over the heads and the
        counted query rows (L x eq. 6's mean over the L x L entries when every row counts); 0 when none counts.

    Raises:
        ShapeMismatchError: different head counts (both named), sequence lengths or batch sizes, or a mask that is
            not (B, L).
    """
    if pred.ndim == 4 and target.ndim == 3:
        pred = pred.mean(1)
    if pred.ndim != target.ndim or pred.ndim not in (3, 4):
        raise ShapeMismatchError(f"attention_mse: pred {tuple(pred.shape)} and target {tuple(target.shape)} must be "
                                 "(B, H, L, L) or (B, L, L)")
    if pred.ndim == 4 and pred.shape[1] != target.shape[1]:
        raise ShapeMismatchError(f"attention_mse: the student has {pred.shape[1]} heads, the stored maps "
                                 f"{target.shape[1]}; compare head-averaged maps (average both over heads)")
    if pred.shape != target.shape:
        raise ShapeMismatchError(f"attention_mse: pred shape {tuple(pred.shape)} does not match target shape "
                                 f"{tuple(target.shape)}")
    per_row = (pred.float() - target.float()).pow(2).sum(-1)  # (B, [H,] L)
    if per_row.ndim == 3:
        per_row = per_row.mean(1)
    if mask is None:
        return per_row.mean()
    if mask.shape != per_row.shape:
        raise ShapeMismatchError(f"attention_mse: mask shape {tuple(mask.shape)} does not match the query positions "
                                 f"{tuple(per_row.shape)}")
    m = mask.to(per_row.dtype)
    return (per_row * m).sum() / m.sum().clamp(min=1.0)
