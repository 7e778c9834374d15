"""Turning termination signals into an exception, so cleanup code runs.

By default SIGTERM and SIGHUP end a Python process on the spot, skipping
every ``finally`` block.  Inside :func:`signals_raise` they (and SIGINT and
SIGQUIT) raise :class:`Interrupted` instead, so a command can thaw a frozen
file system or remove a half-written image before it exits.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

# Signals that would otherwise end the process without cleaning up.
GUARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Interrupted(BaseException):
    """A guarded signal arrived inside :func:`signals_raise`.  ``note`` says
    what the interrupted command did about it (set by that command)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.note = ""

    def __str__(self) -> str:
        text = f"interrupted by {signal.Signals(self.signum).name}"
        return f"{text}; {self.note}" if self.note else text


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    """A signal handler raising :class:`Interrupted`."""
    raise Interrupted(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, a guarded signal raises :class:`Interrupted`; the
    previous handlers are restored on leaving it."""
    saved = {sig: signal.getsignal(sig) for sig in GUARDED_SIGNALS}
    try:
        for sig in GUARDED_SIGNALS:
            signal.signal(sig, raise_interrupted)
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
