"""Stop signals in processes that fork (hivemind's averagers are forked children of their caller).

A forked child inherits its parent's Python signal handlers. A handler that only
sets a "stop at the next step" flag would then make hivemind's averager children
ignore the SIGTERM with which hivemind ends them at shutdown, and they would live
on. :func:`install_stop_handler` acts only in the process that installed it; in
any forked child the signal gets its default action again. Both roles install
their stop handlers with it (the coordinator's checkpointer forks averagers too).

hivemind's own SIGINT trap at averager start-up is undone by
:func:`coldswarm.swarm.sigint.preserve_sigint`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def install_stop_handler(callback: Callable[[int], None], signals: Iterable[int] = STOP_SIGNALS) -> None:
    """Call ``callback(signum)`` on these signals in this process only (not in children forked later)."""
    owner = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        callback(signum)

    for sig in signals:
        signal.signal(sig, handler)
