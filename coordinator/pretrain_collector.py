"""The pretrain collector: turns a pretrain round's swarm state into a version (``serve --dht-listen``).

It runs the hivemind DHT bootstrap peer + checkpointer of
:mod:`coldswarm.coordinator.checkpointer`. The coordinator is built with
:meth:`PretrainCollector.initial_peers` as its DHT peers, which it hands to
workers (Register, PretrainTask); :meth:`PretrainCollector.start` starts the
peer and watches the coordinator's pretrain rounds.

A pretrain round ends when the swarm has taken the round's ``epochs`` global
steps, not when workers report: after training, workers stay in the run only
to serve their state until the checkpointer has downloaded it. So collection
starts as soon as a pretrain round opens, on a background thread that waits
(:meth:`Checkpointer.collect` with ``min_epoch``) until a peer serves a state of
that epoch, evaluates it when an evaluator is configured, records it through
:meth:`MergePipeline.record_version` and closes the round, which publishes it.

A round closed earlier (``round close`` or its deadline) records the state of
the epoch the swarm reached: workers stop training and serve it. One closed
before the swarm's first step, or whose collection fails, fails with the
reason; a cancelled or failed round tells the peers (``collected_key`` set to
``ENDED_UNCOLLECTED``) so they leave at once. A coordinator stopped or killed
mid-collection collects again at start: the round is still ``open`` or
``closing`` and nothing was recorded.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from coldswarm.coordinator.app import Coordinator
from coldswarm.coordinator.rounds import RoundRow
from coldswarm.coordinator.series import SeriesSource, dht_values
from coldswarm.coordinator.states import RoundKind, RoundState, VersionKind

log = logging.getLogger(__name__)

# A pretrain round in one of these has no recorded result yet: its swarm's state is (still) to collect.
_COLLECTING = (RoundState.OPEN, RoundState.CLOSING)
# A pretrain round that ended in one of these will never be collected: its peers may leave.
_ENDED_UNCOLLECTED = (RoundState.CANCELLED, RoundState.FAILED)


class PretrainCollector:
    """The coordinator's DHT bootstrap peer, collecting each pretrain round's averaged state as a version."""

    def __init__(self, dht_listen: list[str], announce: list[str] | None, identity_path: Path):
        """``dht_listen``/``announce``: the DHT peer's multiaddrs (``--dht-listen``/``--dht-announce``);
        ``identity_path``: its private key, which keeps its peer id across restarts."""
        # Imported here: hivemind is heavy and only pretrain rounds need it.
        from coldswarm.coordinator.checkpointer import Checkpointer, CheckpointerConfig

        self.ckpt = Checkpointer(
            CheckpointerConfig(
                host_maddrs=list(dht_listen),
                announce_maddrs=list(announce or []),
                identity_path=identity_path,
            )
        )
        self._peers: list[str] = []
        self.app: Coordinator | None = None
        self._lock = threading.Lock()
        self._threads: dict[int, threading.Thread] = {}
        self._stop = threading.Event()
        self.poll_s = 2.0

    def initial_peers(self) -> list[str]:
        """The DHT peer's multiaddrs that workers bootstrap from; empty until :meth:`start`."""
        return list(self._peers)

    def start(self, app: Coordinator) -> PretrainCollector:
        """Start the DHT peer, then collect ``app``'s pretrain rounds: those that open from now on, and
        those a stop or kill interrupted."""
        self.ckpt.start()
        self._peers = self.ckpt.initial_peers
        self.app = app
        app.rounds.on_round_opened.append(self.watch)
        app.rounds.on_round_closed.append(self.watch)
        for rnd in app.rounds.list():
            if rnd.kind == RoundKind.PRETRAIN and rnd.state in _COLLECTING and rnd.result_version is None:
                log.info("round %d is %s without a version: collecting its swarm's state", rnd.id, rnd.state)
                self.watch(rnd)
        return self

    def watch(self, rnd: RoundRow) -> None:
        """Collect ``rnd``'s state in the background, unless a collection for it is already running."""
        if rnd.kind == RoundKind.PRETRAIN and rnd.state in _ENDED_UNCOLLECTED:
            self._announce_end(rnd)
            return
        if rnd.kind != RoundKind.PRETRAIN or rnd.state not in _COLLECTING or rnd.result_version is not None:
            return
        with self._lock:
            running = self._threads.get(rnd.id)
            if running is not None and running.is_alive():
                return
            thread = threading.Thread(
                target=self._collect, args=(rnd,), name=f"collect-r{rnd.id}", daemon=True
            )
            self._threads[rnd.id] = thread
            thread.start()

    def _collect(self, rnd: RoundRow) -> None:
        app = self.app
        work = app.blobs.temp_dir(prefix=f"collect-r{rnd.id}-")
        epochs = int(rnd.options.get("epochs", 1))
        try:
            out = work / "model"
            log.info("round %d: collecting run %s once it reaches epoch %d", rnd.id, rnd.run_id, epochs)
            self._wait_for_epoch(rnd, epochs)
            if self._stop.is_set():
                return  # the coordinator is stopping: the round stays open and is collected at the next start
            state = app.rounds.get(rnd.id).state
            if state not in _COLLECTING:
                return  # cancelled meanwhile (watch told the peers)
            timeout = float(rnd.options.get("collect_timeout_s", 120.0))
            deadline = time.monotonic() + timeout
            reached = self._epoch_reached(rnd, epochs, early=state != RoundState.OPEN, deadline=deadline)
            if reached == 0 and state != RoundState.OPEN:
                swarm = self.ckpt.swarm_metrics(rnd.run_id)
                raise RuntimeError(
                    "the round ended before the swarm took its first optimizer step "
                    f"({int(swarm['swarm_peers'])} admitted peer(s) reported progress)"
                )
            # Closed early (admin or deadline): the state of the epoch the swarm reached is the round's result.
            # Refuses a state that is not finite or moved more than the round's max_state_jump (the workers'
            # bound too) from the base: such a state never becomes a version. Whether one that passes is
            # published is the publication gate's decision (merge_pipeline), not the collector's.
            jump = (rnd.options.get("hyperparameters") or {}).get("max_state_jump")
            metrics = self.ckpt.collect(
                rnd.run_id,
                app.versions.directory(rnd.base_version),
                out,
                min_epoch=min(epochs, max(reached, 1)),
                timeout=max(deadline - time.monotonic(), self.poll_s),
                max_state_jump=float(jump) if isinstance(jump, int | float) else None,
            )
            metrics = {**metrics, **app.merges.evaluate(out)}
            if app.rounds.get(rnd.id).state not in _COLLECTING:
                log.info("round %d ended while its state was collected; not recording it", rnd.id)
                return
            # Who took part, from their signed records on the DHT (credential: peer id; record: samples). Every
            # worker may read the manifest, so it names peers, not workers (the database maps one to the other).
            participants = [
                {k: v for k, v in p.items() if k != "worker"}
                for p in self.ckpt.participants.pop(rnd.run_id, [])
            ]
            version = app.merges.record_version(
                out,
                rnd.id,
                kind=VersionKind.PRETRAIN,
                metrics=metrics,
                extra={"swarm_participants": participants},
            )
            if app.rounds.get(rnd.id).state == RoundState.OPEN:
                app.rounds.close_round(rnd.id, reason="collected")
            log.info("round %d: the swarm's state is version %d", rnd.id, version.number)
        except Exception as exc:  # recorded on the round, where the admin sees it
            log.exception("collecting round %d failed", rnd.id)
            app.rounds.fail_round(rnd.id, f"collecting the swarm's state failed: {exc}")
            self._announce_end(rnd)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _announce_end(self, rnd: RoundRow) -> None:
        try:
            self.ckpt.announce_end(rnd.run_id)
        except Exception:  # the peers then leave at their serving timeout instead
            log.warning(
                "could not tell run %s's peers that round %d ended", rnd.run_id, rnd.id, exc_info=True
            )

    def _wait_for_epoch(self, rnd: RoundRow, epochs: int) -> None:
        """While the round is open and before its deadline, wait until a peer reports ``epochs``.

        Peers publish their progress on the DHT every few seconds; reading it is cheap, unlike a state
        download, so the checkpointer downloads only once the swarm is there (or the round closed). Each
        reading is also recorded as a point of the round's ``dht`` curve (:mod:`coldswarm.coordinator.series`).
        """
        while not self._stop.is_set():
            current = self.app.rounds.get(rnd.id)
            if current.state != RoundState.OPEN or (current.deadline and time.time() >= current.deadline):
                return
            metrics = self.ckpt.swarm_metrics(rnd.run_id)
            # The same reading is a point of the round's curves (loss, samples/s, peers) on the status page.
            self.app.series.record(rnd.id, SeriesSource.DHT, dht_values(metrics))
            if metrics.get("swarm_epoch_reported", 0) >= epochs:
                return
            self._stop.wait(self.poll_s)

    def _epoch_reached(self, rnd: RoundRow, epochs: int, *, early: bool, deadline: float) -> int:
        """The newest epoch a peer reported; for a round that ended early, waiting (until ``deadline``) for
        the report of a first step.

        Peers publish their metrics every ``metrics_period`` (5 s by default) without waiting, and their
        last word when they stop training, which they do only once a heartbeat told them the round closed.
        Read at the moment of the close, the DHT may still hold a record from before the swarm's first
        step while the swarm is epochs further (the heartbeats said so): that snapshot must not decide
        that the swarm never stepped (issue 13, item 10). So after an early close the peers get the
        collection's own time budget (``collect_timeout_s``) to publish their last word."""
        reached = int(self.ckpt.swarm_metrics(rnd.run_id).get("swarm_epoch_reported", 0))
        while early and reached == 0 and time.monotonic() < deadline and not self._stop.is_set():
            self._stop.wait(min(self.poll_s, max(0.0, deadline - time.monotonic())))
            reached = int(self.ckpt.swarm_metrics(rnd.run_id).get("swarm_epoch_reported", 0))
        if reached:
            log.info("round %d: the swarm reported epoch %d of %d", rnd.id, reached, epochs)
        return reached

    def stop(self) -> None:
        self._stop.set()
        self.ckpt.shutdown()
