"""Datasets: the named tree roots of a pool, volumes and snapshots alike.

A *volume* is writable and lives in the mount root.  A *snapshot* is a
read-only root that belongs to a volume name (its *owner*): it stays when the
volume is deleted and follows it when it is renamed.  Both draw their ids from
one counter, so an id names exactly one dataset for the life of the pool.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from .errors import PoolError
from .format import BLOCK

NAME_MAX = 255


@dataclass
class VolumeInfo:
    """A copy of one volume's attributes (mutating it changes nothing)."""

    id: int            # stable across remounts; never reused within a pool
    name: str
    size: int          # bytes
    mode: int          # permission bits (S_IFREG is the FUSE layer's business)
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    allocated: int     # bytes of mapped blocks (st_blocks = allocated // 512)
    origin: dict | None = None   # clones: {"source": "vol[@snap]", "created": ns}


@dataclass
class SnapshotInfo:
    """A copy of one snapshot's attributes."""

    id: int
    volume: str        # owner volume name
    name: str
    size: int          # the volume's size when the snapshot was taken
    mode: int
    uid: int
    gid: int
    created_ns: int
    allocated: int     # bytes of mapped blocks


class Dataset:
    """Mutable in-memory state of a volume or snapshot (``owner`` set)."""

    __slots__ = ("id", "name", "size", "root", "mode", "uid", "gid", "atime", "mtime",
                 "ctime", "mapped", "owner", "origin", "incompressible")

    def __init__(self, vid: int, name: str, size: int, mode: int, uid: int, gid: int,
                 now: int, owner: str | None = None) -> None:
        self.id, self.name, self.size, self.root = vid, name, size, 0
        self.mode, self.uid, self.gid = mode, uid, gid
        self.atime = self.mtime = self.ctime = now
        self.mapped = 0
        self.owner = owner
        self.origin: dict | None = None
        # Writes in a row lz4 gave up on (Pool._write_blocks); memory only.
        self.incompressible = 0

    @property
    def is_snapshot(self) -> bool:
        return self.owner is not None

    @property
    def label(self) -> str:
        """How messages name it: ``vol`` or ``vol@snap``."""
        return f"{self.owner}@{self.name}" if self.owner is not None else self.name

    def info(self) -> VolumeInfo:
        return VolumeInfo(self.id, self.name, self.size, self.mode, self.uid, self.gid,
                          self.atime, self.mtime, self.ctime, self.mapped * BLOCK,
                          dict(self.origin) if self.origin else None)

    def snap_info(self) -> SnapshotInfo:
        return SnapshotInfo(self.id, self.owner or "", self.name, self.size, self.mode,
                            self.uid, self.gid, self.mtime, self.mapped * BLOCK)

    def to_json(self) -> dict:
        d = {"id": self.id, "name": self.name, "size": self.size, "root": self.root,
             "mode": self.mode, "uid": self.uid, "gid": self.gid, "atime": self.atime,
             "mtime": self.mtime, "ctime": self.ctime, "mapped": self.mapped}
        if self.owner is not None:
            d["owner"] = self.owner
        if self.origin:
            d["origin"] = self.origin
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Dataset":
        v = cls(d["id"], d["name"], d["size"], d["mode"], d["uid"], d["gid"], 0,
                d.get("owner"))
        v.root, v.atime, v.mtime, v.ctime, v.mapped = (d["root"], d["atime"], d["mtime"],
                                                        d["ctime"], d["mapped"])
        v.origin = d.get("origin")
        return v


def validate_name(name: str, what: str = "volume") -> None:
    """Refuse a name that cannot be a file in the mount root (or, for
    ``what="snapshot"``, in a snapshot directory: no '@' either)."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise PoolError(errno.EINVAL, f"invalid {what} name {name!r}")
    if "/" in name or "\0" in name:
        raise PoolError(errno.EINVAL, f"{what} name {name!r} contains '/' or NUL")
    if len(os.fsencode(name)) > NAME_MAX:
        raise PoolError(errno.ENAMETOOLONG,
                        f"{what} name {name[:32]!r}... is longer than {NAME_MAX} bytes")
    if name.startswith("."):
        raise PoolError(errno.EINVAL,
                        f"{what} name {name!r} starts with '.', which is reserved for "
                        "control directories")
    if what == "snapshot" and "@" in name:
        raise PoolError(errno.EINVAL,
                        f"snapshot name {name!r} contains '@', which separates a volume "
                        "from a snapshot")
