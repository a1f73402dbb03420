"""Feature (hint) losses: small pure functions of tensors, like `kdstore.losses`, for stored intermediate outputs.

FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", eq. 3) trains a student's middle layer to predict
the teacher's through a learned regressor r: ``L_HT = 1/2 || u_h(x) - r(v_g(x)) ||^2``. TinyBERT (Jiao et al. 2019,
eq. 7) does the same per token with a linear map of the student's hidden state: ``MSE(H^S W_h, H^T)``. Both are a
mean squared error between the regressed student feature and the teacher's; `feature_mse` is that error in units of
the teacher feature's variance (``scale``, recorded per feature at label time), so a weight of 1 means the same
at every layer and width: predicting the teacher's mean costs 1, a perfect hint 0.
"""

from __future__ import annotations

from torch import Tensor

from kdstore.errors import ShapeMismatchError

__all__ = ["feature_mse"]


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
