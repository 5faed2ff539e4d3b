"""Pretrain rounds' swarm side, wired into a running coordinator (``serve --dht-listen``).

Starts the hivemind DHT bootstrap peer + checkpointer of
:mod:`coldswarm.coordinator.checkpointer`, hands its multiaddrs to workers
(Register, PretrainTask), and when a pretrain round closes collects the
swarm's averaged state on a background thread and records it as the next
version through :meth:`RoundManager.record_version`. A collection a kill
interrupted runs again at start (the round is still ``closing``).
"""

from __future__ import annotations

import logging
import shutil
import threading
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
        self._lock = threading.Lock()  # the checkpointer collects one round at a time

    def start(self) -> SwarmHook:
        self.ckpt.start()
        peers = self.ckpt.initial_peers
        self.app.rounds.dht_peers = lambda: list(peers)
        self.app.rounds.on_round_closed.append(self.on_round_closed)
        for rnd in self.app.rounds.list():
            if rnd.kind == "pretrain" and rnd.state == "closing":
                log.info("round %d was closing when the coordinator stopped: collecting again", rnd.id)
                self.on_round_closed(rnd)
        return self

    def on_round_closed(self, rnd: RoundRow) -> None:
        if rnd.kind != "pretrain" or rnd.state != "closing":
            return
        threading.Thread(target=self._collect, args=(rnd,), name=f"collect-r{rnd.id}", daemon=True).start()

    def _collect(self, rnd: RoundRow) -> None:
        app = self.app
        work = app.blobs.temp_dir(prefix=f"collect-r{rnd.id}-")
        try:
            with self._lock:
                out = work / "model"
                metrics = self.ckpt.collect(
                    rnd.run_id,
                    app.versions.directory(rnd.base_version),
                    out,
                    min_epoch=int(rnd.options.get("epochs", 1)),
                    timeout=float(rnd.options.get("collect_timeout_s", 600.0)),
                )
                app.rounds.record_version(out, rnd.id, kind="pretrain", metrics=metrics)
        except Exception as exc:  # recorded on the round, where the admin sees it
            log.exception("collecting round %d failed", rnd.id)
            app.rounds.fail_round(rnd.id, f"collecting the swarm's state failed: {exc}")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def stop(self) -> None:
        self.ckpt.shutdown()
