"""The sorting network behind median and trimmed_mean, against sorting (0-1 principle and random rows)."""

from __future__ import annotations

import itertools

import pytest
import torch

from coldswarm.fusion import sortnet
from coldswarm.fusion.methods import METHODS, TensorInputs, TrimmedMeanConfig


@pytest.mark.parametrize("n", range(1, 11))
def test_network_sorts_every_zero_one_input(n):
    """A comparator network sorts every input iff it sorts every 0/1 input (Knuth's 0-1 principle)."""
    cols = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n))).T.contiguous()  # (n, 2^n)
    rows = sortnet.sort_rows(list(cols.clone()), sortnet.network(n), torch.empty(cols.shape[1]))
    torch.testing.assert_close(torch.stack(rows), cols.sort(dim=0).values)


@pytest.mark.parametrize("n", [3, 8, 13, 16, 32])
def test_pruned_networks_give_the_wanted_positions(n):
    g = torch.Generator().manual_seed(n)
    data = torch.randn(n, 500, generator=g)
    want = data.sort(dim=0).values
    for positions in [(n // 2,), (n // 2 - 1, n // 2), tuple(range(1, n - 1))]:
        rows = sortnet.sort_rows(list(data.clone()), sortnet.network_for(n, positions), torch.empty(500))
        for p in positions:
            torch.testing.assert_close(rows[p], want[p])
    assert len(sortnet.network_for(n, (n // 2,))) <= len(sortnet.network(n))


@pytest.mark.parametrize("n", [1, 2, 5, 8, 33])  # 33: above MAX_ROWS, torch.sort
def test_median_and_trimmed_mean_equal_sorting(n):
    g = torch.Generator().manual_seed(n)
    thetas = [torch.randn(7, 9, generator=g) for _ in range(n)]
    x = TensorInputs("t", torch.zeros(7, 9), thetas, torch.full((n,), 1.0 / n))
    s = torch.stack(thetas).sort(dim=0).values
    want = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    torch.testing.assert_close(METHODS["median"](x), want)
    k = int(0.2 * n)
    torch.testing.assert_close(METHODS["trimmed_mean"](x, TrimmedMeanConfig(trim=0.2)), s[k : n - k].mean(0))
