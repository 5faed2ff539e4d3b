"""DiLoCo pretraining over hivemind: many local steps, then one all-reduce of pseudo-gradients.

DiLoCo (Douillard et al. 2023, https://arxiv.org/abs/2311.08105) trades communication for local compute: each
peer takes ``inner_steps`` (H) AdamW steps on its own data, then the peers all-reduce only their
pseudo-gradients (parameters at the last sync minus now) and apply the mean with an outer SGD step with
Nesterov momentum (lr 0.7, momentum 0.9 by default). A peer sends about one model's worth of 8-bit values
every H steps instead of one per global step; the math is in :mod:`coldswarm.worker.outer_optimizer`.

How it is built on hivemind (which pieces are reused, and why)
-------------------------------------------------------------
OpenDiLoCo (PrimeIntellect, ``open_diloco/hivemind_diloco.py``) subclasses ``hivemind.Optimizer`` with
``use_local_updates=True``: its state averager holds the outer optimizer over an offloaded copy of the
parameters, and a ``DecentralizedAverager`` whose tensors are that copy's ``.grad`` buffers all-reduces the
pseudo-gradients; the sync blocks training. hivemind's own options do not give DiLoCo: ``use_local_updates``
applies every local step and only *averages parameters* now and then (no outer optimizer, no pseudo-gradient);
``delay_optimizer_step`` / ``delay_grad_averaging`` overlap one *gradient* all-reduce with the next
accumulation (delayed parameter updates), still one all-reduce per global step; ``average_state_every`` spaces
out parameter averaging. So this module composes hivemind's parts the way OpenDiLoCo does, without
subclassing ``hivemind.Optimizer`` (whose ``step`` is built around gradient accumulation and would have to be
copied and patched):

* **outer state**: a plain ``hivemind.optim.state_averager.TrainingStateAverager`` under the run's usual
  ``{run_id}_state_averager`` prefix. Its offloaded parameters are the outer parameters, its optimizer is the
  outer SGD, and its ``main_parameters`` are the *anchor* (the point the current period started from). It
  never joins a parameter-averaging round; it serves ``(outer parameters, outer momentum, epoch)`` to late
  joiners, to peers that missed a sync and to the coordinator's checkpointer, which downloads it exactly as
  it downloads a synchronous swarm's state (parameters first) and so needs no change.
* **the all-reduce**: :class:`~coldswarm.swarm.averagers.PseudoGradientAverager`, a ``DecentralizedAverager`` subclass whose tensors are
  the outer parameters' ``.grad`` buffers (as in OpenDiLoCo and as ``hivemind.Optimizer`` does for offloaded
  gradients). Because it is an ordinary hivemind averager, checks added to the averagers' RPC handlers
  (admission of the caller's peer id, refusal of non-finite parts, robust aggregation) apply to it too.
  Each sync looks for its group under a key naming the outer epoch, so a peer that fell behind can never
  average a stale pseudo-gradient into the others' step.
* **progress**: hivemind's ``ProgressTracker`` (same DHT record as the synchronous optimizer: epoch, samples,
  samples/s), which gives the swarm's epoch and peer count.

Overlap (the default, ``overlap=True``): at the end of a period the peer starts the all-reduce in the
background and goes straight on with the next period's inner steps. When the averaged pseudo-gradient arrives
(checked after every inner step), the outer step runs and the peer *rebases*: it shifts its parameters by what
the outer step moved the point it had sent from, keeping the steps it took meanwhile on top (see
:mod:`coldswarm.worker.outer_optimizer`). Those steps were computed from parameters that did not yet include
the swarm's update; that is a delay of tau = (time of the all-reduce) / (time of one inner step) steps, not
of a whole period (the "streaming"/"eager" DiLoCo variants study the same trade: Douillard et al. 2025,
https://arxiv.org/abs/2501.18512; Kale et al. 2025, https://arxiv.org/abs/2502.12996). A peer waits on the
network only when a sync has not finished by the end of the *next* period (the link is too slow even for the
overlap), or at the round's last sync, whose result is the round's outcome. ``overlap=False`` is the paper's
blocking DiLoCo.

Stragglers: with a fixed H per peer, a faster peer would wait at every sync for the slowest one. Instead,
past its H steps, a peer keeps training while another peer's progress record shows it still short of its H
steps for this epoch (for up to ``averaging_timeout``), as in dynamic local updates (Liu et al. 2024,
https://arxiv.org/abs/2401.09135): each sync averages H steps of the slowest peer and more of the faster
ones, and no peer idles for another. A peer that joins mid-epoch counts the steps the others have taken.

Failures: a sync that fails (no group before the deadline, a broken all-reduce, a group whose members were at
different epochs) applies nothing; the peer keeps its anchor, so its unsent progress goes into the next
pseudo-gradient. If the others did step meanwhile (the swarm's epoch is ahead), the peer downloads the outer
state at its next period boundary, rebases onto it keeping its local progress, and joins the next sync. No
peer blocks longer than ``averaging_timeout`` for another. A peer that sees no other peer applies its own
pseudo-gradient (a swarm of one).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FuturesTimeout  # the builtin's alias from 3.11 only

import torch
from hivemind.averaging.control import AveragingStage
from hivemind.compression import NoCompression
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils import ValueWithExpiration, get_dht_time

from coldswarm.swarm.averagers import PseudoGradientAverager, pseudo_grad_prefix, state_prefix
from coldswarm.swarm.guarded_averagers import AveragerGuard, GuardedTrainingStateAverager
from coldswarm.swarm.robust import RobustAggregation
from coldswarm.worker.outer_optimizer import outer_optimizer_factory, pseudo_gradient_, rebase_
from coldswarm.worker.swarm import SwarmConfig, SwarmTrainer

logger = logging.getLogger(__name__)

__all__ = ["DiLoCoOptimizer", "DiLoCoTrainer"]


class DiLoCoOptimizer:
    """DiLoCo with hivemind's pieces, behind the interface :class:`SwarmTrainer` uses of ``hivemind.Optimizer``:
    ``step(batch_size=...)`` after ``loss.backward()``, ``zero_grad()``, ``local_epoch`` (outer steps taken),
    ``tracker``, ``state_averager``, ``load_state_from_peers()``, ``shutdown()``.

    :param params: the model's trained parameters, in :func:`swarm_parameters` order; trained in place.
    :param inner_optimizer: a factory ``params -> torch optimizer`` (AdamW by default, see ``SwarmConfig``).
    :param scheduler: optional factory of an inner learning-rate schedule, stepped once per outer epoch.
    :param compression: the pseudo-gradient codec (a hivemind ``CompressionBase``).
    :param on_missed_sync: called each time a sync fails while other peers are present.
    :param sync_guard: the pseudo-gradient all-reduce's guard (:class:`AveragerGuard`: admitted peers only, finite
      parts, robust aggregation, screened results); None: anyone, the plain mean (a benchmark's baseline).
    :param state_guard: the outer state averager's (admitted callers, checked downloads); None: hivemind's own.
    :param signing_key: the key this peer's progress records are signed with (the DHT's signature validator
      requires one; :class:`SwarmTrainer` passes its identity's).
    """

    def __init__(
        self,
        *,
        dht,
        config: SwarmConfig,
        params: Sequence[torch.nn.Parameter],
        inner_optimizer: Callable,
        scheduler: Callable | None = None,
        compression=None,
        load_state_compression=None,
        on_missed_sync: Callable[[], None] | None = None,
        sync_guard: AveragerGuard | None = None,
        state_guard: AveragerGuard | None = None,
        signing_key=None,
    ):
        cfg = self.config = config
        self.dht = dht
        self.params = list(params)
        self.inner = inner_optimizer(self.params)
        self.scheduler = scheduler(self.inner) if scheduler is not None else None
        self.on_missed_sync = on_missed_sync
        self.status_loglevel = logging.INFO if cfg.verbose else logging.DEBUG

        # The anchor: where the current period started (host fp32). The state averager keeps the outer
        # parameters as its offloaded copy of it and copies them back into it after every outer step.
        self.anchor = [
            p.detach().to("cpu", torch.float32, copy=True).requires_grad_(True) for p in self.params
        ]
        self.state_averager = self._outer_state_averager(state_guard, load_state_compression)
        self.outer_params = [
            p for group in self.state_averager.optimizer.param_groups for p in group["params"]
        ]
        self.sent_from = [torch.zeros_like(a, requires_grad=False) for a in self.anchor]
        self.averager = self._pseudo_gradient_averager(sync_guard, compression)
        # The outer optimizer reads the averaged pseudo-gradient straight from the all-reduce's buffers.
        with self.averager.get_tensors() as buffers:
            for param, buffer in zip(self.outer_params, buffers, strict=True):
                param.grad = buffer
        batch = cfg.batch_size_per_step or 1
        self.tracker = ProgressTracker(
            dht=dht,
            prefix=cfg.run_id,
            target_batch_size=max(cfg.inner_steps * batch, 1),
            client_mode=cfg.client_mode,
            status_loglevel=self.status_loglevel,
            metadata_expiration=cfg.peer_expiration,
            private_key=signing_key,
            start=True,
        )

        self.steps_in_period = 0  # inner steps since the current period began (a sync was launched)
        self.samples_in_period = 0
        self.samples_in_flight = 0  # samples of the period whose sync is in flight (not yet in the epoch)
        self._boundary_since = None  # when this period reached its H steps (while others still train)
        self._others_checked_at = -float("inf")
        self._step_seconds = None  # EMA of one inner step (forward, backward, optimizer)
        self._last_step_end = None
        self._scheduled = None  # (epoch, StepControl): matchmaking started ahead of the period's end
        self._pending = None  # (epoch, StepControl, launched at): an all-reduce in flight
        self.stats = dict(
            syncs=0,  # outer steps from an all-reduce with other peers
            solo_steps=0,  # outer steps taken alone (no other peer visible)
            missed_syncs=0,  # syncs that failed while others were present
            states_loaded=0,  # outer states downloaded (late join, catching up)
            stall_seconds=0.0,  # time step() blocked on the network (waiting for a sync or a state)
            final_sync_seconds=0.0,  # part of the stall: the round's last sync, which nothing can overlap
            overlapped_steps=0,  # inner steps taken while a sync was in flight
            sync_seconds=0.0,  # launch-to-result time of the syncs that succeeded, summed
            inner_steps=0,
        )

    def _outer_state_averager(self, guard: AveragerGuard | None, load_state_compression):
        """The outer state: a TrainingStateAverager whose offloaded parameters are the outer parameters and
        whose optimizer is the outer Nesterov SGD; served to late joiners and the checkpointer."""
        cfg = self.config
        cls = (
            TrainingStateAverager
            if guard is None
            else functools.partial(GuardedTrainingStateAverager, guard=guard)
        )
        return cls(
            dht=self.dht,
            prefix=state_prefix(cfg.run_id),
            optimizer=outer_optimizer_factory(cfg.outer_lr, cfg.outer_momentum),
            params=self.anchor,
            offload_optimizer=True,
            custom_gradients=True,
            initialize_optimizer=True,  # a zero step: the momentum buffers exist (and are served) from the start
            min_matchmaking_time=cfg.matchmaking_time,
            request_timeout=cfg.request_timeout,
            allreduce_timeout=cfg.averaging_timeout,
            next_chunk_timeout=cfg.load_state_timeout,
            state_compression=load_state_compression or NoCompression(),
            client_mode=cfg.client_mode,
            status_loglevel=self.status_loglevel,
            start=True,
        )

    def _pseudo_gradient_averager(self, guard: AveragerGuard | None, compression) -> PseudoGradientAverager:
        """The all-reduce of the pseudo-gradients, over buffers shaped like the outer parameters; without a
        guard, open and the plain mean (a benchmark's baseline)."""
        cfg = self.config
        return PseudoGradientAverager(
            [torch.zeros_like(p, requires_grad=False) for p in self.outer_params],
            self.dht,
            guard=guard or AveragerGuard(aggregation=RobustAggregation(aggregator="mean")),
            prefix=pseudo_grad_prefix(cfg.run_id),
            min_matchmaking_time=cfg.matchmaking_time,
            request_timeout=cfg.request_timeout,
            allreduce_timeout=cfg.averaging_timeout,
            next_chunk_timeout=cfg.averaging_timeout,
            compression=compression or NoCompression(),
            client_mode=cfg.client_mode,
            start=True,
        )

    # -- the interface SwarmTrainer uses -------------------------------------------------------------------

    @property
    def local_epoch(self) -> int:
        """Outer steps this peer's outer parameters have taken (the swarm's epoch when in sync)."""
        return self.state_averager.local_epoch

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self, batch_size: int | None = None) -> None:
        """One inner step with the gradients in ``.grad``; at the end of a period, the sync."""
        cfg = self.config
        batch_size = batch_size or cfg.batch_size_per_step or 1
        self.inner.step()
        now = time.perf_counter()
        if self._last_step_end is not None:
            took = now - self._last_step_end
            self._step_seconds = took if self._step_seconds is None else 0.9 * self._step_seconds + 0.1 * took
        self.steps_in_period += 1
        self.samples_in_period += batch_size
        self.stats["inner_steps"] += 1
        if self._pending is not None:
            self.stats["overlapped_steps"] += 1
        self._report_progress()
        self._poll_pending()
        if self.steps_in_period >= cfg.inner_steps:
            self._end_period()
        else:
            self._maybe_schedule()
        self._last_step_end = time.perf_counter()

    def load_state_from_peers(self) -> bool:
        """Download the outer state (parameters, momentum, epoch) from the peer with the newest epoch and
        move onto it, keeping the local progress not yet synchronised. Returns whether a state was loaded."""
        if self._pending is not None:
            self._complete_pending(self.config.averaging_timeout)
        self._drop_scheduled()
        began = time.perf_counter()
        epoch = self.local_epoch
        with torch.no_grad():
            for old, anchor in zip(self.sent_from, self.anchor, strict=True):
                old.copy_(anchor)
        try:
            self.state_averager.load_state_from_peers(timeout=self.config.load_state_timeout)
        except FuturesTimeout:
            # hivemind raises when the download outlives load_state_timeout (its late result is dropped,
            # the download ends at its chunk timeout): a state not loaded this time, not a crashed round.
            logger.warning("no state downloaded within %ss; training on", self.config.load_state_timeout)
        loaded = self.local_epoch > epoch
        if loaded:
            rebase_(self.params, self.sent_from, self.anchor)  # x += theta_downloaded - old anchor
            self.stats["states_loaded"] += 1
            if self.stats["inner_steps"] == 0:
                self._align_with_swarm()
            self._after_epoch_change()
            logger.log(
                self.status_loglevel, "loaded the outer state of epoch %d from peers", self.local_epoch
            )
        self._last_step_end = None  # the download is not an inner step
        self.stats["stall_seconds"] += time.perf_counter() - began
        return loaded

    def finish_pending(self) -> None:
        """Wait (up to ``averaging_timeout``) for a sync in flight and apply it, so the outer state is the
        swarm's; drop matchmaking started for a sync that will not happen."""
        if self._pending is not None:
            self._complete_pending(self.config.averaging_timeout)
        self._drop_scheduled()

    def shutdown(self) -> None:
        """Leave: stop reporting progress, finish or drop averaging rounds, stop both averagers."""
        self.tracker.shutdown(5.0)
        try:
            self.finish_pending()
        finally:
            self.averager.shutdown()
            self.state_averager.shutdown()

    # -- the period's end and the sync -----------------------------------------------------------------------

    def _end_period(self) -> None:
        cfg = self.config
        if self._pending is not None:
            # The last sync is still in flight a whole period later: the link is too slow even for the overlap.
            self._complete_pending(cfg.averaging_timeout)
        if self.tracker.global_epoch > self.local_epoch:
            # The swarm stepped without us (a sync we missed): take its state, keep our progress, then sync.
            logger.log(
                self.status_loglevel,
                "swarm is at epoch %d, we are at %d: loading the outer state",
                self.tracker.global_epoch,
                self.local_epoch,
            )
            self.load_state_from_peers()
        if cfg.max_epochs is not None and self.local_epoch >= cfg.max_epochs:
            return  # the round is over; SwarmTrainer.train stops before the next step
        if self._others_still_training():
            return  # keep training (the next step checks again) rather than wait at the sync
        self._launch()

    def _others_still_training(self) -> bool:
        """Whether another peer is still taking the H steps of this epoch, so that this (faster) peer should
        keep training instead of waiting for it at the sync: the faster peer takes more inner steps, as in
        dynamic local updates (Liu et al. 2024, https://arxiv.org/abs/2401.09135). Bounded by
        ``averaging_timeout`` past our own H steps; checked from the peers' progress records at most twice a
        second (in between, the last answer stands)."""
        now = time.perf_counter()
        if self._boundary_since is None:
            self._boundary_since, self._others_training = now, False
            self._others_checked_at = -float("inf")
        if now - self._boundary_since >= self.config.averaging_timeout:
            return False
        if now - self._others_checked_at < 0.5:
            return self._others_training
        self._others_checked_at = now
        epoch, need = self.local_epoch, self.config.inner_steps * (self.config.batch_size_per_step or 1)
        self._others_training = False
        for record in self._progress_records():
            peer_epoch, samples = record.get("epoch"), record.get("samples_accumulated")
            if isinstance(peer_epoch, int) and isinstance(samples, int):
                if peer_epoch < epoch or (peer_epoch == epoch and samples < need):
                    self._others_training = True
        return self._others_training

    def _progress_records(self) -> list[dict]:
        """The other peers' hivemind progress records (epoch, samples_accumulated, ...), read from the DHT."""
        found = self.dht.get(self.tracker.training_progress_key, latest=True)
        if not isinstance(found, ValueWithExpiration) or not isinstance(found.value, dict):
            return []
        mine = self.dht.peer_id.to_bytes()
        records = []
        for entry in found.value.values():
            value = entry.value if isinstance(entry, ValueWithExpiration) else None
            if isinstance(value, dict) and value.get("peer_id") != mine:
                records.append(value)
        return records

    def _align_with_swarm(self) -> None:
        """A peer joining mid-epoch counts the steps the others have already taken in it (their mean), so its
        period ends with theirs instead of up to a period later (its first pseudo-gradient is shorter)."""
        batch = self.config.batch_size_per_step or 1
        done = [
            r["samples_accumulated"]
            for r in self._progress_records()
            if r.get("epoch") == self.local_epoch and isinstance(r.get("samples_accumulated"), int)
        ]
        if done:
            steps = min(self.config.inner_steps - 1, round(sum(done) / len(done) / batch))
            self.steps_in_period, self.samples_in_period = steps, steps * batch

    def _report_progress(self) -> None:
        # Samples since this peer entered its epoch: with a sync in flight, the period it averages plus the
        # steps since, so that a record at epoch e with >= H x batch samples means "done with epoch e's H steps".
        self.tracker.report_local_progress(self.local_epoch, self.samples_in_flight + self.samples_in_period)

    def _launch(self) -> None:
        cfg = self.config
        epoch = self.local_epoch
        control = None
        if self._scheduled is not None:
            scheduled_epoch, scheduled = self._scheduled
            if scheduled_epoch == epoch and not scheduled.done() and not scheduled.triggered:
                control, self._scheduled = scheduled, None
            else:
                self._drop_scheduled()
        with torch.no_grad(), self.averager.get_tensors() as buffers:
            pseudo_gradient_(buffers, self.anchor, self.params)
            for sent, param in zip(self.sent_from, self.params, strict=True):
                sent.copy_(param.detach())
        self.samples_in_flight, self.samples_in_period = self.samples_in_period, 0
        self.steps_in_period, self._boundary_since = 0, None
        self._report_progress()

        if not self._others_present():
            if control is not None:
                control.cancel()
            self._apply_outer_step()
            self.stats["solo_steps"] += 1
            logger.log(
                self.status_loglevel, "no other peer: outer step %d with our own pseudo-gradient", epoch + 1
            )
            return
        if control is None:
            control = self.averager.schedule_sync(
                epoch, scheduled_time=get_dht_time() + cfg.matchmaking_time, timeout=self._sync_timeout(0.0)
            )
        self.averager.trigger(control)
        self._pending = (epoch, control, time.perf_counter())
        final = cfg.max_epochs is not None and epoch + 1 >= cfg.max_epochs
        if final or not cfg.overlap:
            began = time.perf_counter()
            self._complete_pending(cfg.averaging_timeout + cfg.matchmaking_time)
            if final:
                self.stats["final_sync_seconds"] += time.perf_counter() - began

    def _sync_timeout(self, eta: float) -> float:
        """How long a sync may look for its group: until the period's end plus ``averaging_timeout``, and with
        the overlap for one more period (the others may be up to a period behind; nobody waits meanwhile)."""
        cfg = self.config
        period = cfg.inner_steps * (self._step_seconds or 0.0) if cfg.overlap else 0.0
        return eta + cfg.averaging_timeout + period

    def _maybe_schedule(self) -> None:
        """Begin matchmaking about ``matchmaking_time`` before the period ends, so the group is ready then."""
        cfg = self.config
        if self._pending is not None or self._scheduled is not None or self._step_seconds is None:
            return
        eta = (cfg.inner_steps - self.steps_in_period) * self._step_seconds
        if eta > cfg.matchmaking_time or self.tracker.global_progress.num_peers <= 1:
            return
        epoch = self.local_epoch
        control = self.averager.schedule_sync(
            epoch, scheduled_time=get_dht_time() + eta, timeout=self._sync_timeout(eta)
        )
        self._scheduled = (epoch, control)

    def _poll_pending(self) -> None:
        """After each inner step: apply a finished sync; give up on one the swarm has stepped past."""
        if self._pending is None:
            return
        epoch, control, _ = self._pending
        if control.done():
            self._complete_pending(0.0)
        elif control.stage == AveragingStage.LOOKING_FOR_GROUP and self.tracker.global_epoch > epoch:
            control.cancel()
            self._pending = None
            self._missed(epoch, "the swarm stepped past this epoch before we found a group")

    def _complete_pending(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the sync in flight; apply its result or record it as missed."""
        epoch, control, launched = self._pending
        began = time.perf_counter()
        try:
            gathered = control.result(timeout=timeout)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - timeouts, cancellations, failed all-reduces alike
            if not control.done():
                control.cancel()
            gathered, reason = None, f"{type(exc).__name__}: {exc}"
        finally:
            if timeout > 0:
                self.stats["stall_seconds"] += time.perf_counter() - began
            self._pending = None
        if gathered is not None:
            epochs = set(gathered.values()) if isinstance(gathered, dict) else {None}
            if epochs != {epoch}:
                gathered, reason = None, f"group members were at epochs {sorted(map(str, epochs))}"
            elif self.averager.last_sync_incomplete:
                # Applying it would move our outer parameters away from the others'; they step without us.
                gathered, reason = None, "the all-reduce returned only part of the average"
        if gathered is None:
            self._missed(epoch, reason)
            return
        self._apply_outer_step()
        self.stats["syncs"] += 1
        self.stats["sync_seconds"] += time.perf_counter() - launched
        logger.log(
            self.status_loglevel,
            "outer step %d: averaged pseudo-gradients with %d peers in %.1fs",
            self.local_epoch,
            len(gathered),
            time.perf_counter() - launched,
        )

    def _apply_outer_step(self) -> None:
        """theta <- outer SGD(theta, averaged pseudo-gradient); anchor <- theta; x += theta - sent_from."""
        with self.averager.get_tensors():  # no all-reduce may write the pseudo-gradient meanwhile
            self.state_averager.step(increment_epoch=True, optimizer_step=True)
        rebase_(self.params, self.sent_from, self.anchor)
        self._after_epoch_change()

    def _after_epoch_change(self) -> None:
        if not self.config.client_mode:
            self.state_averager.state_sharing_priority = self.local_epoch
        with self.tracker.pause_updates():
            self.tracker.update_epoch(self.local_epoch)
        self.samples_in_flight = 0
        self._report_progress()
        if self.scheduler is not None:
            while (
                self.scheduler._step_count <= self.local_epoch
            ):  # catch up, as hivemind does for late joiners
                self.scheduler.step()

    def _missed(self, epoch: int, reason: str) -> None:
        # The anchor stays: this period's progress is part of the next pseudo-gradient.
        logger.warning(
            "DiLoCo sync of epoch %d failed (%s); its progress goes into the next one", epoch, reason
        )
        self.samples_in_period += self.samples_in_flight
        self.samples_in_flight = 0
        self.stats["missed_syncs"] += 1
        if self.on_missed_sync is not None:
            self.on_missed_sync()

    def _drop_scheduled(self) -> None:
        """Leave matchmaking started for a sync that will not use it (hivemind's 'tag along with zero weight'
        when a group has already formed around it, so the others are not left waiting)."""
        if self._scheduled is None:
            return
        _, control = self._scheduled
        self._scheduled = None
        if control.done():
            return
        if not control.triggered:
            control.weight = 0.0
            control.allow_allreduce()
        try:
            control.result(timeout=self.config.averaging_timeout)
        except BaseException:  # noqa: BLE001 - a zero-weight round that fails changes nothing
            if not control.done():
                control.cancel()

    def _others_present(self) -> bool:
        """Whether another peer trains in this run: the tracker's view, confirmed with a fresh DHT read when it
        sees nobody (its view can be a refresh period old, and stepping alone is not undone)."""
        return self.tracker.global_progress.num_peers > 1 or bool(self._progress_records())


class DiLoCoTrainer(SwarmTrainer):
    """:class:`SwarmTrainer` with DiLoCo as the optimizer (``algorithm="diloco"``); same life cycle and results.

    ``SwarmResult.epoch`` counts outer steps; ``local_fallbacks`` counts syncs this peer missed while other
    peers were present (each caught up at the next one). :attr:`diloco_stats` adds the sync figures.
    """

    def _make_optimizer(self, params):
        from coldswarm.swarm.averaging_codecs import make_compression
        from coldswarm.worker.optimizers import optimizer_factory, scheduler_factory

        cfg = self.config
        return DiLoCoOptimizer(
            dht=self.dht,
            config=cfg,
            params=params,
            # The same guards as the synchronous swarm's (admission, robust all-reduce, checked downloads);
            # unguarded (hivemind's mean, any caller) only for a benchmark's baseline.
            sync_guard=self._averager_guard(None) if self.guard else None,
            state_guard=self._averager_guard(cfg.max_state_jump) if self.guard else None,
            signing_key=self._signing_key,
            inner_optimizer=optimizer_factory(cfg),
            scheduler=scheduler_factory(cfg),
            compression=self._grad_compression or make_compression(cfg.grad_compression, cfg.size_threshold),
            load_state_compression=make_compression(cfg.load_state_compression, cfg.size_threshold),
            on_missed_sync=self._count_missed_sync,
        )

    def _count_missed_sync(self) -> None:
        self.local_fallbacks += 1

    def _watch_local_fallbacks(self, opt) -> None:
        pass  # DiLoCoOptimizer reports missed syncs itself (on_missed_sync)

    def finish_pending(self) -> None:
        if self.optimizer is not None:
            self.optimizer.finish_pending()

    def shutdown(self) -> None:
        if self.optimizer is not None:
            self._final_stats = dict(self.optimizer.stats)
        super().shutdown()

    @property
    def diloco_stats(self) -> dict[str, float]:
        """Sync figures, also after shutdown: syncs, solo_steps, missed_syncs, states_loaded, stall_seconds,
        final_sync_seconds, overlapped_steps, sync_seconds."""
        stats = self.optimizer.stats if self.optimizer is not None else getattr(self, "_final_stats", {})
        return {k: float(v) for k, v in stats.items()}
