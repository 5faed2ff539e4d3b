"""hivemind's averagers set SIGINT to SIG_IGN in the process that starts them; coldswarm keeps Ctrl-C working."""

import signal
import threading

import pytest
import torch

from coldswarm.coordinator.checkpointer import _state_downloader_class
from coldswarm.worker.signals import install_stop_handler, preserve_sigint
from coldswarm.worker.swarm import start_dht


@pytest.fixture
def dht():
    node = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield node
    node.shutdown()


@pytest.fixture
def our_handler():
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    yield handler
    signal.signal(signal.SIGINT, previous)


def test_the_trap_exists_and_preserve_sigint_undoes_it(dht, our_handler):
    from hivemind.averaging import DecentralizedAverager

    plain = DecentralizedAverager([torch.zeros(4)], dht, prefix="trap", start=True)
    try:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "hivemind no longer does this: drop the fix"
    finally:
        plain.shutdown()
    signal.signal(signal.SIGINT, our_handler)
    with preserve_sigint():
        kept = DecentralizedAverager([torch.zeros(4)], dht, prefix="kept", start=True)
    try:
        assert signal.getsignal(signal.SIGINT) is our_handler
    finally:
        kept.shutdown()


def test_checkpointer_downloader_starts_off_the_main_thread(dht, our_handler):
    errors, started = [], []

    def start():
        try:
            averager = _state_downloader_class()([torch.zeros(4)], dht, prefix="bg", start=True)
            started.append(averager.is_alive())
            averager.shutdown()
        except Exception as exc:  # what hivemind's own run_in_background raises here
            errors.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join(timeout=60)
    assert not errors and started == [True]
    assert signal.getsignal(signal.SIGINT) is our_handler


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
