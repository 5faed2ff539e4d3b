"""fusion/ is pure library code: importing all of it pulls in neither grpc nor the coordinator or worker."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import coldswarm.fusion


def test_fusion_imports_no_grpc_coordinator_or_worker():
    modules = sorted(m.name for m in pkgutil.iter_modules(coldswarm.fusion.__path__))
    assert {"checkpoint", "codecs", "contribution", "merge", "methods", "statistics", "validate"} <= set(
        modules
    )
    script = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('coldswarm.fusion.' + m)\n"
        "bad = sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'coldswarm.coordinator',"
        " 'coldswarm.worker', 'hivemind')))\n"
        "print('BAD', bad)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "BAD []" in res.stdout, res.stdout
