"""Talking to a mounted pool through its files only.

Everything the ``cowfs`` command learns or changes on a mounted pool goes
through the mount: ``stat``/``listdir``/``getxattr`` on volumes and on
``.snapshots/VOL/NAME`` files, the JSON status files in ``.clones/``, and
one-line commands written to ``.snapshots/ctl`` and ``.clones/ctl`` (opened
read-write; the reply ``ok <json>`` or ``error: <message>`` is read back from
the same handle).  The daemon serialises these requests, so this module
never needs the pool's internals or its lock.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from cowfs_daemon.server import FSTYPE, mounts_at

log = logging.getLogger(__name__)

SNAPSHOTS_DIR = ".snapshots"
CLONES_DIR = ".clones"
CTL = "ctl"
XATTR_REFERENCED = "user.cowfs.referenced"
XATTR_EXCLUSIVE = "user.cowfs.exclusive"
XATTR_ORIGIN = "user.cowfs.origin"
XATTR_CREATED = "user.cowfs.created"
_FSNAME_PREFIX = b"cowfs:"
_REPLY_LIMIT = 64 << 20     # a clone-group of thousands still fits; a runaway reply does not


class MountCtlError(Exception):
    """A refusal from the mount or the daemon.  ``errno`` is the error the
    file operation failed with; ``str()`` is ``<object>: <cause>``."""

    def __init__(self, err: int, obj: str, cause: str) -> None:
        super().__init__(err, obj, cause)
        self.errno = err
        self.obj = obj
        self.cause = cause

    def __str__(self) -> str:
        return f"{self.obj}: {self.cause}"


@dataclass
class Dataset:
    """What the mount shows about a volume or a snapshot.  Space figures
    are None unless asked for (they cost the daemon a metadata walk)."""

    volume: str                  # the volume (for a snapshot: the volume it belongs to)
    snapshot: str | None         # None for a volume
    size: int
    allocated: int               # bytes of mapped blocks (st_blocks * 512)
    mtime_ns: int                # for a snapshot: when it was taken
    referenced: int | None = None
    exclusive: int | None = None
    origin: str | None = None    # clones: "vol" or "vol@snap"

    @property
    def label(self) -> str:
        """``vol`` or ``vol@snap``."""
        return self.volume if self.snapshot is None else f"{self.volume}@{self.snapshot}"

    def to_json(self) -> dict:
        """The fields as a JSON-ready dict."""
        return {"name": self.label, "volume": self.volume, "snapshot": self.snapshot,
                "size": self.size, "allocated": self.allocated, "mtime_ns": self.mtime_ns,
                "referenced": self.referenced, "exclusive": self.exclusive,
                "origin": self.origin}


def split_source(source: str) -> tuple[str, str | None]:
    """``vol@snap`` -> ``("vol", "snap")``, ``vol`` -> ``("vol", None)``;
    split at the last '@' (snapshot names cannot hold one)."""
    volume, at, snap = source.rpartition("@")
    if not at:
        return source, None
    return volume, snap


def _decode_xattr(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").strip()


class Mount:
    """A mounted cowfs pool at ``path``.  Constructing one checks that a
    cowfs daemon serves ``path`` (MountCtlError otherwise)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.realpath(path)
        self.given = path
        try:
            is_dir = stat.S_ISDIR(os.stat(self.path).st_mode)
        except FileNotFoundError:
            is_dir = False
        except OSError as err:
            raise self._os_error(err, path) from None
        if not is_dir:
            raise MountCtlError(errno.ENOENT, path, "no such directory; give the directory "
                                "a pool is mounted on")
        entries = mounts_at(self.path)
        if not entries:
            raise MountCtlError(errno.EINVAL, path, "not a mount point; mount the pool "
                                "there first with `cowfs mount POOL_DIR " f"{path}`")
        top = entries[-1]
        if top.fstype != FSTYPE:
            raise MountCtlError(errno.EINVAL, path, f"not a cowfs mount (it is {top.fstype}); "
                                "give the directory a pool is mounted on")
        self.source = top.source
        try:
            os.stat(os.path.join(self.path, SNAPSHOTS_DIR, CTL))
        except FileNotFoundError:
            raise MountCtlError(errno.ENOTSUP, path, "this cowfs mount has no "
                                f"{SNAPSHOTS_DIR}/{CTL}; its daemon predates snapshots: "
                                "unmount and mount it again with this version") from None
        except OSError as err:
            raise self._os_error(err, path) from None

    def _os_error(self, err: OSError, obj: str) -> MountCtlError:
        """A MountCtlError for a failed file operation on the mount, with
        advice for the errors that mean the mount itself is in trouble."""
        if err.errno == errno.ENOTCONN:
            return MountCtlError(err.errno, self.given, "the daemon serving it is gone "
                                 "(transport endpoint is not connected); unmount it with "
                                 f"`fusermount3 -u {self.given}` and mount the pool again")
        if err.errno in (errno.EACCES, errno.EPERM) and os.geteuid() != 0:
            return MountCtlError(err.errno, obj, f"{err.strerror}; run this as root")
        return MountCtlError(err.errno or errno.EIO, obj, err.strerror or str(err))

    @property
    def pool_dir(self) -> str | None:
        """The pool directory this mount serves (from its mount source)."""
        if not self.source.startswith(_FSNAME_PREFIX):
            return None
        return os.fsdecode(self.source[len(_FSNAME_PREFIX):])

    # -- paths --------------------------------------------------------------

    def volume_path(self, volume: str) -> str:
        """``MOUNT/VOL``."""
        return os.path.join(self.path, volume)

    def snapshot_path(self, volume: str, snapshot: str) -> str:
        """``MOUNT/.snapshots/VOL/NAME``."""
        return os.path.join(self.path, SNAPSHOTS_DIR, volume, snapshot)

    def dataset_path(self, name: str) -> str:
        """The file of ``vol`` or ``vol@snap``."""
        volume, snap = split_source(name)
        return self.volume_path(volume) if snap is None else self.snapshot_path(volume, snap)

    # -- looking --------------------------------------------------------------

    def _listdir(self, path: str, obj: str) -> list[str]:
        try:
            return os.listdir(path)
        except OSError as err:
            raise self._os_error(err, obj) from None

    def volumes(self) -> list[str]:
        """Names of the volumes, sorted."""
        return sorted(n for n in self._listdir(self.path, self.given) if not n.startswith("."))

    def snapshot_owners(self) -> list[str]:
        """Volume names with a ``.snapshots`` directory: every existing
        volume and every deleted one that still has snapshots."""
        return sorted(n for n in self._listdir(os.path.join(self.path, SNAPSHOTS_DIR),
                                              f"{self.given}/{SNAPSHOTS_DIR}") if n != CTL)

    def snapshot_names(self, volume: str) -> list[str]:
        """Names of ``volume``'s snapshots (ENOENT MountCtlError if the
        volume neither exists nor has snapshots)."""
        return self._listdir(os.path.join(self.path, SNAPSHOTS_DIR, volume), volume)

    def _xattr(self, path: str, name: str) -> str | None:
        try:
            return _decode_xattr(os.getxattr(path, name))
        except OSError as err:
            if err.errno in (errno.ENODATA, errno.ENOTSUP):
                return None
            raise

    def _space(self, path: str, name: str) -> int | None:
        value = self._xattr(path, name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            log.warning("%s: %s is %r, not a number", path, name, value)
            return None

    def dataset(self, name: str, *, space: bool = False) -> Dataset:
        """The volume or snapshot ``name`` (``vol`` or ``vol@snap``), with
        referenced/exclusive bytes if ``space``.  MountCtlError (ENOENT) if
        there is none."""
        volume, snap = split_source(name)
        path = self.dataset_path(name)
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise MountCtlError(errno.ENOENT, name, "no such volume or snapshot")
            entry = Dataset(volume, snap, st.st_size, st.st_blocks * 512, st.st_mtime_ns)
            if snap is None:
                entry.origin = self._xattr(path, XATTR_ORIGIN)
            if space:
                entry.referenced = self._space(path, XATTR_REFERENCED)
                entry.exclusive = self._space(path, XATTR_EXCLUSIVE)
        except FileNotFoundError:
            what = "no such volume" if snap is None else "no such snapshot"
            raise MountCtlError(errno.ENOENT, name, what) from None
        except OSError as err:
            raise self._os_error(err, name) from None
        return entry

    def snapshots(self, volume: str, *, space: bool = False) -> list[Dataset]:
        """``volume``'s snapshots, oldest first.  Snapshots deleted while
        listing are skipped."""
        found = []
        for snap in self.snapshot_names(volume):
            try:
                found.append(self.dataset(f"{volume}@{snap}", space=space))
            except MountCtlError as err:
                if err.errno != errno.ENOENT:
                    raise
        return sorted(found, key=lambda d: (d.mtime_ns, d.snapshot or ""))

    def clone_status(self, volume: str) -> dict | None:
        """The JSON of ``.clones/VOL`` (None if ``volume`` is not a clone)."""
        path = os.path.join(self.path, CLONES_DIR, volume)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise self._os_error(err, volume) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise MountCtlError(errno.EIO, f"{self.given}/{CLONES_DIR}/{volume}",
                                "status file is not valid JSON") from None

    def statvfs(self) -> os.statvfs_result:
        """statvfs(2) of the mount: the pool's capacity and free space."""
        try:
            return os.statvfs(self.path)
        except OSError as err:
            raise self._os_error(err, self.given) from None

    # -- commands -------------------------------------------------------------

    def command(self, directory: str, words: Sequence[str]) -> dict:
        """Write one command (``words``, quoted like a shell would) to
        ``directory``'s ctl file, make it durable (fsync), and return the
        JSON of the ``ok`` reply.
        A refusal raises MountCtlError with the write's errno and the
        daemon's message (the object it names is the command line)."""
        line = shlex.join(words)
        data = line.encode("utf-8", errors="surrogateescape") + b"\n"
        path = os.path.join(self.path, directory, CTL)
        log.debug("%s <- %s", path, line)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise self._os_error(err, f"{self.given}/{directory}/{CTL}") from None
        try:
            try:
                written = os.write(fd, data)
            except OSError as err:
                reply = self._reply(fd)
                cause = reply[len("error:"):].strip() if reply.startswith("error:") else ""
                if err.errno == errno.ENOTCONN:
                    raise self._os_error(err, line) from None
                raise MountCtlError(err.errno or errno.EIO, line,
                                    cause or err.strerror or str(err)) from None
            if written != len(data):
                raise MountCtlError(errno.EIO, line, f"the daemon took {written} of "
                                    f"{len(data)} bytes of the command")
            reply = self._reply(fd)
            # The daemon journals the change; fsync (the pool's sync) makes
            # it survive a crash before we report it done.
            try:
                os.fsync(fd)
            except OSError as err:
                if err.errno not in (errno.EINVAL, errno.ENOSYS, errno.EROFS):
                    raise MountCtlError(err.errno or errno.EIO, line, "done, but committing "
                                        f"it to disk failed: {err.strerror}") from None
        finally:
            os.close(fd)
        log.debug("%s -> %s", path, reply)
        if not reply.startswith("ok"):
            raise MountCtlError(errno.EIO, line, f"unexpected reply {reply[:200]!r} "
                                "after a successful write")
        body = reply[2:].strip()
        try:
            return json.loads(body) if body else {}
        except ValueError:
            raise MountCtlError(errno.EIO, line, f"reply is not JSON: {body[:200]!r}") from None

    @staticmethod
    def _reply(fd: int) -> str:
        """The result line the daemon keeps for handle ``fd`` ('' if none)."""
        chunks = []
        offset = 0
        try:
            while offset < _REPLY_LIMIT:
                chunk = os.pread(fd, 1 << 16, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
                if chunk.endswith(b"\n"):
                    break
        except OSError as err:
            log.debug("reading the ctl reply failed: %s", err)
        return b"".join(chunks).decode("utf-8", errors="replace").strip()
