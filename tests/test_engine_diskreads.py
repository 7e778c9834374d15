"""Reads that do not wait (OsFile.async_reads): a read that misses the page
cache is started, handed to the disk with the others started with it, and
answered once finished, with the newest bytes even when a write came
between."""

from __future__ import annotations

import os
import random
import select
from pathlib import Path

import pytest

from cowfs import aio
from cowfs.blockio import PAGE, OsFile, OsStorage

PAGES = 64


def drop_cache(f: OsFile) -> None:
    """Write the file's dirty pages and drop its clean ones from the page cache."""
    f.sync()
    os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)


@pytest.fixture
def notify_fd():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def open_with_async_reads(tmp_path: Path, notify_fd: int) -> tuple[OsFile, bytes]:
    f = OsStorage(str(tmp_path)).open("data", create=True)
    assert isinstance(f, OsFile)
    payload = random.Random(7).randbytes(PAGES * PAGE)
    f.pwrite(payload, 0)
    drop_cache(f)
    if not f.async_reads(notify_fd):
        f.close()
        pytest.skip("no native AIO, cachestat or O_DIRECT here")
    return f, payload


def reap_all(f: OsFile, notify_fd: int, tokens: set[object]) -> None:
    """Collect finished reads until every one of ``tokens`` has finished."""
    left = set(tokens)
    poller = select.poll()
    poller.register(notify_fd, select.POLLIN)
    for _ in range(500):
        if not left:
            return
        poller.poll(20)
        try:
            os.eventfd_read(notify_fd)
        except BlockingIOError:
            pass
        left -= set(f.reap_reads())
    raise AssertionError(f"{len(left)} started reads never finished")


def test_started_reads_are_answered_after_the_disk_and_a_write_drops_theirs(
        tmp_path: Path, notify_fd: int) -> None:
    """Proves: cached data comes back at once; a miss answers None until its
    read was submitted and reaped, then its bytes, once; a write over a
    finished read drops its answer, and a write not yet in the file is
    answered from its buffer, so the newest bytes come back."""
    f, payload = open_with_async_reads(tmp_path, notify_fd)
    try:
        page = lambda k: payload[k * PAGE:(k + 1) * PAGE]  # noqa: E731
        last = PAGES - 1                  # readahead from it has nothing after it
        assert f.pread(PAGE, last * PAGE) == page(last)    # now cached
        assert f.pread_cached(PAGE, last * PAGE) == page(last)
        tokens = {}
        for k in range(2, 12):
            assert f.pread_cached(PAGE, k * PAGE) is None
            tokens[k] = f.started_read()
        assert len(set(map(id, tokens.values()))) == 10
        # Asked again before the disk has it: still None, the same read.
        assert f.pread_cached(PAGE, 3 * PAGE) is None
        assert f.started_read() is tokens[3]
        assert f.submit_reads() == []
        reap_all(f, notify_fd, set(tokens.values()))
        new = random.Random(8).randbytes(2 * PAGE)
        f.pwrite(new, 5 * PAGE)                           # over pages 5 and 6
        for k in range(2, 12):
            want = new[(k - 5) * PAGE:(k - 4) * PAGE] if k in (5, 6) else page(k)
            assert f.pread_cached(PAGE, k * PAGE) == want, f"page {k}"
        # Writes not yet in the file (the second of two in a row is held
        # in a buffer) are answered from there, not from the disk.
        for k in (30, 31):
            f.pwrite(new[:PAGE], k * PAGE)
            assert f.pread_cached(PAGE, k * PAGE) == new[:PAGE], f"page {k}"
        # A read of part of a page (a compressed block) reads whole pages
        # and answers the part.
        assert f.pread_cached(1000, 40 * PAGE + 300) is None
        f.submit_reads()
        reap_all(f, notify_fd, {f.started_read()})
        assert f.pread_cached(1000, 40 * PAGE + 300) == payload[40 * PAGE + 300:40 * PAGE + 1300]
        # Each answer was handed out once: asking again reads anew.
        assert f.pread_cached(PAGE, 9 * PAGE) is None
        f.submit_reads()
        reap_all(f, notify_fd, {f.started_read()})
        assert f.pread_cached(PAGE, 9 * PAGE) == page(9)
    finally:
        f.close()


def test_reads_the_disk_refuses_or_that_do_not_fit_are_read_waiting(
        tmp_path: Path, notify_fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: a read too long for the reads that do not wait is read at
    once; one io_submit refuses is reported refused and read, waiting, when
    asked again."""
    f, payload = open_with_async_reads(tmp_path, notify_fd)
    try:
        long = 40 * PAGE                  # more than DiskReads.max_bytes
        assert f.pread_cached(long, 0) == payload[:long]
        drop_cache(f)
        assert f.pread_cached(PAGE, 20 * PAGE) is None
        token = f.started_read()
        monkeypatch.setattr(aio, "_syscall", lambda *args: -1)
        assert f.submit_reads() == [token]
        monkeypatch.undo()
        assert f.pread_cached(PAGE, 20 * PAGE) == payload[20 * PAGE:21 * PAGE]
    finally:
        f.close()
