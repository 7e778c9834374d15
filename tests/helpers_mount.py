"""Helpers for the integration tests that drive a real cowfs FUSE mount.

Everything here talks to the kernel through ordinary commands (``cowfs``,
``umount``, ``losetup``, ``mount``) run with timeouts, so that a hung FUSE
daemon fails a test instead of hanging the suite.  The module is also a small
script: ``python helpers_mount.py writer ...`` is the record writer used by the
SIGKILL test (see :func:`writer_main`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from cowfs_tools.procs import running as pid_alive

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
GIB = 1 << 30

# Default time limit for one command; a hung FUSE request shows up as a
# TimeoutExpired naming the command instead of a frozen test run.
CMD_TIMEOUT = 60.0


def run(cmd: Sequence[str | os.PathLike[str]], timeout: float = CMD_TIMEOUT,
        check: bool = False, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with stdin closed, capturing stdout and stderr as text.

    With ``check`` a non-zero exit raises AssertionError showing the command
    and its output, which reads better in a test report than
    CalledProcessError.
    """
    argv = [os.fspath(c) for c in cmd]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    log.debug("ran %s -> %d\n%s%s", argv, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command {argv} failed with exit {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def sha256(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int | None:
    """Index of the first byte where ``a`` and ``b`` differ (a length
    difference counts), or None when they are equal."""
    if a == b:
        return None
    step = 1 << 16
    for start in range(0, min(len(a), len(b)), step):
        if a[start:start + step] != b[start:start + step]:
            return next(i for i in range(start, start + step) if a[i] != b[i])
    return min(len(a), len(b))


# ----------------------------------------------------------------------------
# Mount table, processes


def _unescape_mount_field(text: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mount_entries() -> list[tuple[str, str, str, str]]:
    """Every mount as ``(major:minor, mountpoint, fstype, source)`` from
    /proc/self/mountinfo (reading it never touches a hung FUSE mount)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            parts = left.split()
            rparts = right.split()
            out.append((parts[2], _unescape_mount_field(parts[4]),
                        rparts[0] if rparts else "", rparts[1] if len(rparts) > 1 else ""))
    return out


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether something is mounted exactly at ``path``."""
    target = os.path.abspath(path)
    return any(mp == target for _, mp, _, _ in mount_entries())


def abort_fuse_connection(mountpoint: str | os.PathLike[str]) -> bool:
    """Abort the FUSE connection serving ``mountpoint`` through fusectl, so
    that every pending and future request on it fails with ENOTCONN.  Returns
    whether a connection was found and aborted."""
    target = os.path.abspath(mountpoint)
    devs = [dev for dev, mp, fstype, _ in mount_entries()
            if mp == target and fstype.startswith("fuse")]
    if not devs:
        return False
    conn_dir = Path("/sys/fs/fuse/connections")
    if not (conn_dir.is_dir() and any(conn_dir.iterdir())):
        # fusectl is not mounted on every host; it is harmless to add.
        run(["mount", "-t", "fusectl", "none", str(conn_dir)], timeout=10)
    minor = devs[-1].split(":")[1]
    abort = conn_dir / minor / "abort"
    try:
        abort.write_text("1")
    except OSError as exc:
        log.warning("could not abort FUSE connection %s of %s: %s", minor, target, exc)
        return False
    log.warning("aborted FUSE connection %s of %s", minor, target)
    return True


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Unmount ``path`` however it takes: umount, then a lazy umount after
    aborting a FUSE connection that may be hung or dead."""
    target = os.path.abspath(path)
    if not is_mounted(target):
        return
    try:
        if run(["umount", target], timeout=30).returncode == 0:
            return
    except subprocess.TimeoutExpired:
        log.warning("umount %s timed out", target)
    abort_fuse_connection(target)
    run(["umount", "-l", target], timeout=30)


# ----------------------------------------------------------------------------
# Files and refusals

def assert_clean_refusal(rc: int, output: str, *mentions: str) -> None:
    """A refusal: non-zero exit, a message naming each of ``mentions``, and
    no Python traceback."""
    assert rc != 0, f"expected a refusal, got exit 0:\n{output}"
    assert "Traceback (most recent call last)" not in output, f"traceback instead of a message:\n{output}"
    assert output.strip(), "refused without any message"
    for word in mentions:
        assert word in output, f"message does not mention {word!r}:\n{output}"


def write_file(path: Path, data: bytes, offset: int = 0, fsync: bool = False) -> None:
    """Write ``data`` at ``offset`` of ``path`` (created if missing)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def drop_page_cache(path: Path) -> None:
    """Write ``path``'s dirty pages and evict it from the host page cache, so
    that the next reads of it go below it: to the disk for a pool's ``data``
    file (reads through the mount that wait for the disk), to the daemon
    for a volume in the mount."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_file(path: Path, offset: int = 0, length: int = -1) -> bytes:
    """Read ``length`` bytes (all when -1) at ``offset`` of ``path``."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(length)


def daemons_for(mnt: Path) -> list[int]:
    """Pids of cowfs processes whose command line names ``mnt``."""
    proc = run(["pgrep", "-f", f"cowfs.* mount .*{re.escape(str(mnt))}"], timeout=10)
    return [int(p) for p in proc.stdout.split()]


# ----------------------------------------------------------------------------
# Loop devices


def loop_attach(backing: str | os.PathLike[str], direct_io: bool = False) -> str:
    """Attach a loop device to file ``backing`` and return its /dev path."""
    cmd = ["losetup", "-f", "--show"]
    if direct_io:
        cmd.append("--direct-io=on")
    cmd.append(os.fspath(backing))
    return run(cmd, check=True).stdout.strip()


def loop_uses_direct_io(dev: str) -> bool:
    """Whether loop device ``dev`` really does direct I/O to its backing file
    (the kernel silently falls back to buffered I/O when it cannot)."""
    name = os.path.basename(dev)
    return Path(f"/sys/block/{name}/loop/dio").read_text().strip() == "1"


def loops_backed_under(directory: str | os.PathLike[str]) -> list[str]:
    """Loop devices whose backing file lies under ``directory``."""
    prefix = os.path.abspath(directory) + os.sep
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            path = backing.read_text().strip()
        except OSError:
            continue
        # A file deleted while attached is shown with a " (deleted)" suffix.
        path = path.removesuffix(" (deleted)")
        if path.startswith(prefix):
            found.append("/dev/" + backing.parent.parent.name)
    return found


def loop_detach(dev: str) -> None:
    """Unmount whatever is mounted from ``dev`` and detach it."""
    for _, mp, _, source in reversed(mount_entries()):
        if source == dev:
            force_unmount(mp)
    run(["losetup", "-d", dev], timeout=60)
    # Detaching is asynchronous when the device was still open somewhere.
    if not wait_until(lambda: not Path(f"/sys/block/{os.path.basename(dev)}/loop").exists(),
                      timeout=10):
        log.warning("loop device %s still attached after losetup -d", dev)


# ----------------------------------------------------------------------------
# A cowfs pool and its mount


@dataclass
class CowfsMount:
    """A pool directory and a mountpoint driven through the ``cowfs`` CLI.

    ``mount`` returns only once the FUSE mount is live (the CLI's contract) and
    ``teardown`` leaves nothing behind: no loop device backed by a volume, no
    mount, no daemon.
    """

    bin: Path
    pool: Path
    mnt: Path
    logdir: Path
    _mount_count: int = 0
    last_pid: int | None = None

    # -- CLI -----------------------------------------------------------------

    def cli(self, *args: str | os.PathLike[str],
            timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``cowfs ARGS`` and return the finished process (no check)."""
        return run([self.bin, *args], timeout=timeout)

    def mkfs(self, *args: str) -> None:
        """``cowfs mkfs POOL ARGS``; must succeed."""
        proc = self.cli("mkfs", self.pool, *args)
        assert proc.returncode == 0, f"cowfs mkfs {self.pool} failed:\n{proc.stdout}{proc.stderr}"

    def try_mount(self, *args: str, mnt: Path | None = None,
                  pool: Path | None = None) -> tuple[int, str]:
        """Run ``cowfs mount POOL MNT ARGS`` and return (exit code, output).

        Output goes to a log file, not a pipe: a daemon that keeps the CLI's
        stdout open would otherwise make us wait for it forever.
        """
        self._mount_count += 1
        out_path = self.logdir / f"mount-{self._mount_count}.log"
        with open(out_path, "w+", encoding="utf-8") as out:
            proc = subprocess.run(
                [os.fspath(self.bin), "mount", os.fspath(pool or self.pool),
                 os.fspath(mnt or self.mnt), "--log", os.fspath(self.logdir / "daemon.log"),
                 *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                timeout=CMD_TIMEOUT)
        # The daemon may keep appending its log; the CLI's own words come first.
        text = out_path.read_text(errors="replace")
        log.info("cowfs mount -> %d: %s", proc.returncode, text[:2000])
        return proc.returncode, text

    def mount(self, *args: str) -> None:
        """Mount the pool; assert the CLI exits 0 with the mount live."""
        rc, text = self.try_mount(*args)
        assert rc == 0, f"cowfs mount {self.pool} {self.mnt} exited {rc}:\n{text}"
        assert is_mounted(self.mnt), (
            f"cowfs mount exited 0 but {self.mnt} is not in the mount table:\n{text}")
        self.last_pid = self.daemon_pid()

    def is_mounted(self) -> bool:
        """Whether the mountpoint is in the mount table."""
        return is_mounted(self.mnt)

    def daemon_pid(self) -> int:
        """Pid of the daemon serving this pool: the pid in ``POOL/lock`` if that
        process lives, else the ``cowfs mount`` process found by pgrep."""
        try:
            pid = int((self.pool / "lock").read_text().split()[0])
            if pid_alive(pid):
                return pid
            log.warning("pid %d in %s/lock is not alive; trying pgrep", pid, self.pool)
        except (FileNotFoundError, ValueError, IndexError):
            log.warning("no pid in %s/lock; trying pgrep", self.pool)
        pids = [p for p in daemons_for(self.mnt) if p != os.getpid()]
        assert pids, f"no daemon found for {self.mnt} (lock file and pgrep)"
        return pids[0]

    def wait_daemon_exit(self, pid: int, timeout: float = 30.0) -> None:
        """Assert daemon ``pid`` exits within ``timeout`` seconds."""
        assert wait_until(lambda: not pid_alive(pid), timeout), (
            f"cowfs daemon {pid} still running {timeout}s after unmount")

    def umount(self, how: str = "umount") -> None:
        """Unmount cleanly by ``how`` (umount, fusermount3, SIGTERM, SIGINT),
        then assert the mount is gone and the daemon exited."""
        pid = self.daemon_pid()
        if how == "umount":
            run(["umount", self.mnt], timeout=60, check=True)
        elif how == "fusermount3":
            run(["fusermount3", "-u", self.mnt], timeout=60, check=True)
        elif how in ("SIGTERM", "SIGINT"):
            os.kill(pid, getattr(signal, how))
        else:
            raise ValueError(f"unknown unmount method {how!r}")
        assert wait_until(lambda: not self.is_mounted(), 30), (
            f"{self.mnt} still mounted 30s after {how}")
        self.wait_daemon_exit(pid)

    def remount(self) -> None:
        """Unmount cleanly and mount again (drops every kernel cache of the mount)."""
        self.umount()
        self.mount()

    def kill_daemon(self) -> int:
        """SIGKILL the daemon, wait for it to die and clear the dead mount;
        return its pid."""
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(pid), 10), f"daemon {pid} survived SIGKILL"
        return pid

    def clear_dead_mount(self) -> None:
        """Remove the mount of a dead daemon (``umount -l``, else ``fusermount3 -uz``)."""
        if self.is_mounted():
            run(["umount", "-l", self.mnt], timeout=30)
        if self.is_mounted():
            run(["fusermount3", "-uz", self.mnt], timeout=30)
        assert not self.is_mounted(), f"could not clear the dead mount at {self.mnt}"

    def daemon_tracebacks(self) -> list[str]:
        """Python tracebacks found in the daemon's log and the CLI's output,
        each with a few lines of context."""
        found = []
        for path in sorted(self.logdir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if line.startswith("Traceback (most recent call last)"):
                    found.append(f"{path.name}:\n" + "\n".join(lines[max(0, i - 2):i + 40]))
        return found

    # -- cleanup -------------------------------------------------------------

    def teardown(self) -> None:
        """Detach loop devices backed by volumes, unmount, and make sure the
        daemon is gone (SIGKILL as a last resort, reported as a warning)."""
        for dev in loops_backed_under(self.mnt):
            loop_detach(dev)
        pid: int | None = None
        if self.is_mounted():
            try:
                pid = self.daemon_pid()
            except AssertionError:
                pid = None
            force_unmount(self.mnt)
        pid = pid or self.last_pid
        if pid is not None and not wait_until(lambda: not pid_alive(pid), 30):
            log.warning("daemon %d did not exit after unmount; killing it", pid)
            os.kill(pid, signal.SIGKILL)
        for path in sorted(self.logdir.glob("*.log")):
            log.info("%s:\n%s", path.name, path.read_text(errors="replace")[-4000:])


class Watchdog:
    """Aborts the FUSE connections of registered mounts once a test has run
    for ``seconds``: the test's pending file operations then fail with
    ENOTCONN instead of hanging the suite."""

    def __init__(self, seconds: float) -> None:
        self.mounts: list[Path] = []
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        for mnt in self.mounts:
            log.error("watchdog: test overran its time; aborting FUSE mount %s", mnt)
            abort_fuse_connection(mnt)

    def cancel(self) -> None:
        """Stop the timer (end of test)."""
        self._timer.cancel()


# ----------------------------------------------------------------------------
# The record writer of the SIGKILL test
#
# Each volume gets its own byte alphabet (volume v uses only the bytes
# 1+85v .. 85+85v, never zero), so a wrong byte read back tells whether it
# came from another volume's records or from elsewhere (metadata, stale
# blocks).  Records are derived from (seed, volume, seq) alone, so the
# checker regenerates them from the writer's log.

VOLUME_ALPHABET = 85


def record(seed: int, vol: int, seq: int, vol_size: int) -> tuple[int, bytes]:
    """Offset and content of record ``seq`` of volume ``vol``: mixed aligned
    and unaligned offsets, lengths from 1 byte to 256 KiB, content random or
    (for the compressor) a short random motif repeated."""
    rng = random.Random(f"{seed}:{vol}:{seq}")
    kind = rng.randrange(3)
    if kind == 0:
        length = rng.randint(1, 4096)
    elif kind == 1:
        length = 4096 * rng.randint(1, 16)
    else:
        length = rng.randint(4096, 256 * 1024)
    if rng.random() < 0.5:
        offset = 4096 * rng.randrange((vol_size - length) // 4096 + 1)
    else:
        offset = rng.randrange(vol_size - length + 1)
    table = bytes(1 + VOLUME_ALPHABET * vol + b % VOLUME_ALPHABET for b in range(256))
    if rng.random() < 0.4:
        motif = rng.randbytes(rng.randint(1, 64))
        raw = (motif * (length // len(motif) + 1))[:length]
    else:
        raw = rng.randbytes(length)
    return offset, raw.translate(table)


def _write_records(path: str, vol: int, seed: int, vol_size: int, log_path: str) -> None:
    # Log lines: "S seq" before a record is written, "A seq sha" once its
    # fsync returned, "E seq errno" when the mount failed under us.
    fd = os.open(path, os.O_RDWR)
    lfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    seq = 0
    while True:
        offset, data = record(seed, vol, seq, vol_size)
        os.write(lfd, f"S {seq}\n".encode())
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
            os.fsync(fd)
        except OSError as exc:
            os.write(lfd, f"E {seq} {exc.errno}\n".encode())
            return
        os.write(lfd, f"A {seq} {sha256(data)}\n".encode())
        seq += 1


META_PREFIX = "meta-"


def _volume_churn(mnt: str, seed: int, log_path: str) -> None:
    # Creates small volumes (written, fsynced, directory fsynced) and deletes
    # some of them again (directory fsynced).  Log lines: "S seq OP name"
    # before, "A seq C name sha" / "A seq D name" once durable, "E seq errno".
    rng = random.Random(f"{seed}:churn")
    lfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    live: list[str] = []
    seq = 0
    while True:
        delete = bool(live) and rng.random() < 0.3
        name = live.pop(rng.randrange(len(live))) if delete else f"{META_PREFIX}{seed}-{seq}"
        data = b"" if delete else rng.randbytes(rng.randint(1, 65536))
        os.write(lfd, f"S {seq} {'D' if delete else 'C'} {name}\n".encode())
        try:
            if delete:
                os.unlink(os.path.join(mnt, name))
            else:
                fd = os.open(os.path.join(mnt, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.fsync(dfd)
        except OSError as exc:
            os.write(lfd, f"E {seq} {exc.errno}\n".encode())
            return
        if delete:
            os.write(lfd, f"A {seq} D {name}\n".encode())
        else:
            os.write(lfd, f"A {seq} C {name} {sha256(data)}\n".encode())
            live.append(name)
        seq += 1


def writer_main(argv: list[str]) -> None:
    """Write records to each volume from its own thread until killed or the
    mount fails; one log per volume, ``LOG_PREFIX.<index>``.  With
    ``--churn MNT`` another thread creates and deletes small volumes in MNT,
    logging to ``LOG_PREFIX.churn``."""
    ap = argparse.ArgumentParser(prog="helpers_mount.py writer")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--log-prefix", required=True)
    ap.add_argument("--churn", metavar="MNT")
    ap.add_argument("volumes", nargs="+")
    args = ap.parse_args(argv)
    threads = [threading.Thread(target=_write_records,
                                args=(path, i, args.seed, args.size, f"{args.log_prefix}.{i}"))
               for i, path in enumerate(args.volumes)]
    if args.churn:
        threads.append(threading.Thread(target=_volume_churn,
                                        args=(args.churn, args.seed, f"{args.log_prefix}.churn")))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@dataclass
class WriterLog:
    """What the writer logged for one volume."""

    acked: list[int]            # seqs whose fsync returned, in order
    started: list[int]          # seqs begun but never acknowledged
    shas: dict[int, str]        # seq -> sha of the acknowledged content
    errors: list[tuple[int, int]]  # (seq, errno) of failed writes


def read_writer_log(path: Path) -> WriterLog:
    """Parse one volume's writer log; a torn last line (writer killed while
    logging) is ignored."""
    acked: list[int] = []
    started: set[int] = set()
    shas: dict[int, str] = {}
    errors: list[tuple[int, int]] = []
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        parts = line.split()
        try:
            if parts[0] == "S" and len(parts) == 2:
                started.add(int(parts[1]))
            elif parts[0] == "A" and len(parts) == 3 and len(parts[2]) == 64:
                acked.append(int(parts[1]))
                shas[int(parts[1])] = parts[2]
            elif parts[0] == "E" and len(parts) == 3:
                errors.append((int(parts[1]), int(parts[2])))
        except (IndexError, ValueError):
            continue
    return WriterLog(acked, sorted(started - set(acked)), shas, errors)


def byte_origin(value: int) -> str:
    """Which volume's alphabet ``value`` belongs to, for failure messages."""
    if value == 0:
        return "zero"
    return f"a byte of volume {(value - 1) // VOLUME_ALPHABET}'s records"


def check_volume_after_crash(model: bytearray, actual: bytes, vol: int, seed: int,
                             wlog: WriterLog) -> bytearray:
    """Apply the acknowledged records of ``wlog`` to ``model`` (the content
    known before this round) and compare with ``actual``, the volume read after
    the crash and remount.

    Acknowledged bytes and bytes never written must match exactly.  Bytes of
    a record begun but never acknowledged may hold the old or the new content,
    per byte, nothing else.  Returns the new model (``actual`` once it passed).
    """
    size = len(model)
    assert len(actual) == size, f"volume {vol}: size {len(actual)} after remount, expected {size}"
    for seq in wlog.acked:
        offset, data = record(seed, vol, seq, size)
        assert sha256(data) == wlog.shas[seq], f"writer log of volume {vol} disagrees at seq {seq}"
        model[offset:offset + len(data)] = data
    expected = bytearray(model)
    for seq in wlog.started:
        offset, data = record(seed, vol, seq, size)
        got = actual[offset:offset + len(data)]
        old = model[offset:offset + len(data)]
        for i, (g, o, n) in enumerate(zip(got, old, data, strict=True)):
            assert g in (o, n), (
                f"volume {vol}: byte {offset + i} of unacknowledged record {seq} is {g} "
                f"({byte_origin(g)}), neither old ({o}) nor new ({n})")
        expected[offset:offset + len(data)] = got
    first = first_difference(expected, actual)
    assert first is None, (
        f"volume {vol}: wrong content after the crash; first difference at byte {first}: "
        f"expected {expected[first]} ({byte_origin(expected[first])}), read {actual[first]} "
        f"({byte_origin(actual[first])}); {len(wlog.acked)} records acknowledged this round")
    return bytearray(actual)


def check_churn_after_crash(model: dict[str, str], mnt: Path, log_path: Path) -> dict[str, str]:
    """Apply the acknowledged creations and deletions of the churn log to
    ``model`` (name -> sha256 of the volumes known before this round) and
    compare with the ``meta-`` volumes now in ``mnt``: every acknowledged
    volume exists with its content, every acknowledged deletion is gone; only
    the operation in flight may have gone either way.  Returns the new model."""
    started: dict[int, str] = {}
    in_flight: set[str] = set()
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "S":
            started[int(parts[1])] = parts[3]
            in_flight.add(parts[3])
        elif len(parts) == 5 and parts[0] == "A" and parts[2] == "C" and len(parts[4]) == 64:
            model[parts[3]] = parts[4]
            in_flight.discard(parts[3])
        elif len(parts) == 4 and parts[0] == "A" and parts[2] == "D":
            model.pop(parts[3], None)
            in_flight.discard(parts[3])
    present = {n for n in os.listdir(mnt) if n.startswith(META_PREFIX)}
    missing = sorted(set(model) - present - in_flight)
    assert not missing, f"acknowledged volumes lost after the crash: {missing}"
    resurrected = sorted(present - set(model) - in_flight)
    assert not resurrected, (
        f"volumes present that were never created or whose deletion was acknowledged: {resurrected}")
    for name in sorted(set(model) - in_flight):
        assert sha256((mnt / name).read_bytes()) == model[name], (
            f"acknowledged volume {name} has the wrong content after the crash")
    for name in in_flight:
        model.pop(name, None)
        if name in present:
            model[name] = sha256((mnt / name).read_bytes())
    return model


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "writer":
        writer_main(sys.argv[2:])
    else:
        sys.exit(f"usage: {sys.argv[0]} writer --seed N --size BYTES --log-prefix P VOLUME...")

