"""Serve a pool over FUSE: open it, mount it, answer requests, unmount, close.

:func:`serve` does the whole life of a mount in the calling process (the
``--foreground`` case).  :func:`start_in_background` forks a daemon that
calls :func:`serve` and returns in the parent only once the daemon reports
that the mount answers requests.

Life of a mount:

1. open the pool (takes its lock, replays its journal);
2. mount with libfuse (options: ``fsname=cowfs:<pool>``, ``subtype=cowfs``,
   ``default_permissions`` and the user's ``-o`` options);
3. run the trio loop: the FUSE request loop, ``Pool.tick()`` once a second,
   a receiver for SIGTERM/SIGINT/SIGHUP that stops the request loop, the
   task that tells the kernel to drop caches ctl commands made stale (a
   restore replaces a volume's data), and a check that the mount answers
   ``stat`` before announcing readiness (to the waiting ``cowfs mount``
   command, and to systemd with ``READY=1``);
4. when the loop ends (signal, or the kernel unmounted us after
   ``umount``/``fusermount3 -u``): unmount if still mounted, then
   ``Pool.close()``, which flushes and checkpoints.

``default_permissions`` is always set: the kernel then checks each volume's
mode, uid and gid itself (and the control files' and directories' root
ownership, which is what keeps snapshots, restores and clones to root).  Only
the mounting user (root) can reach the mount unless ``-o allow_other`` is
given, and root passes those checks, so the option costs root nothing and
makes ``allow_other`` safe.  libfuse adds ``nosuid`` and ``nodev`` unless
``-o suid``/``-o dev`` is given, which suits disk images: an owner who may
chmod a volume cannot make it a set-uid program for other users.

Under systemd (``Type=notify``, see ``systemd/cowfs@.service``) the
foreground daemon speaks the notify protocol on ``$NOTIFY_SOCKET`` itself:
``READY=1`` once the mount answers, ``STOPPING=1`` as soon as it starts to
unmount.  A background daemon drops ``$NOTIFY_SOCKET``: it is not the main
process of whatever service started the ``cowfs mount`` command.

Logging goes to stderr, or to a file with ``--log``.  When stderr is the
systemd journal (``$JOURNAL_STREAM``), lines carry syslog priority prefixes
instead of time stamps, so ``journalctl -p warning`` works.  A background
daemon keeps the user's stderr only until the mount is live, so that every
startup problem (including libfuse's own messages) is seen; after that its
stderr is the ``--log`` file, the journal if stderr was the journal (an
fstab mount started by systemd), or /dev/null.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import signal
import socket
import stat
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn

import trio

from cowfs.blockio import OsStorage
from cowfs.errors import PoolError
from cowfs.pool import Pool

from . import fuse_ops

log = logging.getLogger(__name__)

FSTYPE = "fuse.cowfs"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
TICK_INTERVAL = 1.0      # seconds between Pool.tick() calls
READY_TIMEOUT = 30.0     # seconds the new mount gets to answer its first stat
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The journal stamps each line itself; the <N> prefix is the line's syslog
# priority, which journald reads from a stream.
JOURNAL_LOG_FORMAT = "<%(priority)d>%(name)s: %(message)s"

# Options that identify the mount: the readiness check and the cleanup of a
# failed background mount recognise our mount by them.
_RESERVED_OPTIONS = ("fsname", "subtype")
_MNT_DETACH = 2


class MountError(Exception):
    """The mount did not come up.  ``str()`` is a message for the user that
    names the pool or mountpoint and the cause.  Nothing is left mounted and
    the pool is closed when this is raised."""


class _SyslogPriority(logging.Filter):
    """Adds ``priority``, the syslog priority of the record's level, to
    every record (for :data:`JOURNAL_LOG_FORMAT`)."""

    # (lowest level, priority), highest first: critical 2, error 3,
    # warning 4, info 6, debug 7.
    _LEVELS = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))

    def filter(self, record: logging.LogRecord) -> bool:
        record.priority = next((prio for level, prio in self._LEVELS
                                if record.levelno >= level), 7)
        return True


def stderr_is_journal() -> bool:
    """True if stderr is the stream systemd connected to the journal: the
    device and inode in ``$JOURNAL_STREAM`` are those of fd 2."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def configure_logging(verbosity: int, log_path: str | None = None) -> None:
    """Send log records to stderr (or append them to ``log_path``).

    ``verbosity`` -1 logs warnings and errors only, 0 adds informational
    messages, 1 adds cowfs debug messages, 2 also libfuse/pyfuse3 debugging.
    On the systemd journal, lines carry priorities instead of time stamps.
    """
    handler: logging.Handler
    # Volume names are bytes from the kernel and need not be UTF-8: write
    # undecodable ones escaped rather than failing the log record.
    if log_path is None:
        stream = open(sys.stderr.fileno(), "w", encoding="utf-8", errors="backslashreplace",
                      closefd=False, buffering=1)
        handler = logging.StreamHandler(stream)
    else:
        handler = logging.FileHandler(log_path, errors="backslashreplace")
    if log_path is None and stderr_is_journal():
        handler.setFormatter(logging.Formatter(JOURNAL_LOG_FORMAT))
        handler.addFilter(_SyslogPriority())
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    level = {-1: logging.WARNING, 0: logging.INFO}.get(max(verbosity, -1), logging.DEBUG)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if verbosity == 1:
        logging.getLogger("pyfuse3").setLevel(logging.INFO)


# ---------------------------------------------------------------------------
# systemd notify protocol


def sd_notify(message: str) -> bool:
    """Send ``message`` (``KEY=VALUE`` lines, e.g. ``READY=1``) as one
    datagram to the service manager's ``$NOTIFY_SOCKET``: a socket path, or
    an abstract socket written with a leading ``@``.  Returns whether it was
    sent; False without ``$NOTIFY_SOCKET`` (not run by systemd).  A failure
    is logged, never raised: readiness reporting must not stop the mount."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    target = os.fsencode(address)
    if target.startswith(b"@"):
        target = b"\0" + target[1:]
    elif not target.startswith(b"/"):
        log.warning("NOTIFY_SOCKET=%s is not a unix socket address; not telling the "
                    "service manager %r", address, message)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), target)
    except OSError as err:
        log.warning("could not tell the service manager %r through NOTIFY_SOCKET=%s: %s",
                    message, address, err.strerror)
        return False
    return True


def fsname(pool_dir: str) -> str:
    """The mount source shown by mount(8) and df(1) for ``pool_dir``."""
    return f"cowfs:{os.path.abspath(pool_dir)}"


def _escape_option_value(value: str) -> str:
    """Escape a value for libfuse's option parser, which splits on commas,
    treats backslash as escape, and (in pyfuse3) must be ASCII: every byte
    that is not plain printable ASCII becomes a backslash-octal escape."""
    out = []
    for byte in os.fsencode(value):
        char = chr(byte)
        if 0x20 < byte < 0x7F and char not in ",\\":
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out)


def check_paths(pool_dir: str, mountpoint: str) -> tuple[str, str]:
    """Resolve ``pool_dir`` and ``mountpoint`` (realpath) and refuse with
    MountError what cannot work: either one missing or not a directory; a
    mountpoint that is a dead FUSE mount of something else (a dead mount of
    this very pool is cleared once its lock is taken); paths that contain
    each other (the daemon would send its own pool I/O through the mount it
    serves, and hang)."""
    pool_dir = os.path.realpath(pool_dir)
    mountpoint = os.path.realpath(mountpoint)
    if not _is_dir(pool_dir, "pool directory"):
        raise MountError(f"pool directory {pool_dir} lies on a FUSE mount whose daemon is gone")
    if not _is_dir(mountpoint, "mountpoint"):
        entries = mounts_at(mountpoint)
        if not (entries and _is_ours(entries[-1], pool_dir)):
            raise MountError(
                f"mountpoint {mountpoint} is a FUSE mount whose daemon is gone; "
                f"unmount it first (umount {mountpoint})"
            )
    for outer, inner in ((pool_dir, mountpoint), (mountpoint, pool_dir)):
        if inner == outer or inner.startswith(outer.rstrip("/") + "/"):
            raise MountError(
                f"cannot mount pool {pool_dir} on {mountpoint}: "
                "the mountpoint and the pool directory must not contain each other"
            )
    return pool_dir, mountpoint


def _is_dir(path: str, what: str) -> bool:
    """True if ``path`` is a directory, False if it is a FUSE mount whose
    daemon died (ENOTCONN); MountError naming ``what`` otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"{what} {path} does not exist") from None
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            return False
        raise MountError(f"cannot use {what} {path}: {err.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"{what} {path} is not a directory")
    return True


def own_options(extra: Iterable[str]) -> tuple[list[str], float]:
    """Take cowfs's own mount options out of ``extra`` (the user's ``-o``
    options): returns the rest, for libfuse, and the polling window in
    seconds (``poll_us=N``, microseconds; 0 turns polling off; see
    :meth:`VolumeOps.serve_polling`).  Raises MountError for a bad value."""
    rest: list[str] = []
    poll_us = fuse_ops.POLL_US
    for option in extra:
        key, _, value = option.partition("=")
        if key != "poll_us":
            rest.append(option)
            continue
        if not value.isdigit() or int(value) > fuse_ops.POLL_US_MAX:
            raise MountError(f"mount option {option!r}: poll_us must be a whole number of "
                             f"microseconds from 0 to {fuse_ops.POLL_US_MAX}")
        poll_us = int(value)
    return rest, poll_us / 1e6


def fuse_options(pool_dir: str, extra: Iterable[str] = ()) -> list[str]:
    """The FUSE mount options for serving ``pool_dir``, plus ``extra`` (the
    user's ``-o`` options, one option per item).  Raises MountError for an
    option cowfs sets itself or one that is not ASCII."""
    options = [
        f"fsname={_escape_option_value(fsname(pool_dir))}",
        "subtype=cowfs",
        "default_permissions",
    ]
    for option in extra:
        key = option.split("=", 1)[0]
        if key in _RESERVED_OPTIONS:
            raise MountError(f"mount option {option!r} is not allowed: cowfs sets {key} itself")
        if not option.isascii():
            raise MountError(f"mount option {option!r} is not ASCII")
        options.append(option)
    return options


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo for a given mount point."""

    mount_id: int
    fstype: str
    source: bytes


def unescape_mountinfo(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def mounts_at(mountpoint: str) -> list[MountEntry]:
    """Every mount whose mount point is ``mountpoint`` (a resolved absolute
    path), oldest first; the last one is what the path shows."""
    target = os.fsencode(mountpoint)
    found = []
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table:
            fields = line.split()
            if unescape_mountinfo(fields[4]) != target:
                continue
            sep = fields.index(b"-", 6)
            found.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    fstype=fields[sep + 1].decode(errors="replace"),
                    source=unescape_mountinfo(fields[sep + 2]),
                )
            )
    return found


def _is_ours(entry: MountEntry, pool_dir: str) -> bool:
    return entry.fstype == FSTYPE and entry.source == os.fsencode(fsname(pool_dir))


def serves(pool_dir: str, mountpoint: str) -> bool:
    """True if ``mountpoint`` shows a live cowfs mount of the pool in
    ``pool_dir``: the top mount there is this pool's and it answers (a
    mount whose daemon died does not count)."""
    pool_dir = os.path.realpath(pool_dir)
    mountpoint = os.path.realpath(mountpoint)
    entries = mounts_at(mountpoint)
    if not (entries and _is_ours(entries[-1], pool_dir)):
        return False
    try:
        os.stat(mountpoint)
    except OSError:
        return False
    return True


def _detach(mountpoint: str) -> None:
    """Lazily unmount ``mountpoint`` (umount2 with MNT_DETACH)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), mountpoint)


# ---------------------------------------------------------------------------
# The mount's life in this process


@dataclass
class _Session:
    """What the trio tasks of one mount share."""

    ops: fuse_ops.VolumeOps
    pool: Pool
    pool_dir: str
    mountpoint: str
    on_ready: Callable[[], None] | None
    live: bool = False
    failure: str | None = None       # why the mount never became live
    stop_signal: str | None = None   # name of the signal that stopped us
    clean: bool = True               # False once the request loop crashed
    stopping: bool = False           # STOPPING=1 sent to the service manager

    def announce_stopping(self, why: str) -> None:
        """Tell the service manager (once) that the mount is going away."""
        if self.live and not self.stopping:
            self.stopping = True
            sd_notify(f"STOPPING=1\nSTATUS=unmounting {self.mountpoint} ({why}); "
                      f"flushing pool {self.pool_dir}")


def _open_pool(pool_dir: str) -> Pool:
    try:
        return Pool.open(OsStorage(pool_dir))
    except PoolError as err:
        # The lock refusal already reads "pool X is already in use ...".
        message = str(err)
        if pool_dir not in message:
            message = f"cannot open pool {pool_dir}: {message}"
        raise MountError(message) from None
    except OSError as err:
        raise MountError(f"cannot open pool {pool_dir}: {err.strerror}") from None


def _clear_dead_mounts(pool_dir: str, mountpoint: str) -> None:
    """Detach mounts of this pool left on ``mountpoint`` by a daemon that
    died: with the pool's lock held no live daemon serves them, and mounting
    on top would only hide them."""
    for entry in reversed(mounts_at(mountpoint)):
        if not _is_ours(entry, pool_dir):
            return
        log.warning("detaching the dead mount of pool %s left on %s by a daemon that died",
                    pool_dir, mountpoint)
        try:
            _detach(mountpoint)
        except OSError as err:
            raise MountError(
                f"cannot detach the dead mount of pool {pool_dir} on {mountpoint}: {err.strerror}"
            ) from None


def _close_pool(pool: Pool, pool_dir: str) -> bool:
    """Flush, checkpoint and unlock; False (logged) if that failed."""
    try:
        pool.close()
    except Exception:
        log.exception("closing pool %s failed: data written since the last sync may be lost", pool_dir)
        return False
    return True


async def _watch_signals(session: _Session) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as received:
        # Stop signals were blocked from before the mount until this
        # receiver existed, so one sent meanwhile is delivered now instead
        # of killing the process with the mount still in place.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        try:
            async for signum in received:
                name = signal.Signals(signum).name
                if session.stop_signal is None:
                    session.stop_signal = name
                    log.info("%s received: unmounting %s", name, session.mountpoint)
                    session.announce_stopping(f"{name} received")
                    fuse_ops.stop_session()
                else:
                    log.info("%s received: already unmounting", name)
        finally:
            # Keep them away from the final unmount and pool close.
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


async def _housekeeping(pool: Pool) -> None:
    last_error: str | None = None
    while True:
        await trio.sleep(TICK_INTERVAL)
        try:
            pool.tick()
        except Exception as err:
            # Log a failure once, not every second it persists.
            if str(err) != last_error:
                log.exception("pool housekeeping failed")
                last_error = str(err)
        else:
            if last_error is not None:
                log.info("pool housekeeping works again")
                last_error = None


async def _confirm_live(session: _Session) -> None:
    """Announce readiness once the mount answers a stat of its root."""
    try:
        with trio.fail_after(READY_TIMEOUT):
            await trio.to_thread.run_sync(os.stat, session.mountpoint, abandon_on_cancel=True)
    except trio.TooSlowError:
        session.failure = f"the mount on {session.mountpoint} did not answer within {READY_TIMEOUT:.0f} s"
    except OSError as err:
        session.failure = f"the mount on {session.mountpoint} does not answer: {err.strerror}"
    else:
        entries = mounts_at(session.mountpoint)
        if entries and _is_ours(entries[-1], session.pool_dir):
            session.live = True
        else:
            session.failure = f"{session.mountpoint} does not show the cowfs mount after mounting"
    if not session.live:
        fuse_ops.stop_session()
        return
    if session.on_ready is not None:
        session.on_ready()
    log.info("pool %s mounted on %s", session.pool_dir, session.mountpoint)
    sd_notify(f"READY=1\nSTATUS=serving pool {session.pool_dir} on {session.mountpoint}")


async def _run_mount(session: _Session) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, session)
        nursery.start_soon(_housekeeping, session.pool)
        nursery.start_soon(session.ops.serve_invalidations)
        nursery.start_soon(session.ops.serve_scrubs)
        nursery.start_soon(session.ops.serve_disk_reads)
        nursery.start_soon(session.ops.serve_polling)
        nursery.start_soon(_confirm_live, session)
        try:
            await fuse_ops.serve_requests()
        except Exception:
            log.exception("the FUSE request loop failed")
            session.clean = False
        session.announce_stopping("the request loop ended" if session.stop_signal is None
                                  else f"{session.stop_signal} received")
        nursery.cancel_scope.cancel()
    if session.live and session.stop_signal is None and session.clean:
        log.info("%s was unmounted", session.mountpoint)


def _serve_mounted(
    pool: Pool,
    pool_dir: str,
    mountpoint: str,
    options: list[str],
    poll_window: float,
    on_ready: Callable[[], None] | None,
) -> bool:
    ops = fuse_ops.VolumeOps(pool, poll_window)
    # See _watch_signals: no stop signal may act before it can be handled.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        fuse_ops.start_session(ops, mountpoint, options)
    except RuntimeError as err:
        raise MountError(
            f"cannot mount pool {pool_dir} on {mountpoint}: {err} (see libfuse's message above)"
        ) from None
    session = _Session(ops, pool, pool_dir, mountpoint, on_ready)
    try:
        trio.run(_run_mount, session)
    finally:
        busy = ops.busy_volumes()
        if busy:
            log.warning(
                "unmounting %s while volumes are open: %s; their users now get I/O errors",
                mountpoint, ", ".join(busy),
            )
        fuse_ops.end_session()
    if not session.live:
        reason = session.failure
        if reason is None and session.stop_signal is not None:
            reason = f"interrupted by {session.stop_signal} before the mount was live"
        raise MountError(
            f"cannot mount pool {pool_dir} on {mountpoint}: "
            f"{reason or 'the FUSE session ended before the mount was live'}"
        )
    return session.clean


def serve(
    pool_dir: str,
    mountpoint: str,
    *,
    options: Iterable[str] = (),
    on_ready: Callable[[], None] | None = None,
) -> bool:
    """Mount the pool in ``pool_dir`` on ``mountpoint`` and serve it until it
    is unmounted or SIGTERM/SIGINT/SIGHUP arrives.

    ``options`` are extra FUSE mount options.  ``on_ready`` is called once,
    as soon as the mount answers requests.  Raises :class:`MountError` if the
    mount never became live.  Otherwise returns True when the pool was closed
    cleanly (everything flushed and checkpointed), False if the request loop
    or the final close failed (logged).  Stop signals stay blocked on return:
    the caller is expected to exit.
    """
    pool_dir, mountpoint = check_paths(pool_dir, mountpoint)
    libfuse_options, poll_window = own_options(options)
    fuse_opts = fuse_options(pool_dir, libfuse_options)
    pool = _open_pool(pool_dir)
    try:
        _clear_dead_mounts(pool_dir, mountpoint)
        clean = _serve_mounted(pool, pool_dir, mountpoint, fuse_opts, poll_window, on_ready)
    except BaseException:
        _close_pool(pool, pool_dir)
        raise
    if not _close_pool(pool, pool_dir):
        return False
    log.info("pool %s closed: everything written is on disk", pool_dir)
    return clean


# ---------------------------------------------------------------------------
# Background daemon


class _ReadyPipe:
    """The daemon's side of the pipe to the waiting parent: one line,
    ``ok`` or ``error: <message>``, then closed."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send(self, line: str) -> None:
        if self._fd < 0:
            return
        try:
            os.write(self._fd, (line.replace("\n", " ") + "\n").encode(errors="replace"))
        except OSError as err:
            log.warning("could not report to the waiting cowfs command: %s", err.strerror)
        finally:
            os.close(self._fd)
            self._fd = -1


def _daemon_main(
    ready_fd: int,
    pool_dir: str,
    mountpoint: str,
    options: list[str],
    verbosity: int,
    log_path: str | None,
) -> NoReturn:
    """Body of the forked daemon: detach, serve, exit.  Never returns."""
    pipe = _ReadyPipe(ready_fd)
    status = 1
    try:
        os.setsid()
        os.chdir("/")  # do not keep the caller's directory (or its mount) busy
        # Readiness goes to the waiting command; a service that ran it
        # hears from that command's exit, not from this fork.
        os.environ.pop("NOTIFY_SOCKET", None)
        null_fd = os.open(os.devnull, os.O_RDWR)
        os.dup2(null_fd, 0)
        os.dup2(null_fd, 1)
        configure_logging(verbosity, log_path)
        # Nobody reads the journal's stream to its end: an fstab mount
        # started by systemd keeps logging there.
        keep_stderr = log_path is None and stderr_is_journal()

        def ready() -> None:
            # The caller's stderr may be a pipe it reads to the end: let go
            # of it before telling the caller we are live.
            if log_path is not None:
                log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                os.dup2(log_fd, 2)
                os.close(log_fd)
            elif not keep_stderr:
                os.dup2(null_fd, 2)
            pipe.send("ok")

        status = 0 if serve(pool_dir, mountpoint, options=options, on_ready=ready) else 1
    except MountError as err:
        # The caller prints the message; repeat it only into a log file.
        if log_path is not None:
            log.error("%s", err)
        pipe.send(f"error: {err}")
    except BaseException as err:
        log.exception("the cowfs daemon failed")
        pipe.send(f"error: internal error in the cowfs daemon: {err!r}")
    finally:
        os._exit(status)


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def start_in_background(
    pool_dir: str,
    mountpoint: str,
    *,
    options: Iterable[str] = (),
    verbosity: int = 0,
    log_path: str | None = None,
) -> int:
    """Fork a daemon that serves the pool in ``pool_dir`` on ``mountpoint``.

    Returns the daemon's pid once the mount is live.  Otherwise waits for
    the daemon to finish cleaning up and raises :class:`MountError` with its
    message; a mount left behind by a daemon that died without a word is
    detached first.  Call this before starting threads or opening the pool:
    the daemon is a fork of the caller.
    """
    # Refuse what can be refused before forking.
    pool_dir, mountpoint = check_paths(pool_dir, mountpoint)
    option_list = list(options)
    fuse_options(pool_dir, own_options(option_list)[0])
    if log_path is not None:
        log_path = os.path.abspath(log_path)
    existing = {entry.mount_id for entry in mounts_at(mountpoint)}
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _daemon_main(write_fd, pool_dir, mountpoint, option_list, verbosity, log_path)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        reply = pipe.readline().decode(errors="replace").strip()
    if reply == "ok":
        return pid
    _, status = os.waitpid(pid, 0)
    leftovers = [
        entry for entry in mounts_at(mountpoint)
        if entry.mount_id not in existing and _is_ours(entry, pool_dir)
    ]
    for _entry in leftovers:
        _detach(mountpoint)
    if reply.startswith("error: "):
        raise MountError(reply[len("error: "):])
    message = f"the cowfs daemon for pool {pool_dir} died before the mount was live ({_describe_exit(status)})"
    if leftovers:
        message += f"; its unanswered mount on {mountpoint} was detached"
    raise MountError(message)
