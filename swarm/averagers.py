"""The averagers of a pretrain run: the prefixes peers and the checkpointer meet under, and DiLoCo's
pseudo-gradient all-reduce.

Every hivemind averager serves its RPCs as ``{prefix}::{ClassName}.rpc_...`` and finds its groups and state
donors under DHT keys that start with ``prefix``; peers of a run interoperate only if they agree on both.

=====================================  ==========================================================================
prefix                                 who
=====================================  ==========================================================================
:func:`state_prefix` ``(run_id)``      the ``TrainingStateAverager`` every peer serves its state from (synchronous:
                                       parameters and optimizer state; DiLoCo: outer parameters and momentum);
                                       late joiners and the coordinator's checkpointer download from it
:func:`pseudo_grad_prefix` ``(run_id)``  DiLoCo's :class:`PseudoGradientAverager`, one all-reduce per outer epoch,
                                       its group key naming the epoch (:func:`epoch_group_bits`)
=====================================  ==========================================================================

(The synchronous mode's gradient averager is hivemind's own, under ``{run_id}_grad_averager``.)
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
from collections.abc import Sequence

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import StepControl
from hivemind.compression import CompressionInfo, TensorRole

from coldswarm.swarm.guarded_averagers import GuardedAveragerMixin

__all__ = [
    "EPOCH_KEY_BITS",
    "PseudoGradientAverager",
    "epoch_group_bits",
    "pseudo_grad_prefix",
    "state_prefix",
]

#: bits of the outer epoch in each sync's matchmaking key (peers at different epochs never meet)
EPOCH_KEY_BITS = 16


def epoch_group_bits(epoch: int) -> str:
    """The hivemind group bits under which peers look for the all-reduce of outer epoch ``epoch``."""
    return format(epoch % 2**EPOCH_KEY_BITS, f"0{EPOCH_KEY_BITS}b")


def pseudo_grad_prefix(run_id: str) -> str:
    """The hivemind prefix (DHT keys and RPC namespace) of a DiLoCo run's pseudo-gradient all-reduce."""
    return f"{run_id}_pseudo_grad_averager"


def state_prefix(run_id: str) -> str:
    """The prefix under which peers serve the run's state (``hivemind.Optimizer``'s own naming, which the
    DiLoCo trainer keeps); the checkpointer downloads from it."""
    return f"{run_id}_state_averager"


class PseudoGradientAverager(GuardedAveragerMixin, DecentralizedAverager):
    """A hivemind averager for DiLoCo pseudo-gradients; one :meth:`schedule_sync` per outer epoch. Guarded like
    the synchronous swarm's averagers (``guard=AveragerGuard(...)``: admitted callers and group members only,
    finite parts, the round's robust aggregator, screened results); ``AveragerGuard(aggregation=
    RobustAggregation(aggregator="mean"))`` is the open, plain-mean averager of a benchmark's baseline.

    Its tensors are averaged in place (the uniform mean of the peers' pseudo-gradients, the paper's rule) and
    never served to downloaders (``allow_state_sharing=False``).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], dht, *, prefix: str, **kwargs):
        infos = [
            CompressionInfo.from_tensor(t, key=i, role=TensorRole.GRADIENT) for i, t in enumerate(tensors)
        ]
        # Set by the averager's process when an all-reduce left part of the tensors un-averaged. hivemind then
        # keeps the local values of the parts a reducer failed to return (and logs "received N% results"), or
        # retries after a failure half-way through the in-place update; either way this peer's "average"
        # differs from the others'. Shared memory, so it must exist before the process forks.
        self._incomplete = mp.Value(ctypes.c_bool, False)
        super().__init__(
            averaged_tensors=tensors,
            dht=dht,
            prefix=prefix,
            tensor_infos=infos,
            allow_state_sharing=False,
            **kwargs,
        )

    def trigger(self, control: StepControl) -> None:
        """Let the all-reduce of ``control`` run (the tensors hold this peer's pseudo-gradient)."""
        self._incomplete.value = False
        control.allow_allreduce()

    @property
    def last_sync_incomplete(self) -> bool:
        """Whether the last triggered all-reduce left some of this peer's tensors un-averaged."""
        return bool(self._incomplete.value)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        try:
            await super()._run_allreduce_inplace_(tensors, group_info, group_id=group_id, **kwargs)
        except BaseException:
            self._incomplete.value = True  # some parts may already be averaged in place
            raise
        runner = self._running_groups[group_id].result()
        if runner.tensor_part_container.failed_size:
            self._incomplete.value = True

    def schedule_sync(self, epoch: int, scheduled_time: float, timeout: float) -> StepControl:
        """Start matchmaking for the all-reduce of ``epoch`` (its group key and gathered data name it); call
        ``allow_allreduce()`` on the returned control once the tensors hold the pseudo-gradient."""
        self.set_group_bits(epoch_group_bits(epoch))
        return self.step(
            gather=int(epoch),
            scheduled_time=scheduled_time,
            timeout=timeout,
            require_trigger=True,
            wait=False,
        )
