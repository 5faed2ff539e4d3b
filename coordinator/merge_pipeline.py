"""From a round's result to a version: merge → evaluate → decide publication → record.

A fusion round that closes is queued here (``RoundStateMachine(merge=...)``); one
background thread merges it, so RPCs never wait for a merge (the admin ``Merge``
RPC, a deliberate re-merge into a candidate, is the one exception and says so).
Each merge goes through the same steps, one method each:

1. :meth:`MergePipeline._merge_weights` — the contributions onto the base, with
   fusion's method registry (:mod:`coldswarm.coordinator.merge`), into a temp dir;
2. :meth:`MergePipeline.evaluate` — the configured evaluator (``--evaluator
   module:function``, loaded by :func:`load_evaluator`), if any;
3. :meth:`MergePipeline.judge` — the publication gate (:mod:`coldswarm.coordinator.publication_gate`):
   the candidate's scores against its parent's, by the round's ``gate`` option; the one place that
   decides whether a result is published, for fusion merges and pretrain results alike;
4. :meth:`MergePipeline._record_merge` — one transaction records the version, marks the
   round and its contributions.

The pretrain collector records the swarm's averaged state (merged by hivemind,
not here) through :meth:`MergePipeline.record_version`.
"""

from __future__ import annotations

import importlib
import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from coldswarm.common.manifest import EVALUATION_PROTOCOL_KEY
from coldswarm.common.quoting import quote
from coldswarm.coordinator import merge as merge_bridge
from coldswarm.coordinator.blobs import BlobStore
from coldswarm.coordinator.config import CoordinatorConfig
from coldswarm.coordinator.contributions import ContributionRow, Contributions
from coldswarm.coordinator.errors import FailedPrecondition, InvalidArgument
from coldswarm.coordinator.limits import parse_json_object
from coldswarm.coordinator.publication_gate import GateDecision, PublishPolicy, decide
from coldswarm.coordinator.rounds import RoundRow, RoundStateMachine
from coldswarm.coordinator.states import REMERGEABLE_STATES, RoundKind, RoundState, VersionKind
from coldswarm.coordinator.versions import VersionRow, VersionStore

log = logging.getLogger(__name__)

Evaluator = Callable[[Path], dict]


def load_evaluator(spec: str) -> Evaluator | None:
    """``module:function`` → the function (``function(version_dir) -> metrics``); empty → None.
    An evaluator whose results depend on data or code that an upgrade may change should report a
    fingerprint of them as ``metrics["protocol"]`` (:data:`EVALUATION_PROTOCOL_KEY`)."""
    if not spec:
        return None
    module, _, func = spec.partition(":")
    if not func:
        raise ValueError(f"evaluator {spec!r} must be 'module:function'")
    return getattr(importlib.import_module(module), func)


class MergePipeline:
    """Merges closed fusion rounds on a background thread and records round results as versions."""

    def __init__(
        self,
        blobs: BlobStore,
        versions: VersionStore,
        rounds: RoundStateMachine,
        contributions: Contributions,
        config: CoordinatorConfig,
    ):
        self.blobs = blobs
        self.versions = versions
        self.rounds = rounds
        self.contributions = contributions
        self.config = config
        self.evaluator = load_evaluator(config.evaluator)
        # version -> this evaluator's metrics of it: the gate's parent scores, on the same examples as the
        # candidate's. Filled as versions are recorded; a version recorded before a restart is scored again.
        self._scores: dict[int, dict] = {}
        self._merge_lock = threading.Lock()  # one merge at a time (memory)
        # Called with ("merge" | "evaluate", seconds) after each step, e.g. by the Prometheus metrics.
        self.on_stage_seconds: list[Callable[[str, float], None]] = []
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the merge thread -----------------------------------------------------------------

    def start(self) -> None:
        """Start the merge thread and re-queue merges a kill interrupted."""
        self._thread = threading.Thread(target=self._merge_loop, name="coldswarm-merge", daemon=True)
        self._thread.start()
        for round_id in self.rounds.pending_merges():
            log.info("round %d was interrupted while merging: merging it again", round_id)
            self._queue.put(round_id)

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def enqueue(self, round_id: int) -> None:
        """Merge fusion round ``round_id`` (closed, awaiting its merge) on the merge thread."""
        self._queue.put(round_id)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until queued merges are done (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.empty() and not self._merge_lock.locked() and not self.rounds.any_merge_pending():
                return
            time.sleep(0.05)
        raise TimeoutError("merges still running")

    def _merge_loop(self) -> None:
        while not self._stop.is_set():
            round_id = self._queue.get()
            if round_id is None:
                return
            try:
                self._merge_round(round_id)
            except Exception as exc:  # recorded on the round; the thread keeps serving other rounds
                log.exception("merge of round %d failed", round_id)
                self.rounds.fail_merge(round_id, f"merge failed: {exc}")

    def _merge_round(self, round_id: int) -> None:
        rnd = self.rounds.start_merge(round_id)
        if rnd is None:
            return
        self._merge(rnd, rnd.method, rnd.options.get("merge", {}), round_result=True)

    # -- the admin's re-merge -------------------------------------------------------------

    def merge_now(self, round_id: int, method: str = "", options_json: str = "") -> VersionRow:
        """Admin re-merge of a finished round into a candidate version (runs in the caller's thread).

        ``round_id`` 0 means the latest fusion round that has finished.
        """
        if not round_id:
            latest = self.rounds.latest_remergeable()
            if latest is None:
                raise FailedPrecondition("no fusion round has finished yet: there is nothing to re-merge")
            round_id = latest
        rnd = self.rounds.get(round_id)
        if rnd.kind != RoundKind.FUSION:
            raise FailedPrecondition(f"round {round_id} is a {rnd.kind} round; only fusion rounds merge")
        if rnd.state not in REMERGEABLE_STATES:
            raise FailedPrecondition(
                f"round {round_id} is {rnd.state}: re-merge a round after it has published or failed"
            )
        if rnd.contributions == 0:
            raise FailedPrecondition(f"round {round_id} has no contributions to merge")
        method = method or rnd.method
        if method not in merge_bridge.available_methods():
            raise InvalidArgument(
                f"merge method {quote(method)} is not available; one of {merge_bridge.available_methods()}"
            )
        if options_json.strip():
            options = parse_json_object(
                options_json, "the merge options", self.config.max_options_bytes, "--max-options-bytes"
            )
        else:
            options = rnd.options.get("merge", {})
        merge_bridge.check_merge_options(method, options)
        return self._merge(rnd, method, options, round_result=False)

    # -- the steps ------------------------------------------------------------------------

    def _merge(self, rnd: RoundRow, method: str, options: dict, round_result: bool) -> VersionRow:
        """Merge ``rnd``'s contributions into a version. ``round_result``: it is the round's result (the
        round becomes published or merged, and it may be published); else a candidate (a re-merge)."""
        contributions = self.contributions.list(rnd.id)
        with self._merge_lock:
            work = self.blobs.temp_dir(prefix=f"merge-r{rnd.id}-")
            try:
                out = work / "model"
                t0 = time.monotonic()
                report = self._merge_weights(rnd, method, options, contributions, out)
                self._timed("merge", t0)
                if self.config.merge_delay_s:
                    # Test hook (COLDSWARM_TEST_MERGE_DELAY_S): widen the window in which a kill
                    # lands mid-merge, after the weights are written but before anything is recorded.
                    time.sleep(self.config.merge_delay_s)
                metrics = self.evaluate(out)
                decision = self.judge(rnd, rnd.base_version, metrics)
                version = self._record_merge(
                    rnd, method, contributions, out, report, metrics, decision, round_result, t0
                )
            finally:
                shutil.rmtree(work, ignore_errors=True)
        log.info("round %d merged (%s) into version %d", rnd.id, method, version.number)
        return version

    def _merge_weights(
        self, rnd: RoundRow, method: str, options: dict, contributions: list[ContributionRow], out: Path
    ) -> dict:
        """Write the merge of ``contributions`` onto ``rnd``'s base to ``out``; returns fusion's report."""
        return merge_bridge.merge(
            self.versions.directory(rnd.base_version),
            [self.blobs.path(c.sha256) for c in contributions],
            method,
            options,
            out,
            keys=[str(c.id) for c in contributions],
            base_version=rnd.base_version,
        )

    def evaluate(self, model_dir: Path) -> dict:
        """The configured evaluator's metrics for ``model_dir``; empty without an evaluator."""
        if self.evaluator is None:
            return {}
        began = time.monotonic()
        try:
            return dict(self.evaluator(model_dir) or {})
        finally:
            self._timed("evaluate", began)

    def _timed(self, stage: str, began: float) -> None:
        seconds = time.monotonic() - began
        for callback in self.on_stage_seconds:
            try:
                callback(stage, seconds)
            except Exception:  # a listener's bug must not fail a merge
                log.exception("stage-seconds listener failed")

    def judge(self, rnd: RoundRow, parent: int | None, metrics: dict) -> GateDecision:
        """The publication gate's decision on ``rnd``'s result, evaluated to ``metrics``, against version
        ``parent`` (scored by the same evaluator; cached). A gate the coordinator cannot honour any more
        (if-better after a restart without ``--evaluator``) holds the result back, saying why."""
        try:
            gate = self.rounds.gate_of(rnd.kind, rnd.options)
        except InvalidArgument as exc:
            return GateDecision.held_back(str(exc))
        if gate.policy == PublishPolicy.ALWAYS:
            return decide(gate, metrics, None)
        parent_scores = (
            None if parent is None else self.scores_of(parent, metrics.get(EVALUATION_PROTOCOL_KEY))
        )
        return decide(gate, metrics, parent_scores)

    def scores_of(self, number: int, protocol: object = None) -> dict | None:
        """This evaluator's metrics of version ``number``: those its manifest records if this evaluator
        (the same ``--evaluator``) scored it under the same ``protocol``, else scored now (once; cached).
        None without an evaluator.

        ``protocol`` is what the evaluator says of its own test set and code (its metrics'
        ``protocol`` entry, if it reports one): scores made before an upgrade changed either are
        not comparable with the candidate's, so the parent is scored again."""
        if self.evaluator is None:
            return None
        if number not in self._scores:
            manifest = json.loads(self.versions.get(number).manifest_json)
            if manifest.get("evaluated_by") == self.config.evaluator and manifest.get("metrics"):
                self._scores[number] = manifest["metrics"]
        scores = self._scores.get(number)
        if scores is None or (protocol is not None and scores.get(EVALUATION_PROTOCOL_KEY) != protocol):
            scores = self._scores[number] = self.evaluate(self.versions.directory(number))
        return scores

    def evaluated_by(self) -> dict:
        """The manifest field saying which evaluator scored a version's ``metrics`` (none without one): the
        gate compares a candidate with a parent's stored scores only if the same evaluator made them."""
        return {"evaluated_by": self.config.evaluator} if self.evaluator is not None else {}

    def _remember(self, version: VersionRow, metrics: dict) -> VersionRow:
        if self.evaluator is not None and metrics:
            self._scores[version.number] = metrics
        return version

    def _record_merge(
        self,
        rnd: RoundRow,
        method: str,
        contributions: list[ContributionRow],
        out: Path,
        report: dict | None,
        metrics: dict,
        decision: GateDecision,
        round_result: bool,
        started: float,
    ) -> VersionRow:
        """One transaction: the version, the round's result (when ``round_result``), each contribution's fate.
        A round's result that passed the gate is published (unless ``--no-auto-publish``); one that failed is
        a rejected version and its round ends rejected. A re-merge is a candidate (or rejected) either way."""
        dropped = {str(k) for k in (report or {}).get("dropped", [])}
        screened_out = {c.id for c in contributions if str(c.id) in dropped}
        publish = round_result and decision.passed and self.config.auto_publish
        if publish:
            state = RoundState.PUBLISHED
        else:
            state = RoundState.MERGED if decision.passed else RoundState.REJECTED

        def mark(c, number: int) -> None:
            if round_result:
                note = "" if decision.passed else f"held back by the publication gate: {decision.reason}"
                self.rounds.finish_merge(c, rnd.id, number, state, note)
            self.contributions.mark_merged(c, [x.id for x in contributions], screened_out)

        version = self.versions.create(
            out,
            parent=rnd.base_version,
            round_id=rnd.id,
            kind=VersionKind.FUSION,
            method=method,
            # Every worker reads this manifest: contributions by id, never by worker (the admin's
            # ListContributions maps ids to workers), so no worker learns who else contributed what.
            contributions=[
                {"id": c.id, "sha256": c.sha256, "num_examples": c.num_examples} for c in contributions
            ],
            metrics=metrics,
            publish=publish,
            rejected=not decision.passed,
            extra={
                **self.evaluated_by(),
                "merge_report": _jsonable(report),
                "merge_seconds": round(time.monotonic() - started, 3),
                "gate": decision.record,
            },
            on_commit=mark,
        )
        return self._remember(version, metrics)

    # -- results merged elsewhere (the pretrain checkpointer) ------------------------------

    def record_version(
        self,
        model_dir: Path,
        round_id: int | None = None,
        kind: str = VersionKind.PRETRAIN,
        metrics: dict | None = None,
        publish: bool = True,
        method: str | None = None,
        extra: dict | None = None,
    ) -> VersionRow:
        """Record ``model_dir`` (an HF directory with safetensors weights) as the next version.

        For the pretrain checkpointer: call it with the averaged state written to a
        directory (it is copied into the blob store; the directory may be deleted after).
        With ``round_id`` the version's parent is that round's latest result (or its
        base), the round's publication gate decides (:meth:`judge`; ``publish`` False keeps
        a result that passes a candidate), and a round that was ``closing`` becomes
        ``published`` or ``rejected``. ``extra``: more manifest fields (the swarm's
        participants). Returns the version.
        """
        parent = self.versions.current()
        rnd = None
        decision = None
        if round_id is not None:
            rnd = self.rounds.get(round_id)
            parent = rnd.result_version if rnd.result_version is not None else rnd.base_version
            decision = self.judge(rnd, parent, metrics or {})
            publish = publish and decision.passed

        def mark(c, number: int) -> None:
            if rnd is not None:
                held = None if decision.passed else f"held back by the publication gate: {decision.reason}"
                self.rounds.record_result(c, rnd, number, rejected=held)

        version = self.versions.create(
            Path(model_dir),
            parent=parent,
            round_id=round_id,
            kind=kind,
            method=method or kind,
            metrics=metrics or {},
            publish=publish,
            rejected=decision is not None and not decision.passed,
            extra={
                **(extra or {}),
                **self.evaluated_by(),
                **({"gate": decision.record} if decision is not None else {}),
            },
            on_commit=mark,
        )
        return self._remember(version, metrics or {})


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return json.loads(json.dumps(value, default=str))
