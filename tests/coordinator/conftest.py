"""Fixtures for the coordinator tests: a tiny HF model on disk and a real gRPC server on loopback."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from support import save_tiny_t5

from coldswarm.common.channel import bearer, open_channel
from coldswarm.coordinator.config import CoordinatorConfig
from coldswarm.coordinator.server import RunningServer, start_server
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 1+1-layer T5 of a few thousand parameters, saved as safetensors (no download)."""
    return save_tiny_t5(tmp_path_factory.mktemp("tiny") / "model")


def base_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():
                out[name] = fh.get_tensor(name)
    return out


def contribution_bytes(tensors: dict[str, torch.Tensor], base_version: int = 0, form: str = "delta") -> bytes:
    meta = {"format": 1, "form": form, "base_version": base_version, "num_examples": 10}
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"coldswarm": json.dumps(meta)})


def delta_contribution(model_dir: Path, scale: float = 0.01, seed: int = 1, base_version: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    base = base_tensors(model_dir)
    names = sorted(n for n in base if n.endswith("q.weight"))
    return contribution_bytes(
        {f"delta/{n}": torch.randn(base[n].shape, generator=gen) * scale for n in names}, base_version
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunks(upload_id: str, data: bytes, offset: int = 0, step: int = 4096, with_hash: bool = True):
    digest = sha(data)
    pos = offset
    while True:
        piece = data[pos : pos + step]
        last = pos + len(piece) >= len(data)
        yield pb.UploadChunk(
            upload_id=upload_id, offset=pos, data=piece, sha256=digest if last and with_hash else ""
        )
        pos += len(piece)
        if last:
            return


@dataclass
class Worker:
    id: str
    token: str
    stub: pb_grpc.WorkerServiceStub

    @property
    def md(self):
        return bearer(self.token)

    def upload(self, data: bytes, round_id: int, base_version: int = 0, assignment_id: str = "", **kw):
        begin = self.stub.BeginUpload(
            pb.BeginUploadRequest(
                assignment_id=assignment_id,
                round_id=round_id,
                base_version=base_version,
                total_size=len(data),
                codec="none",
                num_examples=10,
            ),
            metadata=self.md,
        )
        return self.stub.UploadContribution(
            chunks(begin.upload_id, data, begin.offset, **kw), metadata=self.md
        )


@dataclass
class Harness:
    running: RunningServer
    address: str
    admin_token: str
    channel: grpc.Channel

    @property
    def app(self):
        return self.running.app

    @property
    def admin(self) -> pb_grpc.AdminServiceStub:
        return pb_grpc.AdminServiceStub(self.channel)

    @property
    def workers(self) -> pb_grpc.WorkerServiceStub:
        return pb_grpc.WorkerServiceStub(self.channel)

    @property
    def amd(self):
        return bearer(self.admin_token)

    def join_token(self, label: str = "t") -> str:
        return self.admin.CreateToken(pb.CreateTokenRequest(label=label), metadata=self.amd).token

    def register(self, join_token: str | None = None, name: str = "w") -> Worker:
        jt = join_token or self.join_token()
        resp = self.workers.Register(pb.RegisterRequest(name=name), metadata=bearer(jt))
        return Worker(resp.worker_id, resp.session_token, self.workers)

    def open_fusion(self, quorum: int = 2, **kw) -> pb.Round:
        return self.admin.OpenRound(
            pb.OpenRoundRequest(kind="fusion", quorum=quorum, **kw), metadata=self.amd
        )

    def counts(self) -> dict[str, int]:
        """Rows per table and blobs on disk: what a refused request must not change."""
        store = self.app.store
        tables = ["contributions", "uploads", "versions", "version_files", "rounds"]
        out = {t: int(store.one(f"SELECT COUNT(*) FROM {t}")[0]) for t in tables}
        out["blobs"] = len(self.app.blobs.all())
        out["parts"] = len(list(self.app.uploads.root.glob("*.part")))
        return out


#: a DHT peer to hand out, so that pretrain rounds open without starting hivemind (nobody dials it here)
FAKE_DHT_PEER = "/ip4/127.0.0.1/tcp/9/p2p/QmPretrainRoundsNeedSomePeerToHandOut"


def make_config(data_dir: Path, base_model: Path | None, **kw) -> CoordinatorConfig:
    if not kw.get("dht_listen"):
        kw.setdefault("dht_peers", [FAKE_DHT_PEER])
    return CoordinatorConfig(data_dir=data_dir, listen="127.0.0.1:0", base_model=base_model, tick_s=0.1, **kw)


@pytest.fixture
def make_harness(tmp_path, tiny_model):
    started: list[Harness] = []

    def make(**kw) -> Harness:
        config = make_config(tmp_path / f"data{len(started)}", tiny_model, **kw)
        running = start_server(config)
        h = Harness(
            running=running,
            address=running.address,
            admin_token=config.admin_token_path.read_text().strip(),
            channel=open_channel(running.address),
        )
        started.append(h)
        return h

    yield make
    for h in started:
        h.channel.close()
        h.running.stop(grace=0)


@pytest.fixture
def harness(make_harness) -> Harness:
    return make_harness()
