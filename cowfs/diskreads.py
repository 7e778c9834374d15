"""Disk reads that do not block their caller: Linux native AIO (io_submit)
on an O_DIRECT descriptor, through ctypes.

A request thread that serves many requests starts the disk reads of several
of them with one system call and learns of their completion through an
eventfd, instead of starting each with its own call and sleeping in it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import sys

PAGE = mmap.PAGESIZE

# io_setup, io_destroy, io_getevents, io_submit; the numbers differ by
# architecture (the generic table is aarch64's).
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_PREAD = 0
_IOCB_FLAG_RESFD = 1


class _Iocb(ctypes.Structure):
    # struct iocb of <linux/aio_abi.h>, little-endian field order.
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32),
                ("rw_flags", ctypes.c_int32), ("opcode", ctypes.c_uint16),
                ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64),
                ("offset", ctypes.c_int64), ("reserved2", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
# Every argument of syscall(2) as a C long: a Python int would go as an int,
# whose upper half the kernel would read as whatever the register held.
_long = ctypes.c_long


def _check(ret: int, what: str) -> int:
    """``ret``, or OSError from errno if it is negative."""
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


class DiskReads:
    """Up to ``depth`` reads of at most ``max_bytes`` each in flight on
    ``fd`` (opened with O_DIRECT; offsets and lengths page-aligned).

    :meth:`start` queues a read in a free slot, :meth:`submit` hands every
    queued one to the kernel in one call, :meth:`reap` collects the finished
    ones; the eventfd ``notify_fd`` (the caller's, who drains it) counts
    finished reads.  Raises OSError from the constructor where the kernel
    lacks native AIO.
    """

    def __init__(self, fd: int, notify_fd: int, depth: int = 64,
                 max_bytes: int = 128 * 1024) -> None:
        calls = _SYSCALLS.get(platform.machine())
        if calls is None or sys.byteorder != "little":
            raise OSError(errno.ENOSYS, f"no native AIO here ({platform.machine()}, "
                          f"{sys.byteorder}-endian)")
        self._setup, self._destroy, self._getevents, self._submit = calls
        self.depth = depth
        self.max_bytes = max_bytes
        self._ctx = ctypes.c_ulong(0)
        _check(_syscall(_long(self._setup), _long(depth), ctypes.byref(self._ctx)), "io_setup")
        self._mem = mmap.mmap(-1, depth * max_bytes)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        self._iocbs = (_Iocb * depth)()
        for i, cb in enumerate(self._iocbs):
            cb.data = i
            cb.opcode = _IOCB_CMD_PREAD
            cb.fildes = fd
            cb.buf = base + i * max_bytes
            cb.flags = _IOCB_FLAG_RESFD
            cb.resfd = notify_fd
        self._slot_ptrs = [ctypes.pointer(cb) for cb in self._iocbs]
        self._no_wait = _Timespec()
        self._events = (_Event * depth)()
        self._free = list(range(depth - 1, -1, -1))
        self._queued: list[int] = []
        self._tags: list[object] = [None] * depth
        self.in_flight = 0

    def start(self, offset: int, length: int, tag: object) -> bool:
        """Queue a read of ``length`` bytes at ``offset``, to be reported
        with ``tag``; False if it does not fit (too long, unaligned, or no
        free slot)."""
        if not self._free or length > self.max_bytes or (offset | length) % PAGE:
            return False
        i = self._free.pop()
        cb = self._iocbs[i]
        cb.offset = offset
        cb.nbytes = length
        self._tags[i] = tag
        self._queued.append(i)
        return True

    def submit(self) -> list[object]:
        """Hand every queued read to the kernel (one system call); the tags
        of those it refused, which are dropped (the caller reads them some
        other way)."""
        queued = self._queued
        if not queued:
            return []
        self._queued = []
        arr = (ctypes.POINTER(_Iocb) * len(queued))(*[self._slot_ptrs[i] for i in queued])
        done = 0
        while done < len(queued):
            n = _syscall(_long(self._submit), self._ctx, _long(len(queued) - done),
                         ctypes.byref(arr, done * ctypes.sizeof(ctypes.c_void_p)))
            if n <= 0:
                break
            done += n
        self.in_flight += done
        refused = []
        for i in queued[done:]:
            refused.append(self._release(i))
        return refused

    def reap(self) -> list[tuple[object, bytes | None]]:
        """The reads finished since the last call, as ``(tag, data)``; a
        short read is padded with zeros, a failed one gives None (the caller
        reads it some other way, to get the error there)."""
        out: list[tuple[object, bytes | None]] = []
        while self.in_flight:
            n = _syscall(_long(self._getevents), self._ctx, _long(0), _long(self.depth),
                         self._events, ctypes.byref(self._no_wait))
            if n <= 0:
                break
            self.in_flight -= n
            for ev in self._events[:n]:
                i = ev.data
                res = ev.res
                length = self._iocbs[i].nbytes
                tag = self._release(i)
                if res < 0:
                    out.append((tag, None))
                else:
                    at = i * self.max_bytes
                    out.append((tag, self._mem[at:at + res] + bytes(length - res)))
        return out

    def _release(self, i: int) -> object:
        tag = self._tags[i]
        self._tags[i] = None
        self._free.append(i)
        return tag

    def close(self) -> None:
        """Wait for the reads in flight, then free everything."""
        _syscall(_long(self._destroy), self._ctx)   # waits for reads in flight
        self._mem.close()
