"""The optimizer and learning-rate schedule a pretrain swarm steps with, built from :class:`SwarmConfig`.

``hivemind.Optimizer`` takes factories (it builds the optimizer itself, over its own copy of the
parameters): :func:`optimizer_factory` and :func:`scheduler_factory` make them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from coldswarm.worker.swarm import SwarmConfig


def optimizer_factory(config: SwarmConfig) -> Callable:
    """``params -> optimizer`` as ``config.optimizer`` names it, clipping the averaged gradient when
    ``config.max_grad_norm`` is set."""
    name = config.optimizer.lower()
    if name == "adamw":
        cls, kwargs = (
            torch.optim.AdamW,
            dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay),
        )
    elif name == "adam":
        cls, kwargs = torch.optim.Adam, dict(lr=config.lr, betas=config.betas)
    elif name == "sgd":
        cls, kwargs = torch.optim.SGD, dict(lr=config.lr, momentum=config.momentum)
    elif name == "adafactor":
        from transformers.optimization import Adafactor

        cls, kwargs = Adafactor, dict(lr=config.lr, scale_parameter=False, relative_step=False)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}: adamw | adam | sgd | adafactor")

    max_norm = config.max_grad_norm
    if max_norm:
        # Clip inside the wrapped optimizer's step: hivemind calls it with the *averaged* gradients, which is
        # what clipping should see (clipping each peer's local micro-batches would not be equivalent).
        base = cls

        class _Clipped(base):  # type: ignore[misc, valid-type]
            def step(self, closure=None):
                params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, max_norm)
                return super().step(closure)

        cls = _Clipped
    return lambda params: cls(params, **kwargs)


def scheduler_factory(config: SwarmConfig) -> Callable | None:
    """``optimizer -> LambdaLR`` with ``config.warmup_epochs`` of linear warm-up, or None without warm-up."""
    if config.warmup_epochs <= 0:
        return None
    warmup = config.warmup_epochs
    # hivemind steps the scheduler once per *global* epoch (and catches it up for late joiners).
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda epoch: min(1.0, (epoch + 1) / (warmup + 1))
    )
