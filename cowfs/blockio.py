"""The one narrow interface through which the engine touches pool files.

Everything the engine reads, writes, syncs or allocates in the pool directory
goes through a :class:`Storage` and the :class:`PoolFile` objects it opens.
Two implementations live here:

* :class:`OsStorage` -- the real thing, ``os.pread``/``os.pwrite`` on files in
  a directory, ``fdatasync`` for durability, ``posix_fallocate`` to reserve
  space so that ENOSPC surfaces when space is reserved, not in the middle of a
  metadata commit.
* :class:`SimStorage` -- an in-memory pool used by the crash simulator.  It
  records every write and sync in order and can build the pool as a power cut
  would leave it after any prefix of that history (:meth:`SimStorage.crash`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .errors import PoolError
from ._oneblock import page_cached, read_buffer
from .aio import DiskReads, PageWrites

PAGE = 4096  # granularity at which a power cut may keep or lose unsynced bytes
# Writes of at least this many bytes (whole pages at a page offset) go to the
# disk with O_DIRECT instead of through the host page cache (OsFile.pwrite).
DIRECT_WRITE_MIN = 256 * 1024
# Smaller page-aligned writes that follow one another in the file are gathered
# into one write of up to this many bytes (OsFile.pwrite).
STAGE_BYTES = DIRECT_WRITE_MIN
# A run of small writes this short, when it ends, has its pages gathered with
# pages written on their own (OsFile) rather than written through the page
# cache.
GATHER_RUN_MAX = 16 * PAGE
# O_DIRECT writes are made from this many page-aligned buffers of this size by
# a thread of their own (OsFile); a larger write takes several in turn.
WRITE_BUFFERS = 4
WRITE_BUFFER_BYTES = 1 << 20

log = logging.getLogger(__name__)


class PoolFile(Protocol):
    """An open pool file.  Offsets and lengths are in bytes."""

    name: str

    def pread(self, length: int, offset: int, poll: float = 0.0) -> bytes | bytearray:
        """Return exactly ``length`` bytes; bytes past the end read as zeros.
        With ``poll`` (seconds), where the system can: if the bytes are not
        all in the host's page cache, start their disk read and ask the
        cache again and again for up to that long, awake, before sleeping
        in a blocking read.  (A read past the end never finds them all
        there: it asks for the whole time.)"""

    def pread_cached(self, length: int, offset: int) -> bytes | bytearray | None:
        """What :meth:`pread` returns, if every byte of it is in the host's
        page cache now (read without waiting for the disk); otherwise None,
        and on Linux the disk read has started (with :meth:`async_reads` on:
        is queued, or was already)."""

    def async_reads(self, notify_fd: int) -> bool:
        """Make :meth:`pread_cached` start a read it misses without starting
        the disk's work (:meth:`submit_reads` does that, for every read
        started since, at once); the eventfd ``notify_fd`` (the caller's)
        counts the finished ones (see :meth:`reap_reads`).  False where the
        system cannot (no native AIO, cachestat or O_DIRECT), and then
        nothing changes."""

    def started_read(self) -> object:
        """A token of the read the last :meth:`pread_cached` that answered
        None started (or found started)."""

    def unsent_reads(self) -> int:
        """How many reads :meth:`pread_cached` started that
        :meth:`submit_reads` has not yet handed to the disk."""

    def submit_reads(self) -> list[object]:
        """Hand the reads :meth:`pread_cached` started to the disk; the
        tokens of those the system refused (asking again reads them)."""

    def reap_reads(self) -> list[object]:
        """Collect the finished reads, so that :meth:`pread_cached` answers
        them; their tokens."""

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset`` or raise ``OSError``."""

    def sync(self) -> None:
        """Make every completed write to this file durable (fdatasync)."""

    def start_writeback(self) -> None:
        """Ask the system to start writing this file's dirty data out now,
        without waiting for it: a hint that keeps the next :meth:`sync`
        short.  Promises nothing about durability."""

    def size(self) -> int:
        """Current length of the file."""

    def allocate(self, size: int) -> None:
        """Grow the file to at least ``size`` bytes with the space reserved on
        the file system underneath; raise ``OSError(ENOSPC)`` if it is full."""

    def close(self) -> None:
        """Release the file handle."""


class Storage(Protocol):
    """A pool directory: a flat set of named files."""

    def open(self, name: str, create: bool = False) -> PoolFile:
        """Open file ``name``; with ``create`` make it if missing."""

    def exists(self, name: str) -> bool:
        """Whether file ``name`` exists."""

    def names(self) -> list[str]:
        """Names of every entry in the pool directory."""

    def sync_dir(self) -> None:
        """Make file creations durable (fsync of the directory)."""

    def space(self) -> tuple[int, int]:
        """``(total, available)`` bytes of the file system under the pool."""

    def lock(self) -> None:
        """Take the pool's exclusive lock or raise PoolError(EBUSY)."""

    def unlock(self) -> None:
        """Drop the lock taken by :meth:`lock`."""

    @property
    def label(self) -> str:
        """Human name of the pool for messages (its directory path)."""


# ----------------------------------------------------------------------------
# Real files


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range(2), or None where it is not available."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class _WritebackThread:
    """Asks the kernel, from a thread of its own, to start writing a file's
    dirty pages out (sync_file_range with SYNC_FILE_RANGE_WRITE).

    The kernel does that work in the context of whoever asks: about 8 ms per
    16 MiB of random 4 KiB writes, during which the asking thread (the
    daemon's only request thread) served nothing.  Asked here, requests go on
    meanwhile: random 4 KiB writes at queue depth 16 ran 9-12% faster.
    Requests that arrive while one runs fold into one more run.
    """

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"writeback {name}",
                                        daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Start writeback soon; returns at once."""
        self._wake.set()

    def stop(self) -> None:
        """Let a running request finish, then end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        assert _sync_file_range is not None
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            # A hint: an error only means the next fdatasync has more to do.
            _sync_file_range(self._fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


class _Job:
    """One write handed to a :class:`_DirectWriter`: ``length`` bytes of
    ``buf`` (page-aligned memory) at file offset ``offset``; or, if
    ``pages`` is given, pages bound for scattered offsets: ``pages`` maps
    each one's file offset to where it is in ``buf``, and ``length`` is how
    much of ``buf`` has been filled."""

    __slots__ = ("buf", "length", "offset", "pages", "done", "error")

    def __init__(self, buf: mmap.mmap, length: int, offset: int,
                 pages: dict[int, int] | None = None) -> None:
        self.buf = buf
        self.length = length
        self.offset = offset
        self.pages = pages
        self.done = False
        self.error: OSError | None = None

    def over(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """What this write holds of ``[start, end)``: ``(place in buf, file
        offset, length)`` of the run, or of each page, over any of it."""
        pages = self.pages
        if pages is None:
            if start < self.offset + self.length and end > self.offset:
                return [(0, self.offset, self.length)]
            return []
        first = start - start % PAGE
        if (end - first) // PAGE <= len(pages):
            return [(pages[o], o, PAGE) for o in range(first, end, PAGE) if o in pages]
        return [(at, o, PAGE) for o, at in pages.items() if start < o + PAGE and o < end]


def _pwrite_all(fd: int, view: memoryview, offset: int, name: str) -> None:
    """pwrite all of ``view`` at ``offset``, resuming after short writes."""
    n = len(view)
    done = 0
    while done < n:
        more = os.pwrite(fd, view[done:], offset + done)
        if more == 0:
            raise OSError(errno.EIO, f"short write to {name}")
        done += more


class _DirectWriter:
    """A thread that carries out :class:`_Job` writes on an O_DIRECT
    descriptor, one at a time, in the order they were handed over.

    It touches nothing but the job it is writing: the job's owner reads
    ``done`` and ``error`` after :meth:`wait`.  With the disk write off the
    request thread, the daemon receives and maps the next large write while
    the disk takes this one (a 1 MiB O_DIRECT write took 256 us at queue
    depth 1 on the development VM's disk, and the request thread waited for
    every one).
    """

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self._name = name
        # Set by the owner before it hands over a job with pages.
        self.page_writes: PageWrites | None = None
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._finished = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"direct writes {name}",
                                        daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        """Queue ``job``; returns at once."""
        self._queue.put(job)

    def wait(self, job: _Job) -> None:
        """Return once ``job`` is written or has failed."""
        with self._finished:
            while not job.done:
                self._finished.wait()

    def stop(self) -> None:
        """Finish the queued jobs, then end the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if job.pages is not None:
                    assert self.page_writes is not None
                    self.page_writes.write(job.buf, job.pages)
                else:
                    with memoryview(job.buf) as whole, whole[:job.length] as view:
                        _pwrite_all(self._fd, view, job.offset, self._name)
            except OSError as e:
                # Without its traceback, whose frames would keep views of
                # the buffer alive.
                job.error = e.with_traceback(None)
            with self._finished:
                job.done = True
                self._finished.notify_all()


class _Started:
    """A read :meth:`OsFile.pread_cached` started without waiting (of the
    pages around the ``length`` bytes wanted): ``done`` once it finished
    (or was refused), then the bytes wanted in ``data`` (None if it failed
    or was refused: read them again, synchronously)."""

    __slots__ = ("done", "data", "skip", "length")

    def __init__(self, length: int) -> None:
        self.done = False
        self.data: bytes | None = None
        self.skip = 0             # bytes read before the wanted ones
        self.length = length


class OsFile:
    """A pool file backed by an OS file descriptor.

    Large page-aligned writes (``DIRECT_WRITE_MIN`` bytes or more: sequential
    volume writes) bypass the host page cache through a second, O_DIRECT
    descriptor: copying them into cache pages cost the daemon more CPU than
    everything else on that path (half its time filling a volume with 1 MiB
    writes), and a cold cache made the fill run at 330 MiB/s on a disk that
    takes 2.7 GiB/s.  The kernel keeps the two descriptors coherent (a direct
    write flushes and drops cached pages of its range).  Where the file
    system refuses O_DIRECT (EINVAL), writes stay buffered.

    Those writes are copied, ``WRITE_BUFFER_BYTES`` at a time, into one of
    ``WRITE_BUFFERS`` page-aligned buffers each (O_DIRECT needs aligned
    memory, so the copy was made anyway) and
    written by a thread of the file's own (:class:`_DirectWriter`): pwrite
    returns once the copy is made.  Smaller page-aligned writes are staged:
    each that starts where the previous one ended is copied into one buffer,
    which goes the same way once ``STAGE_BYTES`` are in it.  The engine
    allocates fresh units in order, so random 4 KiB volume writes into free
    space land one after the other: one disk write per 64 of them instead of
    a page-cache write each and its writeback.

    A page written on its own (random writes into reused space, which lies
    scattered) is gathered with others into one more buffer, bound for
    their own places, and written by that thread with one system call for
    all (:class:`PageWrites`, Linux native AIO) once the buffer is full.
    Through the page cache, each had cost the request thread a buffered
    pwrite and the writeback thread its share of sync_file_range: random
    4 KiB writes at depth 16 over a filled volume went from 21.4-22.9k to
    23.5-24.0k IOPS, the request thread from 42-45 to 39 us a write.  A
    newer write over a gathered page replaces it there.  Where native AIO
    is missing, such pages go through the page cache as before.

    What that costs the contract, nothing: every read returns the newest
    bytes (from a buffer that holds all of them, else after the buffers are
    written); any other write waits for the buffered writes it overlaps;
    :meth:`sync` writes and waits for all, then fdatasyncs, so what it
    returns after is durable as before.  A buffered write that failed is
    tried again, synchronously, by the next call that needs it written; if
    that fails too the error is raised there (a write, a read of it, the
    sync) and the write stays buffered for the next try.
    """

    def __init__(self, path: str, name: str, create: bool) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        self.fd = os.open(path, flags, 0o600)
        self.path = path
        self.name = name
        self._direct_fd = -1          # opened at the first large write
        self._direct_ok = True        # False once the file system refused O_DIRECT
        self._writer: _DirectWriter | None = None   # started at the first buffered write
        self._jobs: list[_Job] = []   # buffered writes not yet known written, oldest first
        self._spare: list[mmap.mmap] = []            # buffers free for the next one
        self._buffers = 0             # buffers made (at most WRITE_BUFFERS)
        self._stage: mmap.mmap | None = None        # small writes gathered (class doc)
        self._stage_at = 0            # file offset of the stage's first byte
        self._staged = 0              # bytes staged, 0 when nothing is
        self._small_end = -1          # where the last small write ended
        self._gathering: _Job | None = None   # lone pages gathered (class doc)
        self._page_writes: PageWrites | None = None   # made at the first lone page
        self._gather_ok = True       # False where PageWrites cannot be made
        self._writeback: _WritebackThread | None = None   # started at the first hint
        self._nowait_ok = True        # False once the kernel refused RWF_NOWAIT reads
        self._reads: DiskReads | None = None   # reads that do not wait (async_reads)
        # Reads started there, by (offset, length) (see _pread_async).
        self._started: dict[tuple[int, int], _Started] = {}
        self._last_started: _Started | None = None

    # -- reads -------------------------------------------------------------

    def pread(self, length: int, offset: int, poll: float = 0.0) -> bytes | bytearray:
        if self._staged or self._jobs or self._gathering is not None:
            held = self._held(length, offset)
            if held is not None:
                return held
        if poll > 0 and self._nowait_ok:
            polled = self._poll_cache(length, offset, time.monotonic() + poll)
            if polled is not None:
                return polled
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            # Short read: either EOF (pad with zeros) or an interrupted read.
            while len(data) < length:
                more = os.pread(self.fd, length - len(data), offset + len(data))
                if not more:
                    return data + bytes(length - len(data))
                data += more
        return data

    def pread_cached(self, length: int, offset: int) -> bytes | bytearray | None:
        if ((self._staged or self._jobs or self._gathering is not None)
                and self._overlapped(offset, offset + length)):
            return self.pread(length, offset)
        if self._reads is not None:
            return self._pread_async(length, offset)
        # preadv2(RWF_NOWAIT) answers EAGAIN instead of waiting for the disk,
        # and has started the disk read (Linux 6.18 here: 199 of 199 refused
        # 4 KiB reads were cached 2 ms later).  A kernel that did not start it
        # costs only the overlap: the caller's blocking pread reads it then.
        if not self._nowait_ok:
            return self.pread(length, offset)
        buf = read_buffer(length)         # returned only if the read fills it
        n = self._read_nowait(buf, offset)
        if n is None:
            return self.pread(length, offset)
        # Not all cached (or past the end, which pread pads): None.
        return buf if n == length else None

    def _read_nowait(self, buf: bytearray, offset: int) -> int | None:
        """preadv2(RWF_NOWAIT) into ``buf``: the bytes read (-1 if none were
        cached), or None where the kernel refuses such reads (then
        ``_nowait_ok`` is False from now on)."""
        try:
            return os.preadv(self.fd, (buf,), offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return -1
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.info("%s: no reads without waiting here (%s); reads wait for the disk",
                     self.name, e.strerror)
            self._nowait_ok = False
            return None

    def _poll_cache(self, length: int, offset: int, until: float) -> bytearray | None:
        """Read ``length`` bytes at ``offset`` from the page cache, asking
        again until they are all there or ``until`` (monotonic) has passed:
        None then.  The first ask that misses starts the disk read (as in
        :meth:`pread_cached`); the thread stays awake meanwhile, where a
        blocking read would sleep and be woken: on this project's VM, cold
        4 KiB reads one at a time went from 6.4-6.7k to 8.1-8.8k IOPS (three
        pairs), the daemon's CPU a read about the same."""
        buf = read_buffer(length)
        while True:
            n = self._read_nowait(buf, offset)
            if n == length:
                return buf
            if n is None or time.monotonic() >= until:
                return None

    def async_reads(self, notify_fd: int) -> bool:
        if self._reads is None and self._open_direct():
            try:
                page_cached(self.fd, 0, PAGE)     # OSError without cachestat
                self._reads = DiskReads(self._direct_fd, notify_fd)
            except OSError as e:
                log.info("%s: no reads that do not wait here (%s)", self.name, e.strerror)
        return self._reads is not None

    def _pread_async(self, length: int, offset: int) -> bytes | bytearray | None:
        assert self._reads is not None
        key = (offset, length)
        started = self._started.get(key)
        if started is not None:
            if not started.done:
                self._last_started = started
                return None
            del self._started[key]
            if started.data is not None:
                return started.data
            return self.pread(length, offset)     # failed or refused: its error here
        if page_cached(self.fd, offset, length):
            return self.pread(length, offset)
        started = _Started(length)
        # O_DIRECT reads whole pages: a compressed block is cut out after.
        first = offset - offset % PAGE
        end = -(-(offset + length) // PAGE) * PAGE
        started.skip = offset - first
        if not self._reads.start(first, end - first, started):
            return self.pread(length, offset)
        if len(self._started) >= 4 * self._reads.depth:
            # Answers nobody came back for (a request given up): forget them.
            for k in [k for k, v in self._started.items() if v.done]:
                del self._started[k]
        self._started[key] = self._last_started = started
        return None

    def started_read(self) -> object:
        return self._last_started

    def unsent_reads(self) -> int:
        return self._reads.queued if self._reads is not None else 0

    def submit_reads(self) -> list[object]:
        if self._reads is None:
            return []
        refused = self._reads.submit()
        for started in refused:
            assert isinstance(started, _Started)
            started.done = True       # data None: read when asked again
        return refused

    def reap_reads(self) -> list[object]:
        if self._reads is None:
            return []
        finished = self._reads.reap()
        for started, data in finished:
            assert isinstance(started, _Started)
            if data is not None and (started.skip or len(data) != started.length):
                data = data[started.skip:started.skip + started.length]
            started.data = data
            started.done = True
        return [started for started, _ in finished]

    def _forget_reads(self, start: int, end: int) -> None:
        """Drop started reads of any byte of ``[start, end)`` (being written)."""
        for key in [k for k in self._started if k[0] < end and start < k[0] + k[1]]:
            del self._started[key]

    def _holders(self, start: int, end: int) -> list[tuple[mmap.mmap, int, int, int]]:
        """Every buffered write over any byte of ``[start, end)`` as
        ``(buffer, place in it, file offset, length)``: the stage and the
        gathered lone pages first, then the handed-over writes, oldest
        first."""
        holders = []
        if self._staged and start < self._stage_at + self._staged and end > self._stage_at:
            assert self._stage is not None
            holders.append((self._stage, 0, self._stage_at, self._staged))
        for j in [self._gathering, *self._jobs] if self._gathering else self._jobs:
            holders += [(j.buf, *piece) for piece in j.over(start, end)]
        return holders

    def _settle_over(self, start: int, end: int) -> None:
        """Wait for the handed-over writes up to the newest one over any
        byte of ``[start, end)`` (a write made now over them lands after
        them).  Not for all: a batch of gathered pages takes milliseconds,
        and random writes waited for the batch in flight over and over."""
        last = 0
        for i, j in enumerate(self._jobs, 1):
            if j.over(start, end):
                last = i
        if last:
            self._settle(last)

    def _overlapped(self, start: int, end: int) -> bool:
        """Whether a buffered write (staged, gathered or handed over) covers
        any byte of ``[start, end)``."""
        return bool(self._holders(start, end))

    def _held(self, length: int, offset: int) -> bytes | None:
        """The ``length`` bytes at ``offset`` if the newest buffered write
        over them holds all of them and no other buffered write touches them;
        None otherwise, with every buffered write over them in the file."""
        end = offset + length
        holders = self._holders(offset, end)
        if not holders:
            return None
        if len(holders) == 1:
            buf, place, at, n = holders[0]
            if at <= offset and end <= at + n:
                return buf[place + offset - at:place + end - at]
        self.flush_stage()
        self._send_gathered()
        self._settle_over(offset, end)
        return None

    # -- writes ------------------------------------------------------------

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        n = len(data)
        if self._started:
            self._forget_reads(offset, offset + n)
        small = n < STAGE_BYTES and not (offset | n) % PAGE
        if self._staged:
            if small and offset == self._stage_at + self._staged and self._staged + n <= STAGE_BYTES:
                if self._gathering is not None and self._gathering.pages:
                    self._drop_gathered(offset, n)
                self._stage[self._staged:self._staged + n] = data   # type: ignore[index]
                self._staged += n
                return
            # The last small write ended where the stage ends: a run that
            # filled its stage goes on in a new one.  (Without this the
            # write after each full stage went through the page cache: one
            # in 65 random writes into fresh space.)
            self._small_end = self._stage_at + self._staged
            self.flush_stage()
        # After the stage is on its way: a short one may have been gathered.
        if self._gathering is not None and self._gathering.pages:
            self._drop_gathered(offset, n)
        if small:
            follows = offset == self._small_end
            self._small_end = offset + n
            if follows:
                # The second of a run of writes one after the other: stage.
                if self._stage is None:
                    self._stage = self._buffer()
                self._stage[:n] = data
                self._stage_at = offset
                self._staged = n
                return
            if n == PAGE and self._can_gather():
                self._gather(data, offset)
                return
        elif not (offset | n) % PAGE and self._open_direct():
            view = memoryview(data).cast("B")
            for at in range(0, n, WRITE_BUFFER_BYTES):
                part = view[at:at + WRITE_BUFFER_BYTES]
                buf = self._buffer()
                buf[:len(part)] = part
                self._hand_over(_Job(buf, len(part), offset + at))
            return
        if self._jobs:
            self._settle_over(offset, offset + n)   # the newest lands last
        self._write_out(data, offset)

    def _can_gather(self) -> bool:
        """Whether pages written on their own can be gathered (class doc);
        where O_DIRECT or native AIO is missing they go through the page
        cache."""
        if self._page_writes is None:
            if not self._gather_ok or not self._open_direct():
                return False
            try:
                self._page_writes = PageWrites(self._direct_fd, PAGE)
            except OSError as e:
                log.info("%s: lone page writes go through the page cache (%s)",
                         self.name, e.strerror)
                self._gather_ok = False
                return False
        return True

    def _gather(self, data: bytes | memoryview, offset: int) -> None:
        """Gather the page ``data``, bound for ``offset``, with others (see
        :meth:`_can_gather`); a full buffer of them goes to the writer."""
        job = self._gathering
        if job is None:
            job = self._gathering = _Job(self._buffer(), 0, 0, {})
        assert job.pages is not None
        at = job.length
        job.buf[at:at + PAGE] = data
        job.pages[offset] = at
        job.length = at + PAGE
        if job.length == WRITE_BUFFER_BYTES:
            self._send_gathered()

    def _drop_gathered(self, offset: int, n: int) -> None:
        """Before a write of ``n`` bytes at ``offset``: drop the gathered
        pages it covers whole (it replaces them), or, if it covers one in
        part, send them on their way first (it must land after them)."""
        assert self._gathering is not None and self._gathering.pages is not None
        pages = self._gathering.pages
        if n == PAGE and not offset % PAGE:
            pages.pop(offset, None)     # the common case, kept short
            return
        over = self._gathering.over(offset, offset + n)
        if not over:
            return
        if (offset | n) % PAGE:
            self._send_gathered()
            return
        for _, o, _ in over:
            del pages[o]

    def _send_gathered(self) -> None:
        """Hand the gathered lone pages to the writer thread."""
        job = self._gathering
        if job is None:
            return
        self._gathering = None
        if job.pages:
            self._hand_over(job)
        else:
            self._spare.append(job.buf)

    def flush_stage(self) -> None:
        """Send the staged bytes on their way to the file: handed to the
        writer thread if there are enough for O_DIRECT, gathered with lone
        pages if they are few (GATHER_RUN_MAX), else written now through the
        page cache.  On failure they stay staged."""
        if not self._staged:
            return
        assert self._stage is not None
        if self._staged >= DIRECT_WRITE_MIN and self._open_direct():
            self._hand_over(_Job(self._stage, self._staged, self._stage_at))
            self._stage = None
        elif self._staged <= GATHER_RUN_MAX and self._can_gather():
            # A short run (a few units free side by side in reused space):
            # its pages are gathered like lone ones.
            with memoryview(self._stage) as whole:
                for at in range(0, self._staged, PAGE):
                    with whole[at:at + PAGE] as page:
                        self._gather(page, self._stage_at + at)
        else:
            if self._jobs:
                self._settle_over(self._stage_at, self._stage_at + self._staged)
            with memoryview(self._stage) as whole, whole[:self._staged] as view:
                self._write_out(view, self._stage_at)
        self._staged = 0

    def _open_direct(self) -> bool:
        """Whether O_DIRECT writes can be made (the descriptor opened)."""
        if self._direct_fd < 0 and self._direct_ok:
            try:
                self._direct_fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._no_direct(e)
        return self._direct_ok

    def _no_direct(self, e: OSError) -> None:
        log.info("%s: the file system refuses O_DIRECT (%s); writing through the page "
                 "cache", self.path, e.strerror)
        self._direct_ok = False

    def _buffer(self) -> mmap.mmap:
        """A free page-aligned buffer of WRITE_BUFFER_BYTES (anonymous mmap
        memory is page-aligned), waiting for the oldest handed-over write
        when all are in use."""
        if self._spare:
            return self._spare.pop()
        if self._buffers < WRITE_BUFFERS:
            self._buffers += 1
            return mmap.mmap(-1, WRITE_BUFFER_BYTES)
        self._settle(1)
        return self._spare.pop()

    def _hand_over(self, job: _Job) -> None:
        if self._writer is None:
            self._writer = _DirectWriter(self._direct_fd, self.name)
        if job.pages is not None:
            self._writer.page_writes = self._page_writes
        # Writes finished meanwhile give their buffers back now: fewer for
        # every read and write to look through.
        jobs = self._jobs
        while jobs and jobs[0].done and jobs[0].error is None:
            self._spare.append(jobs.pop(0).buf)
        jobs.append(job)
        self._writer.submit(job)

    def _settle(self, count: int | None = None) -> None:
        """Wait for the oldest ``count`` handed-over writes (all by default)
        and free their buffers; a failed one is written again here, and if
        that fails too, raised (it stays first in line)."""
        todo = len(self._jobs) if count is None else count
        while todo and self._jobs:
            job = self._jobs[0]
            assert self._writer is not None
            self._writer.wait(job)
            if job.error is not None:
                self._write_again()
            self._jobs.pop(0)
            self._spare.append(job.buf)
            todo -= 1

    def _write_again(self) -> None:
        """The oldest handed-over write failed: once the writer is done with
        the later ones, write it and every later one again, in order, here
        (a later one may overlap it and must land after it)."""
        assert self._writer is not None
        for job in self._jobs:
            self._writer.wait(job)
        first = self._jobs[0]
        what = (f"{len(first.pages)} gathered pages" if first.pages is not None
                else f"{first.length} bytes at {first.offset}")
        log.warning("%s: a write of %s failed (%s); writing it again",
                    self.name, what, first.error)
        for job in self._jobs:
            with memoryview(job.buf) as whole:
                if job.pages is not None:
                    for o, at in job.pages.items():
                        with whole[at:at + PAGE] as view:
                            self._write_out(view, o)
                else:
                    with whole[:job.length] as view:
                        self._write_out(view, job.offset)

    def _write_out(self, data: bytes | memoryview, offset: int) -> None:
        """Write ``data`` to the file now, in this thread: large page-aligned
        writes with O_DIRECT, others through the page cache.  Large aligned
        writes only come here from a buffer (page-aligned memory, as O_DIRECT
        needs): pwrite hands every other one over."""
        n = len(data)
        if n >= DIRECT_WRITE_MIN and not (offset | n) % PAGE and self._open_direct():
            try:
                with memoryview(data) as view:
                    _pwrite_all(self._direct_fd, view, offset, self.name)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._no_direct(e)
        done = os.pwrite(self.fd, data, offset)
        if done < n:
            with memoryview(data) as view:
                _pwrite_all(self.fd, view[done:], offset + done, self.name)

    # -- the rest of the interface -----------------------------------------

    def sync(self) -> None:
        self.flush_stage()
        self._send_gathered()
        self._settle()
        os.fdatasync(self.fd)

    def start_writeback(self) -> None:
        # Best effort: where libc lacks sync_file_range, the next fdatasync
        # simply has more to do.
        if _sync_file_range is None or self.fd < 0:
            return
        if self._writeback is None:
            self._writeback = _WritebackThread(self.fd, self.name)
        self._writeback.request()

    def size(self) -> int:
        self.flush_stage()      # buffered bytes may end past the file's end
        self._settle()
        return os.fstat(self.fd).st_size

    def allocate(self, size: int) -> None:
        cur = self.size()
        if size > cur:
            os.posix_fallocate(self.fd, cur, size - cur)

    def close(self) -> None:
        if self.fd >= 0 and (self._staged or self._jobs or self._gathering is not None):
            # Not durable either way: a pool closes after its last sync, so
            # only one that gave its unsynced changes up gets here.
            try:
                self.flush_stage()
                self._send_gathered()
                self._settle()
            except OSError as e:
                log.warning("%s: buffered writes dropped at close (%s)", self.name, e)
        if self._reads is not None:
            self._reads.close()           # waits for the reads in flight
            self._reads = None
            self._started.clear()
        for thread in (self._writer, self._writeback):
            # Before the descriptors go: their numbers may be reused at once.
            if thread is not None:
                thread.stop()
        self._writer = self._writeback = None
        if self._page_writes is not None:
            self._page_writes.close()
            self._page_writes = None
        for fd in (self.fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self._direct_fd = -1
        gathering = [self._gathering.buf] if self._gathering is not None else []
        for buf in [self._stage, *gathering, *self._spare, *(j.buf for j in self._jobs)]:
            try:
                if buf is not None:
                    buf.close()
            except BufferError:
                pass    # a view of it lives on (in a traceback): freed with it
        self._stage = self._gathering = None
        self._spare, self._jobs, self._staged = [], [], 0


class OsStorage:
    """The pool directory on the host file system."""

    LOCK_NAME = "lock"

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._lock_fd = -1

    @property
    def label(self) -> str:
        return self.path

    def open(self, name: str, create: bool = False) -> OsFile:
        return OsFile(os.path.join(self.path, name), name, create)

    def exists(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.path, name))

    def names(self) -> list[str]:
        return sorted(os.listdir(self.path))

    def sync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def space(self) -> tuple[int, int]:
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def lock(self) -> None:
        path = os.path.join(self.path, self.LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PoolError(
                errno.EBUSY,
                f"pool {self.path} is already in use (mounted by process {holder}); "
                "unmount it first",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


# ----------------------------------------------------------------------------
# Crash simulator


@dataclass
class _SimFileState:
    data: bytearray = field(default_factory=bytearray)


class SimFile:
    """An in-memory pool file whose every write and sync is logged."""

    def __init__(self, storage: "SimStorage", name: str) -> None:
        self._st = storage
        self.name = name

    @property
    def _data(self) -> bytearray:
        return self._st.files[self.name].data

    def pread(self, length: int, offset: int, poll: float = 0.0) -> bytes:
        # Memory answers at once: nothing to poll for.
        self._st.hook("read", self.name, offset, length)
        chunk = bytes(self._data[offset : offset + length])
        return chunk + bytes(length - len(chunk))

    def pread_cached(self, length: int, offset: int) -> bytes | None:
        # Memory is all page cache, unless a test says otherwise.
        if self._st.uncached:
            self._st.uncached -= 1
            return None
        return self.pread(length, offset)

    def async_reads(self, notify_fd: int) -> bool:
        return False

    def started_read(self) -> object:
        return None

    def unsent_reads(self) -> int:
        return 0

    def submit_reads(self) -> list[object]:
        return []

    def reap_reads(self) -> list[object]:
        return []

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        data = bytes(data)
        self._st.hook("write", self.name, offset, len(data))
        buf = self._data
        end = offset + len(data)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[offset:end] = data
        self._st.log.append(("write", self.name, offset, data))

    def sync(self) -> None:
        self._st.hook("sync", self.name, 0, 0)
        self._st.log.append(("sync", self.name, 0, b""))

    def start_writeback(self) -> None:
        # A hint only: in the simulator, as on a real disk, it makes nothing
        # durable, so a crash may still lose every write since the last sync.
        pass

    def size(self) -> int:
        return len(self._data)

    def allocate(self, size: int) -> None:
        self._st.hook("allocate", self.name, 0, size)
        buf = self._data
        if size > self._st.capacity_left() + len(buf):
            raise OSError(errno.ENOSPC, f"no space to grow {self.name}")
        if size > len(buf):
            buf.extend(bytes(size - len(buf)))
            # Space reservation is treated as durable at once, like a
            # journaled metadata change of the host file system.
            self._st.log.append(("allocate", self.name, size, b""))

    def close(self) -> None:
        pass


class SimStorage:
    """An in-memory pool directory for crash and fault tests.

    ``log`` holds every mutating event in order: ``("write", name, offset,
    data)``, ``("sync", name, 0, b"")`` and ``("allocate", name, size, b"")``.
    ``hook`` (if set) is called before every I/O as ``hook(op, name, offset,
    length)`` and may raise ``OSError`` to inject a fault.  ``capacity`` bounds
    the total bytes of all files, to simulate a full file system.
    """

    def __init__(self, capacity: int = 1 << 40, label: str = "sim-pool") -> None:
        self.files: dict[str, _SimFileState] = {}
        self.log: list[tuple[str, str, int, bytes]] = []
        self.capacity = capacity
        self._label = label
        self._locked = False
        self.fault: Callable[[str, str, int, int], None] | None = None
        # How many of the next pread_cached calls answer "not cached".
        self.uncached = 0

    @property
    def label(self) -> str:
        return self._label

    def hook(self, op: str, name: str, offset: int, length: int) -> None:
        if self.fault is not None:
            self.fault(op, name, offset, length)

    def used(self) -> int:
        return sum(len(f.data) for f in self.files.values())

    def capacity_left(self) -> int:
        return max(0, self.capacity - self.used())

    def open(self, name: str, create: bool = False) -> SimFile:
        if name not in self.files:
            if not create:
                raise FileNotFoundError(errno.ENOENT, f"no file {name}")
            self.files[name] = _SimFileState()
            self.log.append(("create", name, 0, b""))
        return SimFile(self, name)

    def exists(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return sorted(self.files)

    def sync_dir(self) -> None:
        pass

    def space(self) -> tuple[int, int]:
        return self.capacity, self.capacity_left()

    def lock(self) -> None:
        if self._locked:
            raise PoolError(errno.EBUSY, f"pool {self.label} is already in use")
        self._locked = True

    def unlock(self) -> None:
        self._locked = False

    # -- power cuts ---------------------------------------------------------

    def crash(self, point: int, mode: str = "lose", rng: random.Random | None = None) -> "SimStorage":
        """Build the pool as a power cut after ``log[:point]`` would leave it.

        Writes followed (before ``point``) by a sync of the same file are kept.
        Unsynced writes are all lost (``mode="lose"``), all kept in order
        (``"keep"``), or (``"random"``) each 4 KiB-aligned piece of each is
        kept or lost at random and the kept pieces land in a random order.
        """
        rng = rng or random.Random(point)
        events = self.log[:point]
        last_sync: dict[str, int] = {}
        for i, (op, name, _, _) in enumerate(events):
            if op == "sync":
                last_sync[name] = i
        out = SimStorage(self.capacity, self._label)
        pending: list[tuple[str, int, bytes]] = []
        for i, (op, name, offset, data) in enumerate(events):
            if op == "create":
                out.files.setdefault(name, _SimFileState())
            elif op == "allocate":
                buf = out.files[name].data
                if offset > len(buf):
                    buf.extend(bytes(offset - len(buf)))
            elif op == "write":
                if i < last_sync.get(name, -1):
                    _apply(out.files[name].data, offset, data)
                else:
                    pending.append((name, offset, data))
        if mode == "keep":
            for name, offset, data in pending:
                _apply(out.files[name].data, offset, data)
        elif mode == "random":
            pieces: list[tuple[str, int, bytes]] = []
            for name, offset, data in pending:
                pos = offset
                end = offset + len(data)
                while pos < end:
                    cut = min(end, (pos // PAGE + 1) * PAGE)
                    pieces.append((name, pos, data[pos - offset : cut - offset]))
                    pos = cut
            rng.shuffle(pieces)
            for name, offset, data in pieces:
                if rng.random() < 0.5:
                    _apply(out.files[name].data, offset, data)
        elif mode != "lose":
            raise ValueError(f"unknown crash mode {mode!r}")
        return out


def _apply(buf: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    buf[offset:end] = data
