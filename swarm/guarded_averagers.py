"""hivemind's averagers, guarded: admitted callers only, robust all-reduce, checked state downloads.

:class:`GuardedAveragerMixin` goes in front of any ``hivemind.averaging.DecentralizedAverager`` subclass and
takes one more keyword argument, ``guard=``:class:`AveragerGuard`. It changes four things, in the averager's
own process:

* **who may call it.** ``rpc_join_group``, ``rpc_aggregate_part`` and ``rpc_download_state`` serve only a
  caller whose peer id (``context.remote_id``, authenticated by libp2p) holds a credential for the run
  (:class:`~coldswarm.swarm.admission.AdmittedPeers`); others get ``PROTOCOL_VIOLATION`` or no state. A group
  whose leader lists a peer without a credential is left before anything is sent to it.
* **how it reduces.** The all-reduce is :class:`~coldswarm.swarm.robust.GuardedAllReduceRunner`: received
  parts that are not finite are refused and their sender excluded, the rest aggregated robustly, other
  reducers' averages screened; reducers are chosen evenly. A peer whose own tensors are not finite does not
  take part.
* **what state it accepts.** ``load_state_from_peers`` downloads only from admitted peers, and refuses a state
  that is not finite, too large, or (with ``max_state_jump``) whose leading tensors moved further from this
  averager's own than that (relative L2); it then asks the next peer.
* **its wire names.** hivemind names RPCs after the servicer's class; a guarded class keeps its hivemind base's
  (``_wire_name``), so guarded and stock peers of the same run still talk to each other.

Refusals are counted (:meth:`GuardedAveragerMixin.guard_stats`) and the latest reasons kept
(:meth:`GuardedAveragerMixin.refusals`), readable from the host process.

Ready-made: :class:`GuardedGradientAverager`, :class:`GuardedTrainingStateAverager` (``hivemind.Optimizer``'s
two averagers) and :class:`GuardedStateDownloader` (the checkpointer's). A new averager (DiLoCo's
pseudo-gradient all-reduce) is ``class PseudoGradientAverager(GuardedAveragerMixin, DecentralizedAverager)``.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import multiprocessing as mp
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

# hivemind tells streaming RPCs by typing.AsyncIterator's _name (collections.abc's has none)
from typing import AsyncIterator, ClassVar  # noqa: UP035

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AveragingMode
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.compression import CompressionInfo, TensorRole, deserialize_torch_tensor
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager, dump_optimizer_state
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import aiter_with_timeout, as_aiter, azip, enter_asynchronously
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from coldswarm.swarm.admission import AdmittedPeers
from coldswarm.swarm.robust import GuardedAllReduceRunner, RobustAggregation

log = logging.getLogger(__name__)

__all__ = [
    "AveragerGuard",
    "GuardedAveragerMixin",
    "GuardedGradientAverager",
    "GuardedStateDownloader",
    "GuardedTrainingStateAverager",
    "relative_jump",
]

#: refusal counters, in this order (guard_stats' keys)
_COUNTERS = ("callers", "parts", "results", "states")
#: a downloaded state is refused past this many bytes per value of this averager's own tensors
_MAX_STATE_BYTES_PER_VALUE = 64


@dataclass
class AveragerGuard:
    """What a guarded averager checks."""

    admitted: AdmittedPeers | None = field(
        default=None, metadata={"help": "who may call and be called; None: anyone (an open swarm)"}
    )
    aggregation: RobustAggregation = field(default_factory=RobustAggregation)
    max_state_jump: float | None = field(
        default=None,
        metadata={
            "help": "refuse a downloaded state whose leading tensors moved more than this (relative L2) from "
            "this averager's own; None: finiteness only"
        },
    )


def relative_jump(new: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """``||new - reference|| / ||reference||`` over the tensors taken together (L2; inf if shapes differ)."""
    moved = total = 0.0
    for a, b in zip(new, reference, strict=True):
        if tuple(a.shape) != tuple(b.shape):
            return float("inf")
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        moved += float((a - b).square().sum())
        total += float(b.square().sum())
    return (moved**0.5) / max(total**0.5, 1e-30)


class GuardedAveragerMixin:
    """Put in front of a ``DecentralizedAverager`` subclass; takes ``guard=AveragerGuard(...)``."""

    #: the hivemind class whose RPC names this one answers to (hivemind names RPCs after the class)
    _wire_name: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        # hivemind's ServicerBase caches a class's RPC handlers and stub type in class attributes and tests
        # them with `cls._rpc_handlers is not None`, which an inherited value passes. Once any process-wide
        # code has built DecentralizedAverager's stub (e.g. `DecentralizedAverager.get_stub(...)`), a subclass
        # without its own would call "...::DecentralizedAverager.rpc_download_state", which peers do not serve
        # (every state download then failed). Each guarded class builds its own, with its `_wire_name`.
        super().__init_subclass__(**kwargs)
        cls._rpc_handlers = None
        cls._stub_type = None

    def __init__(self, *args, guard: AveragerGuard, **kwargs):
        # Set before hivemind's __init__ forks the averager's process (start=True), which inherits them.
        self._guard = guard
        self._guard_counts = mp.Array(ctypes.c_longlong, len(_COUNTERS))
        self._refusal_log: collections.deque[str] = collections.deque(maxlen=16)
        self._logged_callers: dict[PeerID, float] = {}
        super().__init__(*args, **kwargs)

    @classmethod
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        handle_name = f"{cls._wire_name or cls.__name__}.{method_name}"
        return f"{namespace}::{handle_name}" if namespace is not None else handle_name

    # -- counters, readable from the host -------------------------------------------------------------------

    def _refused(self, counter: str, reason: str) -> None:
        with self._guard_counts.get_lock():
            self._guard_counts[_COUNTERS.index(counter)] += 1
        self._refusal_log.append(reason)

    def guard_stats(self) -> dict[str, int]:
        """How many callers, received parts, reducers' results and downloaded states were refused so far."""
        return dict(zip(_COUNTERS, self._guard_counts[:], strict=True))

    def refusals(self, timeout: float = 10.0) -> list[str]:
        """The latest refusal reasons (from the averager's process)."""
        future = MPFuture()
        self._outer_pipe.send(("_get_refusals", [], dict(future=future)))
        return future.result(timeout=timeout)

    async def _get_refusals(self, future: MPFuture) -> None:
        future.set_result(list(self._refusal_log))

    # -- who may call ---------------------------------------------------------------------------------------

    async def _admit(self, peer_id: PeerID, what: str) -> bool:
        admitted = self._guard.admitted
        if admitted is None or await admitted.is_admitted(peer_id, self.dht):
            return True
        self._refused("callers", f"{peer_id} may not {what}: no credential for run {admitted.run_id}")
        now = time.monotonic()
        if now - self._logged_callers.get(peer_id, -1e9) > 60:  # an outsider knocking must not flood the log
            self._logged_callers[peer_id] = now
            log.warning(
                "refused %s's request to %s: it holds no credential for run %s",
                peer_id,
                what,
                admitted.run_id,
            )
        return False

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if not await self._admit(context.remote_id, "join a group"):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if not await self._admit(context.remote_id, "send an all-reduce part"):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if not await self._admit(context.remote_id, "download state"):
            return  # as hivemind denies a download: no message, the caller asks the next peer
        async for message in super().rpc_download_state(request, context):
            yield message

    # -- the all-reduce -------------------------------------------------------------------------------------

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        try:
            gathered = [self.serializer.loads(item) for item in group_info.gathered]
            if len(gathered) != len(group_info.peer_ids) or not all(
                isinstance(item, list | tuple) and len(item) == 3 for item in gathered
            ):
                raise AllreduceException("the leader's group description is malformed")
            _bandwidths, mode_ids, user_gathered_bytes = zip(*gathered, strict=True)
            user_gathered = dict(
                zip(group_info.peer_ids, map(self.serializer.loads, user_gathered_bytes), strict=True)
            )
            modes = tuple(map(AveragingMode, mode_ids))
            admitted = self._guard.admitted
            if admitted is not None:
                for peer in group_info.peer_ids:
                    if peer != self.peer_id and not await admitted.is_admitted(peer, self.dht):
                        self._refused(
                            "callers", f"group member {peer} has no credential for run {admitted.run_id}"
                        )
                        raise AllreduceException(f"group member {peer} holds no credential for this run")
            # Equal slices whatever bandwidth a peer announces (None: hivemind's "not specified"); clients none.
            download_bandwidths = [0.0 if mode == AveragingMode.CLIENT else None for mode in modes]
            peer_fractions = await asyncio.get_event_loop().run_in_executor(
                None, load_balance_peers, self.total_size, download_bandwidths, min_vector_size
            )
            async with enter_asynchronously(self.get_tensors()) as local_tensors:
                if not all(bool(torch.isfinite(t).all()) for t in local_tensors):
                    raise AllreduceException(
                        "this peer's own tensors are not finite: it does not average them"
                    )
                await self._run_allreduce_inplace_(
                    local_tensors, group_info, peer_fractions=peer_fractions, **kwargs
                )
                return user_gathered
        except BaseException as e:
            if isinstance(e, AllreduceException):
                log.warning("%s: %s", type(self).__name__, e)
            elif isinstance(e, Exception):
                log.exception(e)
            raise MatchmakingException(f"Unable to run All-Reduce: {e}") from e

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        runner = GuardedAllReduceRunner(
            config=self._guard.aggregation,
            on_refused=lambda kind, peer, reason: self._refused(
                "parts" if kind == "part" else "results", reason
            ),
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        assert group_id in self._running_groups, (
            f"Group id {group_id} was not registered in _register_allreduce_group"
        )
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")

    # -- state downloads ------------------------------------------------------------------------------------

    def _check_state(self, metadata, tensors: list[torch.Tensor]) -> str | None:
        """Why a downloaded state is refused, or None to accept it."""
        if not isinstance(metadata, dict):
            return "its metadata is not a dictionary"
        for i, tensor in enumerate(tensors):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"tensor {i} is not finite"
        if self._guard.max_state_jump is not None:
            reference = list(self._averaged_tensors)
            if len(tensors) < len(reference):
                return f"it has {len(tensors)} tensors, we average {len(reference)}"
            jump = relative_jump(tensors[: len(reference)], reference)
            if jump > self._guard.max_state_jump:
                return f"its parameters moved {jump:.3g} (relative L2) from ours, over {self._guard.max_state_jump:g}"
        return None

    async def _load_state_from_peers(self, future: MPFuture, timeout: float | None = None):
        # hivemind's, plus: admitted peers only, a byte budget, and _check_state before accepting a state.
        if timeout is not None:
            timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
        try:
            key_manager = self._matchmaking.group_key_manager
            try:
                found = await self.dht.get(
                    f"{key_manager.prefix}.all_averagers", latest=True, return_future=True
                )
            except Exception as exc:  # said in the collector's error, which quotes the latest reasons
                self._refusal_log.append(f"the DHT lookup of state donors failed: {exc!r}"[:300])
                raise
            peer_priority, _ = found or ({}, None)
            if not isinstance(peer_priority, dict):
                peer_priority = {}
            peer_priority = {
                PeerID(peer_id): (float(info.value), random.random())  # using randomness as a tie breaker
                for peer_id, info in peer_priority.items()
                if isinstance(peer_id, bytes)
                and isinstance(info, ValueWithExpiration)
                and isinstance(info.value, float | int)
                and not isinstance(info.value, bool)
            }
            if not peer_priority:
                self._refusal_log.append("no peer offered its state on the DHT")
                log.info("averager could not load state from peers: no peer offers its state")
                future.set_result(None)
                return
            budget = _MAX_STATE_BYTES_PER_VALUE * max(self.total_size, 1) + (1 << 20)
            for peer in sorted(peer_priority, key=peer_priority.get, reverse=True):
                if peer == self.peer_id:
                    continue
                if not await self._admit(peer, "serve its state"):
                    continue
                result = await self._download_state_from(peer, timeout, budget)
                if result is None:
                    continue
                metadata, tensors = result
                reason = self._check_state(metadata, tensors)
                if reason is not None:
                    self._refused("states", f"state of {peer}: {reason}")
                    log.warning("refused the state of %s: %s; asking the next peer", peer, reason)
                    continue
                future.set_result((metadata, tensors))
                return
        finally:
            if not future.done():
                future.set_result(None)

    async def _download_state_from(self, peer: PeerID, timeout, budget: int):
        t0 = time.monotonic()
        log.info("downloading state from peer %s", peer)
        metadata, received = None, 0
        try:
            stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
            stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
            current_tensor_parts, tensors = [], []
            async for message in aiter_with_timeout(stream, timeout=timeout):
                received += message.ByteSize()
                if received > budget:
                    self._refused("states", f"state of {peer}: over {budget} bytes")
                    log.warning("refused the state of %s: it sent over %d bytes", peer, budget)
                    return None
                if message.metadata:
                    metadata = self.serializer.loads(message.metadata)
                if message.tensor_part.dtype and current_tensor_parts:
                    # tensor_part.dtype starts a new tensor: wrap up the previous one
                    tensors.append(deserialize_torch_tensor(combine_from_streaming(current_tensor_parts)))
                    current_tensor_parts = []
                current_tensor_parts.append(message.tensor_part)
            if current_tensor_parts:
                tensors.append(deserialize_torch_tensor(combine_from_streaming(current_tensor_parts)))
            if not metadata:
                log.debug("peer %s did not send its state", peer)
                return None
            log.info("finished downloading state in %.3fs from %s", time.monotonic() - t0, peer)
            return metadata, tensors
        except Exception as e:
            log.warning("failed to download state from %s: %r", peer, e)
            return None


class GuardedGradientAverager(GuardedAveragerMixin, GradientAverager):
    """``hivemind.optim.GradientAverager``, guarded (``Optimizer(grad_averager_factory=partial(this, guard=g))``)."""

    _wire_name = "GradientAverager"


class GuardedTrainingStateAverager(GuardedAveragerMixin, TrainingStateAverager):
    """``hivemind.optim.TrainingStateAverager``, guarded; it serves peers a snapshot of its state."""

    _wire_name = "TrainingStateAverager"

    def get_current_state(self):
        """The state a peer downloads, copied at one instant.

        hivemind's returns the live parameter and optimizer tensors (``.cpu()`` of a CPU tensor is the
        tensor itself), and the averager's process compresses them after the lock is released, while
        this process goes on stepping: a peer that joined then loaded a state torn between two epochs.
        Here the state is read and copied, epoch included, under both locks that guard a change to it:
        the optimizer's (its step) and the averaged tensors' (an all-reduce, a loaded state), taken in
        the order hivemind's own step takes them. Costs one extra copy of the state while a download is
        served. One window stays: ``step(increment_epoch=True)`` raises the epoch just before it takes
        the optimizer's lock, so a state copied then is labelled one epoch ahead of its parameters."""
        with self.lock_optimizer, torch.no_grad(), self.lock_averaged_tensors:
            params = [p.detach().clone() for group in self.optimizer.param_groups for p in group["params"]]
            extras = [t.detach().clone() for t in self.extra_tensors]
            optimizer_metadata, optimizer_tensors = dump_optimizer_state(self.optimizer)
            optimizer_tensors = [t.detach().clone() for t in optimizer_tensors]
            metadata = dict(
                epoch=self.local_epoch,
                group_bits=self.get_group_bits(),
                optimizer_metadata=optimizer_metadata,
            )
        infos = [
            *(
                CompressionInfo.from_tensor(t, key=k, role=TensorRole.PARAMETER)
                for t, k in zip(params, self.parameter_names, strict=True)
            ),
            *(
                CompressionInfo.from_tensor(t, key=i, role=TensorRole.UNSPECIFIED)
                for i, t in enumerate(extras)
            ),
            *(
                CompressionInfo.from_tensor(t, key=i, role=TensorRole.OPTIMIZER)
                for i, t in enumerate(optimizer_tensors)
            ),
        ]
        return metadata, [*params, *extras, *optimizer_tensors], infos


class GuardedStateDownloader(GuardedAveragerMixin, DecentralizedAverager):
    """A plain averager that downloads what peers' ``TrainingStateAverager`` serves (the checkpointer's): it
    answers to and calls ``TrainingStateAverager`` RPC names, never steps, and offers no state of its own."""

    _wire_name = "TrainingStateAverager"
