"""Freezing file systems around a snapshot (``cowfs snapshot --freeze``).

``fsfreeze -f`` makes a file system write everything out and hold new
writes; a snapshot of the volume under it then holds a clean file system.
The one thing that must never happen is leaving it frozen: every
application writing to it would hang.  :func:`frozen` therefore unfreezes
in a ``finally`` block; while frozen, SIGINT/SIGTERM/SIGHUP/SIGQUIT raise
:class:`~cowfs_tools.signals.Interrupted` (so the ``finally`` runs instead
of the process dying) and the terminal's stop signals are ignored; while
thawing, signals are only noted, and acted on once everything is thawed.
Only SIGKILL can still leave a file system frozen; ``fsfreeze -u FSMOUNT``
thaws it by hand.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from cowfs_tools.signals import GUARDED_SIGNALS, Interrupted, raise_interrupted

log = logging.getLogger(__name__)

# Signals that would stop (not end) the process: a stopped process keeps the freeze.
STOP_SIGNALS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
UNFREEZE_TIMEOUT = 60.0   # seconds; thawing takes milliseconds


class FreezeError(Exception):
    """A file system could not be frozen or thawed; ``str()`` names it, the
    cause and what to do."""


def fsfreeze_program() -> str:
    """The path of ``fsfreeze`` (FreezeError if it is not installed)."""
    program = shutil.which("fsfreeze")
    if program is None:
        raise FreezeError("fsfreeze: not found in PATH; install util-linux or snapshot "
                          "without --freeze")
    return program


def _fsfreeze(program: str, flag: str, mountpoint: str,
              timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    # A session of its own keeps a Ctrl-C typed at the terminal from
    # killing the child halfway; our own handlers decide what happens.
    return subprocess.run([program, flag, mountpoint], capture_output=True, text=True,
                          start_new_session=True, timeout=timeout, check=False)


def _thaw(program: str, mountpoint: str, confirmed: bool) -> str | None:
    """Unfreeze ``mountpoint``; return an error message, or None on success
    (or when the freeze was never confirmed and the thaw finds nothing
    frozen)."""
    try:
        done = _fsfreeze(program, "-u", mountpoint, timeout=UNFREEZE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{mountpoint}: could not run fsfreeze -u: {err}"
    if done.returncode == 0:
        log.info("unfroze %s", mountpoint)
        return None
    if not confirmed:
        # The freeze was cut short; the kernel says it is not frozen (EINVAL).
        log.debug("%s was not frozen: %s", mountpoint, done.stderr.strip())
        return None
    return f"{mountpoint}: fsfreeze -u failed: {done.stderr.strip() or done.returncode}"


def _note_signals(noted: list[int]) -> None:
    """Make the guarded signals only append to ``noted`` from now on.  A
    signal Python was already about to deliver may still raise
    Interrupted while the handlers are swapped: it is noted too."""
    def note(signum: int, frame: FrameType | None) -> None:
        noted.append(signum)
    while True:
        try:
            for sig in GUARDED_SIGNALS:
                signal.signal(sig, note)
            return
        except Interrupted as err:
            noted.append(err.signum)


@contextmanager
def frozen(mountpoints: list[str]) -> Iterator[None]:
    """Freeze each of ``mountpoints`` in order, run the body, and unfreeze
    them all (in reverse order) whatever happens.  A guarded signal during
    the freezing or the body raises :class:`Interrupted`; the file systems
    are thawed before it reaches the caller.  Raises FreezeError if a
    freeze fails (after thawing the ones done) or a thaw fails (naming the
    file systems left frozen)."""
    if not mountpoints:
        yield
        return
    program = fsfreeze_program()
    saved = {sig: signal.getsignal(sig) for sig in GUARDED_SIGNALS + STOP_SIGNALS}
    attempted: list[tuple[str, bool]] = []   # (mountpoint, freeze confirmed)
    noted: list[int] = []
    try:
        for sig in GUARDED_SIGNALS:
            signal.signal(sig, raise_interrupted)
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        for mountpoint in mountpoints:
            attempted.append((mountpoint, False))
            done = _fsfreeze(program, "-f", mountpoint)
            if done.returncode != 0:
                raise FreezeError(f"{mountpoint}: cannot freeze it: "
                                  f"{done.stderr.strip() or 'fsfreeze failed'}; "
                                  "no snapshot was taken")
            attempted[-1] = (mountpoint, True)
            log.info("froze %s", mountpoint)
        yield
    finally:
        _note_signals(noted)
        errors = [msg for mp, ok in reversed(attempted)
                  if (msg := _thaw(program, mp, ok)) is not None]
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if errors:
            # This replaces any exception in flight: a file system left
            # frozen is the more urgent news.
            raise FreezeError("; ".join(errors) + "; thaw it by hand with `fsfreeze -u "
                              "FSMOUNT` at once: writers to it hang until then")
    if noted:
        # The body finished, but a signal came while thawing: act on it now.
        raise Interrupted(noted[0])


def check_freezable(fsmount: str, refused_devices: dict[int, str]) -> str:
    """Resolve ``fsmount`` and check it can be frozen safely: it must be a
    mount point and not on one of ``refused_devices`` (st_dev -> why, e.g.
    the file system holding the pool: freezing it would hang the daemon).
    Returns the resolved path; raises FreezeError otherwise."""
    path = os.path.realpath(fsmount)
    if not os.path.isdir(path):
        raise FreezeError(f"{fsmount}: not a directory; --freeze takes the mount point of "
                          "the file system on the loop device")
    if not os.path.ismount(path):
        raise FreezeError(f"{fsmount}: not a mount point; --freeze takes the mount point "
                          "of the file system on the loop device")
    reason = refused_devices.get(os.stat(path).st_dev)
    if reason is not None:
        raise FreezeError(f"{fsmount}: refusing to freeze it: {reason}")
    return path
