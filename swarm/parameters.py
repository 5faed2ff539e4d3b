"""Which tensors a pretrain swarm trains, and in what order: the one definition both sides use.

The worker hands these to ``hivemind.Optimizer``; the coordinator's checkpointer maps the tensors it
downloads from the swarm back to names with the same function, so the two can never disagree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def swarm_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The tensors the swarm trains and averages, in the order hivemind sees them.

    Trainable parameters in ``named_parameters()`` order, tied weights once (T5's shared embedding and LM head).
    The checkpointer maps downloaded tensors back to names with this same function, so keep it the one place
    that decides.
    """
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]
