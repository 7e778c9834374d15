"""Refusals at the engine API: bad names and arguments, unknown volumes,
corrupted data blocks, and a full pool.

Every refusal must be a :class:`PoolError` with the fitting errno, a message
naming the object, and must leave the pool exactly as it was.
"""

from __future__ import annotations

import errno
import logging
import random
from collections.abc import Callable, Iterator

import pytest

from cowfs.blockio import SimStorage
from cowfs.errors import PoolError
from cowfs import pool as pool_module
from cowfs.pool import BLOCK, TICK_WARN_INTERVAL, Pool
from cowfs.spacemap import RESERVED

from engine_model import make_payload, read_all

BAD_NAMES = ["", "a/b", "/abs", "trailing/", "nul\0byte", ".hidden", ".", "..", "x" * 256, "é" * 128]


@pytest.fixture
def pool() -> Iterator[Pool]:
    """An open pool on the simulator with two volumes: 'alpha' (200 KiB of
    text, synced) and 'beta' (empty, 1 MiB)."""
    storage = SimStorage(label="sim-errors")
    Pool.mkfs(storage)
    p = Pool.open(storage)
    a = p.create_volume("alpha", 0)
    p.write(a.id, 0, make_payload(random.Random(1), 200 * 1024, "alpha", "mixed"))
    p.create_volume("beta", 1 << 20)
    p.sync()
    yield p
    p.close()


def snapshot(pool: Pool) -> list[tuple]:
    """Everything observable about the pool's volumes except atime."""
    out = []
    for i in sorted(pool.volumes(), key=lambda i: i.id):
        out.append((i.id, i.name, i.size, i.mode, i.uid, i.gid, i.mtime_ns, i.ctime_ns, i.allocated,
                    read_all(pool, i.id, i.size)))
    return out


def refused(pool: Pool, call: Callable[[], object], *errnos: int) -> PoolError:
    """Assert that ``call`` raises PoolError with one of ``errnos`` and that
    the pool is unchanged and consistent afterwards."""
    before = snapshot(pool)
    with pytest.raises(PoolError) as info:
        call()
    err = info.value
    assert err.errno in errnos, f"errno {err.errname} ({err}), wanted one of {[errno.errorcode[e] for e in errnos]}"
    assert str(err), "refusal without a message"
    assert snapshot(pool) == before, f"pool changed by a refused call ({err})"
    assert pool.check() == []
    return err


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_create_bad_name(pool: Pool, name: str) -> None:
    """Proves: create_volume refuses names with '/', NUL, a leading '.', the
    empty name and names over 255 bytes with EINVAL (ENAMETOOLONG for length)."""
    codes = (errno.EINVAL, errno.ENAMETOOLONG) if len(name.encode()) > 255 else (errno.EINVAL,)
    refused(pool, lambda: pool.create_volume(name, 4096), *codes)


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_rename_bad_name(pool: Pool, name: str) -> None:
    """Proves: rename_volume refuses the same invalid names and keeps the old name."""
    codes = (errno.EINVAL, errno.ENAMETOOLONG) if len(name.encode()) > 255 else (errno.EINVAL,)
    vid = pool.lookup("alpha").id
    refused(pool, lambda: pool.rename_volume(vid, name), *codes)
    assert pool.lookup("alpha").id == vid


def test_name_limits_accepted(pool: Pool) -> None:
    """Proves: the limits are exact -- a 255-byte name, multi-byte UTF-8 and
    dots after the first character are accepted and survive a remount."""
    names = ["y" * 255, "é" * 127 + "z", "a.b..c.", "spaces and-dashes_ok"]
    for n in names:
        pool.create_volume(n, 8192)
    pool.sync()
    assert {n for n in names} <= {i.name for i in pool.volumes()}


def test_duplicate_name(pool: Pool) -> None:
    """Proves: creating a volume under an existing name is EEXIST and changes nothing."""
    err = refused(pool, lambda: pool.create_volume("alpha", 4096), errno.EEXIST)
    assert "alpha" in str(err)


def test_unknown_volume(pool: Pool) -> None:
    """Proves: every call naming a volume that does not exist is ENOENT."""
    ghost = max(i.id for i in pool.volumes()) + 1000
    refused(pool, lambda: pool.lookup("ghost"), errno.ENOENT)
    refused(pool, lambda: pool.get(ghost), errno.ENOENT)
    refused(pool, lambda: pool.delete_volume(ghost), errno.ENOENT)
    refused(pool, lambda: pool.rename_volume(ghost, "new"), errno.ENOENT)
    refused(pool, lambda: pool.truncate(ghost, 0), errno.ENOENT)
    refused(pool, lambda: pool.read(ghost, 0, 10), errno.ENOENT)
    refused(pool, lambda: pool.write(ghost, 0, b"x"), errno.ENOENT)
    refused(pool, lambda: pool.set_attrs(ghost, mode=0o600), errno.ENOENT)


def test_deleted_volume_is_gone(pool: Pool) -> None:
    """Proves: after delete_volume the id and name are unknown (ENOENT) and
    the name can be reused by a new volume with a new id."""
    old = pool.lookup("alpha")
    pool.delete_volume(old.id)
    refused(pool, lambda: pool.get(old.id), errno.ENOENT)
    refused(pool, lambda: pool.read(old.id, 0, 1), errno.ENOENT)
    new = pool.create_volume("alpha", 4096)
    assert new.id != old.id
    assert pool.read(new.id, 0, 4096) == bytes(4096)


def test_negative_arguments(pool: Pool) -> None:
    """Proves: negative sizes and offsets are EINVAL and change nothing."""
    vid = pool.lookup("alpha").id
    refused(pool, lambda: pool.create_volume("neg", -1), errno.EINVAL)
    refused(pool, lambda: pool.truncate(vid, -1), errno.EINVAL)
    refused(pool, lambda: pool.read(vid, -1, 10), errno.EINVAL)
    refused(pool, lambda: pool.read(vid, 0, -10), errno.EINVAL)
    refused(pool, lambda: pool.write(vid, -4096, b"x" * 10), errno.EINVAL)


def test_oversized_arguments(pool: Pool) -> None:
    """Proves: sizes and write ends beyond any sane volume size (2**60) are
    refused with EFBIG (or EINVAL) and change nothing."""
    vid = pool.lookup("alpha").id
    huge = 1 << 60
    refused(pool, lambda: pool.create_volume("huge", huge), errno.EFBIG, errno.EINVAL)
    refused(pool, lambda: pool.truncate(vid, huge), errno.EFBIG, errno.EINVAL)
    refused(pool, lambda: pool.write(vid, huge, b"x"), errno.EFBIG, errno.EINVAL)


def test_empty_io(pool: Pool) -> None:
    """Proves: an empty write, even far past the end, returns 0 and does not
    grow the volume; reads at or past the end return nothing."""
    info = pool.lookup("alpha")
    before = snapshot(pool)
    assert pool.write(info.id, info.size + 10**6, b"") == 0
    assert pool.read(info.id, info.size, 100) == b""
    assert pool.read(info.id, info.size + 4096, 100) == b""
    assert pool.read(info.id, 0, 0) == b""
    assert snapshot(pool) == before


def test_rename_replaces_and_self_rename(pool: Pool) -> None:
    """Proves: renaming onto an existing name replaces that volume (its data
    is gone, space is released consistently); renaming onto itself is a no-op."""
    a = pool.lookup("alpha")
    b = pool.lookup("beta")
    before = read_all(pool, a.id, a.size)
    pool.rename_volume(a.id, "alpha")
    assert pool.lookup("alpha").id == a.id and read_all(pool, a.id, a.size) == before
    pool.rename_volume(a.id, "beta")
    assert [(i.id, i.name) for i in pool.volumes()] == [(a.id, "beta")]
    assert read_all(pool, a.id, a.size) == before
    refused(pool, lambda: pool.get(b.id), errno.ENOENT)
    assert pool.check() == []


def find_all(storage: SimStorage, needle: bytes) -> list[tuple[str, int]]:
    """Every (file, offset) where ``needle`` is stored."""
    hits = []
    for name, f in storage.files.items():
        pos = f.data.find(needle)
        while pos >= 0:
            hits.append((name, pos))
            pos = f.data.find(needle, pos + 1)
    return hits


def test_corrupt_data_block_reads_eio() -> None:
    """Proves: a flipped byte in a stored data block makes reads of that block
    fail with EIO (ChecksumError), while every other block still reads back
    correctly, before and after a remount."""
    storage = SimStorage(label="sim-csum")
    Pool.mkfs(storage, compression=False)
    pool = Pool.open(storage)
    vid = pool.create_volume("disk", 0).id
    rng = random.Random(7)
    blocks = [rng.randbytes(BLOCK) for _ in range(16)]
    pool.write(vid, 0, b"".join(blocks))
    pool.sync()
    pool.close()  # drop any cache so the next read goes to storage

    hits = find_all(storage, blocks[5])
    assert hits, "block 5's bytes are not stored verbatim anywhere with compression off"
    for name, pos in hits:
        storage.files[name].data[pos + 1234] ^= 0x5A

    for _ in range(2):  # the second round proves nothing was "repaired" by a remount
        pool = Pool.open(storage)
        with pytest.raises(PoolError) as info:
            pool.read(vid, 5 * BLOCK, BLOCK)
        assert info.value.errno == errno.EIO, info.value
        with pytest.raises(PoolError) as info:
            pool.read(vid, 4 * BLOCK + 100, 2 * BLOCK)  # a range that spans the bad block
        assert info.value.errno == errno.EIO, info.value
        for b in range(16):
            if b != 5:
                assert pool.read(vid, b * BLOCK, BLOCK) == blocks[b], f"block {b}"
        pool.close()

    # Overwriting the bad block heals it: the new data goes elsewhere.
    pool = Pool.open(storage)
    pool.write(vid, 5 * BLOCK, blocks[5])
    pool.sync()
    pool.close()
    pool = Pool.open(storage)
    assert read_all(pool, vid, 16 * BLOCK) == b"".join(blocks)
    assert pool.check() == []
    pool.close()


def test_host_io_errors_are_pool_errors() -> None:
    """Proves: an I/O error of the file system under the pool while reading
    or writing volume data reaches the caller as PoolError(EIO) naming the
    pool -- never as a raw OSError --, a refused write leaves no data unit
    reserved or taken, and the data reads fine once the file system
    recovers."""
    storage = SimStorage(label="sim-ioerr")
    Pool.mkfs(storage, compression=False)
    pool = Pool.open(storage)
    vid = pool.create_volume("disk", 0).id
    data = random.Random(5).randbytes(4 * BLOCK)
    pool.write(vid, 0, data)
    pool.sync()

    def fail(op: str, name: str, offset: int, length: int) -> None:
        if name == "data" and op in ("read", "write"):
            raise OSError(errno.EIO, f"injected EIO on {op} of {name}")

    storage.fault = fail
    for what, call in [
        ("read", lambda: pool.read(vid, 0, BLOCK)),
        ("unaligned write (read-modify-write)", lambda: pool.write(vid, 100, b"abc")),
        ("aligned write", lambda: pool.write(vid, 8 * BLOCK, bytes([7]) * BLOCK)),
        ("write of raw blocks", lambda: pool.write(vid, 8 * BLOCK, data)),
        ("write of blocks and a hole", lambda: pool.write(vid, 8 * BLOCK, data + bytes(BLOCK) + data)),
    ]:
        free = pool.drc.free_units()
        with pytest.raises(PoolError) as info:
            call()
        assert info.value.errno == errno.EIO and "sim-ioerr" in str(info.value), f"{what}: {info.value!r}"
        assert pool.drc.free_units() == free and RESERVED not in pool.drc.rc, what
    storage.fault = None
    assert pool.read(vid, 0, 4 * BLOCK) == data
    pool.close()


@pytest.mark.parametrize("name", ["superblock", "meta", "journal"])
def test_open_with_unreadable_file(name: str) -> None:
    """Proves: when a pool file cannot be read (EIO from the file system),
    open refuses with a PoolError naming the pool, not a raw OSError, and
    works again once the file system recovers."""
    storage = SimStorage(label="sim-open-ioerr")
    Pool.mkfs(storage)
    pool = Pool.open(storage)
    pool.create_volume("v", 8192)
    pool.sync()  # the journal holds a record, so open has to read it

    def fail(op: str, fname: str, offset: int, length: int) -> None:
        if fname == name and op == "read":
            raise OSError(errno.EIO, f"injected EIO on {op} of {fname}")

    crashed = storage.crash(len(storage.log), "lose")
    crashed.fault = fail
    with pytest.raises(PoolError) as info:
        Pool.open(crashed)
    assert "sim-open-ioerr" in str(info.value), info.value
    crashed.fault = None
    pool = Pool.open(crashed)
    assert [i.name for i in pool.volumes()] == ["v"]
    pool.close()


def fill_until_enospc(pool: Pool, vid: int, rng: random.Random, limit: int) -> tuple[int, dict[int, bytes]]:
    """Write incompressible 64 KiB chunks to ``vid`` until ENOSPC; return the
    offset of the refused chunk and what was accepted before it."""
    written: dict[int, bytes] = {}
    off = 0
    while off < limit:
        chunk = rng.randbytes(64 * 1024)
        try:
            n = pool.write(vid, off, chunk)
        except PoolError as err:
            assert err.errno == errno.ENOSPC, err
            return off, written
        assert n == len(chunk)
        written[off] = chunk
        off += len(chunk)
    raise AssertionError(f"wrote {off} bytes into a pool of capacity {limit} without ENOSPC")


def test_full_pool() -> None:
    """Proves: when the file system under the pool is full, writes fail with
    ENOSPC; data synced before and writes accepted before still read back;
    sync, close and reopen work; deleting a volume frees space so that
    writes succeed again."""
    probe = SimStorage()
    Pool.mkfs(probe)
    base = probe.used()
    capacity = base + (40 << 20)  # room for the engine's host headroom plus a few MiB of data
    storage = SimStorage(capacity=capacity, label="sim-full")
    Pool.mkfs(storage)
    pool = Pool.open(storage)
    rng = random.Random(3)
    keep = pool.create_volume("keep", 0).id
    kept = rng.randbytes(512 * 1024)
    pool.write(keep, 0, kept)
    pool.sync()

    filler = pool.create_volume("filler", 0).id
    refused_at, written = fill_until_enospc(pool, filler, rng, 2 * capacity)
    assert refused_at > 0, "not even one chunk fit"
    assert read_all(pool, keep, len(kept)) == kept
    for off, chunk in written.items():
        assert pool.read(filler, off, len(chunk)) == chunk, f"filler chunk at {off}"
    pool.sync()
    assert pool.check() == []
    pool.close()

    pool = Pool.open(storage)
    assert pool.check() == []
    assert read_all(pool, keep, len(kept)) == kept
    for off, chunk in written.items():
        assert pool.read(filler, off, len(chunk)) == chunk, f"filler chunk at {off} after reopen"
    with pytest.raises(PoolError) as info:
        for i in range(64):
            pool.write(keep, len(kept) + i * 65536, rng.randbytes(65536))
    assert info.value.errno == errno.ENOSPC

    pool.delete_volume(filler)
    pool.sync()
    again = pool.create_volume("again", 0).id
    fresh = rng.randbytes(refused_at // 2)
    assert pool.write(again, 0, fresh) == len(fresh)
    pool.sync()
    assert pool.check() == []
    pool.close()

    pool = Pool.open(storage)
    assert read_all(pool, again, len(fresh)) == fresh
    assert read_all(pool, keep, len(kept)) == kept
    assert pool.check() == []
    pool.close()


def _tree_with_levels(storage: SimStorage) -> tuple[Pool, int, dict[int, bytes]]:
    """A pool whose volume 'disk' maps enough scattered blocks for a tree of
    more than one level, checkpointed and reopened so that nothing is cached."""
    Pool.mkfs(storage, compression=False)
    pool = Pool.open(storage)
    vid = pool.create_volume("disk", 64 << 20).id
    rng = random.Random(11)
    written = {}
    for b in range(0, 4000, 3):
        written[b] = rng.randbytes(BLOCK)
        pool.write(vid, b * BLOCK, written[b])
    pool.close()
    return Pool.open(storage), vid, written


def test_failed_tree_update_reloads_and_keeps_serving() -> None:
    """Proves: a node that cannot be read in the middle of a write fails that
    write with EIO and nothing else: the next request reloads the durable
    state (committing the writes acknowledged before), the write that failed
    left no trace, the FUSE layer is told to drop its caches, and the pool
    takes writes and fsyncs again; while the disk keeps failing, requests get
    EIO and the housekeeping tick retries until the reload works."""
    storage = SimStorage(label="sim-reload")
    pool, vid, written = _tree_with_levels(storage)
    reloads: list[int] = []
    pool.on_reload = reloads.append
    pool.write(vid, 1 * BLOCK, b"acknowledged, not yet fsynced".ljust(BLOCK, b"."))
    written[1] = pool.read(vid, BLOCK, BLOCK)

    def fail(op: str, name: str, offset: int, length: int) -> None:
        if (op, name) == ("read", "meta"):
            raise OSError(errno.EIO, "injected EIO on read of meta")

    storage.fault = fail
    with pytest.raises(PoolError) as info:
        pool.write(vid, 3999 * BLOCK, bytes([9]) * 2 * BLOCK)
    assert info.value.errno == errno.EIO, info.value
    assert pool.stale is not None
    # The disk still fails: the reload cannot happen yet, and says so.
    with pytest.raises(PoolError) as info:
        pool.read(vid, 0, BLOCK)
    assert info.value.errno == errno.EIO and "reload" in str(info.value), info.value
    pool.tick()
    assert pool.stale is not None and reloads == []

    storage.fault = None
    pool.tick()                       # the housekeeping retry does it
    assert pool.stale is None and reloads == [pool.next_id]
    for b, data in written.items():
        assert pool.read(vid, b * BLOCK, BLOCK) == data, f"block {b} after the reload"
    assert pool.read(vid, 3999 * BLOCK, 2 * BLOCK) == written[3999] + bytes(BLOCK)
    assert pool.check() == []
    pool.write(vid, 3999 * BLOCK, bytes([9]) * 2 * BLOCK)
    pool.sync()
    pool.close()
    reopened = Pool.open(storage)
    assert reopened.read(vid, BLOCK, BLOCK) == written[1]
    assert reopened.read(vid, 3999 * BLOCK, 2 * BLOCK) == bytes([9]) * 2 * BLOCK
    reopened.close()


def test_failing_background_retry_is_logged_once_a_minute(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: while the disk keeps failing, the once-a-second housekeeping
    retry logs one warning, then one per TICK_WARN_INTERVAL (with the count
    of failures in a row), and one more when it works again."""
    storage = SimStorage(label="sim-tickwarn")
    pool, vid, _ = _tree_with_levels(storage)

    def fail(op: str, name: str, offset: int, length: int) -> None:
        if (op, name) == ("read", "meta"):
            raise OSError(errno.EIO, "injected EIO on read of meta")

    storage.fault = fail
    with pytest.raises(PoolError):
        pool.write(vid, 3999 * BLOCK, bytes([9]) * 2 * BLOCK)   # leaves a reload pending
    clock = [1000.0]
    monkeypatch.setattr(pool_module.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.WARNING, logger="cowfs.pool")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "background commit" in r.getMessage()]

    for _ in range(5):
        pool.tick()
        clock[0] += 1
    assert len(warnings()) == 1 and "(1 in a row)" in warnings()[0], warnings()
    clock[0] += TICK_WARN_INTERVAL
    pool.tick()
    assert len(warnings()) == 2 and "(6 in a row)" in warnings()[1], warnings()
    storage.fault = None
    pool.tick()
    assert pool.stale is None
    assert len(warnings()) == 3 and "works again after 6 failures" in warnings()[2], warnings()
    pool.tick()
    assert len(warnings()) == 3
    pool.close()


def test_failed_data_sync_leaves_pool_read_only() -> None:
    """Proves: after a failed fdatasync of the data file the unsynced writes
    are given up: the pool serves its durable state, refuses writes, creates
    and snapshots with EROFS and every fsync with EIO (an application must
    never be told that a write it lost is durable), and a remount makes it
    writable again with every fsynced byte in place."""
    storage = SimStorage(label="sim-readonly")
    Pool.mkfs(storage, compression=False)
    pool = Pool.open(storage)
    vid = pool.create_volume("disk", 1 << 20).id
    durable = random.Random(3).randbytes(8 * BLOCK)
    pool.write(vid, 0, durable)
    pool.sync()
    pool.write(vid, 0, bytes([1]) * BLOCK)

    def fail(op: str, name: str, offset: int, length: int) -> None:
        if (op, name) == ("sync", "data"):
            raise OSError(errno.EIO, "injected EIO on sync of data")

    storage.fault = fail
    with pytest.raises(PoolError) as info:
        pool.sync()
    assert info.value.errno == errno.EIO
    storage.fault = None
    assert pool.read(vid, 0, 8 * BLOCK) == durable
    for what, call, want in [
        ("write", lambda: pool.write(vid, 0, b"x"), errno.EROFS),
        ("create", lambda: pool.create_volume("new"), errno.EROFS),
        ("snapshot", lambda: pool.snapshot(["disk"], "s"), errno.EROFS),
        ("truncate", lambda: pool.truncate(vid, 0), errno.EROFS),
        ("fsync", pool.sync, errno.EIO),
        ("fsync again", pool.sync, errno.EIO),
    ]:
        with pytest.raises(PoolError) as info:
            call()
        assert info.value.errno == want, f"{what}: {info.value.errname} {info.value}"
        assert "sim-readonly" in str(info.value), f"{what}: {info.value}"
    pool.close()
    pool = Pool.open(storage)
    assert pool.read(vid, 0, 8 * BLOCK) == durable
    pool.write(vid, 0, b"writable again")
    pool.sync()
    assert pool.check() == []
    pool.close()
