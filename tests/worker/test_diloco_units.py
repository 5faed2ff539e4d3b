"""DiLoCo's pieces without a swarm: the outer math against closed forms, and the round options."""

from __future__ import annotations

import pytest
import torch

from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.swarm.averagers import epoch_group_bits
from coldswarm.worker.algorithms import ALGORITHMS
from coldswarm.worker.outer_optimizer import outer_optimizer_factory, pseudo_gradient_, rebase_
from coldswarm.worker.swarm import SwarmConfig


def test_outer_nesterov_steps_match_the_closed_form():
    torch.manual_seed(0)
    theta = [torch.randn(5, 3), torch.randn(7)]
    g1, g2 = [torch.randn_like(t) for t in theta], [torch.randn_like(t) for t in theta]
    params = [t.clone().requires_grad_(True) for t in theta]
    opt = outer_optimizer_factory(0.7, 0.9)(params)
    for grads in (g1, g2):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for t, p, a, b in zip(theta, params, g1, g2, strict=True):
        # buf1 = g1, step1 = g1 + 0.9 g1; buf2 = 0.9 g1 + g2, step2 = g2 + 0.9 buf2
        expected = t - 0.7 * (a + 0.9 * a) - 0.7 * (b + 0.9 * (0.9 * a + b))
        torch.testing.assert_close(p.detach(), expected)


def test_pseudo_gradient_and_rebase_keep_the_unsynchronised_progress():
    anchor = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    x = [torch.tensor([0.5, 2.5]), torch.tensor([[1.5]])]
    delta = [torch.empty_like(a) for a in anchor]
    pseudo_gradient_(delta, anchor, x)
    assert [d.tolist() for d in delta] == [[0.5, -0.5], [[-1.0]]]
    # Rebase onto a new outer point: the progress since `anchor` is kept on top of it.
    new = [torch.tensor([0.0, 0.0]), torch.tensor([[0.0]])]
    rebase_(x, anchor, new)
    assert [t.tolist() for t in x] == [[-0.5, 0.5], [[1.0]]]
    pseudo_gradient_(delta, new, x)  # the next pseudo-gradient still holds that progress
    assert [d.tolist() for d in delta] == [[0.5, -0.5], [[-1.0]]]
    # With no progress, a peer lands exactly on the new point.
    same = [t.clone() for t in anchor]
    rebase_(same, anchor, [t * 3 for t in anchor])
    assert all(torch.equal(s, t * 3) for s, t in zip(same, anchor, strict=True))


def test_epoch_group_bits_name_the_epoch():
    assert epoch_group_bits(0) == "0" * 16 and epoch_group_bits(5) == "0" * 13 + "101"
    assert len({epoch_group_bits(e) for e in range(1000)}) == 1000


def test_round_options_choose_diloco_and_bad_ones_are_refused():
    task = pb.PretrainTask(run_id="r", target_batch_size=64, epochs=3)
    config = SwarmConfig.from_task(task, {"algorithm": "diloco", "inner_steps": 100, "outer_lr": 0.5})
    assert (config.algorithm, config.inner_steps, config.outer_lr, config.outer_momentum) == (
        "diloco",
        100,
        0.5,
        0.9,
    )
    assert config.overlap and SwarmConfig(run_id="r").algorithm == "sync"
    assert set(ALGORITHMS) == {"sync", "diloco"}
    with pytest.raises(ValueError, match="unknown algorithm"):
        SwarmConfig.from_task(task, {"algorithm": "local-sgd"})
    with pytest.raises(ValueError, match="inner_steps"):
        SwarmConfig.from_task(task, {"algorithm": "diloco", "inner_steps": 0})
    with pytest.raises(ValueError, match="outer_momentum"):
        SwarmConfig.from_task(task, {"algorithm": "diloco", "outer_momentum": 1.0})
    with pytest.raises(ValueError, match="unknown pretrain hyperparameter"):
        SwarmConfig.from_task(task, {"algorithm": "diloco", "inner_stepz": 5})
