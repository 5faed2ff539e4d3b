"""Pretrain rounds' swarm side, wired into a running coordinator (``serve --dht-listen``).

Starts the hivemind DHT bootstrap peer + checkpointer of
:mod:`coldswarm.coordinator.checkpointer` and hands its multiaddrs to workers
(Register, PretrainTask).

A pretrain round ends when the swarm has taken the round's ``epochs`` global
steps, not when workers report: after training, workers stay in the run only
to serve their state until the checkpointer has downloaded it. So collection
starts as soon as a pretrain round opens, on a background thread that waits
(:meth:`Checkpointer.collect` with ``min_epoch``) until a peer serves a state of
that epoch, evaluates it when an evaluator is configured, records it through
:meth:`RoundManager.record_version` and closes the round, which publishes it.

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

log = logging.getLogger(__name__)


class SwarmHook:
    def __init__(self, app: Coordinator, dht_listen: list[str], announce: list[str] | None = None):
        # Imported here: hivemind is heavy and only pretrain rounds need it.
        from coldswarm.coordinator.checkpointer import Checkpointer, CheckpointerConfig

        self.app = app
        self.ckpt = Checkpointer(
            CheckpointerConfig(
                host_maddrs=list(dht_listen),
                announce_maddrs=list(announce or []),
                identity_path=Path(app.config.data_dir) / "dht.key",
            )
        )
        self._lock = threading.Lock()
        self._threads: dict[int, threading.Thread] = {}
        self._stop = threading.Event()
        self.poll_s = 2.0

    def start(self) -> SwarmHook:
        self.ckpt.start()
        peers = self.ckpt.initial_peers
        self.app.rounds.dht_peers = lambda: list(peers)
        self.app.rounds.on_round_opened.append(self.watch)
        self.app.rounds.on_round_closed.append(self.watch)
        for rnd in self.app.rounds.list():
            if rnd.kind == "pretrain" and rnd.state in ("open", "closing") and rnd.result_version is None:
                log.info("round %d is %s without a version: collecting its swarm's state", rnd.id, rnd.state)
                self.watch(rnd)
        return self

    def watch(self, rnd: RoundRow) -> None:
        """Collect ``rnd``'s state in the background, unless a collection for it is already running."""
        if rnd.kind == "pretrain" and rnd.state in ("cancelled", "failed"):
            self._announce_end(rnd)
            return
        if rnd.kind != "pretrain" or rnd.state not in ("open", "closing") or rnd.result_version is not None:
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
            if state not in ("open", "closing"):
                return  # cancelled meanwhile (watch told the peers)
            reached = int(self.ckpt.swarm_metrics(rnd.run_id).get("swarm_epoch_reported", 0))
            if reached == 0 and state != "open":
                raise RuntimeError("the round ended before the swarm took its first optimizer step")
            # Closed early (admin or deadline): the state of the epoch the swarm reached is the round's result.
            metrics = self.ckpt.collect(
                rnd.run_id,
                app.versions.directory(rnd.base_version),
                out,
                min_epoch=min(epochs, max(reached, 1)),
                timeout=float(rnd.options.get("collect_timeout_s", 120.0)),
            )
            if app.rounds.evaluator is not None:
                metrics = {**metrics, **dict(app.rounds.evaluator(out) or {})}
            if app.rounds.get(rnd.id).state not in ("open", "closing"):
                log.info("round %d ended while its state was collected; not recording it", rnd.id)
                return
            version = app.rounds.record_version(out, rnd.id, kind="pretrain", metrics=metrics)
            if app.rounds.get(rnd.id).state == "open":
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
        download, so the checkpointer downloads only once the swarm is there (or the round closed).
        """
        while not self._stop.is_set():
            current = self.app.rounds.get(rnd.id)
            if current.state != "open" or (current.deadline and time.time() >= current.deadline):
                return
            if self.ckpt.swarm_metrics(rnd.run_id).get("swarm_epoch_reported", 0) >= epochs:
                return
            self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()
        self.ckpt.shutdown()
