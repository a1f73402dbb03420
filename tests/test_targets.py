"""kdstore.targets: hand-computed golden values for top-k, log-sum-exp, soft targets and the tail models."""

from __future__ import annotations

import math

import pytest
import torch

from kdstore import targets

LN2, LN3 = math.log(2.0), math.log(3.0)
INF = float("inf")


def t(rows: list[list[float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


# --- top_k ---------------------------------------------------------------------------------------------


def test_top_k_golden_largest_first() -> None:
    values, indices = targets.top_k(t([[0.5, -1.0, 2.0, 1.0], [3.0, 2.0, 1.0, 0.0]]), 2)
    assert values.tolist() == [[2.0, 1.0], [3.0, 2.0]]
    assert indices.tolist() == [[2, 3], [0, 1]]
    assert values.dtype == torch.float32 and indices.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_top_k_ties_go_to_the_lower_class_index(dtype: torch.dtype) -> None:
    logits = t([[1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 5.0, 5.0]], dtype)
    values, indices = targets.top_k(logits, 3)
    assert indices.tolist() == [[1, 3, 2], [0, 1, 2], [0, 2, 3]]
    assert values.tolist() == [[3.0, 3.0, 2.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]]
    assert values.dtype == torch.float32  # computed in float32 whatever the input dtype


def test_top_k_k_equals_c_is_a_full_descending_sort() -> None:
    values, indices = targets.top_k(t([[0.1, 0.4, 0.3, 0.2]]), 4)
    assert indices.tolist() == [[1, 2, 3, 0]]
    assert torch.equal(values, t([[0.4, 0.3, 0.2, 0.1]]))


@pytest.mark.parametrize(
    ("shape", "k", "match"),
    [((4,), 1, r"logits must be \(N, C\), got shape \(4,\)"), ((2, 4), 0, r"k 0: must be in \[1, 4\]"),
     ((2, 4), 5, r"k 5: must be in \[1, 4\]")],
)
def test_top_k_rejects_bad_arguments(shape: tuple[int, ...], k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        targets.top_k(torch.zeros(shape), k)


# --- logsumexp and soft targets ----------------------------------------------------------------------------


def test_logsumexp_golden() -> None:
    lse = targets.logsumexp(t([[0.0, 0.0], [LN2, LN2]]))
    assert lse.tolist() == pytest.approx([LN2, 2 * LN2])
    rows = targets.logsumexp(t([[0.0, LN2, LN3]]))
    assert rows.tolist() == pytest.approx([math.log(6.0)])
    big = targets.logsumexp(t([[1000.0, 1000.0], [-1000.0, -1000.0]]))  # no overflow / underflow
    assert big.tolist() == pytest.approx([1000.0 + LN2, -1000.0 + LN2])
    half = targets.logsumexp(t([[0.0, 0.0]], torch.float16))
    assert half.dtype == torch.float32 and half.tolist() == pytest.approx([LN2])


def test_soft_targets_golden_at_t1_and_t2() -> None:
    logits = t([[0.0, 2 * LN2]])  # exp -> [1, 4]
    assert targets.soft_targets(logits, 1.0).tolist()[0] == pytest.approx([0.2, 0.8])
    # z / 2 = [0, ln 2] -> exp -> [1, 2]
    assert targets.soft_targets(logits, 2.0).tolist()[0] == pytest.approx([1 / 3, 2 / 3])
    assert targets.log_soft_targets(logits, 2.0).tolist()[0] == pytest.approx([math.log(1 / 3), math.log(2 / 3)])
    # T -> large flattens towards uniform; T small sharpens towards one-hot
    assert targets.soft_targets(logits, 1e6).tolist()[0] == pytest.approx([0.5, 0.5], abs=1e-5)
    assert targets.soft_targets(logits, 1e-3).tolist()[0] == pytest.approx([0.0, 1.0], abs=1e-6)


def test_soft_targets_computed_in_float32_from_half_inputs() -> None:
    q = targets.soft_targets(t([[0.0, 2 * LN2]], torch.bfloat16), 1.0)
    assert q.dtype == torch.float32
    assert q.sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_soft_targets_reject_non_positive_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature .*: must be a finite number > 0"):
        targets.soft_targets(t([[0.0, 1.0]]), temperature)
    with pytest.raises(ValueError, match="temperature .*: must be a finite number > 0"):
        targets.log_soft_targets_topk(t([[1.0]]), torch.tensor([[1]]), t([[1.0]])[0], 2, temperature)


# --- rebuilding from top-k -----------------------------------------------------------------------------------

# probabilities 0.4, 0.3, 0.2, 0.1 at T = 1 (class order shuffled to exercise the scatter)
PROBS = [0.2, 0.4, 0.1, 0.3]
LOGITS = t([[math.log(p) + 1.5 for p in PROBS]])  # an offset must not matter


def stored(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v, i = targets.top_k(LOGITS, k)
    return v, i, targets.logsumexp(LOGITS)


def test_rebuild_with_k_equal_c_is_exact() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 7) * 3
    v, i = targets.top_k(logits, 7)
    lse = targets.logsumexp(logits)
    for tail in ("uniform", "drop"):
        assert torch.equal(targets.rebuild_logits(v, i, lse, 7, tail), logits)  # type: ignore[arg-type]
        for temp in (0.5, 1.0, 4.0, 20.0):
            rebuilt = targets.log_soft_targets_topk(v, i, lse, 7, temp, tail)  # type: ignore[arg-type]
            assert torch.allclose(rebuilt, targets.log_soft_targets(logits, temp), atol=1e-6)


def test_uniform_tail_at_t1_reproduces_topk_probs_and_tail_mass_exactly() -> None:
    v, i, lse = stored(2)  # top-2: classes 1 (0.4) and 3 (0.3); tail mass 0.3 over classes 0 and 2
    q = targets.log_soft_targets_topk(v, i, lse, 4, 1.0, "uniform").exp()[0]
    assert q.tolist() == pytest.approx([0.15, 0.4, 0.15, 0.3], abs=1e-6)
    assert (q[0] + q[2]).item() == pytest.approx(0.3, abs=1e-6)
    # the tail logit is L + log(r / (C - k)) = (1.5 + ln 1) + ln 0.15
    rebuilt = targets.rebuild_logits(v, i, lse, 4, "uniform")[0]
    assert rebuilt[0].item() == pytest.approx(1.5 + math.log(0.15), abs=1e-5)
    assert rebuilt[2].item() == rebuilt[0].item()
    assert rebuilt[1].item() == pytest.approx(1.5 + math.log(0.4), abs=1e-6)


def test_uniform_tail_at_t2_golden() -> None:
    v, i, lse = stored(2)
    q = targets.log_soft_targets_topk(v, i, lse, 4, 2.0, "uniform").exp()[0]
    # softmax(log([0.15, 0.4, 0.15, 0.3]) / 2) = sqrt(p) / sum(sqrt(p))
    s = [math.sqrt(p) for p in (0.15, 0.4, 0.15, 0.3)]
    assert q.tolist() == pytest.approx([a / sum(s) for a in s], abs=1e-6)


def test_drop_tail_renormalises_over_the_topk() -> None:
    v, i, lse = stored(2)
    logq = targets.log_soft_targets_topk(v, i, lse, 4, 1.0, "drop")[0]
    assert logq[0].item() == -INF and logq[2].item() == -INF
    assert logq.exp().tolist() == pytest.approx([0.0, 4 / 7, 0.0, 3 / 7], abs=1e-6)
    q2 = targets.log_soft_targets_topk(v, i, lse, 4, 2.0, "drop").exp()[0]
    r = 2 + math.sqrt(3)  # sqrt(0.4) : sqrt(0.3) = 2 : sqrt(3)
    assert q2.tolist() == pytest.approx([0.0, 2 / r, 0.0, math.sqrt(3) / r], abs=1e-6)
    # the drop tail ignores lse entirely
    assert torch.equal(targets.rebuild_logits(v, i, torch.zeros(7), 4, "drop"),
                       targets.rebuild_logits(v, i, lse, 4, "drop"))


def test_uniform_tail_when_topk_holds_all_the_mass() -> None:
    logits = t([[0.0, -200.0, -200.0, 50.0]])  # the top-1 holds mass 1 to float32 precision
    v, i = targets.top_k(logits, 1)
    q = targets.log_soft_targets_topk(v, i, targets.logsumexp(logits), 4, 1.0).exp()[0]
    assert torch.isfinite(q).all()
    assert q.tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0], abs=1e-6)


@pytest.mark.parametrize(
    ("args", "match"),
    [((torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2), 4, "uniform"), r"must both be \(N, k\)"),
     ((torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.zeros(1), 4, "uniform"), r"must both be \(N, k\)"),
     ((torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long), torch.zeros(2), 4, "uniform"),
      "k=5 exceeds num_classes=4"),
     ((torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), torch.zeros(3), 4, "uniform"), r"lse must be \(N,\)"),
     ((torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2), 4, "cubic"), "expected one of uniform, "
                                                                                            "drop")],
)
def test_rebuild_rejects_bad_arguments(args: tuple, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        targets.rebuild_logits(*args)


# --- KL, entropy, fidelity -------------------------------------------------------------------------------------


def test_kl_divergence_golden_and_zero_terms() -> None:
    log_p = torch.log(t([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]]))  # contains -inf
    log_q = torch.log(t([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]]))
    kl = targets.kl_divergence(log_p, log_q)
    assert kl.tolist() == pytest.approx([LN2, 0.0, 0.0])  # p_i = 0 terms give 0 even where log q_i = -inf
    assert torch.isfinite(kl).all()
    # KL(0.5, 0.5 || 0.25, 0.75) = 0.5 ln 2 + 0.5 ln(2/3)
    kl2 = targets.kl_divergence(torch.log(t([[0.5, 0.5]])), torch.log(t([[0.25, 0.75]])))
    assert kl2.item() == pytest.approx(0.5 * LN2 + 0.5 * math.log(2 / 3))


def test_kl_divergence_is_infinite_where_q_misses_p() -> None:
    kl = targets.kl_divergence(torch.log(t([[0.5, 0.5]])), torch.log(t([[1.0, 0.0]])))
    assert kl.item() == INF


def test_entropy_golden() -> None:
    h = targets.entropy(torch.log(t([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])))
    assert h.tolist() == pytest.approx([math.log(4), 0.0, LN2])


def test_topk_fidelity_is_zero_for_k_equal_c() -> None:
    torch.manual_seed(1)
    logits = torch.randn(10, 6) * 4
    v, i = targets.top_k(logits, 6)
    fid = targets.topk_fidelity(logits, v, i, targets.logsumexp(logits), [1.0, 2.0, 4.0, 8.0, 20.0])
    assert sorted(fid) == [1.0, 2.0, 4.0, 8.0, 20.0]
    for kl in fid.values():
        assert kl.shape == (10,)
        assert kl.abs().max().item() < 1e-6


def test_topk_fidelity_is_zero_when_the_tail_really_is_uniform() -> None:
    logits = t([[5.0, 3.0, 1.0, 1.0, 1.0], [1.0, 1.0, 4.0, 1.0, 2.0]])
    v, i = targets.top_k(logits, 2)
    for kl in targets.topk_fidelity(logits, v, i, targets.logsumexp(logits), [1.0, 4.0, 20.0]).values():
        assert kl.abs().max().item() < 1e-5


def test_topk_fidelity_positive_for_a_non_uniform_tail_and_drop_is_worse() -> None:
    logits = torch.log(t([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    v, i = targets.top_k(logits, 2)
    lse = targets.logsumexp(logits)
    uni = targets.topk_fidelity(logits, v, i, lse, [1.0, 4.0])
    drop = targets.topk_fidelity(logits, v, i, lse, [1.0, 4.0], "drop")
    assert uni[1.0].item() > 0 and uni[4.0].item() > 0
    assert drop[1.0].item() > uni[1.0].item()
    # KL(exact || drop) is +inf: the exact soft targets put mass on the tail, where the drop model has none.
    assert drop[1.0].item() == INF
