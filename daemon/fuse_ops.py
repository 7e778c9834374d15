"""FUSE request handlers: the mount's file operations mapped onto a Pool.

This is the only module that imports :mod:`pyfuse3`.  It offers
:class:`VolumeOps`, the request handlers, and four functions that drive the
FUSE session (:func:`start_session`, :func:`serve_requests`,
:func:`stop_session`, :func:`end_session`) so that the server never touches
pyfuse3 itself.

The mount::

    /                       volumes (regular files); the only names listed
    /.snapshots/            hidden (not listed, but found by name)
    /.snapshots/ctl         ctl protocol: snapshot, restore, delete, rename
    /.snapshots/VOL/        one directory per volume and per deleted volume
                            that still has snapshots
    /.snapshots/VOL/NAME    read-only snapshot images
    /.clones/               hidden
    /.clones/ctl            ctl protocol: clone, clone-group
    /.clones/VOL            read-only JSON status of each clone
    /.pool/                 hidden
    /.pool/ctl              ctl protocol: scrub, scrub-cancel
    /.pool/status           read-only JSON: counters, current or last scrub

Inode numbers: the root is ``pyfuse3.ROOT_INODE``, the control directories,
ctl and status files have fixed numbers below ``VOLUME_INODE_BASE``; volumes and
snapshots share one id space in the pool, so either is ``VOLUME_INODE_BASE``
plus its id (ids are never reused, so these numbers are stable across
renames and remounts).  ``.snapshots/VOL`` directories get numbers from
``SNAPSHOT_DIR_INODE_BASE`` up, assigned per name while mounted; a clone's
status file is ``CLONE_STATUS_INODE_BASE`` plus the clone's volume id.

Every handler answers either with a result or with ``FUSEError(errno)``: a
:class:`~cowfs.errors.PoolError` becomes its own errno (its message is
logged), anything unexpected is logged with its traceback and answered with
EIO.  The daemon never dies of a request.

The engine is single-threaded and synchronous.  Handlers call it directly and
never await while doing so, so engine calls are serialised by the trio loop.
The only await is after a ctl command: the kernel's caches of what it
changed are invalidated by :meth:`VolumeOps.serve_invalidations`, a separate
task, while the handler waits for that (with a time limit).  Scrubs run in
another task, :meth:`VolumeOps.serve_scrubs`, a slice of blocks at a time
with a checkpoint between slices, so requests are answered while they run.

Logging: every refused ctl command is logged once, naming the ctl file, the
command and the cause (the server's log format names the pool on every
line).  A checksum failure is logged once, by the engine, which names the
pool, the volume and the offset; the refusal of the read that met it is then
not logged again.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import itertools
import logging
import math
import os
import select
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

from cowfs.errors import ChecksumError, PoolError
from cowfs.pool import BLOCK, Pool, SnapshotInfo, VolumeInfo

from . import control

log = logging.getLogger(__name__)

ROOT_INODE: int = pyfuse3.ROOT_INODE
SNAPSHOTS_INODE = 2
SNAPSHOTS_CTL_INODE = 3
CLONES_INODE = 4
CLONES_CTL_INODE = 5
POOL_INODE = 6
POOL_CTL_INODE = 7
POOL_STATUS_INODE = 8
VOLUME_INODE_BASE = 1000
SNAPSHOT_DIR_INODE_BASE = 1 << 48
CLONE_STATUS_INODE_BASE = 1 << 49

SNAPSHOTS_NAME = b".snapshots"
CLONES_NAME = b".clones"
POOL_NAME = b".pool"
CTL_NAME = b"ctl"
STATUS_NAME = b"status"
_CTL = CTL_NAME.decode()

# The ctl files and which commands each accepts.
_CTL_FILES = {
    SNAPSHOTS_CTL_INODE: control.CtlFile.SNAPSHOTS,
    CLONES_CTL_INODE: control.CtlFile.CLONES,
    POOL_CTL_INODE: control.CtlFile.POOL,
}
_CONTROL_DIRS = (SNAPSHOTS_INODE, CLONES_INODE, POOL_INODE)

# Seconds the kernel may cache names and attributes.  Volumes change only
# through this mount, so caching is safe; a short timeout keeps changes made
# through the ctl files visible quickly (those also invalidate what they can).
ATTR_TIMEOUT = 1.0

# Seconds a ctl command waits for the kernel to drop its caches of what the
# command changed before the write returns anyway.
INVALIDATE_WAIT = 5.0

# Turns of the trio loop a read that missed the page cache waits at most for
# the queued requests to be taken up (each takes about three: 34 turns for
# 11 requests at queue depth 16).
QUEUE_ROUNDS = 64

# Disk reads a read watching the queue lets gather before it stops watching
# and sends them: the disk starts on them while the rest of the queue is
# taken up.  Waiting for the whole queue instead left the disk idle
# meanwhile: 4 KiB cold random reads, depth 16, 12.1-13.2k IOPS against
# 14.0-16.0k with 8 (4 and 6 in between; 2 worse); depth 32 14.1-14.9k
# against 16.4k.
READ_BATCH = 8

# Worker tasks pyfuse3 keeps reading requests even when idle.  With its
# default (one), a read waiting for the disk held its task, the next request
# started a new one and the task exited once its read was answered: one task
# made and ended per cold read at queue depth 16 (64226 for about 70k reads),
# which cost more than the read's own work.  Requests beyond this many waiting
# at once still get new tasks.
WORKER_TASKS = 32

# After a request that leaves no other queued, the request loop keeps polling
# for the next one this long (microseconds; mount option poll_us) instead of
# sleeping at once.  On this project's VM a wake-up from sleep cost the daemon
# about as much CPU as polling through the gap, and its latency was the larger
# part of a request's at queue depth 1: 4 KiB random writes there, seven
# pairs, median 12.9k -> 14.7k IOPS (two pairs not better: 11.7k -> 11.6k,
# 12.3k -> 8.2k), daemon CPU a write 57-70 -> 55-83 us (98 in the worse
# pair); through loop-dio 8.7-8.8k -> 11.3-12.7k; cold reads 5.0-5.5k ->
# 6.3-6.6k.  Not on a single CPU: there polling only takes time from the
# client.
POLL_US = 100
POLL_US_MAX = 10_000
# How often a daemon allowed only one CPU looks again whether it may poll.
POLL_RECHECK = 1.0

NAME_MAX = 255

# The pool has no inode table: report a large, constant inode count, of
# which each volume uses one, so ``df -i`` shows room for more volumes.
INODES_REPORTED = 1 << 32

# Extended attributes of volumes and snapshots.
XATTR_REFERENCED = b"user.cowfs.referenced"
XATTR_EXCLUSIVE = b"user.cowfs.exclusive"
XATTR_ORIGIN = b"user.cowfs.origin"
XATTR_CREATED = b"user.cowfs.created"

# Readdir positions.  '.' and '..' come first; every other entry's position is
# derived from its inode number, which never changes (renames keep it), so a
# listing resumed at any earlier position neither repeats nor skips entries.
_DOT_POSITION = 1
_DOTDOT_POSITION = 2


def _position(inode: int) -> int:
    """Readdir position just after the entry with ``inode``."""
    return _DOTDOT_POSITION + inode


_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def _log_level(err: int) -> int:
    """How loudly to log a refusal: missing names and attributes are routine
    (shells and ls probe for them constantly), data errors and full pools
    deserve attention."""
    if err in (errno.ENOENT, errno.ENODATA):
        return logging.DEBUG
    if err in (errno.EIO, errno.ENOSPC, errno.ESTALE):
        return logging.WARNING
    return logging.INFO


def _describe_arg(arg: Any) -> str:
    """A request argument as shown in debug logs: data buffers by length
    only, kernel context objects by type."""
    if isinstance(arg, bytes) and len(arg) > NAME_MAX:
        return f"<{len(arg)} bytes>"
    if isinstance(arg, (bytes, int, float, bool)) or arg is None:
        return repr(arg)
    return type(arg).__name__


def _answer_code(err: OSError) -> int:
    """The errno for a failure of the pool's host file system: a full host
    disk stays ENOSPC/EDQUOT, anything else is EIO."""
    return err.errno if err.errno in (errno.ENOSPC, errno.EDQUOT) else errno.EIO


def _request(handler: _Handler) -> _Handler:
    """Turn every failure of ``handler`` into a ``FUSEError`` answer.

    PoolError keeps its errno; an OSError from the host file system under the
    pool keeps ENOSPC/EDQUOT (a full host disk) and becomes EIO otherwise;
    anything else becomes EIO.  Unexpected failures are logged with their
    traceback.
    """
    op = handler.__name__

    @functools.wraps(handler)
    async def answer(self: VolumeOps, *args: Any) -> Any:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s(%s)", op, ", ".join(_describe_arg(arg) for arg in args))
        try:
            try:
                return await handler(self, *args)
            finally:
                self._request_done()
        except pyfuse3.FUSEError:
            raise
        except ChecksumError as err:
            # The engine has logged it, naming pool, volume and offset.
            log.debug("%s refused (%s): %s", op, err.errname, err)
            raise pyfuse3.FUSEError(err.errno) from None
        except PoolError as err:
            log.log(_log_level(err.errno), "%s refused (%s): %s", op, err.errname, err)
            raise pyfuse3.FUSEError(err.errno) from None
        except OSError as err:
            log.exception("%s failed in the pool's host file system", op)
            raise pyfuse3.FUSEError(_answer_code(err)) from None
        except Exception:
            log.exception("%s failed unexpectedly; answering EIO", op)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return answer  # type: ignore[return-value]


def _stale_if_gone(err: PoolError, ds_id: int) -> PoolError:
    """``err``, or ESTALE if it says the volume or snapshot no longer exists:
    "no such file" would be a confusing answer to read(2)."""
    if err.errno != errno.ENOENT:
        return err
    return PoolError(errno.ESTALE, f"volume or snapshot id {ds_id} was removed while "
                     "still in use")


@contextlib.contextmanager
def _still_present(ds_id: int) -> Iterator[None]:
    """Report a volume or snapshot that vanished under an open handle or a
    cached inode as ESTALE (:func:`_stale_if_gone`)."""
    try:
        yield
    except PoolError as err:
        raise _stale_if_gone(err, ds_id) from None


def _is_dataset(inode: int) -> bool:
    return VOLUME_INODE_BASE <= inode < SNAPSHOT_DIR_INODE_BASE


def _is_snapshot_dir(inode: int) -> bool:
    return SNAPSHOT_DIR_INODE_BASE <= inode < CLONE_STATUS_INODE_BASE


def _is_clone_status(inode: int) -> bool:
    return inode >= CLONE_STATUS_INODE_BASE


def _is_status(inode: int) -> bool:
    """Whether ``inode`` is a read-only status file (a clone's or the pool's)."""
    return inode == POOL_STATUS_INODE or _is_clone_status(inode)


def _ds_id(inode: int) -> int:
    """The volume or snapshot id behind ``inode``; ENOENT for other inodes."""
    if not _is_dataset(inode):
        raise PoolError(errno.ENOENT, f"inode {inode} is not a volume or snapshot")
    return inode - VOLUME_INODE_BASE


def _attrs(inode: int, mode: int, *, nlink: int = 1, uid: int = 0, gid: int = 0,
           size: int = 0, blocks: int = 0, atime_ns: int = 0, mtime_ns: int = 0,
           ctime_ns: int = 0, timeout: float = ATTR_TIMEOUT) -> pyfuse3.EntryAttributes:
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = inode
    attrs.generation = 0
    attrs.entry_timeout = timeout
    attrs.attr_timeout = timeout
    attrs.st_mode = mode
    attrs.st_nlink = nlink
    attrs.st_uid = uid
    attrs.st_gid = gid
    attrs.st_rdev = 0
    attrs.st_size = size
    attrs.st_blksize = BLOCK
    attrs.st_blocks = blocks
    attrs.st_atime_ns = atime_ns
    attrs.st_mtime_ns = mtime_ns
    attrs.st_ctime_ns = ctime_ns
    return attrs


def _volume_attrs(info: VolumeInfo) -> pyfuse3.EntryAttributes:
    """The stat(2) view of a volume: a regular file with one link."""
    return _attrs(VOLUME_INODE_BASE + info.id, stat.S_IFREG | stat.S_IMODE(info.mode),
                  uid=info.uid, gid=info.gid, size=info.size, blocks=info.allocated // 512,
                  atime_ns=info.atime_ns, mtime_ns=info.mtime_ns, ctime_ns=info.ctime_ns)


def _snapshot_attrs(snap: SnapshotInfo) -> pyfuse3.EntryAttributes:
    """The stat(2) view of a snapshot: the volume's file as it was, without
    write permission, dated when it was taken."""
    created = snap.created_ns
    return _attrs(VOLUME_INODE_BASE + snap.id,
                  stat.S_IFREG | (stat.S_IMODE(snap.mode) & ~0o222),
                  uid=snap.uid, gid=snap.gid, size=snap.size, blocks=snap.allocated // 512,
                  atime_ns=created, mtime_ns=created, ctime_ns=created)


def _decode(name: bytes) -> str:
    """A name from the kernel as the engine's str (undecodable bytes survive
    as surrogates, so the name round-trips through os.fsencode).  The engine
    validates names."""
    return os.fsdecode(name)


@dataclass
class _DataHandle:
    """An open volume or snapshot."""

    ds_id: int
    writable: bool


@dataclass
class _CtlHandle:
    """An open ctl file.  ``result`` is the reply to the last command written
    through this handle; it reads from file position ``result_at`` on (the
    position just after that write), or from 0 once a read comes from before
    that position."""

    ctl: control.CtlFile
    result: bytes = b""
    result_at: int = 0


@dataclass
class _StatusHandle:
    """An open status file (a clone's or the pool's): its content as of the
    open."""

    content: bytes


_Handle = _DataHandle | _CtlHandle | _StatusHandle


@dataclass
class _Invalidation:
    """Kernel cache entries to drop: inodes ``(inode, attributes only)`` and
    directory entries ``(parent inode, name)``.  ``done`` is set once the
    kernel was told."""

    inodes: list[tuple[int, bool]] = field(default_factory=list)
    entries: list[tuple[int, bytes]] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)


def _invalidate_now(job: _Invalidation) -> None:
    """Tell the kernel to drop ``job``'s cache entries (blocks until it has;
    run in a worker thread, never in a request handler)."""
    for inode, attr_only in job.inodes:
        try:
            pyfuse3.invalidate_inode(inode, attr_only)
        except OSError as err:
            # ENOENT: the kernel has nothing cached for it, which is fine.
            if err.errno != errno.ENOENT:
                log.warning("could not invalidate the kernel cache of inode %d: %s",
                            inode, err.strerror)
    for parent, name in job.entries:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError as err:
            if err.errno != errno.ENOENT:
                log.warning("could not invalidate the kernel's entry %r in inode %d: %s",
                            name, parent, err.strerror)


class VolumeOps(pyfuse3.Operations):
    """FUSE handlers presenting the volumes of ``pool`` as regular files in
    the mount root, their snapshots under ``.snapshots`` and clone status
    under ``.clones`` (see the module docstring for the layout).

    Creating, removing, renaming, resizing and chmod/chown/utimes of volumes
    go to the pool; directories, links and special files are refused with
    EPERM.  In ``.snapshots/VOL`` creating a file takes a snapshot, removing
    one deletes it and renaming one renames it; snapshot images refuse
    writes, truncation, chmod and chown with EROFS.  The ctl files run one
    command per write (:mod:`cowfs_daemon.control`); ``.pool/ctl`` starts
    and cancels scrubs, which :meth:`serve_scrubs` runs, and
    ``.pool/status`` reports them with the pool's error counters.  The
    handlers never raise anything but ``pyfuse3.FUSEError``.
    """

    def __init__(self, pool: Pool, poll_window: float = POLL_US / 1e6) -> None:
        super().__init__()
        self.pool = pool
        # Whether no more requests are queued for this mount now, and whether
        # that can be known; set by start_session (without it, assume some are).
        self.queue_empty: Callable[[], bool] = lambda: False
        self.queue_watched = False
        self._overlapped_reads = 0    # reads that let queued requests go first
        # Reads that do not wait (serve_disk_reads): whether they are on, the
        # eventfd that counts finished ones, and the requests waiting for theirs.
        self._async_reads = False
        self._notify_fd = -1
        self._disk_waiters: dict[object, trio.Event] = {}
        self._queue_gate: trio.Event | None = None
        # Polling between requests (serve_polling): the window in seconds,
        # until when the current one runs, and the event that wakes the
        # parked poller.
        self.poll_window = poll_window
        self._poll_until = 0.0
        self._poller_parked: trio.Event | None = None
        self._root_uid = os.getuid()
        self._root_gid = os.getgid()
        # Directory times are not stored in the pool: they start at mount
        # time and move whenever the set of names changes, so tools that
        # watch a directory's mtime notice new and removed entries.  The
        # control directories share one time.
        self._root_mtime_ns = time.time_ns()
        self._control_mtime_ns = self._root_mtime_ns
        # Open file handles by number.
        self._open: dict[int, _Handle] = {}
        self._next_fh = itertools.count(1)
        # Open handles per volume or snapshot id (to warn when one in use is
        # removed or the mount goes away under its users), and those with
        # write access per volume id (restore refuses those volumes).
        self._handles: collections.Counter[int] = collections.Counter()
        self._writers: collections.Counter[int] = collections.Counter()
        # .snapshots/VOL directory inodes, both ways; stable while mounted.
        self._dir_inode: dict[str, int] = {}
        self._dir_name: dict[int, str] = {}
        self._invalidations_in, self._invalidations_out = \
            trio.open_memory_channel[_Invalidation](math.inf)
        # The current or last scrub (at most one runs at a time), and the
        # cancel scope of the one serve_scrubs is running, so that a cancel
        # also cuts short the pause a rate limit imposes.
        self._mounted_ns = time.time_ns()
        self._scrub: control.ScrubJob | None = None
        self._scrub_scope: trio.CancelScope | None = None
        self._scrubs_in, self._scrubs_out = \
            trio.open_memory_channel[control.ScrubJob](math.inf)
        self._scrubs_served = False
        pool.on_reload = self._pool_reloaded

    # -- helpers --------------------------------------------------------

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        return self._dir_attrs(ROOT_INODE, self._root_mtime_ns)

    def _dir_attrs(self, inode: int, mtime_ns: int, nlink: int = 2) -> pyfuse3.EntryAttributes:
        return _attrs(inode, stat.S_IFDIR | 0o755, nlink=nlink, uid=self._root_uid,
                      gid=self._root_gid, atime_ns=mtime_ns, mtime_ns=mtime_ns,
                      ctime_ns=mtime_ns)

    def _ctl_attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        return _attrs(inode, stat.S_IFREG | 0o600, uid=self._root_uid, gid=self._root_gid,
                      atime_ns=self._control_mtime_ns, mtime_ns=self._control_mtime_ns,
                      ctime_ns=self._control_mtime_ns)

    def _pool_status(self) -> bytes:
        return control.pool_status(self.pool, self._scrub, self._mounted_ns,
                                   self._overlapped_reads)

    def _pool_status_attrs(self, content: bytes) -> pyfuse3.EntryAttributes:
        # Counters and scrub progress change all the time: no caching.
        return _attrs(POOL_STATUS_INODE, stat.S_IFREG | 0o444, uid=self._root_uid,
                      gid=self._root_gid, size=len(content), atime_ns=self._mounted_ns,
                      mtime_ns=time.time_ns(), ctime_ns=self._mounted_ns, timeout=0)

    def _status_attrs(self, info: VolumeInfo, content: bytes) -> pyfuse3.EntryAttributes:
        created = (info.origin or {}).get("created", 0)
        # The size changes with the space figures: never let the kernel keep it.
        return _attrs(CLONE_STATUS_INODE_BASE + info.id, stat.S_IFREG | 0o444,
                      uid=self._root_uid, gid=self._root_gid, size=len(content),
                      atime_ns=created, mtime_ns=created, ctime_ns=created, timeout=0)

    def _names_changed(self) -> None:
        self._root_mtime_ns = time.time_ns()

    def _snapshots_changed(self) -> None:
        self._control_mtime_ns = time.time_ns()

    @staticmethod
    def _in_root(parent_inode: int) -> None:
        if parent_inode != ROOT_INODE:
            raise PoolError(errno.ENOTDIR, f"inode {parent_inode} is not a directory")

    def _find(self, parent_inode: int, name: bytes) -> VolumeInfo:
        """The volume called ``name`` in the root; ENOENT for dot names."""
        self._in_root(parent_inode)
        vol_name = _decode(name)
        if vol_name.startswith("."):
            raise PoolError(errno.ENOENT, f"no volume named {vol_name!r} (dot names are reserved)")
        return self.pool.lookup(vol_name)

    def _snapshot_dir_names(self) -> list[str]:
        """Names with a ``.snapshots`` directory: every volume and every
        deleted volume that still has snapshots.  A volume named ``ctl`` is
        left out: ``.snapshots/ctl`` is the ctl file."""
        names = {info.name for info in self.pool.volumes()}
        names.update(self.pool.snapshot_owners())
        names.discard(_CTL)
        return sorted(names)

    def _has_snapshot_dir(self, name: str) -> bool:
        if name == _CTL:
            return False
        try:
            self.pool.lookup(name)
        except PoolError as err:
            if err.errno != errno.ENOENT:
                raise
            return bool(self.pool.snapshots(name))
        return True

    def _snapshot_dir_inode(self, name: str) -> int:
        inode = self._dir_inode.get(name)
        if inode is None:
            inode = SNAPSHOT_DIR_INODE_BASE + len(self._dir_inode)
            self._dir_inode[name] = inode
            self._dir_name[inode] = name
        return inode

    def _snapshot_dir(self, inode: int) -> str:
        """The volume name of the ``.snapshots`` directory ``inode``
        (ENOENT once it has neither a volume nor snapshots)."""
        name = self._dir_name.get(inode)
        if name is None or not self._has_snapshot_dir(name):
            raise PoolError(errno.ENOENT, f"inode {inode}: no such snapshot directory")
        return name

    def _snapshot_dir_attrs(self, name: str) -> pyfuse3.EntryAttributes:
        return self._dir_attrs(self._snapshot_dir_inode(name), self._control_mtime_ns)

    def _clone(self, name: str) -> VolumeInfo:
        """The clone called ``name`` (ENOENT if no such volume or not a clone)."""
        info = self.pool.lookup(name)
        if not info.origin:
            raise PoolError(errno.ENOENT, f"volume {name!r} is not a clone")
        return info

    def _clone_by_id(self, vol_id: int) -> VolumeInfo:
        info = self.pool.get(vol_id)
        if not info.origin:
            raise PoolError(errno.ENOENT, f"volume {info.name!r} is not a clone")
        return info

    def _dataset_attrs(self, ds_id: int) -> pyfuse3.EntryAttributes:
        with _still_present(ds_id):
            if self.pool.is_snapshot(ds_id):
                return _snapshot_attrs(self.pool.snapshot_get(ds_id))
            return _volume_attrs(self.pool.get(ds_id))

    def _inode_attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        """getattr for any inode of the mount."""
        if inode == ROOT_INODE:
            return self._root_attrs()
        if inode == SNAPSHOTS_INODE:
            return self._dir_attrs(inode, self._control_mtime_ns,
                                   2 + len(self._snapshot_dir_names()))
        if inode in (CLONES_INODE, POOL_INODE):
            return self._dir_attrs(inode, self._control_mtime_ns)
        if inode in _CTL_FILES:
            return self._ctl_attrs(inode)
        if inode == POOL_STATUS_INODE:
            return self._pool_status_attrs(self._pool_status())
        if _is_clone_status(inode):
            with _still_present(inode - CLONE_STATUS_INODE_BASE):
                info = self._clone_by_id(inode - CLONE_STATUS_INODE_BASE)
            return self._status_attrs(info, control.clone_status(self.pool, info))
        if _is_snapshot_dir(inode):
            return self._snapshot_dir_attrs(self._snapshot_dir(inode))
        return self._dataset_attrs(_ds_id(inode))

    def _parent(self, inode: int) -> int:
        """The parent of directory ``inode`` (ENOTDIR for files)."""
        if inode == ROOT_INODE or inode in _CONTROL_DIRS:
            return ROOT_INODE
        if _is_snapshot_dir(inode):
            self._snapshot_dir(inode)
            return SNAPSHOTS_INODE
        raise PoolError(errno.ENOTDIR, f"inode {inode} is not a directory")

    def _lookup(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes:
        if name == b".":
            self._parent(parent_inode)
            return self._inode_attrs(parent_inode)
        if name == b"..":
            return self._inode_attrs(self._parent(parent_inode))
        if parent_inode == ROOT_INODE:
            if name == SNAPSHOTS_NAME:
                return self._inode_attrs(SNAPSHOTS_INODE)
            if name == CLONES_NAME:
                return self._inode_attrs(CLONES_INODE)
            if name == POOL_NAME:
                return self._inode_attrs(POOL_INODE)
            return _volume_attrs(self._find(parent_inode, name))
        if parent_inode == SNAPSHOTS_INODE:
            if name == CTL_NAME:
                return self._ctl_attrs(SNAPSHOTS_CTL_INODE)
            vol = _decode(name)
            if not self._has_snapshot_dir(vol):
                raise PoolError(errno.ENOENT, f"no volume or snapshots named {vol!r}")
            return self._snapshot_dir_attrs(vol)
        if parent_inode == CLONES_INODE:
            if name == CTL_NAME:
                return self._ctl_attrs(CLONES_CTL_INODE)
            info = self._clone(_decode(name))
            return self._status_attrs(info, control.clone_status(self.pool, info))
        if parent_inode == POOL_INODE:
            if name == CTL_NAME:
                return self._ctl_attrs(POOL_CTL_INODE)
            if name == STATUS_NAME:
                return self._inode_attrs(POOL_STATUS_INODE)
            raise PoolError(errno.ENOENT, f"no {_decode(name)!r} in .pool (it holds ctl and "
                            "status)")
        if _is_snapshot_dir(parent_inode):
            vol = self._snapshot_dir(parent_inode)
            return _snapshot_attrs(self.pool.snapshot_lookup(vol, _decode(name)))
        raise PoolError(errno.ENOTDIR, f"inode {parent_inode} is not a directory")

    def _label(self, ds_id: int) -> str:
        try:
            if self.pool.is_snapshot(ds_id):
                snap = self.pool.snapshot_get(ds_id)
                return f"snapshot {snap.volume}@{snap.name}"
            return repr(self.pool.get(ds_id).name)
        except PoolError:
            return f"removed volume or snapshot id {ds_id}"

    def _warn_if_open(self, ds_id: int, what: str) -> None:
        """Log ``what`` happened (a removal) if handles still have ``ds_id`` open."""
        count = self._handles.get(ds_id, 0)
        if count:
            log.warning("%s while %d handle(s) still have it open; their I/O now fails "
                        "with ESTALE", what, count)

    def busy_volumes(self) -> list[str]:
        """Describe each volume or snapshot that still has open file handles,
        e.g. ``"'vm1.img' (2 open)"`` (used to warn at shutdown)."""
        return [f"{self._label(ds_id)} ({count} open)"
                for ds_id, count in sorted(self._handles.items())]

    def open_for_writing(self, info: VolumeInfo) -> bool:
        """Whether volume ``info`` has a handle open with write access."""
        return self._writers.get(info.id, 0) > 0

    def _new_handle(self, handle: _Handle) -> int:
        fh = next(self._next_fh)
        self._open[fh] = handle
        if isinstance(handle, _DataHandle):
            self._handles[handle.ds_id] += 1
            if handle.writable:
                self._writers[handle.ds_id] += 1
        return fh

    def _handle(self, fh: int) -> _Handle:
        handle = self._open.get(fh)
        if handle is None:
            raise PoolError(errno.EBADF, f"file handle {fh} is not open")
        return handle

    # -- kernel cache invalidation ----------------------------------------

    async def serve_invalidations(self) -> None:
        """Run forever (until cancelled): tell the kernel to drop cached
        data, attributes and names that ctl commands changed behind its
        back.  Each request runs in a worker thread, outside any request
        handler, because the kernel may wait for requests to finish first."""
        async for job in self._invalidations_out:
            await trio.to_thread.run_sync(_invalidate_now, job, abandon_on_cancel=True)
            job.done.set()

    async def _invalidate(self, changes: control.Changes) -> None:
        """Have :meth:`serve_invalidations` drop the kernel's caches of
        ``changes`` and wait for that, at most INVALIDATE_WAIT seconds."""
        job = _Invalidation()
        for vol_id in changes.replaced_volumes:
            job.inodes.append((VOLUME_INODE_BASE + vol_id, False))
        for vol, snap in changes.gone_snapshots:
            parent = self._dir_inode.get(vol)
            if parent is not None:
                job.entries.append((parent, os.fsencode(snap)))
        if changes.root_names:
            job.inodes.append((ROOT_INODE, True))
        if not job.inodes and not job.entries:
            return
        self._invalidations_in.send_nowait(job)
        with trio.move_on_after(INVALIDATE_WAIT):
            await job.done.wait()
        if not job.done.is_set():
            log.warning("the kernel has not dropped its cached copies within %.0f s; "
                        "readers may see old data until it does", INVALIDATE_WAIT)

    def _pool_reloaded(self, id_limit: int) -> None:
        """The pool went back to its durable state after a failed operation:
        sizes, names and (after lost unsynced changes) data the kernel cached
        may be gone.  Queued, not awaited: this runs inside a request."""
        job = _Invalidation()
        job.inodes = [(VOLUME_INODE_BASE + i, False) for i in range(1, id_limit)]
        job.inodes.append((ROOT_INODE, True))
        self._invalidations_in.send_nowait(job)
        if self._notify_fd >= 0:
            # The data file was opened again, without the reads started on
            # the old one: the requests waiting for those ask again.
            self._async_reads = self.pool.async_reads(self._notify_fd)
            self._wake_all_disk_waiters()

    # -- scrubs ----------------------------------------------------------

    def _pool_command(self, command: control.Command) -> control.Outcome:
        """Run a ``.pool/ctl`` command: start a scrub (handed to
        :meth:`serve_scrubs`) or cancel the running one."""
        if command.verb == "scrub-cancel":
            stopped = control.cancel_scrub(self.pool, self._scrub)
            if self._scrub_scope is not None:
                self._scrub_scope.cancel()
            log.info("scrub cancelled after %d of %d blocks", stopped.scrubber.blocks_done,
                     stopped.scrubber.blocks_total)
            return control.Outcome(control.ok_line(stopped.to_json()), control.Changes())
        job = control.start_scrub(self.pool, command, self._scrub)
        if not self._scrubs_served:
            raise PoolError(errno.ENOTSUP, f"scrub: the daemon serving pool "
                            f"{self.pool.label} runs no scrub task")
        self._scrubs_in.send_nowait(job)
        self._scrub = job
        rate = "unlimited" if job.rate is None else f"{job.rate} bytes/s"
        log.info("scrub started: %d blocks to check, rate %s", job.scrubber.blocks_total, rate)
        return control.Outcome(control.ok_line(job.to_json()), control.Changes())

    async def serve_scrubs(self) -> None:
        """Run forever (until cancelled): run each scrub started through
        ``.pool/ctl``, one at a time.  While this runs, ``scrub`` commands are
        accepted; without it they are refused (ENOTSUP)."""
        self._scrubs_served = True
        try:
            async for job in self._scrubs_out:
                await self._run_scrub(job)
        finally:
            self._scrubs_served = False

    async def _run_scrub(self, job: control.ScrubJob) -> None:
        """Verify ``job``'s blocks a slice at a time.  Between slices it
        waits as long as the rate limit asks, or at least passes a trio
        checkpoint, so that requests waiting meanwhile are answered."""
        scrubber = job.scrubber
        started = trio.current_time()
        with trio.CancelScope() as self._scrub_scope:
            try:
                while job.running:
                    scrubber.step(job.slice_blocks())
                    await trio.sleep(job.pause(trio.current_time() - started))
            except Exception as err:
                # A refusal (the pool stopped, say) is explained by its
                # message; anything else is a bug and gets its traceback.
                log.error("scrub stopped by an error after %d of %d blocks: %s",
                          scrubber.blocks_done, scrubber.blocks_total, err,
                          exc_info=not isinstance(err, PoolError))
                job.fail(f"stopped by an error after {scrubber.blocks_done} blocks: {err}")
            finally:
                self._scrub_scope = None
        if job.error is None and not scrubber.cancelled:
            level = logging.ERROR if scrubber.bad else logging.INFO
            log.log(level, "scrub finished in %.1f s: %d blocks checked, %d bad",
                    trio.current_time() - started, scrubber.blocks_done, len(scrubber.bad))

    # -- names ----------------------------------------------------------

    @_request
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._lookup(parent_inode, name)

    @_request
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._inode_attrs(inode)

    @_request
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        ownership = fields.update_mode or fields.update_uid or fields.update_gid
        if inode == ROOT_INODE:
            raise PoolError(errno.EPERM, "the attributes of the pool root cannot be changed")
        if inode in _CONTROL_DIRS or _is_snapshot_dir(inode):
            raise PoolError(errno.EPERM, "the attributes of control directories cannot be changed")
        if inode in _CTL_FILES or _is_status(inode):
            # Truncating a ctl file to 0 (``>`` without atomic O_TRUNC) and
            # setting times (``touch``) are accepted and change nothing.
            current = self._inode_attrs(inode)
            if ownership:
                raise PoolError(errno.EPERM, f"inode {inode}: the mode and owner of control "
                                "files cannot be changed")
            if fields.update_size and attr.st_size != current.st_size:
                raise PoolError(errno.EROFS if _is_status(inode) else errno.EINVAL,
                                f"inode {inode}: control files cannot be resized")
            return current
        ds_id = _ds_id(inode)
        with _still_present(ds_id):
            if self.pool.is_snapshot(ds_id):
                snap = self.pool.snapshot_get(ds_id)
                if fields.update_size or ownership:
                    raise PoolError(errno.EROFS, f"snapshot {snap.volume}@{snap.name} is "
                                    "read-only")
                # Times (touch) are accepted and not stored: a snapshot's
                # times say when it was taken.
                return _snapshot_attrs(snap)
            if fields.update_size:
                self.pool.truncate(ds_id, attr.st_size)
            changes: dict[str, int] = {}
            if fields.update_mode:
                changes["mode"] = stat.S_IMODE(attr.st_mode)
            if fields.update_uid:
                changes["uid"] = attr.st_uid
            if fields.update_gid:
                changes["gid"] = attr.st_gid
            if fields.update_atime:
                changes["atime_ns"] = attr.st_atime_ns
            if fields.update_mtime:
                changes["mtime_ns"] = attr.st_mtime_ns
            if changes:
                return _volume_attrs(self.pool.set_attrs(ds_id, **changes))
            return _volume_attrs(self.pool.get(ds_id))

    @_request
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if _is_snapshot_dir(parent_inode):
            return self._create_snapshot(parent_inode, name)
        if parent_inode in _CONTROL_DIRS:
            where = {SNAPSHOTS_INODE: SNAPSHOTS_NAME, CLONES_INODE: CLONES_NAME,
                     POOL_INODE: POOL_NAME}[parent_inode].decode()
            raise PoolError(errno.EPERM, f"cannot create {_decode(name)!r} in {where}: it "
                            "holds only control files (take a snapshot with touch "
                            ".snapshots/VOLUME/NAME, clone through .clones/ctl, scrub "
                            "through .pool/ctl)")
        self._in_root(parent_inode)
        info = self.pool.create_volume(
            _decode(name),
            size=0,
            mode=stat.S_IMODE(mode) & ~ctx.umask,
            uid=ctx.uid,
            gid=ctx.gid,
        )
        self._names_changed()
        fh = self._new_handle(_DataHandle(info.id, (flags & os.O_ACCMODE) != os.O_RDONLY))
        log.debug("created volume %r (id %d)", info.name, info.id)
        return pyfuse3.FileInfo(fh=fh), _volume_attrs(info)

    def _create_snapshot(self, parent_inode: int,
                         name: bytes) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """``touch .snapshots/VOL/NAME``: snapshot VOL as NAME and open it."""
        vol = self._snapshot_dir(parent_inode)
        snap = self.pool.snapshot([vol], _decode(name))[0]
        self._snapshots_changed()
        fh = self._new_handle(_DataHandle(snap.id, writable=False))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), _snapshot_attrs(snap)

    @_request
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if _is_snapshot_dir(parent_inode):
            vol = self._snapshot_dir(parent_inode)
            snap = self.pool.snapshot_lookup(vol, _decode(name))
            self.pool.delete_snapshot(snap.id)
            self._snapshots_changed()
            self._warn_if_open(snap.id, f"snapshot {vol}@{snap.name} was deleted")
            return
        if parent_inode in _CONTROL_DIRS:
            self._lookup(parent_inode, name)
            raise PoolError(errno.EPERM, f"cannot remove control file {_decode(name)!r} (to "
                            "delete a clone, remove the volume itself)")
        info = self._find(parent_inode, name)
        self.pool.delete_volume(info.id)
        self._names_changed()
        self._warn_if_open(info.id, f"volume {info.name!r} was removed")
        log.debug("removed volume %r (id %d)", info.name, info.id)

    @_request
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        attrs = self._lookup(parent_inode, name)
        if stat.S_ISDIR(attrs.st_mode):
            raise PoolError(errno.EPERM, f"cannot remove directory {_decode(name)!r}: control "
                            "directories come and go with volumes and snapshots")
        raise PoolError(errno.ENOTDIR, f"{_decode(name)!r} is not a directory")

    @_request
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if parent_inode_old == ROOT_INODE and parent_inode_new == ROOT_INODE:
            self._rename_volume(name_old, name_new, flags)
        elif _is_snapshot_dir(parent_inode_old) and parent_inode_old == parent_inode_new:
            self._rename_snapshot(parent_inode_old, name_old, name_new, flags)
        else:
            raise PoolError(errno.EPERM, f"cannot move {_decode(name_old)!r} to another "
                            "directory: volumes stay in the mount root and snapshots in "
                            "their volume's directory")

    def _rename_volume(self, name_old: bytes, name_new: bytes, flags: int) -> None:
        source = self._find(ROOT_INODE, name_old)
        new_name = _decode(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise PoolError(errno.EINVAL, f"cannot exchange {source.name!r} and {new_name!r}: not supported")
        if new_name == source.name:
            return
        try:
            target: VolumeInfo | None = self.pool.lookup(new_name)
        except PoolError as err:
            if err.errno != errno.ENOENT:
                raise
            target = None
        if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise PoolError(errno.EEXIST, f"cannot rename {source.name!r}: {new_name!r} exists")
        self.pool.rename_volume(source.id, new_name)
        self._names_changed()
        if target is not None:
            self._warn_if_open(target.id, f"volume {target.name!r} was replaced by "
                               f"{source.name!r}")
        log.debug("renamed volume %r to %r", source.name, new_name)

    def _rename_snapshot(self, parent_inode: int, name_old: bytes, name_new: bytes,
                         flags: int) -> None:
        """``mv .snapshots/VOL/a .snapshots/VOL/b``; EEXIST if ``b`` exists
        (a snapshot is never replaced by a rename)."""
        vol = self._snapshot_dir(parent_inode)
        snap = self.pool.snapshot_lookup(vol, _decode(name_old))
        new_name = _decode(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise PoolError(errno.EINVAL, f"cannot exchange snapshots {vol}@{snap.name} and "
                            f"{vol}@{new_name}: not supported")
        self.pool.rename_snapshot(snap.id, new_name)
        self._snapshots_changed()

    @_request
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise PoolError(errno.EPERM, f"cannot create directory {_decode(name)!r}: only volumes "
                        "and snapshots live here")

    @_request
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise PoolError(errno.EPERM, f"cannot create symlink {_decode(name)!r}: only volumes "
                        "and snapshots live here")

    @_request
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise PoolError(errno.EPERM, f"cannot create hard link {_decode(new_name)!r}: volumes "
                        "and snapshots have one name")

    @_request
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise PoolError(errno.EPERM, f"cannot create special file {_decode(name)!r}: only "
                        "volumes and snapshots live here")

    # -- directory listing ------------------------------------------------

    @_request
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._parent(inode)
        return inode

    def _listing(self, inode: int) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        """The entries of directory ``inode`` other than '.' and '..'."""
        if inode == ROOT_INODE:
            return [(os.fsencode(info.name), _volume_attrs(info))
                    for info in self.pool.volumes()]
        if inode == SNAPSHOTS_INODE:
            return [(CTL_NAME, self._ctl_attrs(SNAPSHOTS_CTL_INODE))] + [
                (os.fsencode(name), self._snapshot_dir_attrs(name))
                for name in self._snapshot_dir_names()]
        if inode == CLONES_INODE:
            return [(CTL_NAME, self._ctl_attrs(CLONES_CTL_INODE))] + [
                (os.fsencode(info.name),
                 self._status_attrs(info, control.clone_status(self.pool, info)))
                for info in self.pool.volumes() if info.origin and info.name != _CTL]
        if inode == POOL_INODE:
            return [(CTL_NAME, self._ctl_attrs(POOL_CTL_INODE)),
                    (STATUS_NAME, self._inode_attrs(POOL_STATUS_INODE))]
        vol = self._snapshot_dir(inode)
        return [(os.fsencode(snap.name), _snapshot_attrs(snap))
                for snap in self.pool.snapshots(vol)]

    @_request
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        here = self._inode_attrs(fh)
        entries: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = [
            (b".", here, _DOT_POSITION),
            (b"..", self._inode_attrs(self._parent(fh)), _DOTDOT_POSITION),
        ]
        listing = sorted(self._listing(fh), key=lambda entry: entry[1].st_ino)
        entries.extend((name, attrs, _position(attrs.st_ino)) for name, attrs in listing)
        for name, attrs, position in entries:
            if position <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, attrs, position):
                return

    @_request
    async def releasedir(self, fh: int) -> None:
        return None

    @_request
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        # Renames and removals are journaled by the pool; a directory fsync
        # must make them durable.
        self.pool.sync()

    # -- file I/O -------------------------------------------------------

    @_request
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if inode in _CTL_FILES:
            # O_TRUNC (``>``) is accepted: a ctl file is always empty.
            # direct_io: every write reaches the handler as it was made, and
            # reads are never cut short by the reported size of 0.
            return pyfuse3.FileInfo(fh=self._new_handle(_CtlHandle(_CTL_FILES[inode])),
                                    direct_io=True)
        if inode == POOL_STATUS_INODE:
            if writing:
                raise PoolError(errno.EROFS, ".pool/status is a read-only status file")
            return pyfuse3.FileInfo(fh=self._new_handle(_StatusHandle(self._pool_status())),
                                    direct_io=True)
        if _is_clone_status(inode):
            with _still_present(inode - CLONE_STATUS_INODE_BASE):
                info = self._clone_by_id(inode - CLONE_STATUS_INODE_BASE)
            if writing:
                raise PoolError(errno.EROFS, f".clones/{info.name} is a read-only status file")
            content = control.clone_status(self.pool, info)
            return pyfuse3.FileInfo(fh=self._new_handle(_StatusHandle(content)),
                                    direct_io=True)
        ds_id = _ds_id(inode)
        if self.pool.is_snapshot(ds_id):
            snap = self.pool.snapshot_get(ds_id)
            if writing:
                raise PoolError(errno.EROFS, f"snapshot {snap.volume}@{snap.name} is "
                                "read-only")
            # A snapshot never changes: its cached pages stay valid.
            return pyfuse3.FileInfo(fh=self._new_handle(_DataHandle(ds_id, False)),
                                    keep_cache=True)
        self.pool.get(ds_id)
        # libfuse asks the kernel for atomic O_TRUNC, so truncation on open
        # arrives here rather than as a separate setattr.
        if flags & os.O_TRUNC:
            self.pool.truncate(ds_id, 0)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        # direct_io: requests go to the pool as they were made, with no page
        # cache in between.  Without it the kernel asks for the
        # security.capability attribute before every write (to drop setuid
        # bits), one more round trip that halved 4 KiB write IOPS; and a VM
        # disk on loop or qemu caches above us anyway.  The price: volumes
        # cannot be mmap()ed.
        return pyfuse3.FileInfo(fh=self._new_handle(_DataHandle(ds_id, writable)),
                                direct_io=True)

    @_request
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handle(fh)
        if isinstance(handle, _DataHandle):
            # The hot path: no context manager (see _still_present).
            try:
                # Data not in the host's page cache is waited for only when
                # no other request is queued (None otherwise): yielding would
                # only cost then, as the worker pyfuse3 starts meanwhile would
                # run before the reply rather than after it (8% fewer reads
                # at depth 1).
                if self._async_reads:
                    # A read of one block waits for the disk in its own
                    # system call only when nothing else is queued or on
                    # its way from the disk; otherwise its disk read goes
                    # with the others'.  A longer one always waits: the
                    # pool answers a read of several runs of blocks only
                    # once all are in, and one started early could be
                    # answered and dropped while it waits for another.
                    alone = (off % BLOCK + size > BLOCK
                             or not self._disk_waiters and self.queue_empty())
                    data = self.pool.read(handle.ds_id, off, size, wait=alone)
                else:
                    data = self.pool.read(handle.ds_id, off, size, wait=self.queue_empty)
                if data is None:
                    self._overlapped_reads += 1
                    data = await self._read_started(handle.ds_id, off, size,
                                                    self._wait_for_disk_read())
                return data
            except PoolError as err:
                raise _stale_if_gone(err, handle.ds_id) from None
        if isinstance(handle, _CtlHandle):
            if off < handle.result_at:
                handle.result_at = 0
            start = off - handle.result_at
            return handle.result[start:start + size]
        return handle.content[off:off + size]

    async def _read_started(self, ds_id: int, off: int, size: int,
                            finished: trio.Event | None) -> bytes | bytearray:
        """The answer to a read whose disk read has started; ``finished`` is
        set when that disk read has finished (None: reads that do not wait
        are off).

        With reads that do not wait (:meth:`serve_disk_reads`), the first
        such read lets the queued requests start theirs
        (:meth:`_queue_taken_up`) and then sends every disk read started by
        then to the disk in one call; the reads started meanwhile wait only
        for their own disk read, while the thread serves others (before,
        they also waited for the first one: a wake-up more each; cold reads
        at depth 16 cost 87-101 us of daemon CPU each before this and
        :data:`WORKER_TASKS`, 71-74 after, in three pairs of runs).  With
        those reads off, it lets the queued requests go first the same way,
        then waits in a read of its own, blocking the thread.
        """
        while True:
            if finished is None or not self._async_reads:
                await self._queue_taken_up()
                return self.pool.read(ds_id, off, size)
            if self._queue_gate is None:
                await self._queue_taken_up()
            await finished.wait()
            data = self.pool.read(ds_id, off, size, wait=False)
            if data is not None:
                return data
            finished = self._wait_for_disk_read()     # its answer was dropped: again

    async def _queue_taken_up(self) -> None:
        """Return once no request is left queued for this mount, or
        ``READ_BATCH`` disk reads wait to be sent, or after ``QUEUE_ROUNDS``
        turns of the trio loop (so that a steady stream of requests cannot
        hold a read back for long).

        A read whose disk read has started waits here before it waits for
        the disk, so that every request queued with it starts its own first.
        One waiting read (the first) watches the queue; others that come
        here wait for it.  After a single turn of the loop instead, the next
        worker had not yet taken up the next request: 4 KiB random reads at
        queue depth 16 went to the disk one per call (44418 calls for 44418
        reads), against about 12 per call after this (76580 in 6385).

        On the way out the watching read sends every disk read started by
        then to the disk in one call (:meth:`Pool.submit_reads`), also when
        it is cancelled: the requests it took up wait for those reads.
        """
        gate = self._queue_gate
        if gate is not None:
            await gate.wait()
            return
        gate = self._queue_gate = trio.Event()
        try:
            # Where the queue cannot be watched, one turn is all it waits.
            for _ in range(QUEUE_ROUNDS if self.queue_watched else 1):
                await trio.lowlevel.checkpoint()
                if self.queue_empty() or self.pool.unsent_reads() >= READ_BATCH:
                    break
        finally:
            self._queue_gate = None
            gate.set()
            self._disk_reads_done(self.pool.submit_reads())

    def _wait_for_disk_read(self) -> trio.Event | None:
        """An event set when the disk read the pool last answered None for
        has finished (or the reads that do not wait stop); None while they
        are off."""
        if not self._async_reads:
            return None
        token = self.pool.started_read()
        finished = self._disk_waiters.get(token)
        if finished is None:
            finished = self._disk_waiters[token] = trio.Event()
        return finished

    def _disk_reads_done(self, tokens: list[object]) -> None:
        """Wake the requests waiting for the disk reads named by ``tokens``."""
        for token in tokens:
            finished = self._disk_waiters.pop(token, None)
            if finished is not None:
                finished.set()

    def _wake_all_disk_waiters(self) -> None:
        """Wake every request waiting for a disk read (they ask again)."""
        waiting, self._disk_waiters = self._disk_waiters, {}
        for finished in waiting.values():
            finished.set()

    def _request_done(self) -> None:
        """After every request: open a polling window (serve_polling), and
        wake the parked poller if no other request is queued."""
        self._poll_until = time.monotonic() + self.poll_window
        parked = self._poller_parked
        if parked is not None and self.queue_empty():
            self._poller_parked = None
            parked.set()

    async def serve_polling(self) -> None:
        """Keep the trio loop polling (every turn a checkpoint, so its epoll
        wait does not sleep) until ``poll_window`` has passed since the last
        request, then park until a request leaves the queue empty; runs until
        cancelled.  Off with a zero window, where the queue cannot be
        watched (nothing would wake it), and while the daemon may run on one
        CPU only (checked again every POLL_RECHECK seconds).  A data read
        that waits for the disk polls for its data as long
        (:attr:`Pool.read_poll`) under the same conditions."""
        if self.poll_window <= 0 or not self.queue_watched:
            return
        while True:
            if len(os.sched_getaffinity(0)) < 2:
                self.pool.read_poll = 0.0
                await trio.sleep(POLL_RECHECK)
                continue
            self.pool.read_poll = self.poll_window
            parked = self._poller_parked = trio.Event()
            await parked.wait()
            while time.monotonic() < self._poll_until:
                await trio.lowlevel.checkpoint()

    async def serve_disk_reads(self) -> None:
        """Turn on reads that do not wait (see :meth:`_read_started`) and
        wake the requests waiting for them as their disk reads finish; runs
        until cancelled.  Where the pool's system cannot, reads block the
        thread as before."""
        notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._notify_fd = notify_fd
            self._async_reads = self.pool.async_reads(notify_fd)
            while True:
                await trio.lowlevel.wait_readable(notify_fd)
                try:
                    os.eventfd_read(notify_fd)
                except BlockingIOError:
                    pass
                self._disk_reads_done(self.pool.reap_reads())
        finally:
            self._async_reads = False
            self._notify_fd = -1
            self._wake_all_disk_waiters()
            os.close(notify_fd)

    @_request
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        if isinstance(handle, _DataHandle):
            try:
                return self.pool.write(handle.ds_id, off, buf)
            except PoolError as err:
                raise _stale_if_gone(err, handle.ds_id) from None
        if isinstance(handle, _CtlHandle):
            return await self._command(handle, off, buf)
        raise PoolError(errno.EROFS, "status files are read-only")

    async def _command(self, handle: _CtlHandle, off: int, buf: bytes) -> int:
        """Run the command written to a ctl handle; keep its reply for reads."""
        # A refused write leaves the file position where it was.
        handle.result_at = off
        try:
            command = control.parse(handle.ctl, buf)
            if handle.ctl is control.CtlFile.POOL:
                outcome = self._pool_command(command)
            else:
                outcome = control.execute(self.pool, command, self.open_for_writing)
        except PoolError as err:
            handle.result = control.error_line(str(err))
            log.log(logging.WARNING if err.errno in (errno.EIO, errno.ENOSPC) else logging.INFO,
                    "%s: command %s refused (%s): %s", handle.ctl.value,
                    _describe_command(buf), err.errname, err)
            raise pyfuse3.FUSEError(err.errno) from None
        except BaseException as err:
            handle.result = control.error_line(f"internal error: {err!r}")
            raise
        handle.result = outcome.line
        handle.result_at = off + len(buf)
        if handle.ctl is not control.CtlFile.POOL:
            self._snapshots_changed()
        if outcome.changes.root_names:
            self._names_changed()
        await self._invalidate(outcome.changes)
        return len(buf)

    @_request
    async def flush(self, fh: int) -> None:
        # Writes reach the pool as they arrive; durability is fsync's job.
        return None

    @_request
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.pool.sync()

    @_request
    async def release(self, fh: int) -> None:
        handle = self._open.pop(fh, None)
        if not isinstance(handle, _DataHandle):
            return
        for counter, counted in ((self._handles, True), (self._writers, handle.writable)):
            if counted:
                counter[handle.ds_id] -= 1
                if counter[handle.ds_id] <= 0:
                    del counter[handle.ds_id]

    # -- extended attributes ------------------------------------------------

    def _xattr_names(self, inode: int) -> list[bytes]:
        if not _is_dataset(inode):
            return []
        ds_id = _ds_id(inode)
        with _still_present(ds_id):
            if self.pool.is_snapshot(ds_id):
                return [XATTR_REFERENCED, XATTR_EXCLUSIVE, XATTR_CREATED]
            names = [XATTR_REFERENCED, XATTR_EXCLUSIVE]
            if self.pool.get(ds_id).origin:
                names.append(XATTR_ORIGIN)
            return names

    @_request
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self._xattr_names(inode)

    @_request
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name not in self._xattr_names(inode):
            raise PoolError(errno.ENODATA, f"inode {inode} has no attribute {_decode(name)!r}")
        ds_id = _ds_id(inode)
        with _still_present(ds_id):
            if name == XATTR_EXCLUSIVE:
                return str(self.pool.space(ds_id)[1]).encode()
            if self.pool.is_snapshot(ds_id):
                snap = self.pool.snapshot_get(ds_id)
                if name == XATTR_CREATED:
                    return control.iso_utc(snap.created_ns).encode()
                return str(snap.allocated).encode()
            info = self.pool.get(ds_id)
            if name == XATTR_ORIGIN:
                return os.fsencode(str((info.origin or {}).get("source")))
            return str(info.allocated).encode()

    @_request
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        raise PoolError(errno.ENOTSUP, f"cannot set attribute {_decode(name)!r}: cowfs "
                        "attributes are read-only")

    @_request
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise PoolError(errno.ENOTSUP, f"cannot remove attribute {_decode(name)!r}: cowfs "
                        "attributes are read-only")

    # -- file system ----------------------------------------------------

    @_request
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = self.pool.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = BLOCK
        out.f_frsize = BLOCK
        out.f_blocks = stats.total // BLOCK
        out.f_bfree = stats.free // BLOCK
        out.f_bavail = stats.free // BLOCK
        out.f_files = INODES_REPORTED
        out.f_ffree = max(INODES_REPORTED - stats.volumes, 0)
        out.f_favail = out.f_ffree
        out.f_namemax = NAME_MAX
        return out


def _describe_command(buf: bytes) -> str:
    """A ctl write as shown in log lines: its text, cut short when long."""
    text = repr(buf[:120].decode("utf-8", "backslashreplace").strip())
    return text if len(buf) <= 120 else f"{text}... ({len(buf)} bytes)"


# -- session control ---------------------------------------------------------


def start_session(ops: VolumeOps, mountpoint: str, options: Iterable[str]) -> None:
    """Mount the file system at ``mountpoint`` with the given FUSE options.

    From here on the kernel queues requests for the mount; they are answered
    once :func:`serve_requests` runs.  Raises ``RuntimeError`` if libfuse
    cannot create the session or mount (libfuse prints its reason to stderr).
    """
    pyfuse3.init(ops, mountpoint, set(options))
    fd = _fuse_device_fd()
    if fd is not None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        ops.queue_empty = lambda: not poller.poll(0)
        ops.queue_watched = True


def _fuse_device_fd() -> int | None:
    """The descriptor of /dev/fuse the session reads requests from, if it is
    the process's only one (pyfuse3 does not expose it)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue        # closed meanwhile (the listing's own descriptor)
    if len(found) != 1:
        log.info("%d descriptors of /dev/fuse open; reads that miss the page cache "
                 "always let queued requests go first", len(found))
        return None
    return found[0]


async def serve_requests() -> None:
    """Answer requests until the session is stopped or the kernel unmounts."""
    await pyfuse3.main(min_tasks=WORKER_TASKS)


def stop_session() -> None:
    """Make :func:`serve_requests` return soon (call from the trio thread)."""
    pyfuse3.terminate()


def end_session() -> None:
    """Unmount (if the kernel has not already) and free the session.

    libfuse detaches the mount lazily when run as root, so the call does not
    fail on a busy mount; remaining users then get ENOTCONN.
    """
    pyfuse3.close(unmount=True)
