"""The robust all-reduce's pieces against closed forms: CenteredClip, the reducer's refusals, the sender's screen."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from hivemind.averaging.partition import BannedException

from coldswarm.swarm.robust import (
    AGGREGATORS,
    GuardedPartReducer,
    RefusedPart,
    RobustAggregation,
    ScreenedPartContainer,
    centered_clip,
    weighted_mean,
)

CONFIG = RobustAggregation()


def test_registry_names_the_papers():
    assert set(AGGREGATORS) == {"centered_clip", "mean"}
    assert "2012.10333" in AGGREGATORS["centered_clip"].source  # Karimireddy et al. 2021
    assert "2106.11257" in AGGREGATORS["centered_clip"].source  # Gorbunov et al. 2022
    with pytest.raises(ValueError, match="unknown aggregator"):
        RobustAggregation(aggregator="median-of-means")


def test_mean_is_hivemind_weighted_mean():
    parts = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    weights = torch.tensor([1.0, 3.0])
    assert torch.allclose(weighted_mean(parts, weights, CONFIG), torch.tensor([2.5, 5.0]))
    assert torch.equal(weighted_mean(parts, torch.zeros(2), CONFIG), torch.zeros(2))


def test_centered_clip_bounds_one_outlier_by_the_groups_spread():
    gen = torch.Generator().manual_seed(0)
    honest = torch.randn(4, 1000, generator=gen)
    outlier = 1e4 * torch.randn(1, 1000, generator=gen)
    parts = torch.cat([honest, outlier])
    weights = torch.ones(5)
    result = centered_clip(parts, weights, CONFIG)
    honest_mean = honest.mean(dim=0)
    spread = (honest - honest_mean).norm(dim=1).median()
    # One of five senders pulls the result at most about tau (the median distance) / 5 per iteration's share.
    assert (result - honest_mean).norm() < spread
    assert (weighted_mean(parts, weights, CONFIG) - honest_mean).norm() > 100 * spread  # the mean is lost
    # A huge claimed weight counts at most max_weight_ratio times the median.
    heavy = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e9])
    assert (centered_clip(parts, heavy, CONFIG) - honest_mean).norm() < 2 * spread


def test_centered_clip_on_agreeing_or_two_senders():
    same = torch.ones(3, 10)
    assert torch.equal(centered_clip(same, torch.ones(3), CONFIG), torch.ones(10))
    # Two honest identical parts and an outlier: the median is theirs, so is the result.
    parts = torch.stack([torch.ones(10), torch.ones(10), torch.full((10,), 1e6)])
    assert torch.allclose(centered_clip(parts, torch.ones(3), CONFIG), torch.ones(10))
    # Two senders: nobody can tell who is right; CenteredClip is then the mean.
    two = torch.stack([torch.zeros(10), torch.full((10,), 2.0)])
    assert torch.allclose(centered_clip(two, torch.ones(2), CONFIG), torch.ones(10))
    # Zero-weight senders (hivemind's tag-along peers) neither count nor move the start.
    zero = torch.stack([torch.ones(10), torch.ones(10), torch.full((10,), 1e6)])
    assert torch.allclose(centered_clip(zero, torch.tensor([1.0, 1.0, 0.0]), CONFIG), torch.ones(10))


def _run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_reducer_refuses_parts_that_are_not_finite_or_misshapen_or_overweight():
    async def scenario():
        reducer = GuardedPartReducer([torch.Size([4])], num_senders=3, config=CONFIG)
        for bad, weight in [
            (torch.tensor([1.0, math.nan, 0.0, 0.0]), 1.0),
            (torch.tensor([1.0, math.inf, 0.0, 0.0]), 1.0),
            (torch.zeros(5), 1.0),
            (torch.zeros(4), math.nan),
            (torch.zeros(4), -1.0),
            (torch.zeros(4), 1e13),
        ]:
            with pytest.raises(RefusedPart):
                await reducer.accumulate_part(2, 0, bad, weight=weight)
        reducer.on_sender_failed(2)  # what hivemind's runner does with a refused sender: ban it
        results = await asyncio.gather(
            reducer.accumulate_part(0, 0, torch.ones(4), weight=1.0),
            reducer.accumulate_part(1, 0, torch.full((4,), 3.0), weight=1.0),
        )
        with pytest.raises(BannedException):
            await reducer.accumulate_part(2, 0, torch.zeros(4), weight=1.0)
        return results

    results = _run(scenario())
    for result in results:  # the banned sender is out; the two others are averaged
        assert torch.allclose(result, torch.full((4,), 2.0))


def _container(deltas: dict[int, torch.Tensor], refused: list) -> ScreenedPartContainer:
    """A 3-peer container whose own index is 0, holding ``deltas`` as each reducer's returned result (three
    tensors of 100 values: one part each, one slice per peer)."""
    local = [torch.ones(100) for _ in range(3)]
    container = ScreenedPartContainer(
        local, (1.0, 1.0, 1.0), own_index=0, config=CONFIG, on_refused=lambda i, why: refused.append((i, why))
    )
    for peer, delta in deltas.items():
        container.register_processed_part(peer, 0, delta)
    return container


def test_sender_screens_reducers_results_against_the_median_move():
    refused = []
    own = torch.full((100,), 0.1)  # our robust reduction moved our slice by 10%
    honest = torch.full((100,), -0.3)  # another reducer's: 30%; the median of the three moves
    hostile = torch.full((100,), 3000.0)  # a plain mean with a x1e4 part in it
    container = _container({0: own, 1: honest, 2: hostile}, refused)
    container.screen_results()
    assert [peer for peer, _ in refused] == [2]
    assert torch.equal(container._output_parts_by_peer[1][0], honest)
    assert torch.equal(container._output_parts_by_peer[2][0], torch.zeros(100))  # keeps our own values
    assert container.failed_size == 100
    container.finished.set()  # no all-reduce ran: keep its finalizer quiet

    refused.clear()
    nan = torch.full((100,), math.nan)
    container = _container({0: own, 1: nan, 2: honest}, refused)
    container.screen_results()
    assert [peer for peer, _ in refused] == [1] and "not finite" in refused[0][1]
    container.finished.set()


def test_a_slice_where_the_peers_drifted_apart_is_not_mistaken_for_an_attack():
    """The peers agree on our own slice (our reduction barely moved it) but drifted apart on an honest
    reducer's slice; an attacker's average sits 8.6x beyond that: the honest one is applied, the attacker's
    refused (the earlier yardstick, 16x our own slice's move, refused both: these are a logged run's moves)."""
    refused = []
    own = torch.full((100,), 0.0002)
    honest = torch.full((100,), 0.00777)
    hostile = torch.full((100,), 0.0667)
    container = _container({0: own, 1: honest, 2: hostile}, refused)
    container.screen_results()
    assert [peer for peer, _ in refused] == [2], refused
    assert "allowed 0.0622" in refused[0][1]
    assert torch.equal(container._output_parts_by_peer[1][0], honest)
    container.finished.set()


def test_moves_within_the_floor_are_always_applied():
    """Lossy codecs move every slice a little: below ``result_floor`` nothing is refused."""
    refused = []
    container = _container(
        {0: torch.zeros(100), 1: torch.full((100,), 1e-5), 2: torch.full((100,), 9e-4)}, refused
    )
    container.screen_results()
    assert refused == []
    container.finished.set()
