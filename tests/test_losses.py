"""Tests of kdstore.losses: hand-derived golden values, independent numpy references, and the KD identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdstore import losses
from kdstore.errors import ShapeMismatchError
from kdstore.targets import log_soft_targets, logsumexp, standardize, top_k

LN2, LN3 = math.log(2.0), math.log(3.0)
NEG_INF = float("-inf")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --- independent numpy references (float64) ----------------------------------------------------------


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def np_soft_ce(s: np.ndarray, log_p: np.ndarray, t: float) -> float:
    p = np.exp(log_p)
    log_q = np_log_softmax(s / t)
    return float(np.mean(-np.sum(np.where(p > 0, p * log_q, 0.0), axis=1)))


def np_hard_ce(s: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(-np_log_softmax(s)[np.arange(len(y)), y]))


# --- golden values ----------------------------------------------------------------------------------


def _two_rows() -> tuple[torch.Tensor, torch.Tensor]:
    # Row 0: student logits 0,0,0 -> q = 1/3 each; teacher p = (1/2, 1/4, 1/4).
    # Row 1: student logits 0, ln2, 0 -> q = (1/4, 1/2, 1/4); teacher p = (1, 0, 0) (log p = -inf for zeros).
    s = torch.tensor([[0.0, 0.0, 0.0], [0.0, LN2, 0.0]])
    log_p = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)], [0.0, NEG_INF, NEG_INF]])
    return s, log_p


def test_soft_cross_entropy_golden() -> None:
    # Row 0: -sum p log(1/3) = ln 3. Row 1: -1 * log(1/4) = ln 4. Mean = (ln 3 + ln 4) / 2 = ln(12) / 2.
    s, log_p = _two_rows()
    got = losses.soft_cross_entropy(s, log_p, 1.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(1.2424533248940002, rel=1e-6)
    assert got.item() == pytest.approx(np_soft_ce(s.double().numpy(), log_p.double().numpy(), 1.0), rel=1e-6)


def test_soft_cross_entropy_temperature_golden() -> None:
    # Student logits (0, 2 ln2, 0) at T = 2 are (0, ln2, 0) -> q = (1/4, 1/2, 1/4); teacher p = (1/2, 1/4, 1/4).
    # CE = 1/2 ln4 + 1/4 ln2 + 1/4 ln4 = (1 + 1/4 + 1/2) ln2 = 1.75 ln2.
    s = torch.tensor([[0.0, 2 * LN2, 0.0]])
    log_p = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]])
    assert losses.soft_cross_entropy(s, log_p, 2.0).item() == pytest.approx(1.75 * LN2, rel=1e-6)


def test_soft_kl_golden() -> None:
    # Row 0: KL = CE - H(p) = ln3 - (1/2 ln2 + 1/2 ln4) = ln3 - 1.5 ln2 = 0.0588915178...
    # Row 1: H(p) = 0, KL = CE = ln4. Batch mean = (0.0588915178 + 1.3862943611) / 2.
    s, log_p = _two_rows()
    assert pytest.approx(0.7225929394740412) == (LN3 - 1.5 * LN2 + 2 * LN2) / 2
    assert losses.soft_kl(s, log_p, 1.0).item() == pytest.approx(0.7225929394740412, rel=1e-6)


def test_kd_loss_golden() -> None:
    # T = 2, alpha = 1/2, label 1. Soft: T^2 * 1.75 ln2 = 7 ln2 (see the temperature test).
    # Hard at T = 1: exp(0, 2ln2, 0) = (1, 4, 1) -> q_1 = 4/6 -> CE = ln(3/2).
    # Total = 0.5 * 7 ln2 + 0.5 * ln 1.5 = 2.6287476860...
    s = torch.tensor([[0.0, 2 * LN2, 0.0]])
    log_p = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]])
    got = losses.kd_loss(s, log_p, torch.tensor([1]), temperature=2.0, alpha=0.5)
    assert got.item() == pytest.approx(2.6287476860138907, rel=1e-6)
    # alpha = 1 is the pure soft term; labels are optional and ignored.
    assert losses.kd_loss(s, log_p, None, temperature=2.0, alpha=1.0).item() == pytest.approx(7 * LN2, rel=1e-6)
    # alpha = 0 is the pure hard term.
    got0 = losses.kd_loss(s, log_p, torch.tensor([1]), temperature=2.0, alpha=0.0)
    assert got0.item() == pytest.approx(math.log(1.5), rel=1e-6)


def test_kd_loss_matches_numpy_reference() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 3
    y = torch.randint(0, 7, (5,), generator=g)
    temp, alpha = 3.0, 0.7
    log_p = log_soft_targets(t, temp)
    got = losses.kd_loss(s, log_p, y, temperature=temp, alpha=alpha).item()
    sn, tn = s.double().numpy(), t.double().numpy()
    want = alpha * temp**2 * np_soft_ce(sn, np_log_softmax(tn / temp), temp) + (1 - alpha) * np_hard_ce(sn, y.numpy())
    assert got == pytest.approx(want, rel=1e-5)


def test_mse_logit_loss_golden() -> None:
    # Row 0: s = (1,2,3), t = 0. Raw: 0.5 * (1 + 4 + 9) = 7; zero-meaned s = (-1,0,1): 0.5 * 2 = 1.
    # Row 1: s = 0, t = (1,1,1). Raw: 0.5 * 3 = 1.5; zero-meaned both are 0: 0.
    # Batch means: raw (7 + 1.5) / 2 = 4.25; zero-meaned (1 + 0) / 2 = 0.5.
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert losses.mse_logit_loss(s, t, zero_mean=False).item() == pytest.approx(4.25)
    assert losses.mse_logit_loss(s, t, zero_mean=True).item() == pytest.approx(0.5)
    assert losses.mse_logit_loss(s, t).item() == pytest.approx(0.5)  # zero_mean defaults to True


def test_hard_loss_golden() -> None:
    # Row 0: logits 0,0,0, label 0 -> ln 3. Row 1: logits (0, 2ln2, 0), label 1 -> q = 4/6 -> ln 1.5.
    # Mean = (ln 3 + ln 1.5) / 2 = ln(4.5) / 2.
    s = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2 * LN2, 0.0]])
    y = torch.tensor([0, 1])
    assert losses.hard_loss(s, y).item() == pytest.approx(0.7520386983881371, rel=1e-6)


def test_label_smoothing_golden() -> None:
    # Logits (0, 2ln2, 0) -> q = (1/6, 4/6, 1/6); label 1, eps = 0.3, K = 3 -> y_ls = (0.1, 0.8, 0.1).
    # Loss = 0.1 ln6 + 0.8 ln(3/2) + 0.1 ln6 = 0.2 ln6 + 0.8 ln1.5 = 0.68272398...
    s = torch.tensor([[0.0, 2 * LN2, 0.0]])
    y = torch.tensor([1])
    got = losses.label_smoothing_loss(s, y, smoothing=0.3)
    assert got.item() == pytest.approx(0.6827239803321425, rel=1e-6)
    assert got.item() == pytest.approx(F.cross_entropy(s, y, label_smoothing=0.3).item(), rel=1e-6)
    assert losses.label_smoothing_loss(s, y, smoothing=0.0).item() == pytest.approx(math.log(1.5), rel=1e-6)


@pytest.mark.parametrize(("tail", "want"), [("uniform", 0.75 * math.log(6) + 0.25 * LN3), ("drop", math.log(6))])
def test_topk_kd_loss_golden(tail: str, want: float) -> None:
    # Teacher logits (ln4, ln2, 0, 0): p = (4,2,1,1)/8, lse = ln 8; store top-2 = (ln4, ln2).
    # Uniform tail: leftover mass 2/8 over 2 classes -> (1/2, 1/4, 1/8, 1/8), exact here.
    # Drop tail: renormalise over top-2 -> (2/3, 1/3, 0, 0).
    # Student logits (0, 0, ln2, ln2) -> q = (1/6, 1/6, 2/6, 2/6); T = 1, alpha = 1:
    # uniform: -(3/4 ln(1/6) + 1/4 ln(1/3)) = 0.75 ln6 + 0.25 ln3; drop: -(1 * ln(1/6)) = ln6.
    s = torch.tensor([[0.0, 0.0, LN2, LN2]])
    values = torch.tensor([[math.log(4.0), LN2]])
    indices = torch.tensor([[0, 1]])
    lse = torch.tensor([math.log(8.0)])
    got = losses.topk_kd_loss(s, values, indices, lse, None, temperature=1.0, alpha=1.0, tail=tail)  # type: ignore[arg-type]
    assert got.item() == pytest.approx(want, rel=1e-6)


# --- identities ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", ["uniform", "drop"])
@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 1.0), (4.0, 0.6), (0.5, 0.2)])
def test_topk_with_k_equal_c_equals_full_kd(tail: str, temperature: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(1)
    n, c = 6, 9
    s, t = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g) * 2
    y = torch.randint(0, c, (n,), generator=g)
    values, indices = top_k(t, c)
    full = losses.kd_loss(s, log_soft_targets(t, temperature), y, temperature=temperature, alpha=alpha)
    topk = losses.topk_kd_loss(
        s, values, indices, logsumexp(t), y, temperature=temperature, alpha=alpha, tail=tail  # type: ignore[arg-type]
    )
    torch.testing.assert_close(topk, full, rtol=1e-5, atol=1e-6)


def test_high_temperature_limit_is_logit_matching() -> None:
    # Hinton et al. 2015, sec. 2.1: for zero-meaned logits z (student) and v (teacher) and T >> |z|, |v|,
    # d/dz_i [T^2 CE] = T (q_i - p_i) ~= (z_i - v_i) / C, the gradient of 0.5 * sum (z - v)^2 / C.
    g = torch.Generator().manual_seed(2)
    n, c, temperature = 4, 10, 100.0
    z = torch.randn(n, c, generator=g) * 0.5
    v = torch.randn(n, c, generator=g) * 0.5
    z, v = z - z.mean(1, keepdim=True), v - v.mean(1, keepdim=True)

    z1 = z.clone().requires_grad_(True)
    kd = losses.kd_loss(z1, log_soft_targets(v, temperature), None, temperature=temperature, alpha=1.0)
    (g_kd,) = torch.autograd.grad(kd, z1)
    z2 = z.clone().requires_grad_(True)
    (g_mse,) = torch.autograd.grad(losses.mse_logit_loss(z2, v, zero_mean=True) / c, z2)

    rel = (g_kd - g_mse).norm() / g_mse.norm()
    assert rel < 1e-2, f"relative gradient gap {rel.item():.3g}"
    # ... and the gap shrinks as T grows (at T = 2 it is far larger).
    z3 = z.clone().requires_grad_(True)
    kd_low = losses.kd_loss(z3, log_soft_targets(v, 2.0), None, temperature=2.0, alpha=1.0)
    (g_low,) = torch.autograd.grad(kd_low, z3)
    assert (g_low - g_mse).norm() / g_mse.norm() > 5 * rel


def test_kl_is_batchmean_not_mean() -> None:
    # torch's KLDivLoss 'mean' divides by N * C; 'batchmean' (the true per-sample mean KL) divides by N.
    g = torch.Generator().manual_seed(3)
    n, c, temperature = 5, 8, 2.0
    s, t = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    log_p = log_soft_targets(t, temperature)
    log_q = torch.log_softmax(s / temperature, dim=1)
    ours = losses.soft_kl(s, log_p, temperature)
    batchmean = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    with pytest.warns(UserWarning, match="batchmean"):  # torch itself warns about the 'mean' trap
        mean = F.kl_div(log_q, log_p, reduction="mean", log_target=True)
    torch.testing.assert_close(ours, batchmean, rtol=1e-5, atol=1e-7)
    assert ours.item() == pytest.approx(mean.item() * c, rel=1e-5)
    assert ours.item() != pytest.approx(mean.item(), rel=1e-2)
    # CE and KL differ by the teacher entropy only.
    entropy = -(log_p.exp() * log_p).sum(1).mean()
    torch.testing.assert_close(losses.soft_cross_entropy(s, log_p, temperature), ours + entropy, rtol=1e-5, atol=1e-6)


def test_ce_and_kl_have_the_same_gradient() -> None:
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    log_p = log_soft_targets(t, 3.0)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(losses.soft_cross_entropy(s1, log_p, 3.0), s1)
    (g2,) = torch.autograd.grad(losses.soft_kl(s2, log_p, 3.0), s2)
    torch.testing.assert_close(g1, g2)


# --- labels and alpha ---------------------------------------------------------------------------------


def test_alpha_one_without_labels_works() -> None:
    s, log_p = _two_rows()
    out = losses.kd_loss(s, log_p, None, temperature=1.0, alpha=1.0)
    assert torch.isfinite(out)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.999])
def test_alpha_below_one_without_labels_raises(alpha: float) -> None:
    s, log_p = _two_rows()
    with pytest.raises(ValueError, match="hard-label terms need labels"):
        losses.kd_loss(s, log_p, None, temperature=1.0, alpha=alpha)
    values, indices = top_k(s, 2)
    with pytest.raises(ValueError, match="hard-label terms need labels"):
        losses.topk_kd_loss(s, values, indices, logsumexp(s), None, temperature=1.0, alpha=alpha)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_out_of_range_raises(alpha: float) -> None:
    s, log_p = _two_rows()
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        losses.kd_loss(s, log_p, torch.tensor([0, 1]), temperature=1.0, alpha=alpha)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_bad_temperature_raises(temperature: float) -> None:
    s, log_p = _two_rows()
    with pytest.raises(ValueError, match="temperature .*: must be a finite number > 0"):
        losses.soft_cross_entropy(s, log_p, temperature)
    with pytest.raises(ValueError, match="temperature .*: must be a finite number > 0"):
        losses.kd_loss(s, log_p, None, temperature=temperature, alpha=1.0)


def test_bad_labels_raise() -> None:
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\], got range \[0, 3\]"):
        losses.hard_loss(s, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer class indices"):
        losses.hard_loss(s, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\]"):
        losses.label_smoothing_loss(s, torch.tensor([0, 1]), smoothing=1.5)


# --- shapes -------------------------------------------------------------------------------------------


def test_shape_mismatch_errors() -> None:
    s = torch.zeros(2, 3)
    with pytest.raises(ShapeMismatchError, match=r"teacher_log_probs shape \(2, 4\) does not match .* \(2, 3\)"):
        losses.soft_cross_entropy(s, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match=r"teacher_log_probs shape \(3, 3\)"):
        losses.soft_kl(s, torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match=r"teacher_log_probs shape \(2, 4\)"):
        losses.kd_loss(s, torch.zeros(2, 4), None, temperature=1.0, alpha=1.0)
    with pytest.raises(ValueError, match=r"teacher_logits shape \(2, 4\)"):
        losses.mse_logit_loss(s, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"student_logits must be \(N, C\), got shape \(3,\)"):
        losses.hard_loss(torch.zeros(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must be \(N,\) = \(2,\), got shape \(3,\)"):
        losses.hard_loss(s, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must be \(N,\) = \(2,\), got shape \(2, 1\)"):
        losses.label_smoothing_loss(s, torch.tensor([[0], [1]]), smoothing=0.1)
    with pytest.raises(ValueError, match=r"labels must be \(N,\) = \(2,\), got shape \(1,\)"):
        losses.kd_loss(s, torch.zeros(2, 3), torch.tensor([0]), temperature=1.0, alpha=0.5)


def test_topk_shape_mismatch_errors() -> None:
    s = torch.zeros(2, 3)
    v, i, lse = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2)
    kw = {"temperature": 1.0, "alpha": 1.0}
    with pytest.raises(ValueError, match=r"values \(3, 2\) and indices \(2, 2\) must both be \(N, k\) with N = 2"):
        losses.topk_kd_loss(s, torch.zeros(3, 2), i, lse, None, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"values \(2, 2\) and indices \(2, 1\)"):
        losses.topk_kd_loss(s, v, i[:, :1], lse, None, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k=4 exceeds the student's C=3 classes"):
        losses.topk_kd_loss(s, torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long), lse, None, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"lse must be \(N,\) = \(2,\), got shape \(2, 1\)"):
        losses.topk_kd_loss(s, v, i, lse[:, None], None, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tail 'zero': expected one of"):
        losses.topk_kd_loss(s, v, i, lse, None, tail="zero", **kw)  # type: ignore[arg-type]


# --- -inf teacher log-probs ---------------------------------------------------------------------------


def test_neg_inf_teacher_log_probs_give_finite_loss_and_grad() -> None:
    s, log_p = _two_rows()
    for fn in (losses.soft_cross_entropy, losses.soft_kl):
        s1 = s.clone().requires_grad_(True)
        out = fn(s1, log_p, 2.0)
        (grad,) = torch.autograd.grad(out, s1)
        assert torch.isfinite(out) and torch.isfinite(grad).all()


@pytest.mark.parametrize("temperature", [0.25, 1.0, 20.0])
def test_drop_tail_gives_finite_loss_and_grad(temperature: float) -> None:
    g = torch.Generator().manual_seed(5)
    n, c, k = 8, 50, 3
    t = torch.randn(n, c, generator=g) * 5
    values, indices = top_k(t, k)
    s = (torch.randn(n, c, generator=g) * 30).requires_grad_(True)  # large logits: some student probs underflow
    y = torch.randint(0, c, (n,), generator=g)
    out = losses.topk_kd_loss(s, values, indices, logsumexp(t), y, temperature=temperature, alpha=0.5, tail="drop")
    out.backward()
    assert torch.isfinite(out)
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert (s.grad != 0).any()


# --- dtypes and devices -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_float32_results(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(6)
    n, c, temperature = 6, 11, 3.0
    s, t = torch.randn(n, c, generator=g) * 4, torch.randn(n, c, generator=g) * 4
    y = torch.randint(0, c, (n,), generator=g)
    s_lo, t_lo = s.to(dtype), t.to(dtype)
    tol = {"rel": 2e-2, "abs": 1e-3}
    log_p, log_p_lo = log_soft_targets(t, temperature), log_soft_targets(t_lo, temperature).to(dtype)
    values, indices = top_k(t, 4)
    cases = [
        (losses.soft_cross_entropy(s, log_p, temperature), losses.soft_cross_entropy(s_lo, log_p_lo, temperature)),
        (losses.soft_kl(s, log_p, temperature), losses.soft_kl(s_lo, log_p_lo, temperature)),
        (
            losses.kd_loss(s, log_p, y, temperature=temperature, alpha=0.3),
            losses.kd_loss(s_lo, log_p_lo, y, temperature=temperature, alpha=0.3),
        ),
        (losses.mse_logit_loss(s, t), losses.mse_logit_loss(s_lo, t_lo)),
        (losses.hard_loss(s, y), losses.hard_loss(s_lo, y)),
        (losses.label_smoothing_loss(s, y, smoothing=0.1), losses.label_smoothing_loss(s_lo, y, smoothing=0.1)),
        (
            losses.topk_kd_loss(s, values, indices, logsumexp(t), y, temperature=temperature, alpha=0.5),
            losses.topk_kd_loss(
                s_lo, values.to(dtype), indices, logsumexp(t).to(dtype), y, temperature=temperature, alpha=0.5
            ),
        ),
    ]
    for ref, lo in cases:
        assert lo.dtype == torch.float32
        assert lo.item() == pytest.approx(ref.item(), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_gives_float32_loss_and_grads(device: str) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 5, generator=g).to(device)
    t = torch.randn(8, 4, generator=g).to(device)
    y = torch.randint(0, 4, (8,), generator=g).to(device)
    model = torch.nn.Linear(5, 4).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss = losses.kd_loss(logits, log_soft_targets(t, 2.0), y, temperature=2.0, alpha=0.5)
    assert loss.dtype == torch.float32
    loss.backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
    ref = losses.kd_loss(model(x), log_soft_targets(t, 2.0), y, temperature=2.0, alpha=0.5)
    assert loss.item() == pytest.approx(ref.item(), rel=3e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_all_losses_on_device(device: str) -> None:
    g = torch.Generator().manual_seed(8)
    n, c, temperature = 4, 6, 2.0
    s_cpu, t_cpu = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    y_cpu = torch.randint(0, c, (n,), generator=g)
    s, t, y = s_cpu.to(device), t_cpu.to(device), y_cpu.to(device)
    values, indices = top_k(t, 3)
    lp = log_soft_targets(t, temperature)
    outs = {
        "soft_ce": losses.soft_cross_entropy(s, lp, temperature),
        "soft_kl": losses.soft_kl(s, lp, temperature),
        "kd": losses.kd_loss(s, lp, y, temperature=temperature, alpha=0.5),
        "mse": losses.mse_logit_loss(s, t),
        "hard": losses.hard_loss(s, y),
        "ls": losses.label_smoothing_loss(s, y, smoothing=0.2),
        "topk": losses.topk_kd_loss(s, values, indices, logsumexp(t), y, temperature=temperature, alpha=0.5),
        "topk_drop": losses.topk_kd_loss(
            s, values, indices, logsumexp(t), y, temperature=temperature, alpha=0.5, tail="drop"
        ),
    }
    sn, tn, yn = s_cpu.double().numpy(), t_cpu.double().numpy(), y_cpu.numpy()
    want_kd = 0.5 * temperature**2 * np_soft_ce(sn, np_log_softmax(tn / temperature), temperature)
    want_kd += 0.5 * np_hard_ce(sn, yn)
    for name, out in outs.items():
        assert out.device.type == device and out.dtype == torch.float32 and out.ndim == 0, name
        assert torch.isfinite(out), name
    assert outs["kd"].item() == pytest.approx(want_kd, rel=1e-5)
    assert outs["hard"].item() == pytest.approx(np_hard_ce(sn, yn), rel=1e-5)


# --- logit standardisation (Sun et al. 2024) ---------------------------------------------------------------------


def test_standardize_golden() -> None:
    # (1, 2, 3): mean 2, population SD sqrt(2/3) -> (-sqrt(3/2), 0, sqrt(3/2)).
    # (300, 200, 100) likewise, reversed; a constant row becomes zeros, not NaN.
    a = math.sqrt(1.5)
    got = standardize(torch.tensor([[1.0, 2.0, 3.0], [300.0, 200.0, 100.0], [5.0, 5.0, 5.0]]))
    torch.testing.assert_close(got, torch.tensor([[-a, 0.0, a], [a, 0.0, -a], [0.0, 0.0, 0.0]]))
    # (0, 0, 4, 0): mean 1, deviations (-1, -1, 3, -1), variance 3 -> (-1/sqrt3, -1/sqrt3, sqrt3, -1/sqrt3).
    r3 = math.sqrt(3.0)
    torch.testing.assert_close(standardize(torch.tensor([[0.0, 0.0, 4.0, 0.0]])),
                               torch.tensor([[-1 / r3, -1 / r3, r3, -1 / r3]]))
    # -inf (the drop tail) stays -inf; the mean and SD are those of the finite entries (2, 0): (1, -1).
    got = standardize(torch.tensor([[2.0, 0.0, NEG_INF]]))
    assert got[0, :2].tolist() == pytest.approx([1.0, -1.0]) and got[0, 2].item() == NEG_INF
    # Only the scale and shift of a row are removed.
    z = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(standardize(37.0 * z - 5.0), standardize(z))


def test_standardize_gradient_is_finite_on_constant_rows_and_drop_tails() -> None:
    s = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], requires_grad=True)
    standardize(s).pow(2).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    t = torch.tensor([[3.0, 1.0, NEG_INF]], requires_grad=True)
    standardize(t)[:, :2].sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


def test_standardized_kd_golden() -> None:
    # Teacher (100, 200, 300) and student (1, 2, 3) both standardise to (-a, 0, a), a = sqrt(3/2); at T = 1 the
    # soft cross-entropy is then the entropy of softmax(-a, 0, a):
    #   H = log(1 + 2 cosh a) - 2 a sinh(a) / (1 + 2 cosh a) = 0.7872...
    a = math.sqrt(1.5)
    want = math.log(1 + 2 * math.cosh(a)) - 2 * a * math.sinh(a) / (1 + 2 * math.cosh(a))
    s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[100.0, 200.0, 300.0]])
    log_p = log_soft_targets(standardize(t), 1.0)
    assert losses.kd_loss(s, log_p, temperature=1.0, alpha=1.0, standardize=True).item() == pytest.approx(want)
    # Without standardisation the teacher is one-hot on class 2: CE = -log softmax(1, 2, 3)[2] = log(1 + e^-1 + e^-2).
    plain = losses.kd_loss(s, log_soft_targets(t, 1.0), temperature=1.0, alpha=1.0).item()
    assert plain == pytest.approx(math.log(1 + math.exp(-1) + math.exp(-2)), rel=1e-5)
    # At T = 2 both sides are (-a/2, 0, a/2); T^2 = 4 scales the soft term; the hard term keeps raw logits.
    want2 = math.log(1 + 2 * math.cosh(a / 2)) - a * math.sinh(a / 2) / (1 + 2 * math.cosh(a / 2))
    got2 = losses.kd_loss(s, log_soft_targets(standardize(t), 2.0), torch.tensor([2]), temperature=2.0, alpha=0.5,
                          standardize=True)
    assert got2.item() == pytest.approx(0.5 * 4 * want2 + 0.5 * math.log(1 + math.exp(-1) + math.exp(-2)), rel=1e-5)


def test_standardized_kd_ignores_the_teachers_logit_scale() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)

    def loss(scale: float) -> float:
        log_p = log_soft_targets(standardize(scale * t), 2.0)
        return losses.kd_loss(s, log_p, y, temperature=2.0, alpha=0.9, standardize=True).item()

    assert loss(1.0) == pytest.approx(loss(60.0), rel=1e-5)


def test_standardized_topk_golden_uniform_and_drop() -> None:
    # Full logits (3, 1, 0, 0), top-2 stored: the uniform tail rebuilds the two 0s exactly (the leftover mass 2 /
    # (e^3 + e + 2) split in two gives logit 0), so standardised top-k KD equals standardised full KD.
    z = torch.tensor([[3.0, 1.0, 0.0, 0.0]])
    v, i = top_k(z, 2)
    s = torch.tensor([[1.0, -1.0, 0.0, 0.0]])
    full = losses.kd_loss(s, log_soft_targets(standardize(z), 1.0), temperature=1.0, alpha=1.0, standardize=True)
    uni = losses.topk_kd_loss(s, v, i, logsumexp(z), temperature=1.0, alpha=1.0, tail="uniform", standardize=True)
    assert uni.item() == pytest.approx(full.item(), rel=1e-6)
    # Drop tail: the teacher is z-scored over its 2 stored logits, (3, 1) -> (1, -1), so p = (e, e^-1) / (2 cosh 1)
    # on classes 0 and 1. The student (1, -1, 0, 0) z-scores to (r2, -r2, 0, 0), r2 = sqrt 2, so
    #   CE = log(2 + 2 cosh r2) - r2 * (p0 - p1) = log(2 + 2 cosh r2) - r2 * tanh(1).
    r2 = math.sqrt(2.0)
    want = math.log(2 + 2 * math.cosh(r2)) - r2 * math.tanh(1.0)
    drop = losses.topk_kd_loss(s, v, i, logsumexp(z), temperature=1.0, alpha=1.0, tail="drop", standardize=True)
    assert drop.item() == pytest.approx(want, rel=1e-6)


def test_standardized_mse_golden() -> None:
    # Z(1, 2, 3) = (-a, 0, a) and Z(300, 200, 100) = (a, 0, -a): 0.5 * ((2a)^2 + (2a)^2) = 4 a^2 = 6.
    s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[300.0, 200.0, 100.0]])
    assert losses.mse_logit_loss(s, t, standardize=True).item() == pytest.approx(6.0, rel=1e-6)
    assert losses.mse_logit_loss(s, 0.01 * t, standardize=True).item() == pytest.approx(6.0, rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_standardized_losses_on_device(device: str) -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 6, generator=g).to(device).requires_grad_()
    t = (40 * torch.randn(4, 6, generator=g)).to(device)
    y = torch.randint(0, 6, (4,), generator=g).to(device)
    v, i = top_k(t, 3)
    parts = [losses.kd_loss(s, log_soft_targets(standardize(t), 2.0), y, temperature=2.0, alpha=0.9,
                            standardize=True),
             losses.topk_kd_loss(s, v, i, logsumexp(t), y, temperature=2.0, alpha=0.9, standardize=True),
             losses.mse_logit_loss(s, t, standardize=True)]
    sum(parts).backward()  # type: ignore[union-attr]
    assert all(p.device.type == device and torch.isfinite(p) for p in parts)
    assert s.grad is not None and torch.isfinite(s.grad).all()
