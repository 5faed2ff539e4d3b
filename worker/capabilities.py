"""What a worker tells the coordinator about itself when it registers."""

from __future__ import annotations

import logging
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

import psutil
import torch

from coldswarm.proto import coldswarm_pb2 as pb

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    """``auto`` picks CUDA when one is usable, else the CPU; asking for CUDA without one is an error."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, not {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto"
        )
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def measure_bandwidth(client, max_bytes: int = 8 * 2**20, max_seconds: float = 3.0) -> float:
    """Bytes/s from the coordinator to this worker: a timed read of the start of the latest version's
    largest file, stopped after ``max_bytes`` or ``max_seconds``. 0.0 when it cannot be measured (the
    coordinator has no version yet, the file is tiny, or the read failed): nothing depends on it."""
    import grpc

    try:
        info: pb.Version = client.call("GetVersion", pb.GetVersionRequest(version="latest"), retry=False)
        if not info.files:
            return 0.0
        largest = max(info.files, key=lambda f: f.size)
        request = pb.DownloadRequest(version=str(info.number), path=largest.path)
        received, started = 0, time.monotonic()
        stream = client.stream("DownloadVersion", request, timeout=max_seconds + 5)
        try:
            for chunk in stream:
                received += len(chunk.data)
                if received >= max_bytes or time.monotonic() - started > max_seconds:
                    break
        finally:
            stream.cancel()
        elapsed = time.monotonic() - started
    except grpc.RpcError as exc:
        log.debug("bandwidth probe failed: %s", exc)
        return 0.0
    return received / elapsed if received >= 2**20 and elapsed > 0 else 0.0


def detect_capabilities(device: str, work_dir: Path, bandwidth_bytes_per_s: float = 0.0) -> pb.Capabilities:
    try:
        version = metadata.version("coldswarm")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        version = "unknown"
    caps = pb.Capabilities(
        device=device,
        memory_bytes=psutil.virtual_memory().total,
        free_disk_bytes=shutil.disk_usage(work_dir).free,
        bandwidth_bytes_per_s=bandwidth_bytes_per_s,
        cpu_count=os.cpu_count() or 1,
        software_version=version,
        torch_version=torch.__version__,
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        caps.accelerator_name = props.name
        caps.accelerator_memory_bytes = props.total_memory
        caps.supports_bf16 = torch.cuda.is_bf16_supported()
        try:
            import bitsandbytes  # noqa: F401

            caps.supports_4bit = True
        except Exception:
            caps.supports_4bit = False
    return caps
