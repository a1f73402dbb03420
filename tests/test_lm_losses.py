"""Per-token losses (kdstore.lm_losses): golden values computed by hand, the top-k rebuild against a dense V-wide
computation, gradients, masks, alpha mixing."""

from __future__ import annotations

import math

import pytest
import torch

from kdstore import lm_losses as L
from kdstore import sampling
from kdstore.errors import ConfigError, ShapeMismatchError


def _stored(z: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """What the labeler stores for logits z (P, V): top-k values and ids, log-sum-exp, exact tail log-mass."""
    v, i = torch.topk(z, k, -1)
    lse = torch.logsumexp(z, -1)
    rest = z.clone().scatter_(1, i, float("-inf"))
    return v, i, lse, torch.logsumexp(rest, -1) - lse


def _dense_rebuild(v: torch.Tensor, i: torch.Tensor, lse: torch.Tensor, tail: torch.Tensor, V: int) -> torch.Tensor:
    k = v.shape[1]
    if k == V:
        return torch.empty(len(v), V, dtype=v.dtype).scatter_(1, i, v)
    dense = (lse + tail - math.log(V - k)).unsqueeze(1).expand(-1, V).clone()
    return dense.scatter_(1, i, v)


def test_golden_topk_values_by_hand() -> None:
    # V = 3, k = 1: logits (2, 0, 0). p = (e^2, 1, 1) / (e^2 + 2) = (0.786986, 0.106507, 0.106507);
    # a uniform student has CE = log 3 = 1.098612 at any T; H(p) = 0.665577, so KL = 0.433035 at T = 1.
    v, i, lse, tail = _stored(torch.tensor([[2.0, 0.0, 0.0]]), 1)
    s = torch.zeros(1, 3)
    assert L.topk_ce(s, v, i, lse, tail).item() == pytest.approx(1.098612, abs=1e-5)
    assert L.topk_ce(s, v, i, lse, tail, 4.0).item() == pytest.approx(1.098612, abs=1e-5)
    assert L.topk_kl(s, v, i, lse, tail).item() == pytest.approx(0.433035, abs=1e-5)
    # At T = 2 the teacher is softmax(1, 0, 0) = (0.576117, 0.211942, 0.211942); student logits (0, 0, 2) at T = 2
    # give log s = (1, 1, 2) - 1 - log(2 + e) = (-1.551445, -1.551445, -0.551445):
    # CE = 0.576117 * 1.551445 + 0.211942 * 1.551445 + 0.211942 * 0.551445 = 1.339503.
    s2 = torch.tensor([[0.0, 0.0, 2.0]])
    assert L.topk_ce(s2, v, i, lse, tail, 2.0).item() == pytest.approx(1.339503, abs=1e-5)


def test_golden_sampled_and_hard_by_hand() -> None:
    # 4 draws: id 0 three times (log p = log .75), id 1 once (log p = log .25); a uniform student over V = 3.
    ids, counts = torch.tensor([[0, 1, -1]]), torch.tensor([[3, 1, 0]])
    lp = torch.tensor([[math.log(0.75), math.log(0.25), float("-inf")]])
    s = torch.zeros(1, 3)
    assert L.sampled_ce(s, ids, counts, lp).item() == pytest.approx(math.log(3), abs=1e-6)
    kl = math.log(3) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25)  # 0.536277
    assert L.sampled_kl(s, ids, counts, lp).item() == pytest.approx(kl, abs=1e-6)
    assert L.hard_nll(torch.tensor([[0.0, math.log(3.0), 0.0]]), torch.tensor([1])).item() == pytest.approx(
        math.log(5 / 3), abs=1e-6)


@pytest.mark.parametrize("k", [1, 5, 16])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_topk_equals_dense_rebuild(k: int, T: float) -> None:
    torch.manual_seed(k)
    V = 16
    z, s = torch.randn(7, V, dtype=torch.float64) * 3, torch.randn(7, V, dtype=torch.float64)
    v, i, lse, tail = _stored(z, k)
    q = torch.softmax(_dense_rebuild(v, i, lse, tail, V) / T, -1)
    log_s = torch.log_softmax(s / T, -1)
    ce = -(q * log_s).sum(-1)
    torch.testing.assert_close(L.topk_ce(s, v, i, lse, tail, T), ce)
    kl = (q * (q.clamp_min(1e-300).log() - log_s)).sum(-1)
    torch.testing.assert_close(L.topk_kl(s, v, i, lse, tail, T), kl)
    if k == V:  # nothing left out: the teacher itself
        torch.testing.assert_close(q, torch.softmax(z / T, -1))


def test_topk_gradient_is_the_kl_gradient() -> None:
    torch.manual_seed(0)
    V, k, T = 12, 4, 2.0
    z = torch.randn(5, V, dtype=torch.float64) * 2
    s = torch.randn(5, V, dtype=torch.float64, requires_grad=True)
    v, i, lse, tail = _stored(z, k)
    assert torch.autograd.gradcheck(lambda x: L.topk_ce(x, v, i, lse, tail, T), (s,))
    L.topk_ce(s, v, i, lse, tail, T).sum().backward()
    q = torch.softmax(_dense_rebuild(v, i, lse, tail, V) / T, -1)
    torch.testing.assert_close(s.grad, (torch.softmax(s.detach() / T, -1) - q) / T)


def test_sampled_gradient_and_unbiased_against_full_kl_gradient() -> None:
    # The expected gradient of the sampled CE at T = 1 is the full KL's: average over many independent draw sets.
    torch.manual_seed(1)
    V, N, reps = 6, 8, 4000
    p = torch.softmax(torch.randn(V, dtype=torch.float64) * 1.5, -1)
    s = torch.randn(1, V, dtype=torch.float64)
    draws = torch.multinomial(p.float(), N * reps, replacement=True).view(reps, N)
    counts = torch.zeros(reps, V, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))
    ids = torch.arange(V).expand(reps, V)
    lp = p.log().expand(reps, V)
    x = s.expand(reps, V).clone().requires_grad_(True)
    L.sampled_ce(x, ids, counts, lp).sum().backward()
    full = torch.softmax(s, -1)[0] - p
    torch.testing.assert_close(x.grad.mean(0).double(), full, atol=4e-3, rtol=0)


def test_next_token_labels_follow_the_masks() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 2, 2]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 0]])  # a chat: tokens 2 and 3 are the assistant's
    attention = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert L.next_token_labels(ids, loss_mask, attention).tolist() == [[-100, 7, 8, -100, -100, -100]]
    text = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert L.next_token_labels(ids, text, attention).tolist() == [[6, 7, 8, -100, -100, -100]]


def _batch(B: int = 2, Lq: int = 5, V: int = 11, k: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    z = torch.randn(B * Lq, V) * 2
    v, i, lse, tail = _stored(z, k)
    ids = torch.randint(0, V, (B, Lq))
    tm = torch.ones(B, Lq, dtype=torch.int8)
    tm[1, 3:] = 0
    batch = {"labels": L.next_token_labels(ids, tm), "target_mask": tm, "topk_values": v.view(B, Lq, k),
             "topk_indices": i.view(B, Lq, k), "logsumexp": lse.view(B, Lq), "tail_logmass": tail.view(B, Lq)}
    return torch.randn(B, Lq, V, requires_grad=True), batch


def test_masked_positions_count_for_nothing() -> None:
    s, batch = _batch()
    loss = L.lm_kd_loss(s, batch, loss="topk", temperature=2.0, alpha=0.5)
    loss.backward()
    assert s.grad is not None and s.grad[1, 3:].abs().max() == 0  # masked: no gradient
    assert s.grad[1, 2].abs().max() > 0
    junk = {**batch, "topk_values": batch["topk_values"].clone()}
    junk["topk_values"][1, 3:] = float("nan")  # whatever a masked position holds
    assert L.lm_kd_loss(s, junk, loss="topk", temperature=2.0, alpha=0.5).item() == pytest.approx(loss.item())
    none = {**batch, "target_mask": torch.zeros_like(batch["target_mask"]),
            "labels": torch.full_like(batch["labels"], L.IGNORE)}
    assert L.lm_kd_loss(s, none, loss="topk", temperature=2.0, alpha=0.5).item() == 0.0


def test_alpha_mixes_soft_and_hard() -> None:
    s, batch = _batch()
    T, a = 3.0, 0.3
    flat, tm = s.reshape(-1, 11), batch["target_mask"].reshape(-1).bool()
    soft = L.topk_ce(flat, batch["topk_values"].reshape(-1, 3), batch["topk_indices"].reshape(-1, 3),
                     batch["logsumexp"].reshape(-1), batch["tail_logmass"].reshape(-1), T)[tm].mean()
    lab = batch["labels"].reshape(-1)
    hard = L.hard_nll(flat, lab)[lab != L.IGNORE].mean()
    got = L.lm_kd_loss(s, batch, loss="topk", temperature=T, alpha=a)
    assert got.item() == pytest.approx(a * T * T * soft.item() + (1 - a) * hard.item(), rel=1e-6)
    assert L.lm_kd_loss(s, batch, loss="hard", temperature=T, alpha=a).item() == pytest.approx(hard.item(), rel=1e-6)


def test_bad_inputs_are_refused() -> None:
    s, batch = _batch()
    with pytest.raises(ConfigError, match="alpha"):
        L.lm_kd_loss(s, batch, loss="topk", temperature=1.0, alpha=1.5)
    with pytest.raises(ConfigError, match="loss 'kd'"):
        L.lm_kd_loss(s, batch, loss="kd", temperature=1.0, alpha=1.0)
    with pytest.raises(ShapeMismatchError, match=r"\(P, k\)"):
        L.topk_ce(torch.zeros(3, 5), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), torch.zeros(3),
                  torch.zeros(3))


@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
def test_fused_losses_equal_autograd_through_log_softmax(T: float) -> None:
    """topk_ce and sampled_ce compute their gradient by hand (one pass over V): the same value and gradient as
    autograd through log_softmax; padded draw slots and a position without draws count for nothing."""
    torch.manual_seed(3)
    V, k = 1000, 16
    z, s0 = torch.randn(6, V) * 3, torch.randn(6, V) * 2
    v, i, lse, tail = _stored(z, k)
    ids = torch.stack([torch.randperm(V)[:5] for _ in range(6)])
    counts = torch.tensor([[3, 1, 1, 0, 0]] * 5 + [[0] * 5])
    ids = torch.where(counts > 0, ids, -1)
    lp = torch.log_softmax(z, -1).gather(1, ids.clamp(min=0))
    for fused, reference in (
        (lambda x: L.topk_ce(x, v, i, lse, tail, T),
         lambda x: -(torch.softmax(_dense_rebuild(v, i, lse, tail, V) / T, -1) * torch.log_softmax(x / T, -1)).sum(-1)),
        (lambda x: L.sampled_ce(x, ids, counts, lp, T),
         lambda x: -(torch.nan_to_num(sampling.draw_weights(counts, lp, T)) * torch.where(
             counts > 0, torch.log_softmax(x / T, -1).gather(1, ids.clamp(min=0)), 0.0)).sum(-1)),
    ):
        a, b = s0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        w = torch.rand(6)
        ya, yb = fused(a), reference(b)
        torch.testing.assert_close(ya, yb, atol=1e-4, rtol=1e-5)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)
    assert L.sampled_ce(s0, ids, counts, lp, T)[5] == 0  # no draws: nothing


# -- reverse KL and generalised JSD against the top-k rebuild -----------------------------------------------------

def _dense_divergences(s: torch.Tensor, v: torch.Tensor, i: torch.Tensor, lse: torch.Tensor, tail: torch.Tensor,
                       T: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(s_T || q_T) and JSD_beta(q_T || s_T) with the teacher built V-wide (the reference)."""
    log_q = torch.log_softmax(_dense_rebuild(v, i, lse, tail, s.shape[1]) / T, -1)
    log_s = torch.log_softmax(s / T, -1)
    p, q = log_q.exp(), log_s.exp()
    log_m = (beta * p + (1 - beta) * q).log()
    rkl = (q * (log_s - log_q)).sum(-1)
    jsd = beta * (p * (log_q - log_m)).sum(-1) + (1 - beta) * (q * (log_s - log_m)).sum(-1)
    return rkl, jsd


def test_golden_reverse_kl_and_jsd_by_hand() -> None:
    # V = 5, k = 2: teacher logits (2, 1, 0, 0, 0), so the uniform tail is exact: p = (e^2, e, 1, 1, 1) / Z,
    # log Z = log(e^2 + e + 3) = 2.573172. A uniform student s = 1/5:
    # KL(s || p) = sum_v (1/5)(log(1/5) - z_v + log Z) = log Z - log 5 - 3/5 = 0.363734.
    # At T = 2 the teacher is softmax(1, 0.5, 0, 0, 0): log Z2 = log(e + e^0.5 + 3), KL = log Z2 - log 5 - 0.3.
    # JSD with m = beta p + (1 - beta)/5, p = (0.563734, 0.207386, 0.076293 x 3):
    # beta = 0.5: 0.5 sum p log(p/m) + 0.5 sum (1/5) log((1/5)/m) = 0.088202; beta = 0.25: 0.067095.
    v, i, lse, tail = _stored(torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0]]), 2)
    s = torch.zeros(1, 5)
    assert L.topk_reverse_kl(s, v, i, lse, tail).item() == pytest.approx(0.363734, abs=1e-5)
    assert L.topk_reverse_kl(s, v, i, lse, tail).item() == pytest.approx(
        math.log(math.e**2 + math.e + 3) - math.log(5) - 0.6, abs=1e-5)
    assert L.topk_reverse_kl(s, v, i, lse, tail, 2.0).item() == pytest.approx(
        math.log(math.e + math.e**0.5 + 3) - math.log(5) - 0.3, abs=1e-5)
    assert L.topk_jsd(s, v, i, lse, tail).item() == pytest.approx(0.088202, abs=1e-5)
    assert L.topk_jsd(s, v, i, lse, tail, beta=0.25).item() == pytest.approx(0.067095, abs=1e-5)


@pytest.mark.parametrize("k", [1, 5, 16])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_reverse_kl_and_jsd_equal_dense_rebuild(k: int, T: float, beta: float) -> None:
    torch.manual_seed(k)
    V = 16
    z, s = torch.randn(7, V, dtype=torch.float64) * 3, torch.randn(7, V, dtype=torch.float64) * 2
    v, i, lse, tail = _stored(z, k)
    rkl, jsd = _dense_divergences(s, v, i, lse, tail, T, beta)
    torch.testing.assert_close(L.topk_reverse_kl(s, v, i, lse, tail, T), rkl)
    torch.testing.assert_close(L.topk_jsd(s, v, i, lse, tail, T, beta), jsd)
    assert L.topk_reverse_kl(s.float(), v.float(), i, lse.float(), tail.float(), T).dtype == torch.float32


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_reverse_kl_and_jsd_gradients(T: float) -> None:
    torch.manual_seed(0)
    V, k, beta = 12, 4, 0.3
    z = torch.randn(5, V, dtype=torch.float64) * 2
    v, i, lse, tail = _stored(z, k)
    s0 = torch.randn(5, V, dtype=torch.float64)
    for j, fn in enumerate((lambda x: L.topk_reverse_kl(x, v, i, lse, tail, T),
                            lambda x: L.topk_jsd(x, v, i, lse, tail, T, beta))):
        a = s0.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(fn, (a,))
        b = s0.clone().requires_grad_(True)
        fn(a).sum().backward()
        _dense_divergences(b, v, i, lse, tail, T, beta)[j].sum().backward()
        torch.testing.assert_close(a.grad, b.grad)


def test_reverse_kl_and_jsd_vanish_at_the_rebuilt_teacher() -> None:
    torch.manual_seed(2)
    V, k, T = 20, 3, 2.0
    v, i, lse, tail = _stored(torch.randn(4, V, dtype=torch.float64) * 3, k)
    s = _dense_rebuild(v, i, lse, tail, V)  # student logits = the rebuild: s_T = q_T at every T
    assert L.topk_reverse_kl(s, v, i, lse, tail, T).abs().max() < 1e-12
    assert L.topk_jsd(s, v, i, lse, tail, T, 0.3).abs().max() < 1e-12
    assert L.topk_reverse_kl(s + 1.0, v, i, lse, tail, T).abs().max() < 1e-12  # a shift changes nothing
    assert L.topk_reverse_kl(s.flip(-1), v, i, lse, tail, T).min() > 1e-3  # another student is not the teacher


def test_jsd_symmetric_at_half_and_bounded() -> None:
    torch.manual_seed(4)
    V, k = 9, 3
    z1, z2 = torch.randn(6, V, dtype=torch.float64) * 4, torch.randn(6, V, dtype=torch.float64) * 4
    st1, st2 = _stored(z1, k), _stored(z2, k)
    r1, r2 = _dense_rebuild(*st1, V), _dense_rebuild(*st2, V)
    for T in (0.5, 1.0, 2.0):  # swapping teacher and student: the same value at beta = 0.5, not at 0.2
        torch.testing.assert_close(L.topk_jsd(r1, *st2, T), L.topk_jsd(r2, *st1, T))
        assert not torch.allclose(L.topk_jsd(r1, *st2, T, 0.2), L.topk_jsd(r2, *st1, T, 0.2))
    # near-disjoint teacher and student approach the bound log 2 from below; h(beta) bounds every beta
    v, i, lse, tail = _stored(torch.tensor([[40.0, 0, 0, 0, 0]], dtype=torch.float64), 1)
    far = torch.tensor([[0, 0, 0, 0, 40.0]], dtype=torch.float64)
    got = L.topk_jsd(far, v, i, lse, tail).item()
    assert math.log(2) - 1e-6 < got <= math.log(2)
    for beta in (0.1, 0.5, 0.8):
        h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        vals = L.topk_jsd(torch.randn(6, V, dtype=torch.float64) * 10, *st1, 1.0, beta)
        assert (vals >= -1e-12).all() and (vals <= h).all()
        assert L.topk_jsd(far, v, i, lse, tail, 1.0, beta).item() == pytest.approx(h, abs=1e-6)


def test_jsd_limits_are_forward_and_reverse_kl() -> None:
    """JSD_beta / beta -> KL(teacher || student) as beta -> 0, JSD_beta / (1 - beta) -> KL(student || teacher) as
    beta -> 1 (the convention of Agarwal et al. 2024 with the teacher first)."""
    torch.manual_seed(5)
    V, k, T = 10, 3, 1.5
    v, i, lse, tail = _stored(torch.randn(4, V, dtype=torch.float64) * 2, k)
    s = torch.randn(4, V, dtype=torch.float64)
    fwd, rev = L.topk_kl(s, v, i, lse, tail, T), L.topk_reverse_kl(s, v, i, lse, tail, T)
    assert not torch.allclose(fwd, rev, rtol=0.05)  # the two limits differ, so each check below says something
    eps = 1e-6
    torch.testing.assert_close(L.topk_jsd(s, v, i, lse, tail, T, eps) / eps, fwd, rtol=1e-4, atol=0)
    torch.testing.assert_close(L.topk_jsd(s, v, i, lse, tail, T, 1 - eps) / eps, rev, rtol=1e-4, atol=0)


def test_reverse_kl_with_an_empty_tail_and_with_k_equal_v() -> None:
    torch.manual_seed(6)
    V = 6
    z, s = torch.randn(3, V, dtype=torch.float64), torch.randn(3, V, dtype=torch.float64)
    v, i, lse, tail = _stored(z, V)  # k = V: the teacher itself, finite
    torch.testing.assert_close(L.topk_reverse_kl(s, v, i, lse, tail),
                               (torch.softmax(s, -1) * (torch.log_softmax(s, -1) - torch.log_softmax(z, -1))).sum(-1))
    v, i, lse, tail = _stored(z, 2)
    tail = torch.tensor([float("-inf"), tail[1], tail[2]], dtype=torch.float64)  # row 0: teacher mass 0 outside
    x = s.clone().requires_grad_(True)
    out = L.topk_reverse_kl(x, v, i, lse, tail)
    assert out[0] == float("inf") and torch.isfinite(out[1:]).all()
    assert torch.isfinite(L.topk_jsd(x, v, i, lse, tail)).all()
    (out[1:].sum() + L.topk_jsd(x, v, i, lse, tail).sum()).backward()  # no NaN leaks from the -inf tail
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("loss", ["rkl", "jsd"])
def test_lm_kd_loss_reverse_kl_and_jsd(loss: str) -> None:
    s, batch = _batch()
    T, a, beta = 2.0, 0.3, 0.7
    flat, tm = s.reshape(-1, 11), batch["target_mask"].reshape(-1).bool()
    args = (flat, batch["topk_values"].reshape(-1, 3), batch["topk_indices"].reshape(-1, 3),
            batch["logsumexp"].reshape(-1), batch["tail_logmass"].reshape(-1), T)
    soft = (L.topk_reverse_kl(*args) if loss == "rkl" else L.topk_jsd(*args, beta))[tm].mean()
    lab = batch["labels"].reshape(-1)
    hard = L.hard_nll(flat, lab)[lab != L.IGNORE].mean()
    got = L.lm_kd_loss(s, batch, loss=loss, temperature=T, alpha=a, beta=beta)
    assert got.item() == pytest.approx(a * T * T * soft.item() + (1 - a) * hard.item(), rel=1e-6)
    got.backward()
    assert s.grad is not None and s.grad[1, 3:].abs().max() == 0 and s.grad[1, 2].abs().max() > 0
    junk = {**batch, "tail_logmass": batch["tail_logmass"].clone()}
    junk["tail_logmass"][1, 3:] = float("-inf")  # whatever a masked position holds
    x = s.detach().clone().requires_grad_(True)
    L.lm_kd_loss(x, junk, loss=loss, temperature=T, alpha=1.0, beta=beta).backward()
    assert torch.isfinite(x.grad).all() and x.grad[1, 3:].abs().max() == 0


def test_jsd_beta_outside_the_open_interval_is_refused() -> None:
    s, batch = _batch()
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match=rf"beta {beta:g}: must be in \(0, 1\)"):
            L.lm_kd_loss(s, batch, loss="jsd", temperature=1.0, alpha=1.0, beta=beta)
