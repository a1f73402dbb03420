"""Reproducible sampled targets: draws independent of batching and chunking, frequencies that match p, and an
estimator that is unbiased at T = 1 and consistent at other temperatures."""

from __future__ import annotations

import pytest
import torch

from kdstore.errors import ConfigError, ShapeMismatchError, TeacherError
from kdstore.sampling import (
    SampledTokens,
    draw_weights,
    sample_tokens,
    sampled_cross_entropy,
    to_padded,
    uniforms,
)

V = 40


def logits(rows: int = 4, positions: int = 12, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, positions, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def entries(s: SampledTokens) -> list[tuple[list[int], list[int], list[float]]]:
    """Per position: (ids, counts, logprobs)."""
    off = s.offsets().tolist()
    return [(s.ids[a:b].tolist(), s.counts[a:b].tolist(), s.logprobs[a:b].tolist())
            for a, b in zip(off, off[1:], strict=False)]


def test_uniforms_depend_only_on_their_counter() -> None:
    u = uniforms(7, [0, 5, 9], range(10), 6)
    assert u.shape == (3, 10, 6) and u.dtype == torch.float64 and u.min() >= 0 and u.max() < 1
    assert torch.equal(uniforms(7, [9, 5], [3, 4], 6), u[[2, 1]][:, 3:5])
    assert torch.equal(uniforms(7, [5], [4], 3)[0, 0], u[1, 4, :3])  # draw j does not depend on how many are drawn
    assert not torch.equal(uniforms(8, [0, 5, 9], range(10), 6), u)
    big = uniforms(1, range(100), range(100), 10)
    assert abs(big.mean().item() - 0.5) < 0.01 and abs(big.var().item() - 1 / 12) < 0.002
    assert uniforms(2**63 - 1, [2**40], [2**31], 1).shape == (1, 1, 1)


@pytest.mark.parametrize("vocab", [40, 256, 1000])  # below one block, whole blocks, a partial last block
def test_draws_do_not_depend_on_batching_chunking_or_threads(vocab: int) -> None:
    z = logits(vocab=vocab)
    rows = [100, 101, 102, 103]
    s = sample_tokens(z, seed=3, rows=rows, draws=50)
    whole, lse = entries(s), s.logsumexp.reshape(-1).tolist()
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            # one row at a time, in chunks of 5 positions (absolute positions via start)
            split, split_lse = [], []
            for r in range(4):
                for start in range(0, 12, 5):
                    part = sample_tokens(z[r:r + 1, start:start + 5], seed=3, rows=[rows[r]], start=start, draws=50)
                    split += entries(part)
                    split_lse += part.logsumexp.reshape(-1).tolist()
            assert split == whole and split_lse == lse
    finally:
        torch.set_num_threads(threads)
    swapped = entries(sample_tokens(z[[2, 0]], seed=3, rows=[102, 100], draws=50))  # another batch order
    assert swapped[:12] == whole[24:36] and swapped[12:] == whole[:12]
    assert entries(sample_tokens(z, seed=4, rows=rows, draws=50)) != whole
    assert entries(sample_tokens(z, seed=3, rows=[0, 1, 2, 3], draws=50)) != whole


@pytest.mark.parametrize("vocab", [40, 1000])
def test_sampled_entries(vocab: int) -> None:
    z = logits(vocab=vocab)
    z[..., 7] = float("-inf")  # probability 0: never drawn
    z[..., 128:192] = float("-inf")  # a whole block of zeros (when the vocabulary has one)
    s = sample_tokens(z, seed=1, rows=range(4), draws=30)
    assert s.num_unique.shape == (4, 12) and s.num_unique.dtype == torch.int32 and s.draws == 30
    assert s.ids.dtype == torch.int32 and s.counts.dtype == torch.int32 and s.logprobs.dtype == torch.float32
    assert torch.allclose(s.logsumexp, torch.logsumexp(z, -1), rtol=0, atol=1e-5)
    lp = torch.log_softmax(z, -1).reshape(-1, vocab)
    for i, (ids, counts, lps) in enumerate(entries(s)):
        assert ids == sorted(set(ids)) and sum(counts) == 30 and min(counts) >= 1
        assert 7 not in ids and not any(128 <= x < 192 for x in ids)
        assert torch.allclose(torch.tensor(lps), lp[i, ids], rtol=0, atol=1e-5)


@pytest.mark.parametrize("spread", [1, 97])  # ids inside one block; ids 97 apart, across blocks
def test_frequencies_match_the_teacher(spread: int) -> None:
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.04, 0.01, 0.0, 0.0])
    where = torch.arange(8) * spread + 3
    z = torch.full((5000, 1, 8 * spread + 3), float("-inf"))
    z[..., where] = p.log()
    s = sample_tokens(z, seed=11, rows=range(5000), draws=20)  # 100,000 draws
    freq = torch.bincount(s.ids.long(), weights=s.counts.double(), minlength=z.shape[-1])
    assert freq.sum() == 100_000 and freq[where[:6]].sum() == 100_000  # nothing outside the support
    expected = p[:6].double() * 100_000
    chi2 = ((freq[where[:6]] - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001


def exact_and_estimates(temperature: float, draws: int, rows: int) -> tuple[float, torch.Tensor]:
    z = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    s_logits = torch.tensor([0.3, -0.2, 1.0, 0.0, 0.5, -1.0])
    exact = -(torch.softmax(z / temperature, -1) * torch.log_softmax(s_logits / temperature, -1)).sum().item()
    st = sample_tokens(z.expand(rows, 1, 6), seed=5, rows=range(rows), draws=draws)
    ids, counts, lps = to_padded(st.num_unique, st.ids, st.counts, st.logprobs)
    est = sampled_cross_entropy(s_logits.expand(rows, 6), ids, counts, lps, temperature)
    return exact, est


def test_estimator_is_unbiased_at_t1() -> None:
    exact, est = exact_and_estimates(1.0, draws=4, rows=20_000)
    se = est.std().item() / len(est) ** 0.5
    assert abs(est.mean().item() - exact) < 4 * se


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_estimator_is_consistent_at_other_temperatures(temperature: float) -> None:
    # self-normalised importance weights: bias O(1/N); with N = 200 draws it is below the tolerance used here
    exact, est = exact_and_estimates(temperature, draws=200, rows=4_000)
    se = est.std().item() / len(est) ** 0.5
    assert abs(est.mean().item() - exact) < 4 * se + 0.002 * abs(exact)


def test_weights_and_padding() -> None:
    s = sample_tokens(logits(2, 3), seed=2, rows=[0, 1], draws=16)
    ids, counts, lps = to_padded(s.num_unique, s.ids, s.counts, s.logprobs)
    k = int(s.num_unique.max())
    assert ids.shape == (6, k) and counts.shape == (6, k) and lps.shape == (6, k)
    for i, (e_ids, e_counts, e_lps) in enumerate(entries(s)):
        n = len(e_ids)
        assert ids[i, :n].tolist() == e_ids and counts[i, :n].tolist() == e_counts and lps[i, :n].tolist() == e_lps
        assert ids[i, n:].eq(-1).all() and counts[i, n:].eq(0).all() and lps[i, n:].eq(float("-inf")).all()
    assert torch.equal(draw_weights(counts, lps, 1.0), counts.float() / 16)
    w2 = draw_weights(counts, lps, 2.0)
    assert torch.allclose(w2.sum(-1), torch.ones(6))
    assert (w2[counts == 0] == 0).all() and (w2[counts > 0] > 0).all()
    assert to_padded(s.num_unique, s.ids, s.counts, s.logprobs, k + 3)[0].shape == (6, k + 3)
    with pytest.raises(ConfigError, match=rf"k 1: a position has {k} distinct sampled ids"):
        to_padded(s.num_unique, s.ids, s.counts, s.logprobs, 1)
    with pytest.raises(ShapeMismatchError, match=r"num_unique sums to \d+ but there are \d+ ids"):
        to_padded(s.num_unique, s.ids[1:], s.counts, s.logprobs)


@pytest.mark.parametrize(
    ("call", "err", "match"),
    [
        (lambda: sample_tokens(torch.zeros(3, V), seed=0, rows=[0], draws=5), ShapeMismatchError,
         r"logits of shape \(3, 40\): expected \(rows, positions, vocabulary\)"),
        (lambda: sample_tokens(torch.zeros(2, 3, V), seed=0, rows=[0], draws=5), ShapeMismatchError,
         r"1 row ids for logits of 2 rows"),
        (lambda: sample_tokens(torch.zeros(1, 3, V), seed=-1, rows=[0], draws=5), ConfigError,
         r"seed -1: must be in \[0, 2\*\*63\)"),
        (lambda: sample_tokens(torch.zeros(1, 3, V), seed=0, rows=[0], draws=0), ConfigError, r"draws 0: must be >= 1"),
        (lambda: sample_tokens(torch.zeros(1, 3, V), seed=0, rows=[-2], draws=1), ConfigError,
         r"row ids and positions must be >= 0"),
        (lambda: sample_tokens(torch.full((1, 3, V), float("nan")), seed=0, rows=[0], draws=1), TeacherError,
         r"teacher logits with no finite probability distribution at 3 of 3 positions"),
        (lambda: sample_tokens(torch.full((1, 2, V), float("-inf")), seed=0, rows=[0], draws=1), TeacherError,
         r"at 2 of 2 positions \(NaN, or all -inf\)"),
        (lambda: draw_weights(torch.ones(2, 3), torch.zeros(2, 3), 0.0), ConfigError, r"temperature 0.0: must be > 0"),
        (lambda: draw_weights(torch.ones(2, 3), torch.zeros(2, 4)), ShapeMismatchError, r"counts \(2, 3\) and "),
        (lambda: sampled_cross_entropy(torch.zeros(2, V), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2),
                                       torch.zeros(3, 2)), ShapeMismatchError, r"expected \(P, V\) and \(P, K\)"),
    ],
)
def test_errors(call: object, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        call()  # type: ignore[operator]


def _reference_uniform(seed: int, row: int, pos: int, j: int) -> float:
    """The specification in plain Python integers: SplitMix64 streams keyed by (seed, row, position)."""
    m, g = 2**64 - 1, 0x9E3779B97F4A7C15

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    h = mix(mix(mix((seed + g) & m) ^ row) ^ pos)
    return (mix((h + (j + 1) * g) & m) >> 11) / 2**53


def test_uniform_hash_is_the_specified_one_and_pinned() -> None:
    """The draws are part of the stored data: changing the hash changes every sampled target ever written."""
    got = uniforms(1234, [0, 7], [0, 255], 2)
    assert got.tolist() == [[[_reference_uniform(1234, r, p, j) for j in range(2)] for p in (0, 255)] for r in (0, 7)]
    assert got[0, 0].tolist() == [0.14239663560635352, 0.34496954656830003]
    assert got[1, 1].tolist() == [0.14538175747370552, 0.5827282382431368]
