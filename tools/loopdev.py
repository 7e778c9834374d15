"""Loop devices backed by volumes of a cowfs mount: finding, flushing, and
dropping their cache.

The kernel names each loop device's backing file in
``/sys/block/loopN/loop/backing_file`` as an absolute path (with
`` (deleted)`` appended once the file is gone).  A volume ``VOL`` of the
mount at ``MOUNT`` is the backing file ``realpath(MOUNT)/VOL``.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
from dataclasses import dataclass

# The daemon's mountinfo decoding (octal escapes); one implementation only.
from cowfs_daemon.server import unescape_mountinfo

log = logging.getLogger(__name__)

SYS_BLOCK = "/sys/block"
_DELETED = " (deleted)"
# BLKFLSBUF = _IO(0x12, 97): write back and drop a block device's buffer cache.
BLKFLSBUF = 0x1261


class LoopError(Exception):
    """A loop device could not be flushed; ``str()`` names the device, the
    volume and the cause."""


@dataclass(frozen=True)
class LoopDevice:
    """One attached loop device: ``/dev/loopN`` and the file behind it."""

    name: str            # "loop3"
    backing_file: str    # as the kernel reports it, without " (deleted)"

    @property
    def path(self) -> str:
        """The device node, ``/dev/loopN``."""
        return f"/dev/{self.name}"


def _read_backing_file(loop_dir: str) -> str | None:
    try:
        with open(os.path.join(loop_dir, "backing_file"), "rb") as f:
            raw = f.read()
    except OSError:
        # Not attached (no backing_file) or detached while we looked.
        return None
    path = os.fsdecode(raw.rstrip(b"\n"))
    if path.endswith(_DELETED):
        path = path[: -len(_DELETED)]
    return path or None


def attached_loops() -> list[LoopDevice]:
    """Every attached loop device, by name."""
    found = []
    for loop_dir in sorted(glob.glob(os.path.join(SYS_BLOCK, "loop*", "loop"))):
        backing = _read_backing_file(loop_dir)
        if backing is not None:
            found.append(LoopDevice(os.path.basename(os.path.dirname(loop_dir)), backing))
    return found


def volume_path(mount: str, volume: str) -> str:
    """The path the kernel reports as backing file for ``volume`` of ``mount``."""
    return os.path.join(os.path.realpath(mount), volume)


def loops_for(mount: str, volumes: list[str]) -> dict[str, list[LoopDevice]]:
    """The loop devices backed by each of ``volumes`` of ``mount`` (volumes
    with none are left out)."""
    wanted = {volume_path(mount, v): v for v in volumes}
    found: dict[str, list[LoopDevice]] = {}
    for loop in attached_loops():
        volume = wanted.get(loop.backing_file)
        if volume is not None:
            found.setdefault(volume, []).append(loop)
    return found


def flush(loops: dict[str, list[LoopDevice]]) -> list[LoopDevice]:
    """fsync every loop device in ``loops`` (volume -> devices): what was
    written to the device reaches the volume and the volume commits it.
    Returns the devices flushed; raises LoopError on the first failure."""
    done = []
    for volume, devices in loops.items():
        for loop in devices:
            try:
                fd = os.open(loop.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as err:
                raise LoopError(f"{loop.path} (backed by {volume}): cannot flush it: "
                                f"{err.strerror}; check the device with `losetup -l`") from err
            log.debug("flushed %s backed by %s", loop.path, volume)
            done.append(loop)
    return done


def drop_cache(loop: LoopDevice) -> bool:
    """Write back and drop ``loop``'s buffer cache (BLKFLSBUF), so reads of
    the device see the volume's current bytes.  Returns False (and logs) if
    the kernel refused."""
    try:
        fd = os.open(loop.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, BLKFLSBUF)
        finally:
            os.close(fd)
    except OSError as err:
        log.warning("%s: cannot drop its cache: %s", loop.path, err.strerror)
        return False
    return True


def loop_behind(path: str) -> LoopDevice | None:
    """The loop device holding the file system that ``path`` is on (the
    whole device if that file system sits on a partition of it), or None
    when it is not on a loop device."""
    st = os.stat(path)
    sys_dev = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for candidate in (sys_dev, os.path.dirname(sys_dev)):
        backing = _read_backing_file(os.path.join(candidate, "loop"))
        if backing is not None:
            return LoopDevice(os.path.basename(candidate), backing)
    return None


def mounted_on(loop: LoopDevice) -> list[str]:
    """Mount points of file systems on ``loop`` or one of its partitions."""
    try:
        with open(os.path.join(SYS_BLOCK, loop.name, "dev")) as f:
            whole = f.read().strip()
    except OSError:
        return []
    devices = {whole}
    for part in glob.glob(os.path.join(SYS_BLOCK, loop.name, loop.name + "p*", "dev")):
        with open(part) as f:
            devices.add(f.read().strip())
    found = []
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table:
            fields = line.split()
            if fields[2].decode() in devices:
                found.append(os.fsdecode(unescape_mountinfo(fields[4])))
    return found
