"""FUSE request handlers: the mount's file operations mapped onto a Pool.

This is the only module that imports :mod:`pyfuse3`.  It offers
:class:`VolumeOps`, the request handlers, and four functions that drive the
FUSE session (:func:`start_session`, :func:`serve_requests`,
:func:`stop_session`, :func:`end_session`) so that the server never touches
pyfuse3 itself.

The mount is one flat directory.  Its root is ``pyfuse3.ROOT_INODE``; every
volume is a regular file whose inode number is ``VOLUME_INODE_BASE`` plus the
volume id (ids are never reused within a pool, so inode numbers are stable
across renames and remounts).  Inodes between the root and
``VOLUME_INODE_BASE`` are reserved for control directories.

Every handler answers either with a result or with ``FUSEError(errno)``: a
:class:`~cowfs.errors.PoolError` becomes its own errno (its message is
logged), anything unexpected is logged with its traceback and answered with
EIO.  The daemon never dies of a request.

The engine is single-threaded and synchronous.  Handlers call it directly and
never await while doing so, so engine calls are serialised by the trio loop.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import pyfuse3

from cowfs.errors import PoolError
from cowfs.pool import BLOCK, Pool, VolumeInfo

log = logging.getLogger(__name__)

ROOT_INODE: int = pyfuse3.ROOT_INODE
VOLUME_INODE_BASE = 1000

# Seconds the kernel may cache names and attributes.  Volumes change only
# through this mount, so caching is safe; a short timeout keeps changes made by
# later control paths (snapshots, the CLI) visible quickly.
ATTR_TIMEOUT = 1.0

NAME_MAX = 255

# The pool has no inode table: report a large, constant inode count, of
# which each volume uses one, so ``df -i`` shows room for more volumes.
INODES_REPORTED = 1 << 32

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
    """How loudly to log a refusal: missing names are routine (shells probe
    for them constantly), data errors and full pools deserve attention."""
    if err == errno.ENOENT:
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
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except PoolError as err:
            log.log(_log_level(err.errno), "%s refused (%s): %s", op, err.errname, err)
            raise pyfuse3.FUSEError(err.errno) from None
        except OSError as err:
            log.exception("%s failed in the pool's host file system", op)
            code = err.errno if err.errno in (errno.ENOSPC, errno.EDQUOT) else errno.EIO
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("%s failed unexpectedly; answering EIO", op)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return answer  # type: ignore[return-value]


@contextlib.contextmanager
def _still_present(vol_id: int) -> Iterator[None]:
    """Report a volume that vanished under an open handle or a cached inode
    as ESTALE: "no such file" would be a confusing answer to read(2)."""
    try:
        yield
    except PoolError as err:
        if err.errno != errno.ENOENT:
            raise
        raise PoolError(errno.ESTALE, f"volume id {vol_id} was removed while still in use") from None


def _vol_id(inode: int) -> int:
    """The volume id behind ``inode``; ENOENT for the root and reserved inodes."""
    if inode < VOLUME_INODE_BASE:
        raise PoolError(errno.ENOENT, f"inode {inode} is not a volume")
    return inode - VOLUME_INODE_BASE


def _volume_attrs(info: VolumeInfo) -> pyfuse3.EntryAttributes:
    """The stat(2) view of a volume: a regular file with one link."""
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = VOLUME_INODE_BASE + info.id
    attrs.generation = 0
    attrs.entry_timeout = ATTR_TIMEOUT
    attrs.attr_timeout = ATTR_TIMEOUT
    attrs.st_mode = stat.S_IFREG | stat.S_IMODE(info.mode)
    attrs.st_nlink = 1
    attrs.st_uid = info.uid
    attrs.st_gid = info.gid
    attrs.st_rdev = 0
    attrs.st_size = info.size
    attrs.st_blksize = BLOCK
    attrs.st_blocks = info.allocated // 512
    attrs.st_atime_ns = info.atime_ns
    attrs.st_mtime_ns = info.mtime_ns
    attrs.st_ctime_ns = info.ctime_ns
    return attrs


def _decode(name: bytes) -> str:
    """A name from the kernel as the engine's str (undecodable bytes survive
    as surrogates, so the name round-trips through os.fsencode).  The engine
    validates names."""
    return os.fsdecode(name)


class VolumeOps(pyfuse3.Operations):
    """FUSE handlers presenting the volumes of ``pool`` as regular files in
    the mount root.

    Creating, removing, renaming, resizing and chmod/chown/utimes of volumes
    go to the pool; directories, links and special files are refused with
    EPERM.  Names starting with '.' are never looked up as volumes (they are
    kept for control directories).  The handlers never raise anything but
    ``pyfuse3.FUSEError``.
    """

    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self.pool = pool
        self._root_uid = os.getuid()
        self._root_gid = os.getgid()
        # The root's times are not stored in the pool: they start at mount
        # time and move whenever the set of names changes, so tools that
        # watch the directory's mtime notice new and removed volumes.
        self._root_mtime_ns = time.time_ns()
        # Open file handles per volume id, to warn when a volume in use is
        # removed or the mount goes away under its users.
        self._handles: collections.Counter[int] = collections.Counter()

    # -- helpers --------------------------------------------------------

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = ROOT_INODE
        attrs.generation = 0
        attrs.entry_timeout = ATTR_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        attrs.st_mode = stat.S_IFDIR | 0o755
        attrs.st_nlink = 2
        attrs.st_uid = self._root_uid
        attrs.st_gid = self._root_gid
        attrs.st_rdev = 0
        attrs.st_size = 0
        attrs.st_blksize = BLOCK
        attrs.st_blocks = 0
        attrs.st_atime_ns = self._root_mtime_ns
        attrs.st_mtime_ns = self._root_mtime_ns
        attrs.st_ctime_ns = self._root_mtime_ns
        return attrs

    def _names_changed(self) -> None:
        self._root_mtime_ns = time.time_ns()

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

    def _warn_if_open(self, info: VolumeInfo, what: str) -> None:
        count = self._handles.get(info.id, 0)
        if count:
            log.warning(
                "volume %r %s while %d handle(s) still have it open; "
                "their I/O now fails with ESTALE",
                info.name, what, count,
            )

    def busy_volumes(self) -> list[str]:
        """Describe each volume that still has open file handles, e.g.
        ``"'vm1.img' (2 open)"`` (used to warn at shutdown)."""
        busy = []
        for vol_id, count in sorted(self._handles.items()):
            try:
                label = repr(self.pool.get(vol_id).name)
            except PoolError:
                label = f"removed volume id {vol_id}"
            busy.append(f"{label} ({count} open)")
        return busy

    # -- names ----------------------------------------------------------

    @_request
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE and name in (b".", b".."):
            return self._root_attrs()
        return _volume_attrs(self._find(parent_inode, name))

    @_request
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return self._root_attrs()
        vol_id = _vol_id(inode)
        with _still_present(vol_id):
            return _volume_attrs(self.pool.get(vol_id))

    @_request
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            raise PoolError(errno.EPERM, "the attributes of the pool root cannot be changed")
        vol_id = _vol_id(inode)
        with _still_present(vol_id):
            if fields.update_size:
                self.pool.truncate(vol_id, attr.st_size)
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
                return _volume_attrs(self.pool.set_attrs(vol_id, **changes))
            return _volume_attrs(self.pool.get(vol_id))

    @_request
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._in_root(parent_inode)
        info = self.pool.create_volume(
            _decode(name),
            size=0,
            mode=stat.S_IMODE(mode) & ~ctx.umask,
            uid=ctx.uid,
            gid=ctx.gid,
        )
        self._names_changed()
        self._handles[info.id] += 1
        log.debug("created volume %r (id %d)", info.name, info.id)
        attrs = _volume_attrs(info)
        return pyfuse3.FileInfo(fh=attrs.st_ino), attrs

    @_request
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        info = self._find(parent_inode, name)
        self.pool.delete_volume(info.id)
        self._names_changed()
        self._warn_if_open(info, "was removed")
        log.debug("removed volume %r (id %d)", info.name, info.id)

    @_request
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        info = self._find(parent_inode, name)
        raise PoolError(errno.ENOTDIR, f"{info.name!r} is a volume, not a directory")

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
        self._in_root(parent_inode_new)
        source = self._find(parent_inode_old, name_old)
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
            self._warn_if_open(target, f"was replaced by {source.name!r}")
        log.debug("renamed volume %r to %r", source.name, new_name)

    @_request
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise PoolError(errno.EPERM, f"cannot create directory {_decode(name)!r}: only volumes live here")

    @_request
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise PoolError(errno.EPERM, f"cannot create symlink {_decode(name)!r}: only volumes live here")

    @_request
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise PoolError(errno.EPERM, f"cannot create hard link {_decode(new_name)!r}: volumes have one name")

    @_request
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise PoolError(errno.EPERM, f"cannot create special file {_decode(name)!r}: only volumes live here")

    # -- directory listing ------------------------------------------------

    @_request
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT_INODE:
            raise PoolError(errno.ENOTDIR, f"inode {inode} is not a directory")
        return inode

    @_request
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        root = self._root_attrs()
        entries: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = [
            (b".", root, _DOT_POSITION),
            (b"..", root, _DOTDOT_POSITION),
        ]
        for info in sorted(self.pool.volumes(), key=lambda v: v.id):
            attrs = _volume_attrs(info)
            entries.append((os.fsencode(info.name), attrs, _position(attrs.st_ino)))
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
        vol_id = _vol_id(inode)
        self.pool.get(vol_id)
        # libfuse asks the kernel for atomic O_TRUNC, so truncation on open
        # arrives here rather than as a separate setattr.
        if flags & os.O_TRUNC:
            self.pool.truncate(vol_id, 0)
        self._handles[vol_id] += 1
        return pyfuse3.FileInfo(fh=inode)

    @_request
    async def read(self, fh: int, off: int, size: int) -> bytes:
        vol_id = _vol_id(fh)
        with _still_present(vol_id):
            return self.pool.read(vol_id, off, size)

    @_request
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        vol_id = _vol_id(fh)
        with _still_present(vol_id):
            return self.pool.write(vol_id, off, buf)

    @_request
    async def flush(self, fh: int) -> None:
        # Writes reach the pool as they arrive; durability is fsync's job.
        return None

    @_request
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.pool.sync()

    @_request
    async def release(self, fh: int) -> None:
        vol_id = _vol_id(fh)
        self._handles[vol_id] -= 1
        if self._handles[vol_id] <= 0:
            del self._handles[vol_id]

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


# -- session control ---------------------------------------------------------


def start_session(ops: VolumeOps, mountpoint: str, options: Iterable[str]) -> None:
    """Mount the file system at ``mountpoint`` with the given FUSE options.

    From here on the kernel queues requests for the mount; they are answered
    once :func:`serve_requests` runs.  Raises ``RuntimeError`` if libfuse
    cannot create the session or mount (libfuse prints its reason to stderr).
    """
    pyfuse3.init(ops, mountpoint, set(options))


async def serve_requests() -> None:
    """Answer requests until the session is stopped or the kernel unmounts."""
    await pyfuse3.main()


def stop_session() -> None:
    """Make :func:`serve_requests` return soon (call from the trio thread)."""
    pyfuse3.terminate()


def end_session() -> None:
    """Unmount (if the kernel has not already) and free the session.

    libfuse detaches the mount lazily when run as root, so the call does not
    fail on a busy mount; remaining users then get ENOTCONN.
    """
    pyfuse3.close(unmount=True)
