"""Every bad request gets the right status code, an actionable message, and changes nothing.

Over a real gRPC server on loopback. After each refusal the server still answers,
and no row (contributions, uploads, versions, rounds) or blob/partial file is left.
"""

from __future__ import annotations

import hashlib
import json
import time

import grpc
import pytest
import torch

from coldswarm.common.channel import bearer
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc

from .conftest import base_tensors, chunks, contribution_bytes, delta_contribution

C = grpc.StatusCode


def refused(call, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, f"{err.code()}: {err.details()}"
    for w in words:
        assert w.lower() in err.details().lower(), err.details()
    return err.details()


def still_serving(h) -> None:
    assert h.admin.Status(pb.StatusRequest(), metadata=h.amd, timeout=10).current_version == 0


# -- auth --------------------------------------------------------------------------------


def test_no_token(harness):
    refused(lambda: harness.admin.Status(pb.StatusRequest()), C.UNAUTHENTICATED, "no token")
    refused(lambda: harness.workers.Heartbeat(pb.HeartbeatRequest()), C.UNAUTHENTICATED, "no token")
    refused(lambda: harness.workers.Register(pb.RegisterRequest(name="x")), C.UNAUTHENTICATED, "join token")
    md = [("authorization", "Basic abc")]
    refused(lambda: harness.admin.Status(pb.StatusRequest(), metadata=md), C.UNAUTHENTICATED, "Bearer")
    still_serving(harness)


def test_wrong_token(harness):
    md = bearer("csa_not-the-admin-token")
    refused(lambda: harness.admin.Status(pb.StatusRequest(), metadata=md), C.UNAUTHENTICATED, "unknown token")
    md = bearer("garbage")
    refused(lambda: harness.workers.Register(pb.RegisterRequest(), metadata=md), C.UNAUTHENTICATED, "unknown")
    still_serving(harness)


def test_revoked_join_token_and_its_workers(harness):
    created = harness.admin.CreateToken(pb.CreateTokenRequest(label="alice"), metadata=harness.amd)
    worker = harness.register(created.token)
    worker.stub.Heartbeat(pb.HeartbeatRequest(phase="idle"), metadata=worker.md)
    harness.admin.RevokeToken(pb.RevokeTokenRequest(id=created.info.id), metadata=harness.amd)
    refused(
        lambda: harness.workers.Register(pb.RegisterRequest(), metadata=bearer(created.token)),
        C.UNAUTHENTICATED,
        "revoked",
    )
    refused(
        lambda: worker.stub.Heartbeat(pb.HeartbeatRequest(), metadata=worker.md), C.UNAUTHENTICATED, "revoked"
    )
    tokens = harness.admin.ListTokens(pb.ListTokensRequest(), metadata=harness.amd).tokens
    assert [t.revoked for t in tokens if t.id == created.info.id] == [True]
    refused(
        lambda: harness.admin.RevokeToken(pb.RevokeTokenRequest(id="tok-nope"), metadata=harness.amd),
        C.NOT_FOUND,
        "tokens list",
    )
    still_serving(harness)


def test_wrong_kind_of_token(harness):
    worker = harness.register()
    join = harness.join_token()
    for md in (worker.md, bearer(join)):
        refused(
            lambda md=md: harness.admin.Status(pb.StatusRequest(), metadata=md), C.PERMISSION_DENIED, "admin"
        )
        refused(
            lambda md=md: harness.admin.OpenRound(pb.OpenRoundRequest(kind="fusion"), metadata=md),
            C.PERMISSION_DENIED,
        )
    refused(
        lambda: harness.workers.Heartbeat(pb.HeartbeatRequest(), metadata=harness.amd), C.PERMISSION_DENIED
    )
    refused(
        lambda: harness.workers.Heartbeat(pb.HeartbeatRequest(), metadata=bearer(join)), C.PERMISSION_DENIED
    )
    refused(
        lambda: harness.workers.Register(pb.RegisterRequest(), metadata=worker.md),
        C.PERMISSION_DENIED,
        "join token",
    )
    still_serving(harness)


# -- unknown things ----------------------------------------------------------------------


def test_unknown_worker_round_version(harness):
    a, amd = harness.admin, harness.amd
    refused(lambda: a.GetVersion(pb.GetVersionRequest(version="42"), metadata=amd), C.NOT_FOUND, "version 42")
    refused(lambda: a.GetVersion(pb.GetVersionRequest(version="v1"), metadata=amd), C.INVALID_ARGUMENT)
    refused(
        lambda: list(a.DownloadVersion(pb.DownloadRequest(version="0", path="nope.bin"), metadata=amd)),
        C.NOT_FOUND,
        "nope.bin",
    )
    refused(lambda: a.CloseRound(pb.CloseRoundRequest(round_id=99), metadata=amd), C.NOT_FOUND, "round 99")
    refused(lambda: a.Publish(pb.PublishRequest(version=7), metadata=amd), C.NOT_FOUND)
    refused(lambda: a.Rollback(pb.RollbackRequest(version=7), metadata=amd), C.NOT_FOUND)
    refused(lambda: a.Merge(pb.MergeRequest(round_id=5), metadata=amd), C.NOT_FOUND)
    refused(
        lambda: a.OpenRound(pb.OpenRoundRequest(kind="fusion", base_version=3), metadata=amd), C.NOT_FOUND
    )
    refused(lambda: a.OpenRound(pb.OpenRoundRequest(kind="party"), metadata=amd), C.INVALID_ARGUMENT, "kind")
    w = harness.register()
    refused(
        lambda: w.stub.ReportAssignment(
            pb.ReportAssignmentRequest(assignment_id="a-1", outcome="done"), metadata=w.md
        ),
        C.NOT_FOUND,
    )
    refused(
        lambda: w.stub.BeginUpload(pb.BeginUploadRequest(round_id=99, total_size=10), metadata=w.md),
        C.NOT_FOUND,
        "round 99",
    )
    refused(
        lambda: w.stub.UploadContribution(iter([pb.UploadChunk(upload_id="u-x", data=b"x")]), metadata=w.md),
        C.NOT_FOUND,
        "BeginUpload",
    )
    # A worker that left is unknown afterwards.
    w.stub.Leave(pb.LeaveRequest(reason="bye"), metadata=w.md)
    refused(
        lambda: w.stub.Heartbeat(pb.HeartbeatRequest(), metadata=w.md), C.UNAUTHENTICATED, "register again"
    )
    still_serving(harness)


# -- uploads -----------------------------------------------------------------------------


@pytest.fixture
def fusion(harness):
    """(harness, open round, a registered worker with an assignment)."""
    rnd = harness.open_fusion(quorum=5)
    w = harness.register()
    a = w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md)
    return harness, rnd, w, a


def begin(w, rnd, size, base_version=0, assignment_id=""):
    return w.stub.BeginUpload(
        pb.BeginUploadRequest(
            round_id=rnd.id,
            base_version=base_version,
            total_size=size,
            codec="none",
            assignment_id=assignment_id,
        ),
        metadata=w.md,
    )


def assert_unchanged(h, before):
    assert h.counts() == before
    still_serving(h)


def test_chunks_out_of_order(fusion, tiny_model):
    h, rnd, w, a = fusion
    data = delta_contribution(tiny_model)
    before = h.counts()
    up = begin(w, rnd, len(data), assignment_id=a.id)
    msgs = list(chunks(up.upload_id, data, step=1024))
    msgs[1], msgs[2] = msgs[2], msgs[1]
    refused(
        lambda: w.stub.UploadContribution(iter(msgs), metadata=w.md), C.INVALID_ARGUMENT, "offset", "expected"
    )
    assert_unchanged(h, before)


def test_missing_final_hash(fusion, tiny_model):
    h, rnd, w, a = fusion
    data = delta_contribution(tiny_model)
    before = h.counts()
    up = begin(w, rnd, len(data))
    stream = chunks(up.upload_id, data, with_hash=False)
    refused(lambda: w.stub.UploadContribution(stream, metadata=w.md), C.INVALID_ARGUMENT, "sha256")
    assert_unchanged(h, before)


def test_stream_cut_short_keeps_its_bytes(fusion, tiny_model):
    """A stream that ends early without the hash is resumable, whether gRPC reports a cancel or a close."""
    h, rnd, w, a = fusion
    data = delta_contribution(tiny_model)
    up = begin(w, rnd, len(data), assignment_id=a.id)
    half = len(data) // 2
    short = [pb.UploadChunk(upload_id=up.upload_id, offset=0, data=data[:half])]
    refused(lambda: w.stub.UploadContribution(iter(short), metadata=w.md), C.FAILED_PRECONDITION, "resume")
    again = begin(w, rnd, len(data), assignment_id=a.id)
    assert again.upload_id == up.upload_id and again.offset == half
    resp = w.stub.UploadContribution(chunks(up.upload_id, data, offset=half), metadata=w.md)
    assert resp.size == len(data)


def test_hash_mismatch(fusion, tiny_model):
    h, rnd, w, a = fusion
    data = delta_contribution(tiny_model)
    before = h.counts()
    up = begin(w, rnd, len(data))
    msgs = list(chunks(up.upload_id, data))
    msgs[-1].sha256 = "0" * 64
    refused(lambda: w.stub.UploadContribution(iter(msgs), metadata=w.md), C.DATA_LOSS, "hashes to")
    assert_unchanged(h, before)


def test_hash_before_the_end(fusion, tiny_model):
    h, rnd, w, a = fusion
    data = delta_contribution(tiny_model)
    before = h.counts()
    up = begin(w, rnd, len(data))
    msgs = list(chunks(up.upload_id, data, step=1024))
    msgs[0].sha256 = msgs[-1].sha256
    refused(lambda: w.stub.UploadContribution(iter(msgs), metadata=w.md), C.INVALID_ARGUMENT, "final chunk")
    assert_unchanged(h, before)


def test_over_size_limit(make_harness, tiny_model):
    h = make_harness(max_upload_bytes=64 * 1024)
    rnd = h.open_fusion(quorum=3)
    w = h.register()
    before = h.counts()
    # Declared too big: refused before a byte is sent.
    refused(lambda: begin(w, rnd, 64 * 1024 + 1), C.RESOURCE_EXHAUSTED, "limit")
    # Declared small, then more bytes than the limit: refused at the very chunk that crosses the declared size
    # or the limit, not after the whole payload (how many chunks the client had queued is gRPC's business).
    up = begin(w, rnd, 1000)

    def flood():
        for i in range(64):
            yield pb.UploadChunk(upload_id=up.upload_id, offset=i * 4096, data=b"\0" * 4096)

    refused(
        lambda: w.stub.UploadContribution(flood(), metadata=w.md),
        C.INVALID_ARGUMENT,
        "declared",
        "chunk ending at byte 4096)",
    )
    up = begin(w, rnd, 64 * 1024)
    refused(
        lambda: w.stub.UploadContribution(flood(), metadata=w.md),
        C.RESOURCE_EXHAUSTED,
        "limit",
        f"chunk ending at byte {64 * 1024 + 4096})",
    )
    # Small on the wire, past the limit once decoded (a decompression bomb): refused before it expands.
    from coldswarm.fusion.codecs import CODECS

    bomb = CODECS["zstd"].encode(bytes(2**20))
    assert len(bomb) < 4096
    up = w.stub.BeginUpload(
        pb.BeginUploadRequest(round_id=rnd.id, base_version=0, total_size=len(bomb), codec="zstd"),
        metadata=w.md,
    )
    refused(
        lambda: w.stub.UploadContribution(chunks(up.upload_id, bomb), metadata=w.md),
        C.RESOURCE_EXHAUSTED,
        "decoded with codec 'zstd' is larger than",
    )
    assert_unchanged(h, before)


def test_not_safetensors(fusion):
    h, rnd, w, a = fusion
    before = h.counts()
    for data in (b"PK\x03\x04 this is a zip, not tensors" * 10, b"\x80\x04\x95 pickle" * 5):
        refused(lambda data=data: w.upload(data, rnd.id), C.INVALID_ARGUMENT, "not a safetensors")
    assert_unchanged(h, before)


def _bad_tensors(tiny_model):
    base = base_tensors(tiny_model)
    q = sorted(n for n in base if n.endswith("q.weight"))[0]
    module = q[: -len(".weight")]
    shape = base[q].shape
    nan = torch.zeros(shape)
    nan[0, 0] = float("nan")
    inf = torch.zeros(shape)
    inf[1, 1] = float("inf")
    return [
        ({"delta/encoder.block.9.nothing.weight": torch.zeros(3)}, "no parameter", "encoder.block.9"),
        ({f"delta/{q}": torch.zeros(shape[0] + 1, shape[1])}, "shape", q),
        ({f"weight/{q}": torch.zeros(shape, dtype=torch.int32)}, "dtype", q),
        (
            {f"lora_A/{module}": torch.zeros(4, shape[1] + 3), f"lora_B/{module}": torch.zeros(shape[0], 4)},
            "shape",
            module,
        ),
        ({f"gram/{module}": torch.zeros(5, 5)}, "shape", module),
        ({f"bogus/{q}": torch.zeros(shape)}, "names must start", q),
        ({q: torch.zeros(shape)}, "names must start", q),
        ({f"delta/{q}": nan}, "nan or inf", q),
        ({f"delta/{q}": inf}, "nan or inf", q),
    ]


def test_tensors_that_do_not_fit_the_base(fusion, tiny_model):
    h, rnd, w, a = fusion
    before = h.counts()
    for tensors, word, name in _bad_tensors(tiny_model):
        data = contribution_bytes(tensors)
        refused(lambda data=data: w.upload(data, rnd.id), C.INVALID_ARGUMENT, word, name)
        assert_unchanged(h, before)


def test_closed_round(fusion, tiny_model):
    h, rnd, w, a = fusion
    data = delta_contribution(tiny_model)
    # Begun while open, streamed after the admin cancelled the round.
    up = begin(w, rnd, len(data))
    h.admin.CloseRound(pb.CloseRoundRequest(round_id=rnd.id, cancel=True), metadata=h.amd)
    before = h.counts()
    refused(
        lambda: w.stub.UploadContribution(chunks(up.upload_id, data), metadata=w.md),
        C.FAILED_PRECONDITION,
        "cancelled",
    )
    refused(lambda: begin(w, rnd, len(data)), C.FAILED_PRECONDITION, "no more contributions")
    after = h.counts()
    assert after["contributions"] == 0 and after["parts"] == 0 and after["uploads"] == 0
    assert after["blobs"] == before["blobs"]
    still_serving(h)


def test_other_base_version(fusion, tiny_model):
    h, rnd, w, a = fusion
    before = h.counts()
    refused(lambda: begin(w, rnd, 100, base_version=1), C.FAILED_PRECONDITION, "version 0", "train again")
    # The payload itself says it was trained from another version.
    data = delta_contribution(tiny_model, base_version=3)
    refused(lambda: w.upload(data, rnd.id), C.FAILED_PRECONDITION, "version 3")
    assert_unchanged(h, before)


def test_second_contribution(fusion, tiny_model):
    h, rnd, w, a = fusion
    w.upload(delta_contribution(tiny_model, seed=1), rnd.id, assignment_id=a.id)
    before = h.counts()
    refused(
        lambda: w.upload(delta_contribution(tiny_model, seed=2), rnd.id), C.ALREADY_EXISTS, "one contribution"
    )
    assert_unchanged(h, before)
    # The worker gets no new assignment in that round either.
    assert w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md).id == ""


def test_pretrain_round_takes_no_uploads(harness):
    rnd = harness.admin.OpenRound(pb.OpenRoundRequest(kind="pretrain", quorum=2), metadata=harness.amd)
    w = harness.register()
    a = w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md)
    assert a.pretrain.run_id == f"coldswarm-r{rnd.id}" and a.pretrain.corpus_shard == "corpus:0-of-2"
    refused(lambda: begin(w, rnd, 10), C.FAILED_PRECONDITION, "pretrain")


def test_bad_pretrain_options_are_refused_at_open(harness):
    before = harness.counts()
    for options, words in (
        ({"epochs": 0}, ("epochs",)),
        ({"target_batch_size": "many"}, ("target_batch_size",)),
        ({"hyperparameters": [1]}, ("hyperparameters",)),
        ({"hyperparameters": {"algorithm": "diloco", "batch_size": 0}}, ("batch_size",)),
    ):
        request = pb.OpenRoundRequest(kind="pretrain", options_json=json.dumps(options))
        refused(
            lambda r=request: harness.admin.OpenRound(r, metadata=harness.amd), C.INVALID_ARGUMENT, *words
        )
    assert_unchanged(harness, before)


def test_pretrain_round_needs_a_swarm(make_harness):
    h = make_harness(dht_peers=[])
    before = h.counts()
    refused(
        lambda: h.admin.OpenRound(pb.OpenRoundRequest(kind="pretrain"), metadata=h.amd),
        C.FAILED_PRECONDITION,
        "--dht-listen",
    )
    assert_unchanged(h, before)


def test_bad_round_requests(harness):
    a, amd = harness.admin, harness.amd
    refused(
        lambda: a.OpenRound(pb.OpenRoundRequest(kind="fusion", options_json="{nope"), metadata=amd),
        C.INVALID_ARGUMENT,
        "JSON",
    )
    refused(
        lambda: a.OpenRound(pb.OpenRoundRequest(kind="fusion", method="alchemy"), metadata=amd),
        C.INVALID_ARGUMENT,
        "alchemy",
    )
    # Options every worker would refuse are refused here, before any worker trains.
    for method, options, says in (
        ("average", {"hyperparameters": {"stepz": 10}}, "unknown fusion hyperparameter"),
        ("average", {"peft_method": "prompt"}, "peft_method must be"),
        ("average", {"codec": "rar"}, "unknown codec"),
        ("fisher", {"hyperparameters": {"load_in_4bit": True}}, "Fisher needs floating-point"),
    ):
        request = pb.OpenRoundRequest(kind="fusion", method=method, options_json=json.dumps(options))
        refused(lambda r=request: a.OpenRound(r, metadata=amd), C.INVALID_ARGUMENT, says)
    a.OpenRound(pb.OpenRoundRequest(kind="fusion"), metadata=amd)
    refused(
        lambda: a.OpenRound(pb.OpenRoundRequest(kind="fusion"), metadata=amd),
        C.FAILED_PRECONDITION,
        "still open",
    )
    refused(
        lambda: a.Rollback(pb.RollbackRequest(version=0), metadata=amd), C.FAILED_PRECONDITION, "not older"
    )
    assert harness.counts()["rounds"] == 1


def test_interrupted_upload_resumes(fusion, tiny_model):
    h, rnd, w, a = fusion
    data = delta_contribution(tiny_model)
    up = begin(w, rnd, len(data), assignment_id=a.id)
    half = len(data) // 2

    part = h.app.uploads.part_path(up.upload_id)

    def broken():
        yield pb.UploadChunk(upload_id=up.upload_id, offset=0, data=data[:half])
        # Wait until the coordinator has written the first half (seconds on a loaded machine): only then
        # is there something to resume; a stream broken before any byte landed starts over, correctly.
        deadline = time.monotonic() + 120
        while part.stat().st_size < half and time.monotonic() < deadline:
            time.sleep(0.01)
        raise ConnectionError("network dropped")  # the client's stream breaks: gRPC cancels the call

    with pytest.raises(grpc.RpcError):
        w.stub.UploadContribution(broken(), metadata=w.md)
    # The server may still be finishing the cancelled stream; BeginUpload then says so. On a loaded
    # machine that can take seconds, so wait on a deadline rather than a count.
    again, deadline = None, time.monotonic() + 60
    while again is None and time.monotonic() < deadline:
        try:
            again = begin(w, rnd, len(data), assignment_id=a.id)
        except grpc.RpcError as exc:
            assert exc.code() == C.UNAVAILABLE, exc.details()
            time.sleep(0.1)
    assert again is not None, "the cancelled stream never finished"
    assert again.upload_id == up.upload_id and again.offset == half
    resp = w.stub.UploadContribution(chunks(up.upload_id, data, offset=half), metadata=w.md)
    assert resp.size == len(data)
    assert h.counts()["contributions"] == 1 and h.counts()["parts"] == 0


def test_every_stub_method_has_auth(harness):
    """No RPC answers without a token (guards against a servicer method missing its decorator)."""
    for stub_cls, service in (
        (pb_grpc.AdminServiceStub, "AdminService"),
        (pb_grpc.WorkerServiceStub, "WorkerService"),
    ):
        stub = stub_cls(harness.channel)
        desc = pb.DESCRIPTOR.services_by_name[service]
        for method in desc.methods:
            req_cls = getattr(pb, method.input_type.name)
            call = getattr(stub, method.name)
            if method.client_streaming:
                fn = lambda call=call, req_cls=req_cls: call(iter([req_cls()]))  # noqa: E731
            elif method.server_streaming:
                fn = lambda call=call, req_cls=req_cls: list(call(req_cls()))  # noqa: E731
            else:
                fn = lambda call=call, req_cls=req_cls: call(req_cls())  # noqa: E731
            refused(fn, C.UNAUTHENTICATED)


def test_codecs(fusion, tiny_model):
    h, rnd, w, a = fusion
    before = h.counts()
    refused(
        lambda: w.stub.BeginUpload(
            pb.BeginUploadRequest(round_id=rnd.id, base_version=0, total_size=10, codec="rar"), metadata=w.md
        ),
        C.INVALID_ARGUMENT,
        "unknown codec",
    )
    codecs = pytest.importorskip("coldswarm.fusion.codecs")
    data = delta_contribution(tiny_model)
    encoded = codecs.CODECS["zstd"].encode(data)

    def upload(payload: bytes, codec: str):
        up = w.stub.BeginUpload(
            pb.BeginUploadRequest(round_id=rnd.id, base_version=0, total_size=len(payload), codec=codec),
            metadata=w.md,
        )
        return w.stub.UploadContribution(chunks(up.upload_id, payload), metadata=w.md)

    # Bytes that are not what the codec says: refused, nothing kept.
    refused(lambda: upload(data, "zstd"), C.INVALID_ARGUMENT, "zstd")
    assert_unchanged(h, before)
    resp = upload(encoded, "zstd")
    contribution = h.admin.ListContributions(pb.ListContributionsRequest(), metadata=h.amd).contributions[0]
    assert resp.size == len(encoded) and contribution.sha256 == hashlib.sha256(data).hexdigest()
