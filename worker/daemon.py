"""The ``join-swarm`` daemon: register, heartbeat, take work, do it, contribute, repeat.

Life cycle:

1. Register with the join token (or reuse the session saved in ``work_dir`` for
   this coordinator) and receive a session token of the worker's own.
2. A heartbeat thread reports progress every few seconds; the coordinator can
   answer "cancel" (the round closed), which stops the job at its next step.
3. Ask for an assignment; download the base version into the sha256-keyed cache;
   run the job; upload what it produced (resumable); report the outcome.
4. Coordinator unreachable: retry with exponential backoff and jitter, keeping
   local progress (a finished contribution waits in ``work_dir/outbox`` and is
   uploaded when the coordinator is back, also after a worker restart).
5. SIGINT/SIGTERM: stop at the next step boundary, upload nothing partial, tell
   the coordinator (Leave), exit 0. A second signal exits at once.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import grpc
from google.protobuf import json_format

from coldswarm.common.durable import write_private
from coldswarm.common.rpc_errors import rpc_message
from coldswarm.common.signals import install_stop_handler
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.worker.backoff import Backoff
from coldswarm.worker.capabilities import detect_capabilities, measure_bandwidth, resolve_device
from coldswarm.worker.client import CoordinatorClient, Stopped
from coldswarm.worker.config import WorkerConfig
from coldswarm.worker.downloads import VersionCache
from coldswarm.worker.jobs import Cancelled, JobContext, JobResult
from coldswarm.worker.progress import Progress, byte_bar, interactive
from coldswarm.worker.session import Session, load_session, save_session
from coldswarm.worker.uploads import upload_contribution

log = logging.getLogger("coldswarm.worker")

# Outcomes of an upload the coordinator refused for good: keeping the payload would retry forever.
FINAL_UPLOAD_CODES = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


def _cpu_bf16(asked: bool, device: str) -> bool:
    """``--cpu-bf16`` where it helps: on a CPU device that computes bf16 natively; a warning elsewhere."""
    if not asked:
        return False
    from coldswarm.worker.devices import cpu_bf16_supported

    if device != "cpu":
        log.warning("--cpu-bf16 ignored: training runs on %s (bf16 there follows the device)", device)
        return False
    if not cpu_bf16_supported():
        log.warning("--cpu-bf16 ignored: this CPU has neither AVX512-BF16 nor AMX, so bf16 would be emulated")
        return False
    log.info("finetuning in bf16 autocast on this CPU (--cpu-bf16)")
    return True


class Worker:
    def __init__(self, config: WorkerConfig, stop: threading.Event | None = None):
        self.config = config
        self.stop = stop or threading.Event()
        self.cancel = threading.Event()
        self.progress = Progress(show_bar=interactive())
        self.device = resolve_device(config.device)
        self.cpu_bf16 = _cpu_bf16(config.cpu_bf16, self.device)
        self.work_dir = Path(config.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.cache = VersionCache(self.work_dir / "cache")
        self.outbox = self.work_dir / "outbox"
        self.outbox.mkdir(exist_ok=True)
        self.client = CoordinatorClient(
            config.coordinator, config.token, ca_file=config.ca_file, stop=self.stop
        )
        self.session: Session | None = None
        self._heartbeat: threading.Thread | None = None
        self.failure_backoff = Backoff(base_s=5.0, cap_s=120.0)

    # -- life cycle ---------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int) -> None:
            if self.stop.is_set():
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                raise SystemExit(130)
            log.info("%s received: stopping at the next step boundary", signal.Signals(signum).name)
            self.stop.set()
            self.cancel.set()

        install_stop_handler(on_signal)

    def run(self) -> int:
        try:
            self.register()
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
            self._heartbeat.start()
            self.flush_outbox()
            self._work_loop()
        except Stopped:
            pass
        finally:
            self.stop.set()
            self.cancel.set()
            if self.session is not None:
                self._leave()
            self.client.close()
        return 0

    def _work_loop(self) -> None:
        done = 0
        idle_since = time.monotonic()
        while not self.stop.is_set():
            assignment: pb.Assignment = self.client.call("GetAssignment", pb.GetAssignmentRequest())
            if not assignment.id:
                idle_for = time.monotonic() - idle_since
                if self.config.exit_when_idle_s and idle_for >= self.config.exit_when_idle_s:
                    log.info("no work offered for %.0fs: exiting", idle_for)
                    return
                self.stop.wait(min(assignment.retry_after_s or 5.0, 5.0))
                continue
            if not self.run_assignment(assignment):
                # A failed assignment is often offered again at once: don't spin on it.
                delay = self.failure_backoff.next_delay()
                log.info("waiting %.0fs before asking for work again", delay)
                self.stop.wait(delay)
            else:
                self.failure_backoff.reset()
            done += 1
            idle_since = time.monotonic()
            if self.config.max_assignments and done >= self.config.max_assignments:
                log.info("finished %d assignment(s): exiting", done)
                return

    # -- registration and heartbeat -----------------------------------------------------------

    @property
    def session_file(self) -> Path:
        return self.work_dir / "session.json"

    def register(self) -> None:
        saved = load_session(self.session_file, self.config.coordinator)
        if saved is not None:
            self.client.token = saved.session_token
            try:
                self.client.call("Heartbeat", pb.HeartbeatRequest(phase="idle"))
                self.session = saved
                self.progress.update(bandwidth_bytes_per_s=saved.bandwidth_bytes_per_s)
                log.info("resumed as worker %s", saved.worker_id)
                return
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise
                log.info("saved session no longer valid (%s); registering again", rpc_message(exc))
        measured_before = saved.bandwidth_bytes_per_s if saved is not None else 0.0
        self.client.token = self.config.token
        caps = detect_capabilities(self.device, self.work_dir, measured_before)
        name = self.config.name or socket.gethostname()
        reply: pb.RegisterResponse = self.client.call(
            "Register", pb.RegisterRequest(name=name, capabilities=caps)
        )
        self.session = Session(
            coordinator=self.config.coordinator,
            worker_id=reply.worker_id,
            session_token=reply.session_token,
            heartbeat_interval_s=reply.heartbeat_interval_s or 5.0,
            dht_initial_peers=list(reply.dht_initial_peers),
        )
        save_session(self.session_file, self.session)  # before anything else: a kill must not orphan it
        self.client.token = reply.session_token
        log.info("registered as worker %s (%s, device %s)", reply.worker_id, name, self.device)
        # Only a registered worker may download, so the rate goes out with heartbeats (and with the
        # capabilities of this worker's next registration).
        self.session.bandwidth_bytes_per_s = measure_bandwidth(self.client) or measured_before
        self.progress.update(bandwidth_bytes_per_s=self.session.bandwidth_bytes_per_s)
        if self.session.bandwidth_bytes_per_s:
            log.info("bandwidth from the coordinator: %.1f MB/s", self.session.bandwidth_bytes_per_s / 1e6)
        save_session(self.session_file, self.session)

    def _heartbeat_loop(self) -> None:
        interval = self.session.heartbeat_interval_s if self.session else 5.0
        while not self.stop.wait(interval):
            try:
                reply = self.client.stub.Heartbeat(
                    self.progress.heartbeat(), metadata=self.client.metadata, timeout=interval
                )
                if reply.cancel_assignment and self.progress.assignment_id:
                    log.info(
                        "coordinator cancelled assignment %s: %s", self.progress.assignment_id, reply.message
                    )
                    self.cancel.set()
            except grpc.RpcError as exc:
                # The main loop owns retries and backoff; a missed heartbeat is only worth a debug line.
                log.debug("heartbeat failed: %s", rpc_message(exc))

    def _leave(self) -> None:
        try:
            self.client.stub.Leave(
                pb.LeaveRequest(reason="worker stopped"), metadata=self.client.metadata, timeout=5
            )
        except grpc.RpcError as exc:
            log.debug("could not tell the coordinator we left: %s", rpc_message(exc))

    # -- assignments --------------------------------------------------------------------------

    def run_assignment(self, assignment: pb.Assignment) -> bool:
        """Run one assignment to its end; True if it was done, False if it failed or was aborted."""
        kind = assignment.WhichOneof("task")
        log.info(
            "assignment %s: %s round %d on version %d",
            assignment.id,
            kind,
            assignment.round_id,
            assignment.base_version,
        )
        self.cancel.clear()
        self.progress.update(
            assignment_id=assignment.id, phase="downloading", step=0, total_steps=0, loss=0.0
        )
        scratch = self.work_dir / "scratch" / assignment.id
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            with byte_bar(f"version {assignment.base_version}", 0) as advance:
                version_dir = self.cache.ensure(self.client, assignment.base_version, advance)
            ctx = JobContext(
                assignment=assignment,
                version_dir=version_dir,
                scratch_dir=scratch,
                data_dir=self.config.data_dir,
                device=self.device,
                progress=self.progress,
                cancel=self.cancel,
                stopping=self.stop,
                dht_initial_peers=list(self.session.dht_initial_peers) if self.session else [],
                swarm_host_maddrs=list(self.config.swarm_host_maddrs),
                swarm_announce_maddrs=list(self.config.swarm_announce_maddrs),
                swarm_identity_path=self.work_dir / "swarm-identity.key",
                swarm_credential=lambda public_key, aid=assignment.id: self.client.call(
                    "GetSwarmCredential",
                    pb.SwarmCredentialRequest(assignment_id=aid, public_key=public_key),
                    retry=False,
                    timeout=30,
                ),
                on_bad_record="raise" if self.config.strict_data else "skip",
                cpu_bf16=self.cpu_bf16,
            )
            result = self._run_job(kind, ctx)
            if result.payload is not None:
                self._queue_and_upload(assignment, result)
            self._report(assignment.id, "done", "", result.metrics)
            return True
        except (Cancelled, Stopped) as exc:
            self._report(assignment.id, "aborted", str(exc), {})
            if isinstance(exc, Stopped):
                raise
            return False
        except grpc.RpcError as exc:
            log.error("assignment %s failed: %s", assignment.id, rpc_message(exc))
            self._report(assignment.id, "failed", rpc_message(exc), {})
            return False
        except Exception as exc:
            log.exception("assignment %s failed", assignment.id)
            self._report(assignment.id, "failed", f"{type(exc).__name__}: {exc}", {})
            return False
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            self.progress.update(assignment_id="", phase="idle", step=0, total_steps=0, metrics={})

    def _run_job(self, kind: str | None, ctx: JobContext) -> JobResult:
        if kind == "fusion":
            from coldswarm.worker.fusion_job import run_fusion_job

            return run_fusion_job(ctx, ctx.assignment.fusion)
        if kind == "pretrain":
            from coldswarm.worker.pretrain_job import run_pretrain_job

            return run_pretrain_job(ctx, ctx.assignment.pretrain)
        raise ValueError(f"this worker does not know assignments of kind {kind!r}; upgrade coldswarm")

    def _report(self, assignment_id: str, outcome: str, message: str, metrics: dict[str, float]) -> None:
        request = pb.ReportAssignmentRequest(
            assignment_id=assignment_id,
            outcome=outcome,
            message=message[:2000],
            metrics={k: float(v) for k, v in metrics.items()},
        )
        try:
            # A stopping worker tries once; a working one waits out an outage.
            self.client.call("ReportAssignment", request, retry=not self.stop.is_set(), timeout=10)
        except (grpc.RpcError, Stopped) as exc:
            log.warning("could not report assignment %s as %s: %s", assignment_id, outcome, exc)

    # -- the outbox: finished contributions survive outages and restarts ----------------------

    def _queue_and_upload(self, assignment: pb.Assignment, result: JobResult) -> None:
        entry = self.outbox / assignment.id
        entry.mkdir(parents=True, exist_ok=True)
        payload = entry / "payload"
        shutil.move(str(result.payload), payload)
        meta = {
            "assignment": json_format.MessageToDict(assignment),
            "codec": result.codec,
            "num_examples": result.num_examples,
            "metrics": result.metrics,
        }
        write_private(entry / "meta.json", json.dumps(meta))
        self._upload_entry(entry)

    def _upload_entry(self, entry: Path) -> None:
        meta = json.loads((entry / "meta.json").read_text())
        assignment = json_format.ParseDict(meta["assignment"], pb.Assignment())
        self.progress.update(phase="uploading")
        payload = entry / "payload"
        try:
            with byte_bar(f"upload {assignment.id}", payload.stat().st_size) as advance:
                reply = upload_contribution(
                    self.client,
                    payload,
                    assignment=assignment,
                    codec=meta["codec"],
                    num_examples=int(meta["num_examples"]),
                    metrics_json=json.dumps(meta["metrics"]),
                    progress=advance,
                )
        except grpc.RpcError as exc:
            if exc.code() in FINAL_UPLOAD_CODES:
                log.error(
                    "coordinator refused contribution for %s: %s; discarding it",
                    assignment.id,
                    rpc_message(exc),
                )
                shutil.rmtree(entry, ignore_errors=True)
            raise
        log.info(
            "contribution %d stored (%d bytes, sha256 %s)",
            reply.contribution_id,
            reply.size,
            reply.sha256[:12],
        )
        shutil.rmtree(entry, ignore_errors=True)

    def flush_outbox(self) -> None:
        """Upload contributions finished before a restart or an outage."""
        for entry in sorted(p for p in self.outbox.iterdir() if (p / "meta.json").exists()):
            try:
                self._upload_entry(entry)
            except grpc.RpcError as exc:
                log.warning("pending contribution %s not uploaded: %s", entry.name, rpc_message(exc))
