"""How the command lines end: the one exception type the build reports to the user (exit
status 2, no traceback), and the signals that stop a build or a training run."""

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence


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
def stopped_by(*signals: signal.Signals) -> Iterator[None]:
    """``signals`` raise :class:`Stopped` meanwhile: CI's cancel, ``timeout`` and a cluster's
    preemption send SIGTERM, a closed terminal SIGHUP, and by default either ended the process
    at once, leaving child processes running and temporary files behind."""
    if threading.current_thread() is not threading.main_thread():  # only it takes handlers
        yield
        return

    owner = os.getpid()

    def stop(signum: int, _frame: object) -> None:
        if os.getpid() != owner:  # a forked child (a DataLoader worker): end as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Stopped(signum)

    # A signal ignored on purpose stays so: nohup ignores SIGHUP for its command.
    caught = [sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, stop) for sig in caught}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
