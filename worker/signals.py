"""Stop signals in processes that fork (hivemind's averagers are forked children of their caller).

A forked child inherits its parent's Python signal handlers. A handler that only
sets a "stop at the next step" flag would then make hivemind's averager children
ignore the SIGTERM with which hivemind ends them at shutdown, and they would live
on. :func:`install_stop_handler` acts only in the process that installed it; in
any forked child the signal gets its default action again.

hivemind 1.1.12 also sets SIGINT to SIG_IGN in the *calling* process when it starts
an averager (so that its child ignores Ctrl-C) and never restores it;
:func:`preserve_sigint` puts the caller's handler back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
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


@contextlib.contextmanager
def preserve_sigint():
    """Keep this process's SIGINT handler across hivemind's averager start-up (see the module docstring).

    The child is forked inside this block and keeps SIG_IGN; the caller gets its own handler back. Off the
    main thread no handler can change, so nothing is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
