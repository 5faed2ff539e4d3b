"""The DHT process outlives requesters that exit before it reads their requests (coldswarm.swarm.dht)."""

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from coldswarm.swarm.dht import DROPPED, ResilientDHT, _RequestPipe

CHURN_PROBE = Path(__file__).with_name("dht_churn_probe.py")


def _send_a_pipe_and_exit(connection) -> None:
    _, writer = multiprocessing.Pipe(duplex=False)
    connection.send(("_get", [], {"future_pipe": writer}))  # as an MPFuture's reply pipe travels


def test_request_from_an_exited_process_is_dropped_not_fatal():
    ctx = multiprocessing.get_context("fork")
    inner, outer = ctx.Pipe(duplex=False)
    sender = ctx.Process(target=_send_a_pipe_and_exit, args=(outer,))
    sender.start()
    sender.join(timeout=30)
    assert sender.exitcode == 0
    pipe = _RequestPipe(inner)
    method, args, kwargs = pipe.recv()
    assert (method, args) == (DROPPED, []) and hasattr(ResilientDHT, method)
    # The pipe itself is fine: the next request is read normally.
    outer.send(("_shutdown", [], {}))
    assert pipe.recv() == ("_shutdown", [], {})


def _eof_on_load():
    raise EOFError("the requester went away mid-handshake")


class _VanishesOnLoad:
    """Unpickles as a requester that exits during the fd handshake does: EOFError, which killed hivemind's DHT."""

    def __reduce__(self):
        return _eof_on_load, ()


def test_requester_that_vanishes_mid_handshake_is_dropped_not_fatal():
    inner, outer = multiprocessing.Pipe(duplex=False)
    outer.send(("_get", [], {"future": _VanishesOnLoad()}))
    method, _, kwargs = _RequestPipe(inner).recv()
    assert method == DROPPED and "mid-handshake" in kwargs["reason"]


def test_end_of_the_pipe_still_ends_the_reader():
    inner, outer = multiprocessing.Pipe(duplex=False)
    outer.close()
    with pytest.raises(EOFError):
        _RequestPipe(inner).recv()


@pytest.mark.slow
def test_dht_keeps_answering_while_averagers_come_and_go():
    # A fresh interpreter: hivemind's process-wide state does not survive a long test session's forks.
    result = subprocess.run([sys.executable, str(CHURN_PROBE)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert report == {"cycles": "6", "dht process": "alive", "dht answers": "yes"}, result.stderr[-3000:]
