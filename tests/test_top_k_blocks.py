"""`targets.top_k`'s block pre-selection gives the same bits as the plain path: values and indices, ties included.

The reference is `top_k` as it was before the pre-selection (torch.topk of k + 1 over the whole row, a stable full sort
where a tie crosses the cut), kept here verbatim.
"""

from __future__ import annotations

import pytest
import torch

from kdstore import targets


def reference_top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    c = x.shape[1]
    v, idx = torch.topk(x, min(k + 1, c), dim=1)
    if k < c:
        crossing = torch.nonzero(v[:, k] == v[:, k - 1]).flatten()
        v, idx = v[:, :k], idx[:, :k]
        if len(crossing):
            idx = idx.clone()
            idx[crossing] = torch.sort(x[crossing], dim=1, descending=True, stable=True).indices[:, :k]
    idx = torch.sort(idx, dim=1).values
    vals = torch.gather(x, 1, idx)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return torch.gather(vals, 1, order), torch.gather(idx, 1, order)


def logits(kind: str, n: int, c: int, seed: int) -> torch.Tensor:
    """Rows of one kind: continuous, many ties (a coarse grid), all-equal runs, -inf padding, or special values."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 3
    if kind == "grid":  # ties among the largest values, some crossing the cut, some not
        z = torch.round(z * 4) / 4
    elif kind == "few":  # 6 distinct values: ties everywhere, every block maximum the same
        z = torch.randint(0, 6, (n, c), generator=g).float()
    elif kind == "padded":  # the last classes -inf (a padded vocabulary), some rows nearly all -inf
        z[:, c - c // 3:] = float("-inf")
        z[: n // 2, 5:] = float("-inf")
    elif kind == "special":  # NaN, +inf, -0.0 / 0.0 and all -inf rows
        z[0, c // 2] = float("nan")
        z[1, [3, c - 1]] = float("inf")
        z[2] = 0.0
        z[2, ::7] = -0.0
        z[3] = float("-inf")
        z[4, c - 1] = float("nan")
    return z


def assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(got[1], want[1])  # indices, in order
    # values: bit for bit (NaN rows included)
    assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32))


@pytest.mark.parametrize("kind", ["normal", "grid", "few", "padded", "special"])
@pytest.mark.parametrize(("c", "k"), [(4096, 1), (4096, 2), (4100, 7), (4097, 63), (50257, 64), (49152, 64),
                                      (49153, 100), (151936, 64), (200_000, 1024)])
def test_block_preselection_is_the_plain_top_k(kind: str, c: int, k: int) -> None:
    n = max(6, min(40, (1 << 22) // c))
    x = logits(kind, n, c, seed=c + k)
    want = reference_top_k(x, k)
    assert_same(targets.top_k(x, k), want)
    for size in (16, 64, 100):  # the pre-selection itself, forced, with other block sizes (a short last block)
        if (k + 1) * size <= c:
            got = targets._select_by_blocks(x, k, size)
            assert torch.equal(torch.sort(got, 1).values, torch.sort(want[1], 1).values)


def test_ties_at_the_chosen_blocks_boundary() -> None:
    """Ties that cross the cut and reach outside the chosen blocks: the k-th, (k+1)-th, the (k+1)-th block maximum
    and values in unchosen blocks all equal. The lower class indices must win, as in the plain path."""
    k, size, c = 4, 64, 64 * 40 + 13
    x = torch.full((3, c), -5.0)
    x[0, [100, 700, 1500, 2000, 2500, c - 1]] = 1.0  # six maxima, in six blocks, for k + 1 = 5 blocks
    x[1, [10, 11]] = 2.0
    x[1, 64 * torch.arange(3, 40)] = 1.0  # a tie across 37 blocks below two clear winners
    x[2, c - 13:] = 3.0  # the short last block alone holds the top values (13 equal)
    want = reference_top_k(x, k)
    assert_same(targets.top_k(x, k), want)
    assert torch.equal(torch.sort(targets._select_by_blocks(x, k, size), 1).values, torch.sort(want[1], 1).values)
    assert want[1][0].tolist() == [100, 700, 1500, 2000] and want[1][1].tolist() == [10, 11, 192, 256]


def test_the_preselection_runs_where_it_pays() -> None:
    """top_k takes the block path for k + 1 blocks of 64 up to an eighth of the row, and gives the same bits."""
    calls = []
    real = targets._select_by_blocks

    def spy(x: torch.Tensor, k: int, size: int = targets.TOPK_BLOCK) -> torch.Tensor:
        calls.append(k)
        return real(x, k, size)

    mp = pytest.MonkeyPatch()
    mp.setattr(targets, "_select_by_blocks", spy)
    try:
        x = logits("grid", 8, 49152, 0)
        for k in (1, 64, 95, 96, 1024):
            assert_same(targets.top_k(x, k), reference_top_k(x, k))
    finally:
        mp.undo()
    assert calls == [1, 64, 95]
