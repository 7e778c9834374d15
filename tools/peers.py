"""The peers cowfs is benchmarked against, each a FUSE daemon in a context manager.

* :class:`Qcow2Export`: a qcow2 image, with whatever backing chain its header
  names, served writable by ``qemu-storage-daemon``'s FUSE export as one
  regular file (the export's mount point *is* the file).  The image is
  opened with QEMU's defaults: host page cache (``cache.direct=off``),
  flushes honoured, ``aio=threads``, as cowfs does buffered I/O on its pool
  and fdatasyncs it.
* :class:`Ceiling`: ``python -m cowfs_tools.ceiling``, an in-memory pyfuse3
  file, the bare per-request cost of a pyfuse3 + trio daemon.

Both run their daemon in the foreground as a child of this process, in its
own session (a Ctrl-C at the terminal reaches only the caller, which then
tears down in order), optionally pinned to one CPU with ``taskset -c`` from
the exec on, so that every thread the daemon starts inherits the pinning.
Entering waits until the FUSE mount is on ``mountpoint`` and answers a
``stat``; ``.pid`` is the daemon's pid (taskset execs it, so the pid is the
same), ``.path`` the file to do I/O on.  Leaving sends SIGTERM, waits for the
daemon to exit (SIGKILL after :data:`STOP_TIMEOUT`) and for the mount to go
away (a mount left by a killed daemon is detached lazily).  Anything attached
to the file (a loop device) must be let go of before leaving.

Example::

    with Qcow2Export(Path("vm.qcow2"), Path("/tmp/vm.raw"), cpu=1) as export:
        run(["fio", f"--filename={export.path}", ...])
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from cowfs_daemon.server import mounts_at

log = logging.getLogger("cowfs.peers")

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.05


class PeerError(Exception):
    """A peer daemon did not start or stop as it should; the message says why."""


def fuse_mount_on(path: Path) -> bool:
    """Whether the mount ``path`` shows (the last one on it) is a FUSE mount."""
    entries = mounts_at(str(path))
    return bool(entries) and entries[-1].fstype.split(".")[0] in ("fuse", "fuseblk")


class FuseDaemon:
    """A FUSE daemon serving one regular file on ``mountpoint``; subclasses
    say how to start it (:meth:`command`) and what it is (``what``)."""

    what = "FUSE daemon"

    def __init__(self, mountpoint: Path, *, cpu: int | None = None) -> None:
        self.path = mountpoint.resolve()
        self.cpu = cpu
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    def command(self) -> list[str]:
        """The daemon's command line, serving in the foreground."""
        raise NotImplementedError

    @property
    def pid(self) -> int:
        """The daemon's process id (only while entered)."""
        if self._proc is None:
            raise PeerError(f"{self.what} on {self.path} is not running")
        return self._proc.pid

    def __enter__(self) -> Self:
        if fuse_mount_on(self.path):
            raise PeerError(f"{self.path} already has a FUSE mount on it")
        self.path.touch(exist_ok=True)
        cmd = self.command()
        if self.cpu is not None:
            cmd = ["taskset", "-c", str(self.cpu), *cmd]
        log.debug("$ %s", " ".join(cmd))
        self._output = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._output,
                                          stderr=subprocess.STDOUT, start_new_session=True)
            self._wait_ready()
        except BaseException:
            self._stop()
            raise
        log.info("%s (pid %d) serving %s", self.what, self._proc.pid, self.path)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        status, output = self._stop()
        if status:
            log.warning("%s exited with status %d: %s", self.what, status, output or "no output")

    def _daemon_output(self) -> str:
        """What the daemon printed so far, on one line."""
        if self._output is None:
            return ""
        self._output.seek(0)
        return " ".join(self._output.read().decode(errors="replace").split())

    def _wait_ready(self) -> None:
        """Return once the mount is there and answers; raise PeerError if the
        daemon exits first or takes longer than READY_TIMEOUT."""
        assert self._proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while not fuse_mount_on(self.path):
            status = self._proc.poll()
            if status is not None:
                raise PeerError(f"{self.what} exited with status {status} before mounting "
                                f"{self.path}: {self._daemon_output() or 'no output'}")
            if time.monotonic() > deadline:
                raise PeerError(f"{self.what} did not mount {self.path} within {READY_TIMEOUT:.0f} s")
            time.sleep(POLL_INTERVAL)
        self.path.stat()

    def _stop(self) -> tuple[int | None, str]:
        """Stop the daemon, wait for it and for its mount to go away; log,
        never raise, what cannot be done.  Returns the daemon's exit status
        (None if it never started) and what it printed."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it",
                            self.what, proc.pid, STOP_TIMEOUT)
                proc.kill()
                proc.wait()
        output = self._daemon_output()
        if self._output is not None:
            self._output.close()
            self._output = None
        self._wait_unmounted()
        return (None if proc is None else proc.returncode), output

    def _wait_unmounted(self) -> None:
        """Wait for the mount on ``path`` to go away; detach it lazily if its
        daemon is gone and it stays."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while fuse_mount_on(self.path):
            if time.monotonic() > deadline:
                log.warning("%s is still mounted after its daemon exited: detaching it lazily", self.path)
                subprocess.run(["umount", "-l", str(self.path)], check=False)
                return
            time.sleep(POLL_INTERVAL)


class Qcow2Export(FuseDaemon):
    """``image`` (qcow2, with its backing chain) exported writable as a FUSE
    file on ``mountpoint`` by qemu-storage-daemon (created if missing)."""

    what = "qemu-storage-daemon"

    def __init__(self, image: Path, mountpoint: Path, *, cpu: int | None = None) -> None:
        super().__init__(mountpoint, cpu=cpu)
        self.image = image.resolve()

    def command(self) -> list[str]:
        # JSON option values need no escaping of commas in file names.  The
        # qcow2 node opens the backing chain its header names by default.
        def opt(value: dict[str, Any]) -> str:
            return json.dumps(value, separators=(",", ":"))
        return [
            "qemu-storage-daemon",
            "--blockdev", opt({"driver": "file", "node-name": "file", "filename": str(self.image)}),
            "--blockdev", opt({"driver": "qcow2", "node-name": "qcow2", "file": "file"}),
            "--export", opt({"type": "fuse", "id": "export", "node-name": "qcow2",
                             "mountpoint": str(self.path), "writable": True}),
        ]


class Ceiling(FuseDaemon):
    """``python -m cowfs_tools.ceiling`` serving ``size`` bytes in memory as a
    FUSE file on ``mountpoint`` (created if missing)."""

    what = "ceiling"

    def __init__(self, mountpoint: Path, size: int, *, cpu: int | None = None) -> None:
        super().__init__(mountpoint, cpu=cpu)
        self.size = size

    def command(self) -> list[str]:
        return [sys.executable, "-m", "cowfs_tools.ceiling", str(self.path), "--size", str(self.size)]
