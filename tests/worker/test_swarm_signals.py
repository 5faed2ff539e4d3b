"""hivemind's averagers set SIGINT to SIG_IGN in the process that starts them; coldswarm keeps Ctrl-C working."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from coldswarm.common.signals import install_stop_handler

PROBE = Path(__file__).with_name("signals_probe.py")


@pytest.fixture(scope="module")
def probe() -> dict[str, str]:
    result = subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)


def test_the_trap_exists_and_preserve_sigint_undoes_it(probe):
    assert probe["plain"] == "ignored", "hivemind no longer sets SIGINT to SIG_IGN: drop preserve_sigint"
    assert probe["preserved"] == "kept"


def test_checkpointer_downloader_starts_off_the_main_thread(probe):
    assert probe["thread"] == "alive"
    assert probe["after thread"] == "kept"


def test_stop_handler_acts_only_in_the_installing_process(tmp_path):
    import multiprocessing
    import os

    calls = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    install_stop_handler(calls.append)
    try:
        ctx = multiprocessing.get_context("fork")
        running = ctx.Event()
        child = ctx.Process(target=_sleep_after_setting, args=(running,))
        child.start()
        # CPython drops signals that arrive while a forked child is still setting up: wait until it runs.
        assert running.wait(timeout=30)
        child.terminate()  # what hivemind does to its averager at shutdown
        child.join(timeout=10)
        assert child.exitcode == -signal.SIGTERM, "a forked child must die of SIGTERM, not ignore it"
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _sleep_after_setting(event) -> None:
    import time

    event.set()
    time.sleep(60)
