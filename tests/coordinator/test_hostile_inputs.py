"""Issue 13's hostile inputs, each over a real server: the status code, a bounded message that names no
server path, and nothing left on disk or in the database.

Classes (the issue's numbering): 2 listings a worker could break, 3 edge numbers, 4 round options,
5 unbounded echoes, 6 leaks, 7 leftovers, 8 token labels. Starvation (1) is in test_starvation.py,
the wire document (9) in test_wire_conformance.py.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch
from safetensors.torch import save as st_save

from coldswarm.common.channel import bearer
from coldswarm.common.quoting import MESSAGE_CHARS
from coldswarm.proto import coldswarm_pb2 as pb

from .conftest import base_tensors, chunks, contribution_bytes, delta_contribution

C = grpc.StatusCode
BIG = 600_000  # what the attacker sent


def refused(h, call, code: grpc.StatusCode, *words: str, echo: str = "") -> str:
    """``call`` fails with ``code``; its message is bounded, says ``words``, quotes no more than a prefix of
    ``echo`` and names no server path; the server answers the next call on the same channel."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    details = err.details() or ""
    assert err.code() == code, f"{err.code()}: {details[:300]}"
    assert len(details) <= MESSAGE_CHARS, f"{len(details)} chars: {details[:200]}..."
    for w in words:
        assert w.lower() in details.lower(), details
    if echo:
        assert echo[:200] not in details, "the message quotes more than a prefix of the request"
    data_dir = str(h.app.config.data_dir)
    assert data_dir not in details and str(h.app.config.data_dir.resolve()) not in details, details
    assert "admin.token" not in details, details
    still_serving(h)
    return details


def still_serving(h) -> None:
    assert h.admin.Status(pb.StatusRequest(), metadata=h.amd, timeout=10).HasField("current_version")


def leftovers(h) -> dict:
    """Rows and files a refused request must not add."""
    out = h.counts()
    out["tokens"] = int(h.app.store.one("SELECT COUNT(*) FROM tokens")[0])
    out["tmp"] = sorted(p.name for p in h.app.blobs.tmp_dir.iterdir())
    out["upload_files"] = sorted(p.name for p in h.app.uploads.root.iterdir())
    return out


def begin(w, rnd, size, **kw):
    return w.stub.BeginUpload(
        pb.BeginUploadRequest(round_id=rnd.id, base_version=0, total_size=size, codec="none", **kw),
        metadata=w.md,
    )


@pytest.fixture
def fusion(harness):
    rnd = harness.open_fusion(quorum=5)
    w = harness.register()
    a = w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md)
    return harness, rnd, w, a


# -- 2: listings a worker could break ------------------------------------------------------------


def test_heartbeat_metrics_are_bounded_and_listings_survive_workers_that_left(harness):
    h = harness
    workers = [h.register(name=f"w{i}") for i in range(2)]
    names = {f"metric-{i:06d}-" + "x" * 40: 1.0 for i in range(BIG // 50)}  # ~600 KB of names
    before = leftovers(h)
    for w in workers:
        refused(
            h,
            lambda w=w: w.stub.Heartbeat(pb.HeartbeatRequest(phase="training", metrics=names), metadata=w.md),
            C.INVALID_ARGUMENT,
            "metrics",
            "limit",
        )
    assert leftovers(h) == before
    # Within the limits: accepted; then they leave, and ListWorkers (gone ones too) still answers.
    for w in workers:
        w.stub.Heartbeat(pb.HeartbeatRequest(phase="training", metrics={"epoch": 2.0}), metadata=w.md)
        w.stub.Leave(pb.LeaveRequest(reason="bye"), metadata=w.md)
    listed = h.admin.ListWorkers(pb.ListWorkersRequest(include_gone=True), metadata=h.amd)
    assert {w.id for w in listed.workers} == {w.id for w in workers}
    assert not listed.next_page_token


def test_contribution_metrics_json_is_bounded(fusion):
    h, rnd, w, a = fusion
    before = leftovers(h)
    for size in (BIG, 900_000):
        metrics = json.dumps({"m": "x" * size})
        refused(
            h,
            lambda m=metrics: begin(w, rnd, 100, metrics_json=m, assignment_id=a.id),
            C.INVALID_ARGUMENT,
            "metrics_json",
            "limit",
            echo=metrics,
        )
    assert leftovers(h) == before


def _all_pages(call, request, field: str) -> list:
    items, seen_tokens = [], set()
    while True:
        page = call(request)
        items.extend(getattr(page, field))
        if not page.next_page_token:
            return items
        assert page.next_page_token not in seen_tokens
        seen_tokens.add(page.next_page_token)
        request.page_token = page.next_page_token


def test_every_listing_pages(harness):
    h, amd = harness, harness.amd
    workers = [h.register(name=f"w{i}") for i in range(9)]  # and 9 join tokens
    listed = _all_pages(
        lambda r: h.admin.ListWorkers(r, metadata=amd), pb.ListWorkersRequest(page_size=4), "workers"
    )
    assert [w.id for w in listed] == [w.id for w in workers]
    first = h.admin.ListWorkers(pb.ListWorkersRequest(page_size=4), metadata=amd)
    assert len(first.workers) == 4 and first.next_page_token
    tokens = _all_pages(
        lambda r: h.admin.ListTokens(r, metadata=amd), pb.ListTokensRequest(page_size=2), "tokens"
    )
    assert len(tokens) == 10 and len({t.id for t in tokens}) == 10  # the admin token and 9 join tokens
    assert (
        len(
            _all_pages(
                lambda r: h.admin.ListVersions(r, metadata=amd),
                pb.ListVersionsRequest(page_size=1),
                "versions",
            )
        )
        == 1
    )
    assert (
        _all_pages(lambda r: h.admin.ListRounds(r, metadata=amd), pb.ListRoundsRequest(page_size=1), "rounds")
        == []
    )
    req = pb.ListContributionsRequest(page_size=1)
    assert _all_pages(lambda r: h.admin.ListContributions(r, metadata=amd), req, "contributions") == []
    # A huge page size is the server's maximum, not an error; a negative one is refused.
    assert len(h.admin.ListWorkers(pb.ListWorkersRequest(page_size=2**31 - 1), metadata=amd).workers) == 9
    refused(
        h,
        lambda: h.admin.ListWorkers(pb.ListWorkersRequest(page_size=-1), metadata=amd),
        C.INVALID_ARGUMENT,
        "page_size",
    )
    # Tokens are opaque and tied to their listing: garbage, or a token of another listing, is refused.
    for token in ("garbage", "x" * BIG):
        refused(
            h,
            lambda t=token: h.admin.ListWorkers(pb.ListWorkersRequest(page_token=t), metadata=amd),
            C.INVALID_ARGUMENT,
            "page_token",
            echo=token,
        )
    refused(
        h,
        lambda: h.admin.ListWorkers(
            pb.ListWorkersRequest(page_token=first.next_page_token, include_gone=True), metadata=amd
        ),
        C.INVALID_ARGUMENT,
        "page_token",
    )
    refused(
        h,
        lambda: h.admin.ListTokens(pb.ListTokensRequest(page_token=first.next_page_token), metadata=amd),
        C.INVALID_ARGUMENT,
        "page_token",
    )


# -- 3: edge numbers -----------------------------------------------------------------------------


def test_version_strings_are_ascii_numbers_that_fit(harness):
    h = harness
    w = h.register()
    for spec in ("99999999999999999999", "4294967296", "٠", "１", "-1", "0x0", " 0 0", "1e3"):
        refused(
            h,
            lambda s=spec: w.stub.GetVersion(pb.GetVersionRequest(version=s), metadata=w.md),
            C.INVALID_ARGUMENT,
            "version",
        )
    for spec in ("0", "latest", "", "LATEST"):
        assert w.stub.GetVersion(pb.GetVersionRequest(version=spec), metadata=w.md).number == 0
    refused(
        h, lambda: w.stub.GetVersion(pb.GetVersionRequest(version="4294967295"), metadata=w.md), C.NOT_FOUND
    )


def test_round_deadlines_and_quorums_in_range(harness):
    h = harness
    before = leftovers(h)
    for deadline in (float("nan"), float("inf"), -1.0, 1e300):
        refused(
            h,
            lambda d=deadline: h.admin.OpenRound(
                pb.OpenRoundRequest(kind="fusion", deadline_s=d), metadata=h.amd
            ),
            C.INVALID_ARGUMENT,
            "deadline",
        )
    refused(
        h,
        lambda: h.admin.OpenRound(pb.OpenRoundRequest(kind="fusion", quorum=2**32 - 1), metadata=h.amd),
        C.INVALID_ARGUMENT,
        "quorum",
    )
    for options in (
        {"epochs": 2**40},
        {"target_batch_size": 2**33},
        {"epochs": float("inf")},
        {"collect_timeout_s": -1},
    ):
        refused(
            h,
            lambda o=options: h.admin.OpenRound(
                pb.OpenRoundRequest(kind="pretrain", options_json=json.dumps(o)), metadata=h.amd
            ),
            C.INVALID_ARGUMENT,
        )
    # JSON's NaN/Infinity are not JSON: refused wherever JSON comes in.
    refused(
        h,
        lambda: h.admin.OpenRound(
            pb.OpenRoundRequest(kind="fusion", options_json='{"hyperparameters": {"lr": NaN}}'),
            metadata=h.amd,
        ),
        C.INVALID_ARGUMENT,
        "NaN",
    )
    refused(
        h,
        lambda: h.admin.OpenRound(
            pb.OpenRoundRequest(kind="fusion", options_json="[" * 100_000), metadata=h.amd
        ),
        C.INVALID_ARGUMENT,
    )
    assert leftovers(h) == before


def test_num_examples_that_sqlite_cannot_hold(fusion, tiny_model):
    h, rnd, w, a = fusion
    before = leftovers(h)
    refused(
        h,
        lambda: begin(w, rnd, 100, num_examples=2**64 - 1, assignment_id=a.id),
        C.INVALID_ARGUMENT,
        "num_examples",
    )
    assert leftovers(h) == before
    refused(h, lambda: begin(w, rnd, 100, metrics_json='{"loss": Infinity}'), C.INVALID_ARGUMENT)
    assert leftovers(h) == before
    # The payload's own metadata says 2^70 examples: refused at validation, nothing kept.
    base = base_tensors(tiny_model)
    q = sorted(n for n in base if n.endswith("q.weight"))[0]
    for num in (2**70, -3, True, "12"):
        meta = {"format": 1, "form": "delta", "base_version": 0, "num_examples": num}
        data = st_save({f"delta/{q}": torch.zeros(base[q].shape)}, metadata={"coldswarm": json.dumps(meta)})
        up = w.stub.BeginUpload(
            pb.BeginUploadRequest(
                round_id=rnd.id, base_version=0, total_size=len(data), codec="none", num_examples=0
            ),
            metadata=w.md,
        )
        refused(
            h,
            lambda up=up, data=data: w.stub.UploadContribution(chunks(up.upload_id, data), metadata=w.md),
            C.INVALID_ARGUMENT,
            "num_examples",
        )
        assert leftovers(h) == before


# -- 4: round options ----------------------------------------------------------------------------


def test_round_options_strict_at_the_top_level(harness):
    h = harness
    before = leftovers(h)
    for kind, options, says in (
        ("fusion", {"peft_methd": "lora"}, "did you mean 'peft_method'"),
        ("fusion", {"merge": "not-an-object"}, "merge"),
        ("fusion", {"hyperparameters": []}, "hyperparameters"),
        ("fusion", {"shard_prefix": 3}, "shard_prefix"),
        ("pretrain", {"epochz": 3}, "did you mean 'epochs'"),
        ("pretrain", {"run_id": "a.b"}, "run_id"),
    ):
        refused(
            h,
            lambda k=kind, o=options: h.admin.OpenRound(
                pb.OpenRoundRequest(kind=k, options_json=json.dumps(o)), metadata=h.amd
            ),
            C.INVALID_ARGUMENT,
            says,
        )
    assert leftovers(h) == before


# -- 5: unbounded echoes ---------------------------------------------------------------------------


def test_refusals_quote_a_prefix_of_what_was_sent(fusion, tiny_model):
    h, rnd, w, a = fusion
    big = "v" * BIG
    before = leftovers(h)
    refused(
        h,
        lambda: w.stub.GetVersion(pb.GetVersionRequest(version=big), metadata=w.md),
        C.INVALID_ARGUMENT,
        echo=big,
    )
    refused(
        h,
        lambda: list(w.stub.DownloadVersion(pb.DownloadRequest(version="0", path=big), metadata=w.md)),
        C.INVALID_ARGUMENT,
        echo=big,
    )
    refused(
        h,
        lambda: list(
            w.stub.DownloadVersion(pb.DownloadRequest(version="0", path="nope/" + "p" * 500), metadata=w.md)
        ),
        C.NOT_FOUND,
        "nope/",
        echo="p" * 500,
    )
    refused(
        h,
        lambda: h.admin.RevokeToken(pb.RevokeTokenRequest(id=big), metadata=h.amd),
        C.INVALID_ARGUMENT,
        echo=big,
    )
    refused(
        h,
        lambda: h.admin.OpenRound(pb.OpenRoundRequest(kind=big), metadata=h.amd),
        C.INVALID_ARGUMENT,
        echo=big,
    )
    refused(
        h,
        lambda: h.admin.OpenRound(pb.OpenRoundRequest(kind="fusion", method="m" * 200), metadata=h.amd),
        C.INVALID_ARGUMENT,
        echo="m" * 200,
    )
    refused(
        h,
        lambda: w.stub.ReportAssignment(
            pb.ReportAssignmentRequest(assignment_id="a" * 200, outcome="done"), metadata=w.md
        ),
        C.INVALID_ARGUMENT,
        echo="a" * 200,
    )
    refused(
        h,
        lambda: w.stub.UploadContribution(
            iter([pb.UploadChunk(upload_id="u" * 300, data=b"x")]), metadata=w.md
        ),
        C.INVALID_ARGUMENT,
        echo="u" * 300,
    )
    # A tensor name of 100 KB in the payload.
    base = base_tensors(tiny_model)
    q = sorted(n for n in base if n.endswith("q.weight"))[0]
    name = "delta/" + "n" * 100_000
    data = contribution_bytes({name: torch.zeros(3)})
    refused(h, lambda: w.upload(data, rnd.id), C.INVALID_ARGUMENT, "tensor", echo=name)
    data = contribution_bytes({"delta/" + q + "x" * 300: torch.zeros(base[q].shape)})
    refused(h, lambda: w.upload(data, rnd.id), C.INVALID_ARGUMENT, "no parameter", echo="x" * 300)
    # The payload's metadata with a huge form string.
    meta = {"format": 1, "form": "f" * 50_000, "base_version": 0, "num_examples": 1}
    data = st_save({f"delta/{q}": torch.zeros(base[q].shape)}, metadata={"coldswarm": json.dumps(meta)})
    refused(h, lambda: w.upload(data, rnd.id), C.INVALID_ARGUMENT, "form", echo="f" * 50_000)
    assert leftovers(h) == before


# -- 6: leaks --------------------------------------------------------------------------------------


def test_unauthenticated_refusals_name_no_server_path(harness):
    h = harness
    for md in ((), bearer("csa_guess"), bearer("garbage"), [("authorization", "Basic x")]):
        for method in pb.DESCRIPTOR.services_by_name["AdminService"].methods:
            request = getattr(pb, method.input_type.name)()
            call = getattr(h.admin, method.name)
            if method.server_streaming:
                fn = lambda call=call, request=request, md=md: list(call(request, metadata=md))  # noqa: E731
            else:
                fn = lambda call=call, request=request, md=md: call(request, metadata=md)  # noqa: E731
            refused(h, fn, C.UNAUTHENTICATED)


def test_validation_messages_name_no_upload_path(fusion, tiny_model):
    h, rnd, w, a = fusion
    for data in (b"PK\x03\x04 not tensors" * 10, b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}  ' + b"\0" * 64):
        details = refused(h, lambda d=data: w.upload(d, rnd.id), C.INVALID_ARGUMENT)
        assert "uploads/" not in details and ".part" not in details and "/tmp" not in details, details
    # Past the coordinator's own checks, refused by fusion's validator (a LoRA without its r and alpha).
    base = base_tensors(tiny_model)
    q = sorted(n for n in base if n.endswith("q.weight"))[0][: -len(".weight")]
    lora = contribution_bytes(
        {
            f"lora_A/{q}": torch.zeros(4, base[q + ".weight"].shape[1]),
            f"lora_B/{q}": torch.zeros(base[q + ".weight"].shape[0], 4),
        },
        form="lora",
    )
    details = refused(h, lambda: w.upload(lora, rnd.id), C.INVALID_ARGUMENT, "lora")
    assert "uploads/" not in details and ".part" not in details, details
    from coldswarm.fusion.codecs import CODECS

    for payload in (lora, b"not safetensors at all" * 10):
        bad = CODECS["zstd"].encode(payload)
        up = w.stub.BeginUpload(
            pb.BeginUploadRequest(round_id=rnd.id, base_version=0, total_size=len(bad), codec="zstd"),
            metadata=w.md,
        )
        details = refused(
            h,
            lambda up=up, bad=bad: w.stub.UploadContribution(chunks(up.upload_id, bad), metadata=w.md),
            C.INVALID_ARGUMENT,
        )
        assert "decoded-" not in details and "/tmp" not in details and "tmp/" not in details, details


def test_version0_manifest_does_not_name_the_base_model_directory(harness, tiny_model):
    w = harness.register()
    manifest = w.stub.GetVersion(pb.GetVersionRequest(version="0"), metadata=w.md).manifest_json
    assert str(tiny_model) not in manifest and str(tiny_model.resolve()) not in manifest
    assert json.loads(manifest)["source"] == "a model directory given to the coordinator (--base-model)"


def test_workers_read_published_versions_only_and_no_worker_ids(harness, tiny_model, tmp_path):
    h = harness
    rnd = h.open_fusion(quorum=1)
    w, other = h.register(name="a"), h.register(name="b")
    w.upload(delta_contribution(tiny_model), rnd.id)
    h.app.merges.wait_idle(60)
    v1 = w.stub.GetVersion(pb.GetVersionRequest(version="1"), metadata=w.md)
    manifest = json.loads(v1.manifest_json)
    assert [set(c) for c in manifest["contributions"]] == [{"id", "sha256", "num_examples"}]
    assert w.id not in v1.manifest_json
    # A candidate (recorded, not published) is the admin's to see, not the workers'.
    candidate = h.app.merges.record_version(tiny_model, None, kind="fusion", publish=False)
    spec = str(candidate.number)
    for stub, md in ((w.stub, w.md), (other.stub, other.md)):
        refused(
            h,
            lambda s=stub, m=md: s.GetVersion(pb.GetVersionRequest(version=spec), metadata=m),
            C.PERMISSION_DENIED,
            "published",
        )
        refused(
            h,
            lambda s=stub, m=md: list(
                s.DownloadVersion(pb.DownloadRequest(version=spec, path="config.json"), metadata=m)
            ),
            C.PERMISSION_DENIED,
        )
    assert h.admin.GetVersion(pb.GetVersionRequest(version=spec), metadata=h.amd).state == "candidate"
    # ... unless a round trains from it: then its workers must download it.
    h.admin.OpenRound(pb.OpenRoundRequest(kind="fusion", base_version=candidate.number), metadata=h.amd)
    assert w.stub.GetVersion(pb.GetVersionRequest(version=spec), metadata=w.md).number == candidate.number


# -- 7: leftovers ----------------------------------------------------------------------------------


def _half_upload(h, w, rnd, data, assignment_id=""):
    """An upload with its first half received and its stream ended: a row and a partial file."""
    up = begin(w, rnd, len(data), assignment_id=assignment_id)
    short = [pb.UploadChunk(upload_id=up.upload_id, offset=0, data=data[: len(data) // 2])]
    with pytest.raises(grpc.RpcError):
        w.stub.UploadContribution(iter(short), metadata=w.md)
    assert h.counts()["uploads"] == 1 and h.counts()["parts"] == 1
    return up


def test_cancelled_round_leaves_no_upload_behind(fusion, tiny_model):
    h, rnd, w, a = fusion
    _half_upload(h, w, rnd, delta_contribution(tiny_model), a.id)
    h.admin.CloseRound(pb.CloseRoundRequest(round_id=rnd.id, cancel=True), metadata=h.amd)
    assert h.counts()["uploads"] == 0 and h.counts()["parts"] == 0


def test_closed_round_leaves_no_upload_behind(fusion, tiny_model):
    h, rnd, w, a = fusion
    other = h.register()
    other.upload(delta_contribution(tiny_model, seed=3), rnd.id)
    _half_upload(h, w, rnd, delta_contribution(tiny_model), a.id)
    h.admin.CloseRound(pb.CloseRoundRequest(round_id=rnd.id), metadata=h.amd)
    assert h.counts()["uploads"] == 0 and h.counts()["parts"] == 0


def test_leave_leaves_no_upload_behind(fusion, tiny_model):
    h, rnd, w, a = fusion
    _half_upload(h, w, rnd, delta_contribution(tiny_model), a.id)
    w.stub.Leave(pb.LeaveRequest(reason="bye"), metadata=w.md)
    assert h.counts()["uploads"] == 0 and h.counts()["parts"] == 0


def test_over_size_chunk_leaves_nothing(make_harness, tiny_model):
    h = make_harness(chunk_bytes=64 * 1024)
    rnd = h.open_fusion(quorum=3)
    w = h.register()
    before = leftovers(h)
    data = b"\0" * (300 * 1024)
    up = begin(w, rnd, len(data))
    assert up.max_chunk_bytes == 64 * 1024
    too_big = [pb.UploadChunk(upload_id=up.upload_id, offset=0, data=data[: 64 * 1024 + 1])]
    refused(
        h,
        lambda: w.stub.UploadContribution(iter(too_big), metadata=w.md),
        C.RESOURCE_EXHAUSTED,
        "max_chunk_bytes",
    )
    assert leftovers(h) == before
    # A chunk so large that gRPC itself refuses it (over 4x max_chunk_bytes) before the coordinator sees
    # it: the sync server shows that only as a stream the client broke off, so the upload stays resumable
    # (it resumes from 0), and goes when its round closes.
    data = b"\0" * (400 * 1024)
    up = begin(w, rnd, len(data))
    whole = [pb.UploadChunk(upload_id=up.upload_id, offset=0, data=data)]
    with pytest.raises(grpc.RpcError) as info:
        w.stub.UploadContribution(iter(whole), metadata=w.md)
    assert info.value.code() == C.RESOURCE_EXHAUSTED
    deadline, again = time.monotonic() + 30, None
    while again is None and time.monotonic() < deadline:
        try:
            again = begin(w, rnd, len(data))
        except grpc.RpcError as exc:  # the broken stream is still ending
            assert exc.code() == C.UNAVAILABLE, exc.details()
            time.sleep(0.05)
    assert again is not None and again.upload_id == up.upload_id and again.offset == 0
    h.admin.CloseRound(pb.CloseRoundRequest(round_id=rnd.id, cancel=True), metadata=h.amd)
    assert h.counts()["uploads"] == 0 and h.counts()["parts"] == 0


def test_failed_begin_leaves_no_partial_file(fusion):
    h, rnd, w, a = fusion
    before = leftovers(h)
    refused(h, lambda: begin(w, rnd, 100, assignment_id="a-nope"), C.NOT_FOUND)
    assert leftovers(h) == before


# -- 8: token labels -------------------------------------------------------------------------------


def test_token_labels_are_bounded(harness):
    h = harness
    before = leftovers(h)
    label = "l" * 300_000
    refused(
        h,
        lambda: h.admin.CreateToken(pb.CreateTokenRequest(label=label), metadata=h.amd),
        C.INVALID_ARGUMENT,
        "label",
        "200",
        echo=label,
    )
    assert leftovers(h) == before
    ok = h.admin.CreateToken(pb.CreateTokenRequest(label="l" * 200), metadata=h.amd)
    assert ok.info.label == "l" * 200


def test_register_names_and_capabilities_are_bounded(harness):
    h = harness
    jt = h.join_token()
    long_name = h.workers.Register(pb.RegisterRequest(name="n" * 1000), metadata=bearer(jt))
    listed = h.admin.ListWorkers(pb.ListWorkersRequest(), metadata=h.amd).workers
    assert [w.name for w in listed if w.id == long_name.worker_id] == ["n" * 200]
    caps = pb.Capabilities(device="d" * 10_000)
    before = leftovers(h)
    refused(
        h,
        lambda: h.workers.Register(pb.RegisterRequest(name="x", capabilities=caps), metadata=bearer(jt)),
        C.INVALID_ARGUMENT,
        "device",
        echo="d" * 10_000,
    )
    assert leftovers(h) == before
