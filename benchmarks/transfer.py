"""Transfer benchmark: a ~200 MB version through the coordinator vs. a plain loopback socket.

Prints rates and ratios (never asserts). In one run, on loopback:

- download: ``DownloadVersion`` streamed into a file, and the admin CLI's verified
  download (``coldswarm.common.fetch.download_version``: resumable, sha256 of
  every file, fsync) — vs. a plain TCP socket sending the same file into a file;
- upload: ``BeginUpload`` + ``UploadContribution`` of a same-sized contribution until
  the coordinator answers (its hash check, validation and blob commit included) —
  vs. a plain TCP socket receiving the same bytes into a file.

The coordinator and the socket peer each run as their own process; this process is
the client in both cases. Target: service rate >= 0.5 x socket rate.

    python benchmarks/transfer.py [--size-mb 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from coldswarm.common.channel import bearer, open_channel
from coldswarm.common.fetch import download_version
from coldswarm.coordinator.local_cluster import free_port
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc

MiB = 1024 * 1024
ROWS = 1024  # each tensor is ROWS x ROWS float32 = 4 MiB

SOCKET_PEER = r"""
import socket, sys
mode, path, port_file = sys.argv[1], sys.argv[2], sys.argv[3]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(1)
open(port_file, "w").write(str(srv.getsockname()[1]))
while True:
    conn, _ = srv.accept()
    if mode == "send":
        with open(path, "rb") as fh:
            conn.sendfile(fh)
    else:
        with open(path, "wb") as fh:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                fh.write(data)
        conn.sendall(b"ok")
    conn.close()
"""


def build_base(out: Path, size_mb: int) -> list[str]:
    """An HF-shaped directory (config.json + model.safetensors) of about ``size_mb`` MB."""
    out.mkdir(parents=True)
    n = max(1, size_mb * MiB // (ROWS * ROWS * 4))
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(ROWS, ROWS, generator=gen) for i in range(n)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({"model_type": "benchmark", "layers": n}))
    return list(tensors)


def wait_port(port_file: Path, proc) -> int:
    for _ in range(600):
        if port_file.exists() and port_file.read_text():
            return int(port_file.read_text())
        if proc.poll() is not None:
            raise RuntimeError("socket peer died")
        time.sleep(0.05)
    raise TimeoutError("socket peer did not start")


def socket_download(path: Path, dest: Path, work: Path) -> float:
    port_file = work / "send.port"
    peer = subprocess.Popen([sys.executable, "-c", SOCKET_PEER, "send", str(path), str(port_file)])
    try:
        port = wait_port(port_file, peer)
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s, open(dest, "wb") as fh:
            while data := s.recv(1 << 20):
                fh.write(data)
        return time.perf_counter() - t0
    finally:
        peer.kill()
        peer.wait()
        port_file.unlink(missing_ok=True)


def socket_upload(path: Path, dest: Path, work: Path) -> float:
    port_file = work / "recv.port"
    peer = subprocess.Popen([sys.executable, "-c", SOCKET_PEER, "recv", str(dest), str(port_file)])
    try:
        port = wait_port(port_file, peer)
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s, open(path, "rb") as fh:
            s.sendfile(fh)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(2) == b"ok"
        return time.perf_counter() - t0
    finally:
        peer.kill()
        peer.wait()
        port_file.unlink(missing_ok=True)


def grpc_download(stub, md, path: str, dest: Path) -> float:
    t0 = time.perf_counter()
    with open(dest, "wb") as fh:
        for chunk in stub.DownloadVersion(pb.DownloadRequest(version="0", path=path), metadata=md):
            fh.write(chunk.data)
    return time.perf_counter() - t0


def grpc_upload(admin, workers, amd, join_token: str, payload: Path, chunk: int) -> tuple[float, float]:
    """(seconds until gRPC took the last chunk, seconds until the coordinator accepted the upload)."""
    admin.OpenRound(pb.OpenRoundRequest(kind="fusion", quorum=1000), metadata=amd)
    reg = workers.Register(pb.RegisterRequest(name="bench"), metadata=bearer(join_token))
    md = bearer(reg.session_token)
    size = payload.stat().st_size
    t0 = time.perf_counter()
    digest = hashlib.sha256()  # the client hashes as it sends, as a worker does
    rounds = admin.ListRounds(pb.ListRoundsRequest(), metadata=amd).rounds
    up = workers.BeginUpload(
        pb.BeginUploadRequest(round_id=rounds[-1].id, base_version=0, total_size=size, codec="none"),
        metadata=md,
    )
    step = min(chunk, up.max_chunk_bytes)

    def stream():
        with open(payload, "rb") as fh:
            offset = 0
            while True:
                data = fh.read(step)
                digest.update(data)
                last = offset + len(data) >= size
                yield pb.UploadChunk(
                    upload_id=up.upload_id,
                    offset=offset,
                    data=data,
                    sha256=digest.hexdigest() if last else "",
                )
                offset += len(data)
                if last:
                    sent.append(time.perf_counter() - t0)
                    return

    sent: list[float] = []
    workers.UploadContribution(stream(), metadata=md)
    elapsed = time.perf_counter() - t0
    admin.CloseRound(pb.CloseRoundRequest(cancel=True), metadata=amd)
    return sent[0], elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement (the median is shown)")
    ap.add_argument("--chunk-mib", type=int, default=1, help="the coordinator's chunk size")
    ap.add_argument(
        "--sink",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where received bytes are written in the stream/socket runs (default /dev/shm: "
        "memory, so disk write-back does not blur the transport comparison)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="coldswarm-transfer-") as tmp:
        work = Path(tmp)
        sink = Path(tempfile.mkdtemp(prefix="coldswarm-sink-", dir=args.sink))
        base = work / "base"
        names = build_base(base, args.size_mb)
        weights = base / "model.safetensors"
        size = weights.stat().st_size
        payload = work / "contribution.safetensors"
        gen = torch.Generator().manual_seed(1)
        payload.write_bytes(
            save(
                {f"delta/{n}": torch.randn(ROWS, ROWS, generator=gen) * 1e-3 for n in names},
                metadata={"coldswarm": json.dumps({"format": 1, "form": "delta", "base_version": 0})},
            )
        )
        port = free_port()
        data_dir = work / "data"
        log = open(work / "coordinator.log", "wb")
        coord = subprocess.Popen(
            [
                sys.executable, "-m", "coldswarm.coordinator.cli", "serve", "--data-dir", str(data_dir),
                "--listen", f"127.0.0.1:{port}", "--base-model", str(base),
                "--chunk-bytes", str(args.chunk_mib * MiB), "--log-level", "WARNING",
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            token_file = data_dir / "admin.token"
            channel = open_channel(f"127.0.0.1:{port}")
            admin, workers = pb_grpc.AdminServiceStub(channel), pb_grpc.WorkerServiceStub(channel)
            for _ in range(600):
                try:
                    amd = bearer(token_file.read_text().strip())
                    admin.Status(pb.StatusRequest(), metadata=amd, timeout=1)
                    break
                except Exception:
                    if coord.poll() is not None:
                        raise RuntimeError(f"coordinator exited; see {work / 'coordinator.log'}") from None
                    time.sleep(0.2)
            join = admin.CreateToken(pb.CreateTokenRequest(label="bench"), metadata=amd).token
            results: dict[str, list[float]] = {
                k: [] for k in ("sock_down", "grpc_down", "cli_down", "sock_up", "grpc_sent", "grpc_up")
            }
            for i in range(args.repeat):
                results["sock_down"].append(socket_download(weights, sink / "sock.bin", work))
                results["grpc_down"].append(grpc_download(admin, amd, "model.safetensors", sink / "grpc.bin"))
                out = work / f"dl{i}"
                t0 = time.perf_counter()
                download_version(admin, "0", out, metadata=amd)
                results["cli_down"].append(time.perf_counter() - t0)
                results["sock_up"].append(socket_upload(payload, sink / "sock-up.bin", work))
                sent, accepted = grpc_upload(admin, workers, amd, join, payload, args.chunk_mib * MiB)
                results["grpc_sent"].append(sent)
                results["grpc_up"].append(accepted)
                for p in (sink / "sock.bin", sink / "grpc.bin", sink / "sock-up.bin"):
                    p.unlink(missing_ok=True)
                shutil.rmtree(out, ignore_errors=True)
            channel.close()
        finally:
            coord.terminate()
            coord.wait(timeout=30)
        shutil.rmtree(sink, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in results.items()}
        up_size = payload.stat().st_size

        def rate(nbytes, secs):
            return nbytes / secs / MiB

        print(f"payload: version file {size / MiB:.0f} MiB, contribution {up_size / MiB:.0f} MiB; "
              f"median of {args.repeat} runs; sink {args.sink or 'tmp'}; chunk {args.chunk_mib} MiB; {os.cpu_count()} CPUs; "
              f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        rows = [
            ("download  socket copy", rate(size, med["sock_down"]), None),
            (
                "download  DownloadVersion stream",
                rate(size, med["grpc_down"]),
                med["sock_down"] / med["grpc_down"],
            ),
            (
                "download  admin CLI (verify+fsync)",
                rate(size, med["cli_down"]),
                med["sock_down"] / med["cli_down"],
            ),
            ("upload    socket copy", rate(up_size, med["sock_up"]), None),
            (
                "upload    UploadContribution stream",
                rate(up_size, med["grpc_sent"]),
                med["sock_up"] / med["grpc_sent"],
            ),
            (
                "upload    ... accepted (hash+check+fsync)",
                rate(up_size, med["grpc_up"]),
                med["sock_up"] / med["grpc_up"],
            ),
        ]
        for name, r, ratio in rows:
            print(f"{name:38s} {r:8.1f} MiB/s" + (f"   ratio {ratio:.2f} of socket" if ratio else ""))


if __name__ == "__main__":
    main()
