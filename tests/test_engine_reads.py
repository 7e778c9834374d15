"""Pool.read: without waiting for the disk (what the FUSE layer uses to let
queued requests start their disk reads before one of them waits), and reads
of many blocks, whose runs of raw blocks are found and checked in C."""

from __future__ import annotations

import errno
import platform
import random
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowfs._oneblock import first_bad, native_checksums, raw_run, read_buffer
from cowfs.blockio import SimStorage
from cowfs.errors import ChecksumError
from cowfs.format import DATA_FILE, SECTOR, SECTORS_PER_BLOCK, checksum
from cowfs.pool import BLOCK, Pool


def test_reads_that_would_wait_for_the_disk() -> None:
    """Pool.read(wait=False) answers None when a block it needs is not in
    the page cache (the simulator says which), a callable ``wait`` is asked
    only then and decides, and the next read returns the data; holes,
    compressed and multi-block reads alike."""
    storage = SimStorage(label="nowait")
    Pool.mkfs(storage)
    pool = Pool.open(storage)
    vid = pool.create_volume("v", 64 * BLOCK).id
    data = random.Random(7).randbytes(8 * BLOCK) + b"cowfs" * (8 * BLOCK // 5) + b"xyz"
    pool.write(vid, 0, data)
    asked = []

    def wait(answer: bool):
        def ask() -> bool:
            asked.append(answer)
            return answer
        return ask

    for off, length in ((0, BLOCK), (BLOCK, 3 * BLOCK), (9 * BLOCK, 2 * BLOCK), (100, 5000)):
        want = data[off:off + length]
        assert pool.read(vid, off, length, wait=False) == want       # all cached
        assert pool.read(vid, off, length, wait=wait(False)) == want
        assert asked == []
        storage.uncached = 1
        assert pool.read(vid, off, length, wait=False) is None
        storage.uncached = 1
        assert pool.read(vid, off, length, wait=wait(False)) is None
        storage.uncached = 1
        assert pool.read(vid, off, length, wait=wait(True)) == want
        assert asked == [False, True]
        asked.clear()
        storage.uncached = 1
        assert pool.read(vid, off, length) == want                    # waits
        storage.uncached = 0
    # A hole needs no data read at all.
    storage.uncached = 1
    assert pool.read(vid, 40 * BLOCK, BLOCK, wait=False) == bytes(BLOCK)
    # Counted: the three misses of each range (a read that waits anyway
    # does not ask, so it is not one).
    assert pool.uncached_reads == 3 * 4
    pool.close()


# -- reads of many blocks: runs of raw blocks, in C ----------------------------

def _raw_run_model(keys: list[int], addrs: list[int], slens: list[int], i: int, j: int) -> int:
    """raw_run's promise, written plainly."""
    k = i + 1
    if slens[i] != BLOCK:
        return k
    while (k < j and slens[k] == BLOCK and keys[k] == keys[k - 1] + 1
           and addrs[k] == addrs[k - 1] + SECTORS_PER_BLOCK):
        k += 1
    return k


# A leaf: each entry one step after the one before (key gap 0 or more,
# stored right after the previous block or elsewhere), raw or compressed.
_entry = st.tuples(st.sampled_from([1, 1, 1, 2, 40]),
                   st.sampled_from([SECTORS_PER_BLOCK] * 3 + [0, 1, 2 * SECTORS_PER_BLOCK, -8]),
                   st.sampled_from([BLOCK, BLOCK, BLOCK, 100, BLOCK - 1]))


@settings(max_examples=400, deadline=None)
@given(st.lists(_entry, min_size=1, max_size=60), st.data())
def test_raw_run_ends_where_the_run_ends(entries: list[tuple[int, int, int]],
                                         data: st.DataObject) -> None:
    """Proves: raw_run gives the end of the run of consecutive, raw,
    physically contiguous entries from i, bounded by j, for any leaf."""
    keys, addrs, slens = array("Q"), array("Q"), array("H")
    key, sector = 5, 1000
    for step, advance, slen in entries:
        key += step
        sector += advance
        keys.append(key)
        addrs.append(sector)
        slens.append(slen)
    i = data.draw(st.integers(0, len(keys) - 1))
    j = data.draw(st.integers(i + 1, len(keys)))
    assert raw_run(keys, addrs, slens, i, j) == _raw_run_model(
        list(keys), list(addrs), list(slens), i, j)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # a mode for the whole test
@given(st.integers(0, 12), st.integers(0, 4), st.sets(st.integers(0, 11)))
def test_first_bad_finds_the_first_wrong_checksum(checksum_path: str, nb: int, start: int,
                                                  wrong: set[int]) -> None:
    """Proves: first_bad checks each block of a buffer against csums[i + m]
    and answers the first m that differs, or -1, whatever the offset i, with
    the checksums taken in C and through xxhash's Python function."""
    rng = random.Random(nb * 100 + start)
    buf = rng.randbytes(nb * BLOCK)
    csums = array("Q", [rng.getrandbits(64) for _ in range(start)])
    for m in range(nb):
        good = checksum(buf[m * BLOCK:(m + 1) * BLOCK])
        csums.append(good ^ 1 if m in wrong else good)
    csums.append(rng.getrandbits(64))           # entries after the buffer's: not read
    bad = [m for m in range(nb) if m in wrong]
    assert first_bad(buf, csums, start) == (bad[0] if bad else -1)
    # A view that starts one block in, checked from the next checksum on.
    assert first_bad(memoryview(buf)[BLOCK:], csums, start + 1) == next(
        (m - 1 for m in bad if m >= 1), -1)


@pytest.mark.skipif(platform.machine() != "x86_64",
                    reason="xxhash builds XXH3_64bits_dispatch for x86-64 only")
def test_checksums_are_taken_in_c() -> None:
    """Proves: on x86-64 the module found xxhash's C function and agreed with
    its Python one at import (else every block's checksum would cost a
    Python call, silently), and it can be switched off and on again."""
    assert native_checksums(True) is True
    assert native_checksums(False) is False
    assert native_checksums(True) is True


def test_c_read_helpers_refuse_bad_arguments() -> None:
    """Proves: mismatched or out-of-range arguments raise, never read past an
    array; read_buffer gives a bytearray of the length asked."""
    keys, addrs, slens = array("Q", [1, 2]), array("Q", [8, 16]), array("H", [BLOCK, BLOCK])
    assert raw_run(keys, addrs, slens, 0, 2) == 2
    for i, j in ((0, 3), (-1, 1), (1, 1), (2, 2)):
        with pytest.raises(IndexError):
            raw_run(keys, addrs, slens, i, j)
    with pytest.raises(ValueError):
        raw_run(keys, addrs, array("H", [BLOCK]), 0, 1)
    with pytest.raises(TypeError):
        raw_run(keys, array("I", [8, 16]), slens, 0, 1)
    csums = array("Q", [checksum(bytes(BLOCK))] * 2)
    assert first_bad(bytes(2 * BLOCK), csums, 0) == -1
    with pytest.raises(IndexError):
        first_bad(bytes(2 * BLOCK), csums, 1)
    with pytest.raises(IndexError):
        first_bad(bytes(BLOCK), csums, -1)
    with pytest.raises(ValueError):
        first_bad(bytes(BLOCK + 1), csums, 0)
    buf = read_buffer(3 * BLOCK)
    assert isinstance(buf, bytearray) and len(buf) == 3 * BLOCK
    with pytest.raises(ValueError):
        read_buffer(-1)


def _mixed_volume(compression: bool) -> tuple[SimStorage, Pool, int, bytes]:
    """A pool whose volume has every shape a long read meets: sequentially
    written raw runs across leaf boundaries, compressible blocks, holes,
    and overwritten blocks stored elsewhere."""
    storage = SimStorage(label="sim-long-reads")
    Pool.mkfs(storage, compression=compression)
    pool = Pool.open(storage)
    size = 1200 * BLOCK
    vid = pool.create_volume("v", size).id
    rng = random.Random(11)
    model = bytearray(size)

    def put(off: int, data: bytes) -> None:
        pool.write(vid, off, data)
        model[off:off + len(data)] = data

    put(0, rng.randbytes(600 * BLOCK))                      # spans several leaves
    put(700 * BLOCK, b"compress me " * (100 * BLOCK // 12))  # compressible
    put(900 * BLOCK, rng.randbytes(300 * BLOCK))
    for _ in range(60):                                     # overwrites: runs broken
        b = rng.randrange(1200)
        put(b * BLOCK, rng.randbytes(BLOCK) if rng.random() < 0.7 else b"z" * BLOCK)
    pool.sync()
    return storage, pool, vid, bytes(model)


@pytest.mark.parametrize("compression", [True, False])
def test_long_reads_match_what_was_written(compression: bool) -> None:
    """Proves: reads of up to 2 MiB at any offset over raw runs, compressed
    blocks, holes and overwritten blocks return what was written."""
    _, pool, vid, model = _mixed_volume(compression)
    rng = random.Random(3)
    for _ in range(300):
        off = rng.randrange(len(model))
        length = rng.choice([2 * BLOCK, 64 * BLOCK, 256 * BLOCK, 512 * BLOCK,
                             rng.randrange(1, 600 * BLOCK)])
        assert pool.read(vid, off, length) == model[off:off + length], (off, length)
    pool.close()


def test_one_data_read_for_a_sequentially_written_range() -> None:
    """Proves: a 1 MiB read of data written in one sequence is one read of
    the data file, although its blocks lie in more than one leaf."""
    storage = SimStorage(label="sim-one-read")
    Pool.mkfs(storage)
    pool = Pool.open(storage)
    vid = pool.create_volume("v", 1024 * BLOCK).id
    data = random.Random(5).randbytes(1024 * BLOCK)
    for off in range(0, len(data), 256 * BLOCK):
        pool.write(vid, off, data[off:off + 256 * BLOCK])
    pool.sync()
    reads: list[int] = []

    def count(op: str, name: str, offset: int, length: int) -> None:
        if op == "read" and name == DATA_FILE:
            reads.append(length)

    storage.fault = count
    assert pool.read(vid, 300 * BLOCK, 256 * BLOCK) == data[300 * BLOCK:556 * BLOCK]
    assert len(list(pool.tree.leaf_spans(pool.datasets[vid].root, 300, 256))) > 1
    assert reads == [256 * BLOCK]
    pool.close()


def test_a_bad_block_inside_a_long_run_is_named() -> None:
    """Proves: a flipped byte in one block of a run read as one piece makes
    every read that covers it fail with EIO naming that block's offset, and
    reads around it still succeed."""
    storage, pool, vid, model = _mixed_volume(compression=False)
    victim = 200                                    # inside the first raw run
    leaf, _ = pool.tree.find_leaf(pool.datasets[vid].root, victim)
    sector = leaf.addrs[list(leaf.keys).index(victim)]
    storage.files[DATA_FILE].data[sector * SECTOR + 77] ^= 0x10
    for off, length in ((0, 256 * BLOCK), (victim * BLOCK, BLOCK),
                        ((victim - 1) * BLOCK + 5, 3 * BLOCK)):
        with pytest.raises(ChecksumError) as info:
            pool.read(vid, off, length)
        assert info.value.errno == errno.EIO
        assert f"offset {victim * BLOCK} " in str(info.value), info.value
    assert pool.read(vid, 0, victim * BLOCK) == model[:victim * BLOCK]
    assert pool.read(vid, (victim + 1) * BLOCK, 300 * BLOCK) == \
        model[(victim + 1) * BLOCK:(victim + 301) * BLOCK]
    pool.close()
