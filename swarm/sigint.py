"""hivemind's SIGINT trap, undone.

hivemind 1.1.12 sets SIGINT to SIG_IGN in the *calling* process when it starts an averager (so that
its child ignores Ctrl-C) and never restores it; :func:`preserve_sigint` puts the caller's handler
back. (Handlers that forked children must not inherit are
:func:`coldswarm.common.signals.install_stop_handler`'s job.)
"""

from __future__ import annotations

import contextlib
import signal
import threading


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
