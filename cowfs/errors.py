"""Errors raised by the engine.

Every refusal the engine makes is a :class:`PoolError` carrying the errno a
shell user should see and a message naming the object and the cause.  The FUSE
layer turns it into ``pyfuse3.FUSEError(err.errno)`` and logs the message; the
CLI prints the message.
"""

from __future__ import annotations

import errno as _errno


class PoolError(Exception):
    """A refused or failed engine operation.

    ``errno`` is the POSIX error number that fits (ENOENT, EEXIST, EBUSY,
    EINVAL, ENOSPC, EROFS, EIO, ...); ``str(err)`` names the object and cause.
    A refusal raised before any state changed guarantees nothing changed.
    """

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err

    @property
    def errname(self) -> str:
        """Symbolic name of the errno, e.g. ``'ENOENT'``."""
        return _errno.errorcode.get(self.errno, str(self.errno))


class FormatError(PoolError):
    """The pool's on-disk structures are not something this version can serve
    (unknown format version, damaged superblock, journal or metadata)."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EIO, message)


class ChecksumError(PoolError):
    """A stored block or node did not match its checksum; reads return EIO."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EIO, message)
