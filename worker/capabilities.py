"""What a worker tells the coordinator about itself when it registers."""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path

import psutil
import torch

from coldswarm.proto import coldswarm_pb2 as pb


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
