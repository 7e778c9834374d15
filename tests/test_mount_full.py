"""A pool on a small file system filled to the brim: the write that does not
fit fails with ENOSPC (not EIO), everything fsynced before is intact, the pool
still mounts, and deleting a volume gives the space back."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Callable

import pytest

from helpers_mount import GIB, MIB, CowfsMount, first_difference, read_file, wait_until, write_file

pytestmark = [pytest.mark.mount, pytest.mark.mount_timeout(240)]

FS_SIZE = 200 * MIB
CHUNK = MIB
SYNC_EVERY = 4  # chunks between fsyncs


def pool_free(mnt: Path) -> int:
    """Bytes available according to statvfs on the cowfs mount."""
    st = os.statvfs(mnt)
    return st.f_bavail * st.f_frsize


def test_fill_pool_to_enospc(make_cowfs: Callable[..., CowfsMount],
                             make_small_fs: Callable[[int], Path]) -> None:
    """Write incompressible data until ENOSPC on a pool living on a 200 MiB
    ext4; fsynced data reads back, before and after a remount; rm of the
    volume raises free space and a new write then succeeds."""
    fs = make_small_fs(FS_SIZE)
    cm = make_cowfs(pool=fs / "pool")
    rng = random.Random(1234)
    path = cm.mnt / "fill.img"
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o644))
    os.truncate(path, GIB)

    chunks: list[bytes] = []
    durable = 0          # chunks covered by a successful fsync
    failure: OSError | None = None
    fd = os.open(path, os.O_RDWR)
    try:
        while len(chunks) * CHUNK < 2 * FS_SIZE:
            data = rng.randbytes(CHUNK)
            try:
                assert os.pwrite(fd, data, len(chunks) * CHUNK) == CHUNK
                chunks.append(data)
                if len(chunks) % SYNC_EVERY == 0:
                    os.fsync(fd)
                    durable = len(chunks)
            except OSError as exc:
                failure = exc
                break
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            # close() may report a deferred write error; it counts like the others.
            failure = failure or exc
    assert failure is not None, f"wrote {2 * FS_SIZE} bytes to a pool on a {FS_SIZE} byte fs without error"
    assert failure.errno == errno.ENOSPC, f"a full pool failed a write with {failure!r}, not ENOSPC"
    assert durable * CHUNK >= FS_SIZE // 2, f"ENOSPC after only {durable} MiB"

    def check_durable() -> None:
        with open(path, "rb") as fh:
            for i in range(durable):
                got = fh.read(CHUNK)
                assert got == chunks[i], (
                    f"chunk {i} (fsynced) differs at byte {first_difference(got, chunks[i])}")

    assert cm.daemon_pid() == cm.last_pid, "the daemon died on ENOSPC"
    check_durable()
    cm.remount()
    check_durable()

    free_full = pool_free(cm.mnt)
    os.unlink(path)
    assert wait_until(lambda: pool_free(cm.mnt) >= free_full + durable * CHUNK // 2, 10), (
        f"free space went only from {free_full} to {pool_free(cm.mnt)} after deleting "
        f"{durable} MiB of data")
    fresh = os.urandom(8 * MIB)
    write_file(cm.mnt / "again.img", fresh, fsync=True)
    assert read_file(cm.mnt / "again.img") == fresh
    cm.remount()
    assert os.listdir(cm.mnt) == ["again.img"]
    assert read_file(cm.mnt / "again.img") == fresh


def test_overwrites_do_not_leak_space(make_cowfs: Callable[..., CowfsMount],
                                      make_small_fs: Callable[[int], Path]) -> None:
    """Overwriting a 32 MiB volume eight times with new random data (256 MiB
    in all, more than the 200 MiB file system holds) succeeds: the blocks each
    overwrite replaces are freed, and free space ends where it was after the
    first write, give or take 16 MiB; the last content survives a remount."""
    fs = make_small_fs(FS_SIZE)
    cm = make_cowfs(pool=fs / "pool")
    path = cm.mnt / "churn.img"
    rng = random.Random(99)
    free_after_first = 0
    data = b""
    for round_no in range(8):
        data = rng.randbytes(32 * MIB)
        try:
            write_file(path, data, fsync=True)
        except OSError as exc:
            pytest.fail(f"overwrite {round_no} of a 32 MiB volume failed: {exc!r} "
                        f"(free {pool_free(cm.mnt)} bytes): overwritten blocks are not freed")
        if round_no == 0:
            free_after_first = pool_free(cm.mnt)
    free_end = pool_free(cm.mnt)
    assert free_end >= free_after_first - 16 * MIB, (
        f"free space fell from {free_after_first} to {free_end} over 7 overwrites")
    cm.remount()
    assert read_file(path) == data
