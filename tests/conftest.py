"""Shared fixtures: child-process reaping, a free port, and the GPU marker (plain helpers are in support.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest
from support import free_port

from coldswarm.coordinator.local_cluster import stop_process_groups


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing means no GPU either
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class ProcessGroup:
    """Starts child processes in their own sessions and kills every one of them (and
    their descendants) at teardown, so no test leaves a process behind."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        proc = subprocess.Popen(args, env=full_env, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def python(self, module: str, *args: str, **kwargs) -> subprocess.Popen:
        return self.start([sys.executable, "-m", module, *args], **kwargs)

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def reap(self, timeout: float = 10.0) -> None:
        stop_process_groups(self.procs, grace_s=timeout)


def _process_wide_helper(proc: psutil.Process) -> bool:
    """torch's shared-memory manager: started once per test process (hivemind switches torch to file_system
    sharing) and shared by every later test; killing it breaks them ("Broken pipe"), it is no leak."""
    try:
        return proc.name() == "torch_shm_manager"
    except psutil.Error:
        return False


@pytest.fixture
def processes():
    group = ProcessGroup()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        yield group
    finally:
        group.reap()
        leaked = [
            p
            for p in psutil.Process().children(recursive=True)
            if p.pid not in before and p.is_running() and not _process_wide_helper(p)
        ]
        for p in leaked:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leaked, timeout=5)


@pytest.fixture
def port() -> int:
    return free_port()
