"""docs/WIRE.md against a running coordinator, with a client written from that page alone.

The client here uses grpc, the generated stubs (the proto is the contract), numpy and zstandard: no
coldswarm client code (no ``common.channel``, no ``fusion``), and the contribution it uploads is built
byte by byte as WIRE.md describes it. The page's constants block and its refusal table are parsed, so a
change of the server that the page does not follow (or the reverse) fails here.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import zstandard

from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc

WIRE = Path(__file__).resolve().parents[2] / "docs" / "WIRE.md"


def wire_constants() -> dict[str, str]:
    block = re.search(r"```wire\n(.*?)```", WIRE.read_text(), re.S)
    assert block, "docs/WIRE.md has no ```wire constants block"
    pairs = (line.split("=", 1) for line in block.group(1).splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def wire_refusals() -> dict[str, str]:
    """{scenario id: status code name} from the page's "Refusals" table."""
    section = WIRE.read_text().split("## Refusals", 1)[1]
    rows = re.findall(r"^\| `([a-z-]+)` \|.*\| `([A-Z_]+)` \|$", section, re.M)
    assert rows, "docs/WIRE.md's Refusals table has no rows"
    return dict(rows)


C = wire_constants()


def md(token: str) -> list[tuple[str, str]]:
    return [(C["auth_metadata_key"], f"{C['auth_scheme']} {token}")]


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file as WIRE.md describes it: u64 LE header length, JSON header, tiled data."""
    header: dict = {"__metadata__": metadata}
    data, offset = [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        data.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # data aligned to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(text)) + text + b"".join(data)


def read_safetensors_header(raw: bytes) -> dict:
    (n,) = struct.unpack_from("<Q", raw, 0)
    return json.loads(raw[8 : 8 + n])


def zstd_frame(payload: bytes) -> bytes:
    """The codec frame of WIRE.md, for codec ``zstd``."""
    name = b"zstd"
    return (
        C["frame_magic"].encode()
        + bytes([int(C["frame_version"]), len(name)])
        + name
        + struct.pack("<Q", len(payload))
        + zstandard.ZstdCompressor().compress(payload)
    )


def chunks(upload_id: str, data: bytes, start: int, size: int, sha: str | None):
    pos = start
    while pos < len(data):
        piece = data[pos : pos + size]
        last = pos + len(piece) >= len(data)
        yield pb.UploadChunk(upload_id=upload_id, offset=pos, data=piece, sha256=sha if last and sha else "")
        pos += len(piece)


class Client:
    """A worker or admin client from WIRE.md alone."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.worker = pb_grpc.WorkerServiceStub(self.channel)
        self.admin = pb_grpc.AdminServiceStub(self.channel)

    def download(self, token: str, version: str, entry: pb.FileEntry) -> bytes:
        got = bytearray()
        while len(got) < entry.size:  # resume from what we have, as WIRE.md says
            for chunk in self.worker.DownloadVersion(
                pb.DownloadRequest(version=version, path=entry.path, offset=len(got)), metadata=md(token)
            ):
                assert chunk.offset == len(got)
                got += chunk.data
        assert hashlib.sha256(got).hexdigest() == entry.sha256
        return bytes(got)


def code_of(call) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return None


@pytest.fixture
def wire(harness):
    client = Client(harness.address)
    yield client, harness.admin_token
    client.channel.close()


def _register(client: Client, admin_token: str, name: str) -> pb.RegisterResponse:
    join = client.admin.CreateToken(pb.CreateTokenRequest(label=name), metadata=md(admin_token)).token
    return client.worker.Register(pb.RegisterRequest(name=name), metadata=md(join))


def _delta_contribution(client: Client, session: str, base: int, scale: float, bad_shape: bool = False):
    version = client.worker.GetVersion(pb.GetVersionRequest(version=str(base)), metadata=md(session))
    weights = next(f for f in version.files if f.path == "model.safetensors")
    header = read_safetensors_header(client.download(session, str(base), weights))
    name, spec = next(
        (k, v) for k, v in sorted(header.items()) if k != "__metadata__" and v["dtype"] == "F32"
    )
    shape = [spec["shape"][0] + 1, *spec["shape"][1:]] if bad_shape else spec["shape"]
    delta = np.full(shape, scale, dtype=np.float32)
    meta = {
        "format": int(C["contribution_format"]),
        "form": "delta",
        "base_version": base,
        "num_examples": 10,
    }
    return safetensors_bytes({f"delta/{name}": delta}, {C["contribution_metadata_key"]: json.dumps(meta)})


def test_a_client_from_the_page_alone_contributes_resuming_a_cut_upload(wire):
    client, admin_token = wire
    rnd = client.admin.OpenRound(pb.OpenRoundRequest(kind="fusion", quorum=5), metadata=md(admin_token))
    w = _register(client, admin_token, "wire-client")
    latest = client.worker.GetVersion(
        pb.GetVersionRequest(version=C["latest_version"]), metadata=md(w.session_token)
    )
    assert latest.number == rnd.base_version
    payload = zstd_frame(_delta_contribution(client, w.session_token, rnd.base_version, 0.01))
    sha = hashlib.sha256(payload).hexdigest()
    begin = pb.BeginUploadRequest(
        round_id=rnd.id, base_version=rnd.base_version, total_size=len(payload), codec="zstd", num_examples=10
    )
    first = client.worker.BeginUpload(begin, metadata=md(w.session_token))
    assert first.offset == 0 and first.max_chunk_bytes > 0
    step = max(1, min(first.max_chunk_bytes, len(payload) // 4))

    # A stream cut after two chunks: the coordinator keeps the whole chunks it received (the second may still
    # have been in the client's buffers when the call was cancelled), and BeginUpload says how far that is.
    def cut():
        for i, chunk in enumerate(chunks(first.upload_id, payload, 0, step, sha)):
            if i == 2:
                raise ConnectionError("the client's link dropped")
            yield chunk

    assert code_of(lambda: client.worker.UploadContribution(cut(), metadata=md(w.session_token))) is not None
    deadline = time.monotonic() + 30
    while True:  # UNAVAILABLE while the cut stream is still ending on the server: retry, as WIRE.md says
        try:
            resumed = client.worker.BeginUpload(begin, metadata=md(w.session_token))
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
            time.sleep(0.1)
    assert resumed.upload_id == first.upload_id and resumed.offset in (0, step, 2 * step)
    reply = client.worker.UploadContribution(
        chunks(resumed.upload_id, payload, resumed.offset, step, sha), metadata=md(w.session_token)
    )
    assert reply.sha256 and reply.contribution_id > 0
    listed = client.admin.ListContributions(
        pb.ListContributionsRequest(round_id=rnd.id), metadata=md(admin_token)
    )
    assert [c.id for c in listed.contributions] == [reply.contribution_id]
    assert listed.contributions[0].form == "delta" and listed.contributions[0].num_examples == 10


def test_every_refusal_in_the_page_carries_its_code(wire):
    client, admin_token = wire
    admin = md(admin_token)
    expected = wire_refusals()
    # Before a round is live: a typo'd option key is refused (not a "round already open").
    scenarios = {
        "options-unknown-key": lambda: client.admin.OpenRound(
            pb.OpenRoundRequest(kind="fusion", quorum=5, options_json=json.dumps({"peft_methd": "lora"})),
            metadata=admin,
        )
    }
    got = {"options-unknown-key": code_of(scenarios["options-unknown-key"])}
    rnd = client.admin.OpenRound(pb.OpenRoundRequest(kind="fusion", quorum=5), metadata=admin)
    w = _register(client, admin_token, "wire-refusals")
    s = md(w.session_token)

    def upload(payload: bytes, sha: str | None, offset_shift: int = 0, codec: str = "none"):
        begin = client.worker.BeginUpload(
            pb.BeginUploadRequest(
                round_id=rnd.id,
                base_version=rnd.base_version,
                total_size=len(payload),
                codec=codec,
                num_examples=10,
            ),
            metadata=s,
        )
        stream = [
            pb.UploadChunk(
                upload_id=c.upload_id, offset=c.offset + offset_shift, data=c.data, sha256=c.sha256
            )
            for c in chunks(begin.upload_id, payload, begin.offset, 4096, sha)
        ]
        return client.worker.UploadContribution(iter(stream), metadata=s)

    good = _delta_contribution(client, w.session_token, rnd.base_version, 0.01)
    bad = _delta_contribution(client, w.session_token, rnd.base_version, 0.01, bad_shape=True)
    scenarios.update(
        {
            "no-token": lambda: client.worker.GetAssignment(pb.GetAssignmentRequest()),
            "bad-token": lambda: client.worker.GetAssignment(
                pb.GetAssignmentRequest(), metadata=md("not-a-token")
            ),
            "worker-on-admin": lambda: client.admin.Status(pb.StatusRequest(), metadata=s),
            "version-unknown": lambda: client.worker.GetVersion(
                pb.GetVersionRequest(version="4000"), metadata=s
            ),
            "version-not-a-number": lambda: client.worker.GetVersion(
                pb.GetVersionRequest(version="\u0660"), metadata=s
            ),
            "string-too-long": lambda: client.worker.Heartbeat(
                pb.HeartbeatRequest(phase="x" * 10_000), metadata=s
            ),
            "unknown-codec": lambda: client.worker.BeginUpload(
                pb.BeginUploadRequest(
                    round_id=rnd.id, base_version=rnd.base_version, total_size=10, codec="lz77"
                ),
                metadata=s,
            ),
            "upload-unknown": lambda: client.worker.UploadContribution(
                iter([pb.UploadChunk(upload_id="u-nobody-began", offset=0, data=b"x")]), metadata=s
            ),
            "chunk-out-of-order": lambda: upload(good, hashlib.sha256(good).hexdigest(), offset_shift=3),
            "hash-mismatch": lambda: upload(good, "0" * 64),
            "bad-payload": lambda: upload(bad, hashlib.sha256(bad).hexdigest()),
            "page-token-garbage": lambda: client.admin.ListVersions(
                pb.ListVersionsRequest(page_token="not-a-token"), metadata=admin
            ),
        }
    )
    assert set(scenarios) == set(expected), "the test and docs/WIRE.md's Refusals table name other scenarios"
    for scenario, call in scenarios.items():
        if scenario not in got:
            got[scenario] = code_of(call)
    assert {k: (v.name if v else None) for k, v in got.items()} == expected
    # The refused uploads left nothing behind: the worker can still contribute.
    assert upload(good, hashlib.sha256(good).hexdigest()).contribution_id > 0
