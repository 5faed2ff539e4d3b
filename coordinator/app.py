"""The coordinator's state and handlers, wired together (no gRPC here).

:class:`Coordinator` owns the database, the blob store and the single-purpose
parts built over them (auth, versions, workers, the round state machine,
assignments, contributions, the merge pipeline, uploads); the gRPC servicers
(:mod:`coldswarm.coordinator.service`) call into them, and tests may call them
directly.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from coldswarm.coordinator.assignments import Assignments
from coldswarm.coordinator.auth import Auth
from coldswarm.coordinator.blobs import BlobStore
from coldswarm.coordinator.config import CoordinatorConfig
from coldswarm.coordinator.contributions import Contributions
from coldswarm.coordinator.errors import FailedPrecondition, PermissionDenied
from coldswarm.coordinator.limits import Door
from coldswarm.coordinator.merge_pipeline import MergePipeline
from coldswarm.coordinator.rounds import RoundStateMachine
from coldswarm.coordinator.series import SwarmSeries
from coldswarm.coordinator.states import VersionKind, VersionState
from coldswarm.coordinator.store import Store
from coldswarm.coordinator.swarm_admission import SwarmAdmission
from coldswarm.coordinator.uploads import UploadManager
from coldswarm.coordinator.versions import VersionRow, VersionStore
from coldswarm.coordinator.workers import WorkerRegistry

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """The coordinator cannot start with this configuration; the message says what to change."""


class Coordinator:
    def __init__(self, config: CoordinatorConfig, dht_peers: Callable[[], list[str]] | None = None):
        """``dht_peers``: the swarm's DHT bootstrap multiaddrs handed to workers (Register, PretrainTask);
        by default ``config.dht_peers`` (with ``--dht-listen``, the pretrain collector's own peer)."""
        self.config = config
        self.dht_peers: Callable[[], list[str]] = dht_peers or (lambda: list(config.dht_peers))
        data = Path(config.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        os.chmod(data, 0o700)  # tokens, contributions: nobody else's business
        self.store = Store(data / "state.sqlite")
        self.blobs = BlobStore(data)
        self.auth = Auth(self.store, config.admin_token_path)
        self.versions = VersionStore(self.store, self.blobs, data / "versions")
        self.workers = WorkerRegistry(self.store, self.auth, config.worker_gone_after_s)
        # The swarm's curves per pretrain round: from heartbeats here, from the DHT by the pretrain collector.
        self.series = SwarmSeries(
            self.store,
            max_points=config.series_max_points,
            min_interval_s=config.series_interval_s,
            heartbeat_window_s=3 * config.heartbeat_interval_s,
        )
        self.workers.on_heartbeat.append(self.series.on_heartbeat)
        # Closing a fusion round queues its merge on the pipeline built below.
        self.rounds = RoundStateMachine(
            self.store,
            self.versions,
            config,
            dht_peers=self.dht_peers,
            merge=lambda round_id: self.merges.enqueue(round_id),
        )
        self.assignments = Assignments(self.store, self.rounds, self.workers, self.dht_peers)
        self.contributions = Contributions(self.store, self.rounds, self.assignments)
        self.merges = MergePipeline(self.blobs, self.versions, self.rounds, self.contributions, config)
        self.swarm = SwarmAdmission(
            self.store, self.assignments, self.rounds, config.swarm_key_path, config.swarm_credential_ttl_s
        )
        self.uploads = UploadManager(
            self.store,
            self.blobs,
            self.versions,
            self.rounds,
            self.contributions,
            data / "uploads",
            config.max_upload_bytes,
            config.chunk_bytes,
            config.max_metrics_bytes,
        )
        # Cleanup when it is due, not at the next start: a round that closed takes no more uploads, and
        # a worker that left will never resume one.
        self.rounds.cleanups.append(
            lambda rnd: self.uploads.discard_round(rnd.id, f"round {rnd.id} is {rnd.state}")
        )
        self.workers.on_leave.append(
            lambda worker_id: self.uploads.discard_worker(worker_id, "its worker left")
        )
        self.door = Door(config.max_metrics_bytes, config.max_options_bytes)
        # Stored JSON longer than this (rows from before the limits) is not listed; see service.worker_pb.
        self.listing_json_chars = 4 * max(config.max_metrics_bytes, 16 * 1024)
        self._paths = sorted(
            {str(data), str(data.resolve()), *(() if config.base_model is None else (str(config.base_model),
             str(Path(config.base_model).resolve())))},
            key=len,
            reverse=True,
        )  # fmt: skip
        self.started_at = time.time()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- first start ----------------------------------------------------------------------

    def init_state(self) -> str | None:
        """Admin token and version 0, when missing. Returns a newly made admin token, else None."""
        token = self.auth.ensure_admin_token()
        if self.config.join_token_file is not None and self.auth.ensure_join_token_file(
            self.config.join_token_file
        ):
            log.info("join token written to %s", self.config.join_token_file)
        self.ensure_version0()
        return token

    def ensure_version0(self) -> VersionRow | None:
        if self.versions.count():
            if self.config.base_model is not None:
                log.info(
                    "the state already has versions; --base-model %s is not used", self.config.base_model
                )
            return None
        if self.config.base_model is not None:
            return self.create_version0(self.config.base_model)
        try:
            from coldswarm.lm.default import build_default_version
        except ImportError:
            raise ConfigError(
                "there is no version 0 yet and the embedded default model (coldswarm.lm.default) is not "
                "available: pass --base-model DIR, an HF model directory with safetensors weights"
            ) from None
        work = self.blobs.temp_dir(prefix="default-")
        try:
            out = work / "model"
            build_default_version(out, size="tiny")
            return self.create_version0(out, source="coldswarm.lm.default (tiny)")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def create_version0(
        self, model_dir: Path, method: str = VersionKind.INIT, source: str | None = None
    ) -> VersionRow:
        """Record ``model_dir`` as version 0 and publish it."""
        if self.versions.count():
            raise FailedPrecondition("version 0 exists already; later versions come from rounds")
        # Version 0 carries metrics too, so every later version compares against where the run began.
        metrics = self.merges.evaluate(Path(model_dir))
        row = self.versions.create(
            Path(model_dir),
            parent=None,
            round_id=None,
            kind=VersionKind.INIT,
            method=method,
            metrics=metrics,
            publish=True,
            # Every worker reads this manifest: it says where version 0 came from without naming a
            # directory of the coordinator's machine.
            extra={
                "source": source or "a model directory given to the coordinator (--base-model)",
                **self.merges.evaluated_by(),
            },
        )
        log.info("version 0 created from %s", model_dir)
        return row

    def version_for_worker(self, spec: str | int) -> int:
        """The version ``spec`` names, if workers may read it: a published one (the pointer, or one it
        was at), or the base of the live round (which its workers must download). Candidates and rejected
        versions are the admin's (PERMISSION_DENIED)."""
        number = self.versions.resolve(spec)
        state = self.versions.state(number)
        if state == VersionState.PUBLISHED:
            return number
        live = self.rounds.live()
        if live is not None and live.base_version == number:
            return number
        raise PermissionDenied(
            f"version {number} is {state}, not published: workers read published versions and the "
            "base of the open round"
        )

    def redact(self, message: str) -> str:
        """``message`` without this coordinator's own paths (data dir, base model): a refusal goes to callers."""
        for path in self._paths:
            if path and path != ".":
                message = message.replace(path, "<coordinator path>")
        return message

    def uptime(self) -> float:
        return time.time() - self.started_at

    # -- running --------------------------------------------------------------------------

    def start(self) -> None:
        """Recover from a kill, then start the merge thread and the ticker."""
        self.recover()
        self.merges.start()
        self._ticker = threading.Thread(target=self._tick_loop, name="coldswarm-tick", daemon=True)
        self._ticker.start()

    def recover(self) -> None:
        """Remove what a killed process left half-done: temp files, orphan blobs, stale uploads."""
        self.blobs.sweep_temp()
        self.uploads.recover()
        referenced = {r[0] for r in self.store.all("SELECT sha256 FROM version_files")}
        referenced |= {r[0] for r in self.store.all("SELECT sha256 FROM contributions")}
        for sha in self.blobs.all() - referenced:
            # Only a kill between "blob stored" and "row committed" makes these.
            log.info("removing blob %s that no row refers to", sha)
            self.blobs.delete(sha)

    def tick(self) -> None:
        """What the ticker does every ``tick_s``: write heartbeats and the swarm's curves from them, free the
        assignments of workers gone silent, close rounds whose deadline passed."""
        self.workers.flush()
        self.series.flush()
        self.assignments.expire_silent()
        self.rounds.close_overdue()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.config.tick_s):
            try:
                self.tick()
            except Exception:  # a bad tick must not end the loop
                log.exception("tick failed")

    def stop(self) -> None:
        self._stop.set()
        self.merges.stop()
        try:
            self.workers.flush()
        except Exception:
            log.exception("flushing heartbeats at stop failed")
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        self.store.close()
