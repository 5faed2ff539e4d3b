"""How a pretrain swarm trains together: the ``algorithm`` round option, one entry per way.

============  ==================================================================================  =================
name          what                                                                                source
============  ==================================================================================  =================
``sync``      ``hivemind.Optimizer``: accumulate to ``target_batch_size`` across the swarm,         Diskin et al. 2021,
              all-reduce the gradients (8-bit), one optimizer step on every peer, parameters       arXiv:2106.10207
              averaged (fp16) every epoch; equivalent to one large batch (the default)
``diloco``    DiLoCo: ``inner_steps`` local AdamW steps per peer, then an all-reduce of the        Douillard et al.
              pseudo-gradients and an outer Nesterov SGD step; ~``inner_steps`` x less traffic,    2023,
              sync overlapped with the next inner steps (:mod:`coldswarm.worker.diloco`)            arXiv:2311.08105
============  ==================================================================================  =================

Standard library only, so that the names can be checked without importing torch or hivemind; the trainer
class is imported when a trainer is made.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["ALGORITHMS", "Algorithm", "make_trainer"]


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str
    source: str
    trainer: str  # "module:Class", a SwarmTrainer (sub)class


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm(
            "sync",
            "synchronous data parallelism: gradient all-reduce every target_batch_size samples",
            "https://arxiv.org/abs/2106.10207",
            "coldswarm.worker.swarm:SwarmTrainer",
        ),
        Algorithm(
            "diloco",
            "DiLoCo: inner_steps local steps, then a pseudo-gradient all-reduce and an outer Nesterov step",
            "https://arxiv.org/abs/2311.08105",
            "coldswarm.worker.diloco:DiLoCoTrainer",
        ),
    )
}


def make_trainer(model, config, **kwargs):
    """The trainer of ``config.algorithm`` for ``model`` (kwargs as :class:`SwarmTrainer` takes them)."""
    module, _, name = ALGORITHMS[config.algorithm].trainer.partition(":")
    return getattr(importlib.import_module(module), name)(model, config, **kwargs)
