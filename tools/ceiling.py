"""The ceiling: what a pyfuse3 + trio daemon costs when it does no work at all.

One regular file held in memory (a ``bytearray``), served by the same stack as
cowfs: pyfuse3's request loop under trio, with the FUSE mount options cowfs
uses and the file opened the way cowfs opens a volume.  ``bench.py``
measures cowfs against it: the gap between the two is cowfs's own work (pool,
journal, checksums, copy-on-write); the ceiling itself is the price of FUSE,
pyfuse3 and trio, which no pyfuse3 daemon can go below.  Run it as root::

    python -m cowfs_tools.ceiling MOUNTPOINT --size 1G

``MOUNTPOINT`` must be an existing regular file: as with qemu-storage-daemon's
FUSE export, the mount's root *is* the file, ``--size`` bytes of zeros at
first.  Nothing is ever written to disk; the data is gone once unmounted.

What is mirrored from cowfs, so that the comparison is fair:

* mount options: ``default_permissions`` (cowfs's ``fuse_options`` adds only
  its own ``fsname`` and ``subtype`` besides; the ceiling has its own, so that
  it is never taken for a cowfs mount);
* attribute and entry timeout: cowfs's ``ATTR_TIMEOUT``;
* the open reply: like ``VolumeOps.open`` for a volume, ``direct_io`` is set
  (and ``keep_cache`` not), so O_DIRECT and buffered callers take the same
  kernel paths as on a cowfs volume;
* ``fsync`` is answered (a no-op here) rather than refused with ENOSYS, which
  would make the kernel skip it from then on;
* the request loop: ``pyfuse3.main()`` with its default worker tasks,
  sleeping between requests (cowfs polls first: its ``poll_us`` option).

It serves until the file is unmounted or SIGTERM, SIGINT or SIGHUP arrives,
then unmounts and exits with status 0 (1 if the mount failed).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat
import sys
from typing import Sequence

import pyfuse3
import trio

from cowfs_daemon.fuse_ops import ATTR_TIMEOUT
from cowfs_tools.bench import parse_size

log = logging.getLogger("cowfs.ceiling")

MOUNT_OPTIONS = frozenset({"fsname=cowfs-ceiling", "subtype=ceiling", "default_permissions"})
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
BLOCK_SIZE = 4096


class CeilingOps(pyfuse3.Operations):
    """The root inode is the one regular file; its data is ``self.data``.
    Its size is fixed: a write past the end fails with EFBIG, a truncate to
    another size with EINVAL."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.data = bytearray(size)
        self.uid, self.gid = os.getuid(), os.getgid()

    def _attrs(self) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = pyfuse3.ROOT_INODE
        attrs.entry_timeout = ATTR_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        attrs.st_mode = stat.S_IFREG | 0o644
        attrs.st_nlink = 1
        attrs.st_uid, attrs.st_gid = self.uid, self.gid
        attrs.st_size = len(self.data)
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_blocks = len(self.data) // 512
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs()

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # Mode, owner and times are accepted and forgotten; the size is fixed.
        if fields.update_size and attr.st_size != len(self.data):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._attrs()

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(memoryview(self.data)[off:off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if off + len(buf) > len(self.data):
            raise pyfuse3.FUSEError(errno.EFBIG)
        self.data[off:off + len(buf)] = buf
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass


async def _stop_on_signal(signals: trio.abc.ReceiveChannel[int]) -> None:
    """End the request loop at the first stop signal."""
    async for signum in signals:
        log.info("%s received: unmounting", signal.Signals(signum).name)
        pyfuse3.terminate()
        return


async def serve(mountpoint: str, size: int) -> None:
    """Mount the file on ``mountpoint`` and answer requests until it is
    unmounted or a stop signal arrives; the mount is gone on return.
    Raises RuntimeError if libfuse cannot mount."""
    # Catch the stop signals before the mount exists, so that none can kill
    # the process between mounting and serving and leave a dead mount.
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        pyfuse3.init(CeilingOps(size), mountpoint, set(MOUNT_OPTIONS))
        try:
            log.info("serving %d bytes on %s", size, mountpoint)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, signals)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
    log.info("%s unmounted", mountpoint)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    p = argparse.ArgumentParser(prog="python -m cowfs_tools.ceiling",
                                description="in-memory pyfuse3 file: the per-request ceiling of a pyfuse3 daemon")
    p.add_argument("mountpoint", help="existing regular file to mount the in-memory file on")
    p.add_argument("--size", type=parse_size, required=True, help="size of the file (e.g. 1G)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until unmounted or stopped; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s ceiling %(levelname)s %(message)s", stream=sys.stderr)
    if not os.path.isfile(args.mountpoint):
        log.error("%s is not an existing regular file", args.mountpoint)
        return 1
    try:
        trio.run(serve, os.path.abspath(args.mountpoint), args.size)
    except RuntimeError as e:
        log.error("cannot mount on %s: %s", args.mountpoint, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
