"""Run by tests/worker/test_swarm_signals.py in a fresh interpreter: prints what happens to SIGINT.

hivemind's process-wide state (its MPFuture backend, torch's shared-memory manager) does not survive
the many forks of a long test session, so these checks start from a clean process.
"""

import signal
import sys
import threading

import torch
from hivemind.averaging import DecentralizedAverager

from coldswarm.coordinator.checkpointer import _state_downloader_class
from coldswarm.swarm.dht import start_dht
from coldswarm.swarm.guarded_averagers import AveragerGuard
from coldswarm.swarm.sigint import preserve_sigint


def ours(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    dht = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        signal.signal(signal.SIGINT, ours)
        plain = DecentralizedAverager([torch.zeros(4)], dht, prefix="trap", start=True)
        print("plain:", "ignored" if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else "kept")
        plain.shutdown()

        signal.signal(signal.SIGINT, ours)
        with preserve_sigint():
            kept = DecentralizedAverager([torch.zeros(4)], dht, prefix="kept", start=True)
        print("preserved:", "kept" if signal.getsignal(signal.SIGINT) is ours else "lost")
        kept.shutdown()

        outcome = []

        def start_off_main_thread():
            try:
                # As the checkpointer builds it: guarded (here with no admission list: anyone may serve).
                averager = _state_downloader_class()(
                    [torch.zeros(4)], dht, guard=AveragerGuard(), prefix="bg", start=True
                )
                outcome.append("alive" if averager.is_alive() else "dead")
                averager.shutdown()
            except Exception as exc:
                outcome.append(f"error {type(exc).__name__}: {exc}")

        thread = threading.Thread(target=start_off_main_thread)
        thread.start()
        thread.join(timeout=60)
        print("thread:", outcome[0] if outcome else "hung")
        print("after thread:", "kept" if signal.getsignal(signal.SIGINT) is ours else "lost")
    finally:
        dht.shutdown()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
