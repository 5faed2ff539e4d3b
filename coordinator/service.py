"""The gRPC servicers: thin. Each RPC checks the token, calls a handler, maps errors.

Domain errors (:mod:`coldswarm.coordinator.errors`) become their status codes
with their message; anything else becomes INTERNAL with a pointer to the log,
and the server keeps serving.
"""

from __future__ import annotations

import functools
import logging
from importlib import metadata

import grpc

from coldswarm.common.quoting import bounded
from coldswarm.coordinator.app import Coordinator
from coldswarm.coordinator.assignments import AssignmentInfo
from coldswarm.coordinator.auth import Principal, token_key
from coldswarm.coordinator.contributions import ContributionRow
from coldswarm.coordinator.errors import CoordinatorError, InvalidArgument
from coldswarm.coordinator.limits import finite_or_none
from coldswarm.coordinator.paging import fill_page, page_request
from coldswarm.coordinator.rounds import RoundRow
from coldswarm.coordinator.states import RoundKind
from coldswarm.coordinator.uploads import Chunk
from coldswarm.coordinator.versions import VersionRow
from coldswarm.coordinator.workers import WorkerRow
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

try:
    COORDINATOR_VERSION = metadata.version("coldswarm")
except metadata.PackageNotFoundError:  # running from a source tree
    COORDINATOR_VERSION = "0+unknown"


def _fail(app: Coordinator, context, exc: Exception, name: str):
    """Abort the call: a domain error with its code and its message (bounded, and with no server path even
    where a part forgot), anything else INTERNAL with a pointer to the log (which alone has the details)."""
    if isinstance(exc, CoordinatorError):
        context.abort(exc.code, bounded(app.redact(exc.message)))
    log.exception("%s failed", name)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name} (details in the coordinator's log)")


def rpc(need: str):
    """Decorate a servicer method ``(self, request, context, principal)``: auth, the door's limits on the
    request (:mod:`coldswarm.coordinator.limits`), error mapping. A client-streaming method gets its
    request iterator, whose messages it checks itself."""

    def deco(fn):
        @functools.wraps(fn)
        def unary(self, request, context):
            try:
                principal = self.app.auth.authenticate(context.invocation_metadata(), need)
                if principal.worker_id:
                    self.app.workers.touch(principal.worker_id)
                if hasattr(request, "DESCRIPTOR"):
                    self.app.door.check(request)
                return fn(self, request, context, principal)
            except Exception as exc:  # mapped, never raised into grpc's thread
                _fail(self.app, context, exc, fn.__name__)

        return unary

    return deco


def rpc_stream(need: str):
    """Like :func:`rpc` for server-streaming methods (generators)."""

    def deco(fn):
        @functools.wraps(fn)
        def stream(self, request, context):
            try:
                principal = self.app.auth.authenticate(context.invocation_metadata(), need)
                self.app.door.check(request)
                yield from fn(self, request, context, principal)
            except Exception as exc:
                _fail(self.app, context, exc, fn.__name__)

        return stream

    return deco


# -- conversions -------------------------------------------------------------------------


def version_pb(v: VersionRow) -> pb.Version:
    msg = pb.Version(
        number=v.number,
        method=v.method,
        state=v.state,
        files=[pb.FileEntry(path=p, size=s, sha256=h) for p, s, h in v.files],
        manifest_json=v.manifest_json,
        created_at=v.created_at,
        is_current=v.is_current,
    )
    if v.parent is not None:
        msg.parent = v.parent
    if v.round_id is not None:
        msg.round_id = v.round_id
    return msg


def participant_pb(p: dict) -> pb.SwarmParticipant:
    """A manifest's ``swarm_participants`` entry (written by the checkpointer from signed records)."""

    def count(key: str) -> int:
        value = p.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    return pb.SwarmParticipant(
        worker_id=str(p.get("worker", "")),
        peer_id=str(p.get("peer_id", "")),
        samples=count("samples"),
        steps=count("steps"),
        epoch=min(count("epoch"), 2**32 - 1),
    )


def round_pb(r: RoundRow, participants: list[dict] = ()) -> pb.Round:
    msg = pb.Round(
        id=r.id,
        kind=r.kind,
        base_version=r.base_version,
        state=r.state,
        quorum=r.quorum,
        deadline=r.deadline,
        method=r.method,
        options_json=r.options_json,
        contributions=r.contributions,
        error=r.error,
        opened_at=r.opened_at,
        closed_at=r.closed_at,
        run_id=r.run_id,
        swarm_participants=[participant_pb(p) for p in participants],
    )
    if r.result_version is not None:
        msg.result_version = r.result_version
    return msg


def _json_for_listing(text: str, limit: int) -> str:
    """A stored JSON text for a reply; one larger than the door admits today (a row from before the limit)
    is replaced by a note, so it cannot make a page or a listing fail."""
    return text if len(text) <= limit else '{"omitted": "larger than this coordinator lists"}'


def contribution_pb(c: ContributionRow, limit: int = 64 * 1024) -> pb.Contribution:
    return pb.Contribution(
        id=c.id,
        round_id=c.round_id,
        worker_id=c.worker_id,
        base_version=c.base_version,
        form=c.form,
        size=c.size,
        sha256=c.sha256,
        num_examples=c.num_examples,
        metrics_json=_json_for_listing(c.metrics_json, limit),
        state=c.state,
        created_at=c.created_at,
    )


def worker_pb(w: WorkerRow, limit: int = 64 * 1024, swarm_totals: tuple[int, int] = (0, 0)) -> pb.WorkerInfo:
    caps = pb.Capabilities()
    try:
        caps.ParseFromString(w.capabilities)
    except Exception:  # stored by us from a parsed message; an old row must not break listing
        pass
    return pb.WorkerInfo(
        id=w.id,
        name=w.name,
        capabilities=caps,
        registered_at=w.registered_at,
        last_seen=w.last_seen,
        state=w.state,
        assignment_id=w.assignment_id,
        progress_json=_json_for_listing(w.progress_json, limit),
        swarm_samples=swarm_totals[0],
        swarm_rounds=swarm_totals[1],
    )


def assignment_pb(a: AssignmentInfo) -> pb.Assignment:
    msg = pb.Assignment(id=a.id, round_id=a.round_id, base_version=a.base_version, deadline=a.deadline)
    if a.kind == RoundKind.FUSION:
        msg.fusion.CopyFrom(pb.FusionTask(**a.task))
    else:
        msg.pretrain.CopyFrom(pb.PretrainTask(**a.task))
    return msg


def token_pb(t) -> pb.TokenInfo:
    return pb.TokenInfo(id=t.id, kind=t.kind, label=t.label, created_at=t.created_at, revoked=t.revoked)


def _download(app: Coordinator, number: int, request, context):
    path, size, _sha = app.versions.file(number, request.path)
    offset = int(request.offset)
    if offset > size:
        raise InvalidArgument(f"offset {offset} is past the end of that file ({size} bytes)")
    step = app.config.chunk_bytes
    with open(path, "rb") as fh:
        fh.seek(offset)
        while offset < size:
            data = fh.read(step)
            if not data:
                break
            yield pb.DataChunk(path=request.path, offset=offset, data=data)
            offset += len(data)


# -- WorkerService -----------------------------------------------------------------------


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    def __init__(self, app: Coordinator):
        self.app = app

    @rpc("join")
    def Register(self, request, context, principal: Principal):
        worker_id, token = self.app.workers.register(
            principal, request.name, request.capabilities.SerializeToString(), address=context.peer()
        )
        return pb.RegisterResponse(
            worker_id=worker_id,
            session_token=token,
            heartbeat_interval_s=self.app.config.heartbeat_interval_s,
            dht_initial_peers=list(self.app.dht_peers()),
        )

    @rpc("worker")
    def Heartbeat(self, request, context, principal: Principal):
        progress = {  # strict JSON for whoever lists it: NaN ("no loss yet") becomes null
            "assignment_id": request.assignment_id,
            "phase": request.phase,
            "step": request.step,
            "total_steps": request.total_steps,
            "loss": finite_or_none(request.loss),
            "samples_per_s": finite_or_none(request.samples_per_s),
            "metrics": {k: finite_or_none(v) for k, v in request.metrics.items()},
        }
        self.app.workers.heartbeat(principal.worker_id, progress)
        cancel = self.app.assignments.should_cancel(principal.worker_id, request.assignment_id)
        return pb.HeartbeatResponse(
            cancel_assignment=cancel, message="the assignment's round is no longer open" if cancel else ""
        )

    @rpc("worker")
    def GetAssignment(self, request, context, principal: Principal):
        a = self.app.assignments.assign(principal.worker_id)
        if a is None:
            return pb.Assignment(retry_after_s=self.app.config.heartbeat_interval_s)
        return assignment_pb(a)

    @rpc("worker")
    def ReportAssignment(self, request, context, principal: Principal):
        self.app.assignments.report(
            principal.worker_id, request.assignment_id, request.outcome, request.message
        )
        return pb.ReportAssignmentResponse()

    @rpc("worker")
    def GetVersion(self, request, context, principal: Principal):
        return version_pb(self.app.versions.get(self.app.version_for_worker(request.version)))

    @rpc_stream("worker")
    def DownloadVersion(self, request, context, principal: Principal):
        yield from _download(self.app, self.app.version_for_worker(request.version), request, context)

    @rpc("worker")
    def BeginUpload(self, request, context, principal: Principal):
        upload_id, offset, max_chunk = self.app.uploads.begin(
            principal.worker_id,
            assignment_id=request.assignment_id,
            round_id=request.round_id,
            base_version=request.base_version,
            total_size=request.total_size,
            codec=request.codec,
            num_examples=request.num_examples,
            metrics_json=request.metrics_json,
        )
        return pb.BeginUploadResponse(upload_id=upload_id, offset=offset, max_chunk_bytes=max_chunk)

    @rpc("worker")
    def UploadContribution(self, request_iterator, context, principal: Principal):
        door = self.app.door

        def chunks():
            for c in request_iterator:
                door.check(c)
                yield Chunk(c.upload_id, c.offset, c.data, c.sha256)

        result = self.app.uploads.receive(principal.worker_id, chunks(), context.is_active)
        return pb.UploadResponse(
            contribution_id=result.contribution_id, sha256=result.sha256, size=result.size
        )

    @rpc("worker")
    def Leave(self, request, context, principal: Principal):
        self.app.workers.leave(principal.worker_id)
        return pb.LeaveResponse()

    @rpc("worker")
    def GetSwarmCredential(self, request, context, principal: Principal):
        issued = self.app.swarm.issue(principal.worker_id, request.assignment_id, request.public_key)
        return pb.SwarmCredential(
            access_token=issued.token,
            authority_public_key=issued.authority_public_key,
            expires_at=issued.expires_at,
            renew_after_s=issued.renew_after_s,
            peer_id=issued.peer_id,
            run_id=issued.run_id,
        )


# -- AdminService ------------------------------------------------------------------------


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, app: Coordinator):
        self.app = app

    @rpc("admin")
    def Status(self, request, context, principal):
        total, active = self.app.workers.counts()
        msg = pb.StatusResponse(
            coordinator_version=COORDINATOR_VERSION,
            versions=self.app.versions.count(),
            workers_total=total,
            workers_active=active,
            dht_maddrs=list(self.app.dht_peers()),
            uptime_s=self.app.uptime(),
        )
        current = self.app.versions.current()
        if current is not None:
            msg.current_version = current
        live = self.app.rounds.live()
        if live is not None:
            msg.open_round.CopyFrom(round_pb(live))
        return msg

    # Every listing pages (AIP-158; coordinator/paging.py): a page is fetched with one row more than it
    # holds, to know whether another follows.

    @rpc("admin")
    def ListWorkers(self, request, context, principal):
        page = page_request("workers", request.page_size, request.page_token, gone=request.include_gone)
        rows = self.app.workers.list(request.include_gone, after=page.after, limit=page.size + 1)
        limit = self.app.listing_json_chars
        totals = self.app.swarm.worker_totals()
        items, token = fill_page(
            rows, lambda kr: worker_pb(kr[1], limit, totals.get(kr[1].id, (0, 0))), lambda kr: kr[0], page
        )
        return pb.ListWorkersResponse(workers=items, next_page_token=token)

    @rpc("admin")
    def ListVersions(self, request, context, principal):
        page = page_request("versions", request.page_size, request.page_token)
        rows = self.app.versions.list(after=page.after, limit=page.size + 1)
        items, token = fill_page(rows, version_pb, lambda v: v.number, page)
        return pb.ListVersionsResponse(versions=items, next_page_token=token)

    @rpc("admin")
    def ListRounds(self, request, context, principal):
        page = page_request("rounds", request.page_size, request.page_token)
        rows = self.app.rounds.list(after=page.after, limit=page.size + 1)
        participants = self.app.swarm.participants
        items, token = fill_page(
            rows, lambda r: round_pb(r, participants(r.result_version)), lambda r: r.id, page
        )
        return pb.ListRoundsResponse(rounds=items, next_page_token=token)

    @rpc("admin")
    def ListContributions(self, request, context, principal):
        rid = request.round_id if request.HasField("round_id") else None
        page = page_request("contributions", request.page_size, request.page_token, round=rid)
        rows = self.app.contributions.list(rid, after=page.after, limit=page.size + 1)
        limit = self.app.listing_json_chars
        items, token = fill_page(rows, lambda c: contribution_pb(c, limit), lambda c: c.id, page)
        return pb.ListContributionsResponse(contributions=items, next_page_token=token)

    @rpc("admin")
    def CreateToken(self, request, context, principal):
        row, token = self.app.auth.create_join_token(request.label)
        return pb.CreateTokenResponse(info=token_pb(row), token=token)

    @rpc("admin")
    def RevokeToken(self, request, context, principal):
        return pb.RevokeTokenResponse(info=token_pb(self.app.auth.revoke(request.id)))

    @rpc("admin")
    def ListTokens(self, request, context, principal):
        page = page_request("tokens", request.page_size, request.page_token)
        rows = self.app.auth.list(after=page.after, limit=page.size + 1)
        items, token = fill_page(rows, token_pb, lambda t: list(token_key(t)), page)
        return pb.ListTokensResponse(tokens=items, next_page_token=token)

    @rpc("admin")
    def OpenRound(self, request, context, principal):
        base = request.base_version if request.HasField("base_version") else None
        return round_pb(
            self.app.rounds.open_round(
                request.kind, base, request.quorum, request.deadline_s, request.method, request.options_json
            )
        )

    @rpc("admin")
    def CloseRound(self, request, context, principal):
        rid = request.round_id if request.HasField("round_id") else None
        return round_pb(self.app.rounds.close_round(rid, cancel=request.cancel))

    @rpc("admin")
    def Merge(self, request, context, principal):
        return version_pb(self.app.merges.merge_now(request.round_id, request.method, request.options_json))

    @rpc("admin")
    def Publish(self, request, context, principal):
        return version_pb(self.app.versions.publish(request.version))

    @rpc("admin")
    def Rollback(self, request, context, principal):
        return version_pb(self.app.versions.rollback(request.version))

    @rpc("admin")
    def GetVersion(self, request, context, principal):
        return version_pb(self.app.versions.get(request.version))

    @rpc_stream("admin")
    def DownloadVersion(self, request, context, principal):
        yield from _download(self.app, self.app.versions.resolve(request.version), request, context)
