"""OsFile on a real file: large writes go around the page cache (O_DIRECT),
small ones through it, and every read sees the newest bytes either way."""

from __future__ import annotations

import errno
import logging
import os
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from cowfs import aio, blockio
from cowfs.blockio import DIRECT_WRITE_MIN, PAGE, OsStorage
from cowfs.errors import PoolError
from cowfs.pool import Pool

FILE_SIZE = 8 << 20


def native_aio() -> bool:
    """Whether this kernel has native AIO (without it, lone page writes go
    through the page cache and are never gathered)."""
    try:
        aio._Context(1).close()
    except OSError:
        return False
    return True


needs_native_aio = pytest.mark.skipif(not native_aio(), reason="no native AIO here")


def random_write(rng: random.Random) -> tuple[int, int]:
    """(offset, length) of one write: mostly page-aligned, small or at least
    DIRECT_WRITE_MIN, sometimes unaligned; always inside FILE_SIZE."""
    kind = rng.random()
    if kind < 0.4:
        length = rng.choice([PAGE, 2 * PAGE, 16 * PAGE])
    elif kind < 0.8:
        length = rng.choice([DIRECT_WRITE_MIN, 2 * DIRECT_WRITE_MIN, 1 << 20])
    else:
        length = rng.randrange(1, 2 * DIRECT_WRITE_MIN)
    if kind < 0.8:
        offset = rng.randrange(0, (FILE_SIZE - length) // PAGE + 1) * PAGE
    else:
        offset = rng.randrange(0, FILE_SIZE - length + 1)
    return offset, length


@pytest.mark.parametrize("seed", range(4))
def test_direct_and_cached_writes_agree_with_a_model(tmp_path: Path, seed: int) -> None:
    """Proves: a random mix of large page-aligned writes (O_DIRECT), small
    and unaligned ones (page cache) and reads over the same ranges always
    reads what a bytearray model holds, both through the open file and,
    after sync and close, through a fresh descriptor; and the large writes
    did take the O_DIRECT path."""
    rng = random.Random(seed)
    storage = OsStorage(str(tmp_path))
    f = storage.open("data", create=True)
    f.allocate(FILE_SIZE)
    model = bytearray(FILE_SIZE)
    direct_writes = 0
    for step in range(120):
        offset, length = random_write(rng)
        data = rng.randbytes(length)
        f.pwrite(data, offset)
        model[offset:offset + length] = data
        if length >= DIRECT_WRITE_MIN and not (offset | length) % PAGE:
            direct_writes += 1
        # Reads straddling what was just written and its neighbours.
        r_off = max(0, offset - rng.randrange(0, 3 * PAGE))
        r_len = min(FILE_SIZE - r_off, length + rng.randrange(0, 6 * PAGE))
        assert f.pread(r_len, r_off) == model[r_off:r_off + r_len], (
            f"seed {seed} step {step}: read {r_len} at {r_off} after a write of {length} at {offset}")
    assert direct_writes and f._direct_fd >= 0, "no write took the O_DIRECT path"
    f.sync()
    f.close()
    with open(tmp_path / "data", "rb") as fresh:
        assert fresh.read() == model, f"seed {seed}: the file on disk differs from the model"


def test_small_writes_never_open_o_direct(tmp_path: Path) -> None:
    """Proves: writes below DIRECT_WRITE_MIN, and large ones that are not
    page-aligned, stay in the page cache (no O_DIRECT descriptor)."""
    f = OsStorage(str(tmp_path)).open("data", create=True)
    f.pwrite(b"x" * (DIRECT_WRITE_MIN - PAGE), 0)
    f.pwrite(b"y" * DIRECT_WRITE_MIN, 100)
    f.pwrite(b"z" * (DIRECT_WRITE_MIN + 1), DIRECT_WRITE_MIN * 2)
    assert f._direct_fd == -1
    assert f.pread(3, DIRECT_WRITE_MIN * 2 - 1) == b"\0zz"
    f.close()


def test_o_direct_refused_falls_back_to_the_page_cache(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: where the file system refuses O_DIRECT (EINVAL, as tmpfs did
    before Linux 6.6), a large write still lands, through the page cache,
    and later large writes do not try O_DIRECT again."""
    real_open = os.open
    refused: list[str] = []

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(blockio.os, "open", no_direct)
    f = OsStorage(str(tmp_path)).open("data", create=True)
    data = random.Random(1).randbytes(2 * DIRECT_WRITE_MIN)
    f.pwrite(data, 0)
    f.pwrite(data, len(data))
    assert len(refused) == 1, f"O_DIRECT tried {len(refused)} times"
    assert f.pread(2 * len(data), 0) == data + data
    f.sync()
    f.close()
    assert (tmp_path / "data").read_bytes() == data + data


def test_writeback_hint_does_not_wait_and_close_waits_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: start_writeback returns while the kernel call it asks for is
    still running (in its own thread), hints given meanwhile fold into one
    more call, and close() lets the running call finish before the
    descriptor goes."""
    entered = threading.Event()
    release = threading.Event()
    calls: list[tuple[int, bool]] = []

    def slow_sync_file_range(fd: int, offset: int, length: int, flags: int) -> int:
        entered.set()
        release.wait(10)
        # The descriptor must still be open while the call runs.
        try:
            os.fstat(fd)
            still_open = True
        except OSError:
            still_open = False
        calls.append((flags, still_open))
        return 0

    monkeypatch.setattr(blockio, "_sync_file_range", slow_sync_file_range)
    f = OsStorage(str(tmp_path)).open("data", create=True)
    f.pwrite(b"x" * PAGE, 0)
    f.start_writeback()
    assert entered.wait(10), "the writeback call never started"
    for _ in range(5):                       # all while the first call runs
        f.start_writeback()
    assert calls == []
    closer = threading.Thread(target=f.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive(), "close() did not wait for the running call"
    release.set()
    closer.join(10)
    assert not closer.is_alive()
    assert f.fd == -1
    # The running call, then at most one more for the five hints.
    assert 1 <= len(calls) <= 2, calls
    assert all(flags == 2 and still_open for flags, still_open in calls), calls
    assert not [t for t in threading.enumerate() if t.name.startswith("writeback ")]


def drop_cache(f: blockio.OsFile) -> None:
    """Write the file's dirty pages and drop its clean ones from the page cache."""
    f.sync()
    os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def test_pread_cached_answers_none_for_uncached_data_and_starts_it(tmp_path: Path) -> None:
    """Proves: data in the page cache comes back at once; data not in it
    gives None, and (on Linux) its disk read has started, so it is soon
    cached without anyone waiting for it."""
    f = OsStorage(str(tmp_path)).open("data", create=True)
    payload = random.Random(6).randbytes(16 * PAGE)
    f.pwrite(payload, 0)
    assert f.pread_cached(PAGE, 3 * PAGE) == payload[3 * PAGE:4 * PAGE]
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                        text=True, check=True).stdout.strip()
    if fs == "tmpfs":
        pytest.skip("tmpfs pages are the data: DONTNEED cannot drop them")
    drop_cache(f)
    assert f.pread_cached(PAGE, 5 * PAGE) is None
    for _ in range(2000):
        got = f.pread_cached(PAGE, 5 * PAGE)
        if got is not None:
            break
        time.sleep(0.001)
    assert got == payload[5 * PAGE:6 * PAGE], "the refused read was never started"
    assert f.pread(2 * PAGE, 7 * PAGE) == payload[7 * PAGE:9 * PAGE]
    f.close()


@pytest.mark.parametrize("how", ["pread_cached", "polling pread"])
def test_reads_without_nowait_support_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           how: str) -> None:
    """Proves: where the kernel refuses RWF_NOWAIT, pread_cached and pread
    with ``poll`` read and wait, and stop asking after the first refusal."""
    f = OsStorage(str(tmp_path)).open("data", create=True)
    f.pwrite(b"x" * PAGE, 0)
    drop_cache(f)
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    def read() -> bytes | bytearray | None:
        return f.pread_cached(PAGE, 0) if how == "pread_cached" else f.pread(PAGE, 0, poll=1.0)

    monkeypatch.setattr(blockio.os, "preadv", refuse)
    assert read() == b"x" * PAGE
    assert read() == b"x" * PAGE
    assert len(calls) == 1, "asked again after the kernel refused"
    f.close()


def test_polling_pread_returns_uncached_data_without_a_blocking_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: pread with ``poll`` answers data that was not in the page
    cache by asking until it is (not through a blocking pread), exactly the
    bytes written, also across pages; bytes past the end still read as
    zeros (that ask never fills the buffer: the blocking read pads)."""
    f = OsStorage(str(tmp_path)).open("data", create=True)
    payload = random.Random(7).randbytes(16 * PAGE)
    f.pwrite(payload, 0)
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                        text=True, check=True).stdout.strip()
    if fs == "tmpfs":
        pytest.skip("tmpfs pages are the data: DONTNEED cannot drop them")
    drop_cache(f)
    blocking = []
    real_pread = os.pread

    def counted(fd, n, offset):
        blocking.append((n, offset))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(blockio.os, "pread", counted)
    assert f.pread(PAGE, 5 * PAGE, poll=1.0) == payload[5 * PAGE:6 * PAGE]
    assert f.pread(PAGE + 512, 10 * PAGE + 1024, poll=1.0) == \
        payload[10 * PAGE + 1024:11 * PAGE + 1536]
    assert blocking == [], "polling read fell back to a blocking pread"
    assert f.pread(PAGE, 16 * PAGE - 512, poll=0.001) == payload[-512:] + bytes(PAGE - 512)
    assert blocking[:1] == [(PAGE, 16 * PAGE - 512)], "the read past the end was not left to pread"
    f.close()


def before_page_writes(monkeypatch: pytest.MonkeyPatch,
                       hook: Callable[[dict[int, int]], None]) -> None:
    """Call ``hook`` with the pages of every PageWrites.write before it
    writes them (it may raise instead)."""
    real_write = aio.PageWrites.write

    def hooked(self, buf, pages):
        hook(pages)
        return real_write(self, buf, pages)

    monkeypatch.setattr(aio.PageWrites, "write", hooked)


def slow_background_writes(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.002) -> None:
    """Make every write of the writer threads take ``seconds`` longer, so
    that later calls find handed-over writes still in flight."""
    real_pwrite = os.pwrite

    def slow(fd, data, offset):
        if threading.current_thread().name.startswith("direct writes"):
            time.sleep(seconds)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(blockio.os, "pwrite", slow)
    before_page_writes(monkeypatch, lambda pages: time.sleep(seconds))


@pytest.mark.parametrize("seed", range(4))
def test_staged_and_handed_over_writes_agree_with_a_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Proves: with the writer thread slowed down, a random mix of runs of
    small writes one after the other (staged), bursts of lone page writes
    (gathered, then handed over 256 at a time), 256 KiB-1 MiB writes (handed
    to the thread), 2 MiB writes (handed over in 1 MiB pieces), unaligned
    writes (made at once), rewrites
    of ranges still in flight, reads and cached reads over all of it and
    syncs always reads what a bytearray model holds, and after close the
    file on disk is the model; and that reads did meet staged bytes,
    gathered pages and writes in flight."""
    slow_background_writes(monkeypatch)
    rng = random.Random(seed)
    f = OsStorage(str(tmp_path)).open("data", create=True)
    f.allocate(FILE_SIZE)
    model = bytearray(FILE_SIZE)
    seen = {"staged": 0, "in flight": 0, "handed over": 0, "gathered": 0,
            "gathered pages handed over": 0, "gathered page replaced": 0}
    recent: list[tuple[int, int]] = []

    def write(offset: int, data: bytes) -> None:
        gathered = f._gathering.pages if f._gathering is not None else {}
        seen["gathered page replaced"] += any(
            o in gathered for o in range(offset - offset % PAGE, offset + len(data), PAGE))
        f.pwrite(data, offset)
        model[offset:offset + len(data)] = data
        recent.append((offset, len(data)))
        seen["handed over"] += len(f._jobs) > 0
        seen["gathered pages handed over"] += any(j.pages is not None for j in f._jobs)

    def check_read(offset: int, length: int, step: int) -> None:
        seen["staged"] += f._staged > 0 and f._overlapped(offset, offset + length)
        seen["gathered"] += f._gathering is not None and bool(
            f._gathering.over(offset, offset + length))
        seen["in flight"] += any(not j.done for j in f._jobs)
        want = model[offset:offset + length]
        got = f.pread_cached(length, offset) if rng.random() < 0.5 else f.pread(length, offset)
        if got is not None:     # pread_cached: None only for bytes not cached
            assert got == want, f"seed {seed} step {step}: {length} bytes at {offset}"

    def near_recent(length: int) -> int:
        """A page-aligned offset for ``length`` bytes: often inside the
        latest write (which may still be staged or in flight), else anywhere."""
        where = rng.random()
        if recent and where < 0.5:
            o, n = recent[-1]
            if where < 0.2:     # just before it: a run of writes runs into it
                offset = max(0, o - rng.randrange(1, 3) * PAGE)
            else:
                offset = o + rng.randrange(0, max(1, n // PAGE)) * PAGE
        else:
            offset = rng.randrange(0, FILE_SIZE // PAGE) * PAGE
        return min(offset // PAGE * PAGE, (FILE_SIZE - length) // PAGE * PAGE)

    for step in range(150):
        kind = rng.random()
        if kind < 0.35:       # a run of small writes one after the other
            size = rng.choice([PAGE, 2 * PAGE])
            count = rng.randrange(2, 100)
            offset = near_recent(size * count)
            for i in range(count):
                write(offset + i * size, rng.randbytes(size))
        elif kind < 0.45:     # lone pages here and there, some over recent ones
            for _ in range(rng.randrange(1, 300)):
                write(near_recent(PAGE) if rng.random() < 0.3
                      else rng.randrange(0, FILE_SIZE // PAGE) * PAGE, rng.randbytes(PAGE))
        elif kind < 0.6:      # a large write, or a rewrite of one still in flight
            length = rng.choice([DIRECT_WRITE_MIN, 2 * DIRECT_WRITE_MIN, 1 << 20])
            write(near_recent(length), rng.randbytes(length))
        elif kind < 0.7:      # oversized, or unaligned, or a lone small write
            length = rng.choice([2 << 20, rng.randrange(1, 3 * PAGE), PAGE])
            offset = near_recent(length)
            if length != PAGE and rng.random() < 0.5:
                offset += rng.randrange(1, PAGE) if offset + length < FILE_SIZE - PAGE else 0
            write(offset, rng.randbytes(length))
        elif kind < 0.75:
            f.sync()
        for _ in range(3):    # reads over what was just written and around it
            o, n = recent[-1] if recent else (0, PAGE)
            r_off = max(0, o - rng.randrange(0, 3) * PAGE + rng.randrange(0, 2) * rng.randrange(PAGE))
            r_len = max(1, min(FILE_SIZE - r_off, rng.choice([PAGE, n, n + 2 * PAGE, 1])))
            check_read(r_off, r_len, step)
        if len(recent) > 50:
            del recent[:-10]
    if not native_aio():
        seen = {k: v for k, v in seen.items() if "gathered" not in k}
    assert all(seen.values()), f"seed {seed}: a path was never taken: {seen}"
    f.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("direct writes")]
    assert (tmp_path / "data").read_bytes() == model, f"seed {seed}: file on disk differs"


def test_failed_background_write_is_made_again_before_later_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Proves: when the writer thread's write of A fails and a later write B
    over the same bytes succeeds, the next call that needs them written
    (here sync) writes A and then B again, in that order, so the file ends
    with B; the failure is logged, not lost."""
    slow_background_writes(monkeypatch, 0.0)
    real_pwrite = blockio.os.pwrite
    failures = []

    def fail_first(fd, data, offset):
        if threading.current_thread().name.startswith("direct writes") and not failures:
            failures.append(offset)
            raise OSError(errno.EIO, "injected EIO")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(blockio.os, "pwrite", fail_first)
    f = OsStorage(str(tmp_path)).open("data", create=True)
    a, b = b"a" * DIRECT_WRITE_MIN, b"b" * DIRECT_WRITE_MIN
    f.pwrite(a, 0)
    f.pwrite(b, 0)
    with caplog.at_level(logging.WARNING, logger="cowfs.blockio"):
        f.sync()
    assert failures == [0]
    assert "injected EIO" in caplog.text and "writing it again" in caplog.text
    assert f.pread(DIRECT_WRITE_MIN, 0) == b
    f.close()
    assert (tmp_path / "data").read_bytes() == b


def test_write_failing_for_good_is_raised_at_sync_and_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: while the disk refuses every O_DIRECT write, a large write
    still returns at once and reads back from its buffer, each sync raises
    the disk's error, and once the disk takes writes again the next sync
    writes it: nothing acknowledged is silently dropped."""
    f = OsStorage(str(tmp_path)).open("data", create=True)
    data = random.Random(8).randbytes(DIRECT_WRITE_MIN * 2)
    real_pwrite = blockio.os.pwrite
    broken = [True]

    def refuse_direct(fd, buf, offset):
        if broken[0] and fd == f._direct_fd:
            raise OSError(errno.EIO, "injected EIO")
        return real_pwrite(fd, buf, offset)

    monkeypatch.setattr(blockio.os, "pwrite", refuse_direct)
    f.pwrite(data, PAGE * 16)
    assert f.pread(len(data), PAGE * 16) == data
    for _ in range(2):
        with pytest.raises(OSError) as info:
            f.sync()
        assert info.value.errno == errno.EIO
    assert f.pread(PAGE, PAGE * 17) == data[PAGE:2 * PAGE]
    broken[0] = False
    f.sync()
    f.close()
    assert (tmp_path / "data").read_bytes()[PAGE * 16:] == data


def test_pool_whose_handed_over_write_fails_gives_it_up_at_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves, on a pool on real files: a 1 MiB volume write the disk then
    refuses is acknowledged (handed over), but the fsync after it fails
    with EIO, the pool serves its durable state read-only, and a remount
    finds every byte that an fsync acknowledged."""
    storage = OsStorage(str(tmp_path))
    Pool.mkfs(storage, compression=False)
    pool = Pool.open(storage)
    vid = pool.create_volume("disk", 4 << 20).id
    durable = random.Random(4).randbytes(1 << 20)
    pool.write(vid, 0, durable)
    pool.sync()
    real_pwrite = blockio.os.pwrite

    def refuse_direct(fd, buf, offset):
        if fd == pool.data._direct_fd:
            raise OSError(errno.EIO, "injected EIO")
        return real_pwrite(fd, buf, offset)

    monkeypatch.setattr(blockio.os, "pwrite", refuse_direct)
    pool.write(vid, 0, bytes([7]) * (1 << 20))
    with pytest.raises(PoolError) as info:
        pool.sync()
    assert info.value.errno == errno.EIO
    monkeypatch.setattr(blockio.os, "pwrite", real_pwrite)
    assert pool.read(vid, 0, 1 << 20) == durable
    with pytest.raises(PoolError) as info:
        pool.write(vid, 0, b"x")
    assert info.value.errno == errno.EROFS
    pool.close()
    pool = Pool.open(storage)
    assert pool.read(vid, 0, 1 << 20) == durable
    assert pool.check() == []
    pool.close()


def test_writes_over_bytes_in_flight_land_after_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: while the writer thread is held in the middle of a 256 KiB
    write J, an unaligned write inside J (made at once) waits for J, and so
    does a run of small writes that runs into J's range (staged, then
    written through the page cache as a partial stage): the file ends with
    their bytes over J's, not J's over theirs."""
    gates: list[threading.Event] = []
    real_pwrite = os.pwrite

    def held(fd, data, offset):
        if threading.current_thread().name.startswith("direct writes"):
            assert gates[-1].wait(10), "the writer thread was never let go"
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(blockio.os, "pwrite", held)
    f = OsStorage(str(tmp_path)).open("data", create=True)
    at = 16 * PAGE
    model = bytearray(at + 2 * DIRECT_WRITE_MIN)
    f.allocate(len(model))

    def write(data: bytes, offset: int) -> None:
        f.pwrite(data, offset)
        model[offset:offset + len(data)] = data

    def hold_j(fill: bytes) -> None:
        gates.append(threading.Event())
        write(fill * DIRECT_WRITE_MIN, at)
        assert len(f._jobs) == 1 and not f._jobs[0].done
        threading.Timer(0.05, gates[-1].set).start()

    hold_j(b"j")
    write(b"u" * 100, at + 5 * PAGE + 7)             # unaligned, inside J
    assert f.pread(len(model), 0) == model
    hold_j(b"k")
    for i, c in enumerate(b"abc"):                   # the run starts a page before J
        write(bytes([c]) * PAGE, at - PAGE + i * PAGE)
    assert f._staged == 2 * PAGE and not f._jobs[0].done
    write(b"z" * PAGE, at + DIRECT_WRITE_MIN + PAGE)  # sends the stage on its way
    f.sync()
    f.close()
    assert (tmp_path / "data").read_bytes() == model


@needs_native_aio
def test_lone_pages_are_gathered_and_later_writes_land_over_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: pages written on their own are held in memory (not yet in
    the file) and read back from there; a later unaligned write into one
    and a later whole-page write over another both win over the gathered
    bytes, in reads and in the file; a full buffer of them (256) goes to the
    file in one PageWrites call, and sync writes the rest."""
    calls: list[int] = []
    before_page_writes(monkeypatch, lambda pages: calls.append(len(pages)))
    f = OsStorage(str(tmp_path)).open("data", create=True)
    model = bytearray(1024 * PAGE)
    f.allocate(len(model))
    rng = random.Random(5)

    def write(data: bytes, offset: int) -> None:
        f.pwrite(data, offset)
        model[offset:offset + len(data)] = data

    def on_disk(offset: int, length: int) -> bytes:
        with open(tmp_path / "data", "rb") as fresh:
            fresh.seek(offset)
            return fresh.read(length)

    write(rng.randbytes(PAGE), 10 * PAGE)
    write(rng.randbytes(PAGE), 20 * PAGE)
    assert f._gathering is not None and sorted(f._gathering.pages) == [10 * PAGE, 20 * PAGE]
    assert on_disk(10 * PAGE, PAGE) == bytes(PAGE), "a gathered page reached the file early"
    assert f.pread(PAGE, 10 * PAGE) == model[10 * PAGE:11 * PAGE]
    write(b"u" * 100, 10 * PAGE + 7)                 # unaligned, into a gathered page
    assert calls == [2], "the unaligned write did not wait for the gathered pages"
    assert f.pread(2 * PAGE, 9 * PAGE) == model[9 * PAGE:11 * PAGE]
    write(rng.randbytes(PAGE), 20 * PAGE)            # a whole page over a gathered one
    assert f.pread(PAGE, 20 * PAGE) == model[20 * PAGE:21 * PAGE]
    # Every other page from 100 on: none follows the one before, so all are gathered.
    for i in range(256):
        write(rng.randbytes(PAGE), (100 + 2 * i) * PAGE)
    assert [len(j.pages) for j in f._jobs if j.pages is not None] == [256]
    assert f.pread(len(model), 0) == model
    f.sync()
    # Page 20 again and the first 255 of the loop's filled a buffer; sync
    # wrote the last one.
    assert calls == [2, 256, 1], f"gathered pages written as {calls}"
    assert on_disk(0, len(model)) == model
    f.close()


def write_256_lone_pages(tmp_path: Path, seed: int) -> tuple[blockio.OsFile, bytearray]:
    """A data file with 256 random pages written on their own (every other
    page: none follows the one before), enough to fill one gathering
    buffer; the file and a model of what it should hold."""
    f = OsStorage(str(tmp_path)).open("data", create=True)
    assert isinstance(f, blockio.OsFile)
    model = bytearray(600 * PAGE)
    f.allocate(len(model))
    rng = random.Random(seed)
    for i in range(256):
        data = rng.randbytes(PAGE)
        f.pwrite(data, 2 * i * PAGE)
        model[2 * i * PAGE:(2 * i + 1) * PAGE] = data
    return f, model


@needs_native_aio
def test_failed_gathered_page_writes_are_made_again_at_sync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Proves: when the writer thread's write of gathered pages fails, the
    pages stay readable from memory and sync writes them again (logged),
    so the file ends with every one of them."""
    failures: list[int] = []

    def fail_first(pages: dict[int, int]) -> None:
        if not failures:
            failures.append(len(pages))
            raise OSError(errno.EIO, "injected EIO")

    before_page_writes(monkeypatch, fail_first)
    f, model = write_256_lone_pages(tmp_path, seed=6)
    assert f.pread(len(model), 0) == model
    with caplog.at_level(logging.WARNING, logger="cowfs.blockio"):
        f.sync()
    assert failures == [256] and "injected EIO" in caplog.text
    f.close()
    assert (tmp_path / "data").read_bytes() == model


@needs_native_aio
def test_failed_wait_for_a_batch_waits_for_all_of_it_before_giving_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: when waiting for a batch of gathered pages fails, the AIO
    context is destroyed (which waits for every write in flight) before the
    failure reaches the owner, who may then reuse the buffer; the next sync
    writes the pages again, and the file ends with all of them."""
    events: list[str] = []
    real_getevents, real_close = aio._Context.getevents, aio._Context.close

    def fail_once(self, min_nr, timeout):
        if not events:
            events.append("wait failed")
            raise OSError(errno.EINVAL, "injected EINVAL")
        return real_getevents(self, min_nr, timeout)

    def close(self):
        events.append("context destroyed")
        real_close(self)

    monkeypatch.setattr(aio._Context, "getevents", fail_once)
    monkeypatch.setattr(aio._Context, "close", close)
    f, model = write_256_lone_pages(tmp_path, seed=9)
    f.sync()
    assert events[:2] == ["wait failed", "context destroyed"], events
    f.close()
    assert (tmp_path / "data").read_bytes() == model


def test_checkpoints_keep_the_pool_files_open(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves, on a pool on real files: checkpoints neither open nor close
    a pool file (closing the superblock file after its gathered 4 KiB write
    took 25-53 ms, mostly io_destroy, and the request loop waited with it,
    at every checkpoint), and each still switches the superblock: a remount
    finds the last checkpoint's generation and the data written before it."""
    storage = OsStorage(str(tmp_path))
    Pool.mkfs(storage, compression=False)
    pool = Pool.open(storage)
    vid = pool.create_volume("disk", 4 << 20).id
    events: list[str] = []
    real_open, real_close = storage.open, blockio.OsFile.close

    def counted_open(name: str, create: bool = False) -> blockio.OsFile:
        events.append(f"open {name}")
        return real_open(name, create)

    def counted_close(self: blockio.OsFile) -> None:
        events.append(f"close {self.name}")
        real_close(self)

    monkeypatch.setattr(storage, "open", counted_open)
    monkeypatch.setattr(blockio.OsFile, "close", counted_close)
    rng = random.Random(5)
    written: dict[int, bytes] = {}
    gen = pool.sb.gen
    for i in range(3):
        written[i] = rng.randbytes(PAGE)
        pool.write(vid, i * PAGE * 16, written[i])
        pool.sync()
        pool.checkpoint()
    assert events == [], events
    assert pool.sb.gen == gen + 3
    monkeypatch.setattr(storage, "open", real_open)
    pool.close()
    assert sorted(events) == ["close data", "close journal", "close meta", "close superblock"]
    pool = Pool.open(storage)
    assert pool.sb.gen == gen + 3
    for i, data in written.items():
        assert pool.read(vid, i * PAGE * 16, PAGE) == data
    pool.close()


def test_pool_close_closes_every_file_when_one_fails(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: a pool's close (its files closed side by side, see
    Pool._close_files) closes all four files even when one of them fails,
    and raises that failure afterwards."""
    storage = OsStorage(str(tmp_path))
    Pool.mkfs(storage, compression=False)
    pool = Pool.open(storage)
    pool.write(pool.create_volume("disk", 1 << 20).id, 0, b"x" * PAGE)
    pool.sync()
    closed: list[str] = []
    real_close = blockio.OsFile.close

    def close_or_fail(self: blockio.OsFile) -> None:
        real_close(self)
        closed.append(self.name)
        if self.name == "meta":
            raise OSError(errno.EIO, "injected EIO at close")

    monkeypatch.setattr(blockio.OsFile, "close", close_or_fail)
    with pytest.raises(OSError) as info:
        pool.close()
    assert info.value.errno == errno.EIO
    assert sorted(closed) == ["data", "journal", "meta", "superblock"]
    assert all(f.fd < 0 for f in (pool.meta, pool.data, pool.jfile, pool.sbf))
