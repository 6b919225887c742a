"""How the command lines end: the one exception type the build reports to the user (exit
status 2, no traceback), and the signals that stop a build or a training run."""

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any


class BuildError(Exception):
    """A problem with the user's input or environment, stated so the user can fix it."""


def listing(items: Sequence[str], shown: int = 1) -> str:
    """The first ``shown`` of ``items``, comma-separated, and how many more: a message names a
    few, not hundreds."""
    more = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {more} more" if more > 0 else "")


class Stopped(BaseException):
    """A signal asked the command to end: it unwinds as Ctrl-C does, removing what it made."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal = signal.Signals(signum)


@contextlib.contextmanager
def handled_by(handler: Any, *signals: signal.Signals) -> Iterator[None]:
    """``handler`` (a function, or ``signal.SIG_DFL``) takes ``signals`` meanwhile, then their
    handlers before. In the main thread only, which alone takes handlers. A signal ignored on
    purpose stays so (nohup ignores SIGHUP for its command), and one handled outside Python is
    left to that handler (``signal.signal`` could not put it back)."""
    previous = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                    previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


@contextlib.contextmanager
def stopped_by(*signals: signal.Signals) -> Iterator[None]:
    """``signals`` raise :class:`Stopped` meanwhile: CI's cancel, ``timeout`` and a cluster's
    preemption send SIGTERM, a closed terminal SIGHUP, and by default either ended the process
    at once, leaving child processes running and temporary files behind."""
    owner = os.getpid()

    def stop(signum: int, _frame: object) -> None:
        if os.getpid() != owner:  # a forked child (a DataLoader worker): end as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Stopped(signum)

    with handled_by(stop, *signals):
        yield
