"""DiLoCo's outer loop as tensor math: pseudo-gradients, the outer Nesterov step, and moving a peer onto a
new outer point while it keeps the local progress it has not synchronised yet.

DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language Models",
https://arxiv.org/abs/2311.08105): every peer starts a period from the shared outer parameters ``theta``,
takes ``H`` inner optimizer steps (AdamW) on its own data, and sends only its *pseudo-gradient*

    delta_i = anchor_i - x_i          (the parameters at the last sync minus the parameters now)

The peers all-reduce the pseudo-gradients to their mean and apply it with an outer SGD step with Nesterov
momentum (torch's ``SGD(nesterov=True)``: ``buf = mu * buf + g``; ``theta -= lr * (g + mu * buf)``; the
paper's defaults are ``lr = 0.7``, ``mu = 0.9``, ``H = 500``). A first outer step from a zero momentum buffer
therefore moves ``theta`` by ``-lr * (1 + mu) * mean(delta)``.

Overlapping the sync with the next period (what :mod:`coldswarm.worker.diloco` does by default) means the
averaged update arrives while the peer has already moved on. The peer then *rebases*: it shifts its
parameters by exactly what the outer step moved the point it had sent from,

    x <- x + (theta_new - sent_from)          anchor <- theta_new

so the progress made since the sync (``x - sent_from``) is kept on top of the swarm's new point and counted
in the next pseudo-gradient (``anchor - x`` is unchanged by the shift). The same rule moves a peer that
downloads the outer state (a late joiner, or one that missed a sync) while keeping what it has not
synchronised yet: ``x <- x + (theta_downloaded - anchor)``.

These functions work in place on lists of tensors in the same order (:func:`coldswarm.swarm.parameters.swarm_parameters`);
``params`` may live on an accelerator, everything else is fp32 on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["outer_optimizer_factory", "pseudo_gradient_", "rebase_"]


def outer_optimizer_factory(lr: float, momentum: float) -> Callable[..., torch.optim.Optimizer]:
    """The outer optimizer DiLoCo uses: SGD with Nesterov momentum (plain SGD when ``momentum`` is 0)."""
    if lr <= 0 or not 0 <= momentum < 1:
        raise ValueError(f"outer lr must be > 0 and momentum in [0, 1), got lr={lr}, momentum={momentum}")
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)


@torch.no_grad()
def pseudo_gradient_(
    out: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> None:
    """``out = anchor - params``: the change since the last sync, with the sign of a gradient."""
    for o, a, p in zip(out, anchor, params, strict=True):
        torch.sub(a, p.detach().to(device=a.device, dtype=a.dtype), out=o)


@torch.no_grad()
def rebase_(
    params: Sequence[torch.Tensor], old_base: Sequence[torch.Tensor], new_base: Sequence[torch.Tensor]
) -> None:
    """``params = new_base + (params - old_base)``: move onto a new outer point, keeping the progress made from
    the old one (computed in this order, a peer with no progress lands exactly on ``new_base``)."""
    for p, old, new in zip(params, old_base, new_base, strict=True):
        p.sub_(old.to(device=p.device, dtype=p.dtype)).add_(new.to(device=p.device, dtype=p.dtype))
