"""OsFile on a real file: large writes go around the page cache (O_DIRECT),
small ones through it, and every read sees the newest bytes either way."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cowfs import blockio
from cowfs.blockio import DIRECT_WRITE_MIN, PAGE, OsStorage

FILE_SIZE = 8 << 20


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


def test_pread_cached_without_nowait_support_waits(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: where the kernel refuses RWF_NOWAIT, pread_cached reads and
    waits, and stops asking after the first refusal."""
    f = OsStorage(str(tmp_path)).open("data", create=True)
    f.pwrite(b"x" * PAGE, 0)
    drop_cache(f)
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(blockio.os, "preadv", refuse)
    assert f.pread_cached(PAGE, 0) == b"x" * PAGE
    assert f.pread_cached(PAGE, 0) == b"x" * PAGE
    assert len(calls) == 1, "asked again after the kernel refused"
    f.close()
