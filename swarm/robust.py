"""Robust all-reduce: what one broken or hostile peer in a group can do to the others' tensors, bounded.

hivemind's all-reduce is a butterfly: the averaged vector is cut into one slice per peer; every peer sends
each slice of its tensors to that slice's *reducer*, which averages what it received (weighted by each
sender's weight) and sends every sender back the difference between the average and the sender's own part.
So a peer is both a sender, whose parts the others average, and a reducer, whose averages the others apply.
Each role is guarded here:

**As a reducer** (:class:`GuardedPartReducer`), a peer refuses any part that is not finite, has the wrong
shape, or carries a weight that is not a finite number in [0, 1e12]; hivemind then excludes that sender from
the rest of the all-reduce (its remaining parts are not waited for, its stream gets an error). What is left is
aggregated by the configured entry of :data:`AGGREGATORS`: by default CenteredClip
(`Karimireddy et al. 2021 <https://arxiv.org/abs/2012.10333>`_, the aggregator Gorbunov et al. 2022,
`Secure Distributed Training at Scale <https://arxiv.org/abs/2106.11257>`_, run inside hivemind's butterfly
all-reduce), which starts at the coordinate-wise median of the parts and repeatedly moves towards the senders,
each sender's pull clipped to a radius ``tau``. Here ``tau`` is ``clip_radius`` times the median distance of
the parts from that median: a sender's influence is bounded relative to the group's own spread, whatever its
norm. Weights above ``max_weight_ratio`` times the group's median weight are cut down to it.

**As a sender** (:class:`ScreenedPartContainer`), a peer checks every other reducer's returned average
before applying it. It refuses one that is not finite, or that moved its own parts by more (relative L2,
``||average - own|| / ||own||`` over the reducer's whole slice) than ``result_tolerance`` times the median of
that move over all the group's reducers, its own trusted robust reduction included (or ``result_floor``, if
larger). The median, not its own slice's move alone: how far peers have drifted apart differs from slice to
slice (after a refused slice, say, the peers differ there and nowhere else), and the median of the moves is
set by the honest majority of reducers wherever the drift lies. A refused reducer counts as failed: for its
slice this peer keeps its own values, as hivemind does when a reducer disappears. A peer with no slice of
its own (client mode) can only check finiteness.

Reducers are chosen evenly: the bandwidths peers announce are ignored (an announced bandwidth would let one
peer take the whole vector to reduce).

With a majority of honest peers in a group, one attacker therefore cannot make an honest peer's result
non-finite, and moves it at most by about ``tau`` (as a reducer's input) or by ``result_tolerance`` times the
honest reducers' median move (as a reducer), per all-reduce. In a group of two, no aggregator can tell the
honest peer from the other; CenteredClip is then the plain mean, and only the finiteness checks hold.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import (
    AllreduceException,
    BannedException,
    TensorPartContainer,
    TensorPartReducer,
)

log = logging.getLogger(__name__)

__all__ = [
    "AGGREGATORS",
    "AggregatorSpec",
    "GuardedAllReduceRunner",
    "GuardedPartReducer",
    "RefusedPart",
    "RobustAggregation",
    "ScreenedPartContainer",
    "centered_clip",
    "weighted_mean",
]

#: the largest weight a sender may claim (hivemind's weights are sample counts)
MAX_WEIGHT = 1e12

Aggregator = Callable[[torch.Tensor, torch.Tensor, "RobustAggregation"], torch.Tensor]


@dataclass
class RobustAggregation:
    """How a guarded averager aggregates and screens (one per averager; defaults are the swarm's)."""

    aggregator: str = field(
        default="centered_clip",
        metadata={"help": "an entry of swarm.robust.AGGREGATORS: centered_clip | mean"},
    )
    clip_radius: float = field(
        default=1.0, metadata={"help": "CenteredClip's tau, as a multiple of the parts' median distance"}
    )
    clip_iterations: int = field(default=10, metadata={"help": "CenteredClip iterations (stops early)"})
    max_weight_ratio: float = field(
        default=2.0, metadata={"help": "a sender's weight counts at most this many times the group's median"}
    )
    result_tolerance: float = field(
        default=8.0,
        metadata={
            "help": "refuse a reducer's average that moves our parts (relative L2) more than this many times "
            "the median move over the group's reducers (ours included)"
        },
    )
    result_floor: float = field(
        default=1e-3, metadata={"help": "...but always accept a relative move up to this (lossy codecs)"}
    )

    def __post_init__(self):
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; choose one of {sorted(AGGREGATORS)}")
        if not (self.clip_radius > 0 and self.clip_iterations >= 1 and self.max_weight_ratio >= 1):
            raise ValueError("clip_radius must be > 0, clip_iterations >= 1 and max_weight_ratio >= 1")
        if not (self.result_tolerance >= 1 and self.result_floor >= 0):
            raise ValueError("result_tolerance must be >= 1 and result_floor >= 0")


# -- aggregators: (parts [n, d], weights [n]) -> [d] -------------------------------------------------------


def weighted_mean(parts: torch.Tensor, weights: torch.Tensor, config: RobustAggregation) -> torch.Tensor:
    """hivemind's own rule: the weight-weighted mean (zeros when every weight is zero)."""
    total = weights.sum()
    if total <= 0:
        return torch.zeros_like(parts[0])
    return (weights[:, None] * parts).sum(dim=0) / total


def _median_rows(x: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median of the rows of ``x`` (the mean of the two middle rows when even)."""
    ordered = x.sort(dim=0).values
    n = ordered.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def centered_clip(parts: torch.Tensor, weights: torch.Tensor, config: RobustAggregation) -> torch.Tensor:
    """CenteredClip (Karimireddy et al. 2021; in hivemind's all-reduce: Gorbunov et al. 2022) with an adaptive
    radius: ``v <- v + sum_i w_i min(1, tau / ||x_i - v||) (x_i - v) / sum_i w_i``, from the coordinate-wise
    median of the weighted senders, ``tau = clip_radius * median_i ||x_i - median||``; weights are capped at
    ``max_weight_ratio`` times their median."""
    active = weights > 0
    if not bool(active.any()):
        return torch.zeros_like(parts[0])
    parts, weights = parts[active].double(), weights[active].double()
    weights = torch.minimum(weights, config.max_weight_ratio * _median_rows(weights[:, None])[0])
    center = _median_rows(parts)
    tau = config.clip_radius * _median_rows((parts - center).norm(dim=1)[:, None])[0]
    if tau <= 0:  # most senders sent the same values: that is the answer
        return center.float()
    for _ in range(config.clip_iterations):
        diff = parts - center
        distance = diff.norm(dim=1)
        scale = torch.where(distance > tau, tau / distance.clamp_min(1e-30), torch.ones_like(distance))
        step = ((weights * scale)[:, None] * diff).sum(dim=0) / weights.sum()
        center += step
        if step.norm() <= 1e-6 * tau:
            break
    return center.float()


@dataclass(frozen=True)
class AggregatorSpec:
    fn: Aggregator
    summary: str
    source: str


#: how a reducer turns the parts it received into their aggregate, keyed by ``RobustAggregation.aggregator``
AGGREGATORS: dict[str, AggregatorSpec] = {
    "centered_clip": AggregatorSpec(
        centered_clip,
        "CenteredClip around the median, radius relative to the group's spread: one outlier moves the result by "
        "at most about tau",
        "Karimireddy et al. 2021, https://arxiv.org/abs/2012.10333; in hivemind's all-reduce: Gorbunov et al. "
        "2022, https://arxiv.org/abs/2106.11257",
    ),
    "mean": AggregatorSpec(
        weighted_mean,
        "hivemind's weighted mean: one sender can move the result anywhere (finiteness is still checked)",
        "hivemind, https://github.com/learning-at-home/hivemind",
    ),
}


# -- the reducer ------------------------------------------------------------------------------------------


class RefusedPart(AllreduceException):
    """A received part was refused (not finite, wrong shape, bad weight); its sender leaves the all-reduce."""


class GuardedPartReducer(TensorPartReducer):
    """hivemind's reducer, keeping every sender's part of the current slice instead of a running sum, so the
    configured aggregator sees them all; parts that are not finite or not of the expected shape are refused."""

    def __init__(self, part_shapes, num_senders: int, config: RobustAggregation):
        self.config = config
        self._aggregate = AGGREGATORS[config.aggregator].fn
        self._parts: list[torch.Tensor] = []
        self._weights: list[float] = []
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self._parts, self._weights = [], []
        super().reset_accumulators()

    def check(self, part_index: int, tensor_part: torch.Tensor, weight: float) -> None:
        """Raise :class:`RefusedPart` unless the part may be aggregated."""
        if not 0 <= part_index < self.num_parts:
            raise RefusedPart(f"part {part_index} is out of range")
        if tuple(tensor_part.shape) != tuple(self.part_shapes[part_index]):
            raise RefusedPart(f"part {part_index} has shape {tuple(tensor_part.shape)[:4]}")
        if not (isinstance(weight, float | int) and math.isfinite(weight) and 0 <= weight <= MAX_WEIGHT):
            raise RefusedPart(f"weight {str(weight)[:16]} is not in [0, {MAX_WEIGHT:g}]")
        if not bool(torch.isfinite(tensor_part).all()):
            raise RefusedPart(f"part {part_index} is not finite")

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        # Before counting it: hivemind's ban (on_sender_failed) then excludes the sender from this part on.
        self.check(part_index, tensor_part, weight)
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait(
                {self.current_part_future, asyncio.create_task(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException(
                    f"attempted to aggregate part in a finalized {self.__class__.__name__}"
                )
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._parts.append(tensor_part.float())
            self._weights.append(float(weight))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            if self._parts:
                result = self._aggregate(torch.stack(self._parts), torch.tensor(self._weights), self.config)
            else:
                result = torch.zeros(self.part_shapes[self.current_part_index])
            self.current_part_future.set_result(result)
            self.reset_accumulators()


# -- the sender's screen ---------------------------------------------------------------------------------


class ScreenedPartContainer(TensorPartContainer):
    """hivemind's part container, which screens the averages other reducers return before they are applied.

    All results are in before the first output tensor is yielded (the screen compares each reducer's whole
    slice with this peer's own), then refused reducers' slices are replaced by this peer's own values.
    """

    def __init__(self, *args, own_index: int, config: RobustAggregation, on_refused=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.own_index = own_index
        self.config = config
        self.on_refused = on_refused  # called with (peer index, reason)

    async def _wait_for_all_results(self) -> None:
        for peer_index in range(self.group_size):
            while self._outputs_registered_by_peer[peer_index] < self.num_parts_by_peer[peer_index]:
                if self.finished.is_set():
                    raise AllreduceException("All-reduce was terminated during iteration")
                self._output_part_available[peer_index].clear()
                await self._output_part_available[peer_index].wait()

    def _relative_move(self, peer_index: int) -> float:
        moved = sum(float(d.double().square().sum()) for d in self._output_parts_by_peer[peer_index])
        own = sum(float(p.double().square().sum()) for p, _info in self._input_parts_by_peer[peer_index])
        return math.sqrt(moved) / max(math.sqrt(own), 1e-30)

    def _refuse(self, peer_index: int, reason: str) -> None:
        parts = self._output_parts_by_peer[peer_index]
        for i in range(len(parts)):
            parts[i] = torch.zeros_like(parts[i])  # deltas: zero keeps this peer's own values
            self.failed_size += parts[i].numel()
        if self.on_refused is not None:
            self.on_refused(peer_index, reason)

    def screen_results(self) -> None:
        """Refuse the slices of reducers whose average is not finite or moved this peer's parts too far."""
        reducers = [i for i in range(self.group_size) if self._output_parts_by_peer[i]]
        finite = {
            i: all(bool(torch.isfinite(d).all()) for d in self._output_parts_by_peer[i]) for i in reducers
        }
        allowed = None
        if self.num_parts_by_peer[self.own_index] > 0:  # else (client mode) only finiteness can be checked
            # A non-finite average counts as an infinite move: it still cannot shift the median of a group
            # whose reducers are mostly honest.
            moves = {i: self._relative_move(i) if finite[i] else math.inf for i in reducers}
            allowed = max(
                self.config.result_tolerance * statistics.median(moves.values()), self.config.result_floor
            )
        for peer_index in reducers:
            if peer_index == self.own_index:
                continue
            if not finite[peer_index]:
                self._refuse(peer_index, "its average is not finite")
            elif allowed is not None and moves[peer_index] > allowed:
                moved = moves[peer_index]
                self._refuse(
                    peer_index, f"its average moved our parts by {moved:.3g} (allowed {allowed:.3g})"
                )

    async def iterate_output_tensors(self):
        await self._wait_for_all_results()
        self.screen_results()
        async for tensor in super().iterate_output_tensors():
            yield tensor


# -- the all-reduce ---------------------------------------------------------------------------------------

_RUNNER_ARGS = frozenset(
    {"p2p", "servicer_type", "prefix", "group_id", "weight", "ordered_peer_ids", "modes"}
    | {"sender_timeout", "reducer_timeout"}
)


class GuardedAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce with a :class:`GuardedPartReducer` and a :class:`ScreenedPartContainer`.

    :param config: the :class:`RobustAggregation` to run with
    :param on_refused: ``(kind, peer_id, reason)`` for each refusal, kind "part" (as a reducer: a sender's
      part) or "result" (as a sender: a reducer's average); e.g. counters and logs
    """

    def __init__(self, *, config: RobustAggregation, on_refused=None, tensors, peer_fractions, **kwargs):
        super().__init__(tensors=tensors, peer_fractions=peer_fractions, **kwargs)
        self.config = config
        self._on_refused = on_refused
        own = self.ordered_peer_ids.index(self.peer_id)
        # hivemind builds its plain container and reducer in __init__; replace both (the plain ones did no work).
        self.tensor_part_reducer.finished.set()  # so that its finalizer does not report 0% received
        self.tensor_part_container.finished.set()
        self.tensor_part_container = ScreenedPartContainer(
            tensors,
            peer_fractions,
            return_deltas=True,
            own_index=own,
            config=config,
            on_refused=lambda index, reason: self._refused("result", self.ordered_peer_ids[index], reason),
            **{k: v for k, v in kwargs.items() if k not in _RUNNER_ARGS},
        )
        self.parts_for_local_averaging = self.tensor_part_container.get_raw_input_parts(own)
        self.tensor_part_reducer = GuardedPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging), len(self.sender_peer_ids), config
        )

    def _refused(self, kind: str, peer_id, reason: str) -> None:
        log.warning("all-reduce %s: refused %s's %s: %s", self.group_id.hex()[:8], peer_id, kind, reason)
        if self._on_refused is not None:
            self._on_refused(kind, peer_id, reason)

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        try:
            async for message in super()._accumulate_parts_streaming(stream, sender_index):
                yield message
        except RefusedPart as exc:
            self._refused("part", self.sender_peer_ids[sender_index], f"{exc}; excluded from this all-reduce")
            raise
