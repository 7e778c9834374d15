"""Pool.write of many blocks: which blocks it stores, how (compressed or
as they came, lz4 left out on volumes it keeps failing on), and the space it
takes for them, exactly."""

from __future__ import annotations

import errno
import random
from array import array

import pytest

from cowfs.blockio import SimStorage
from cowfs._oneblock import block_checksums
from cowfs.errors import PoolError
from cowfs.format import checksum
from cowfs.pool import (BLOCK, INCOMPRESSIBLE_GIVE_UP, INCOMPRESSIBLE_STREAK, LZ4_PROBE_EVERY,
                        Pool)
from cowfs.spacemap import PENDING, RESERVED, SYSTEM


def referenced_units(pool: Pool) -> int:
    """Data units that leaf pointers reference now."""
    return sum(1 for c in pool.drc.rc if c not in (0, PENDING, RESERVED, SYSTEM))


def block(kind: str, rng: random.Random) -> bytes:
    """One 4 KiB block: random (incompressible), text-like or zeros."""
    if kind == "random":
        return rng.randbytes(BLOCK)
    if kind == "text":
        return ((b"cowfs block %d " % rng.randrange(1000)) * BLOCK)[:BLOCK]
    return bytes(BLOCK)


@pytest.mark.parametrize("compression", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_many_block_writes_store_each_block_once(compression: bool, seed: int) -> None:
    """Proves: a write of 2-64 blocks mixing random, compressible and zero
    blocks (zero ones also after lz4 has given up on the write) reads back
    as written, maps no zero block, and takes exactly the data units its
    stored blocks need: one per raw block, the packed sectors of the
    compressed ones (at most one unit per block), none for zeros; and leaves
    no unit reserved.  Phases of random data make lz4 give up on a volume
    (INCOMPRESSIBLE_STREAK writes in a row, then one write in
    LZ4_PROBE_EVERY tried) until a tried write packs a block again."""
    rng = random.Random(seed)
    storage = SimStorage(label=f"writes-{seed}")
    Pool.mkfs(storage, compression=compression)
    pool = Pool.open(storage)
    vid = pool.create_volume("v", 1 << 20).id
    streak = 0                  # the model of the volume's lz4 state
    skipped = probed = 0
    for step in range(72):
        nb = rng.randrange(2, 65)
        if (step // 12) % 2:
            kinds = ["random"] * nb
        else:
            # Random blocks first often enough that lz4 gives up part way.
            head = ["random"] * rng.randrange(0, INCOMPRESSIBLE_GIVE_UP + 2)
            kinds = (head + rng.choices(["random", "text", "zero"], k=nb))[:nb]
        data = b"".join(block(k, rng) for k in kinds)
        offset = rng.randrange(0, (1 << 20) // BLOCK - nb + 1) * BLOCK
        pool.sync()
        assert PENDING not in pool.drc.rc
        before = referenced_units(pool)
        pool.write(vid, offset, data)
        assert pool.read(vid, offset, len(data)) == data, f"step {step}"
        assert RESERVED not in pool.drc.rc, f"step {step}: a unit left reserved"
        # New units referenced; the old ones this write replaced are PENDING.
        taken = referenced_units(pool) - before + pool.drc.rc.count(PENDING)
        # lz4 is tried (unless the volume's streak says to skip this write)
        # until INCOMPRESSIBLE_GIVE_UP random blocks failed it: text blocks
        # before that are packed (1 to n units for n), every other non-zero
        # block takes a unit of its own.
        tried = compression
        if tried and streak >= INCOMPRESSIBLE_STREAK:
            streak += 1
            tried = streak % LZ4_PROBE_EVERY == 0
            skipped += not tried
            probed += tried
        upto, gave_up = (nb, False) if tried else (0, False)
        if tried:
            misses = 0
            for i, k in enumerate(kinds):
                misses += k == "random"
                if misses == INCOMPRESSIBLE_GIVE_UP:
                    upto, gave_up = i + 1, True
                    break
        packed = sum(k == "text" for k in kinds[:upto])
        if packed:
            streak = 0
        elif gave_up and streak < INCOMPRESSIBLE_STREAK:
            streak += 1
        own = sum(k != "zero" for k in kinds) - packed
        assert own + min(packed, 1) <= taken <= own + packed, \
            f"step {step}: {taken} units for {kinds}"
    if compression:
        assert skipped and probed, "the test should reach the volume's skipping of lz4"
    pool.close()


def test_lz4_is_left_out_per_volume_and_comes_back() -> None:
    """Proves: after INCOMPRESSIBLE_STREAK writes lz4 gave up on, a volume's
    compressible writes are stored raw but for one in LZ4_PROBE_EVERY; the
    first such probe compresses again, and so do the writes after it; another
    volume of the pool compresses throughout, and writes lz4 neither packed
    nor gave up on (one random block and zeros) do not count."""
    rng = random.Random(11)
    storage = SimStorage(label="writes-lz4-streak")
    Pool.mkfs(storage, compression=True)
    pool = Pool.open(storage)
    media, docs = pool.create_volume("media", 1 << 20).id, pool.create_volume("docs", 1 << 20).id
    text = b"".join(block("text", rng) for _ in range(4))

    def units_for(vid: int, data: bytes) -> int:
        pool.sync()
        before = referenced_units(pool)
        pool.write(vid, 0, data)
        assert pool.read(vid, 0, len(data)) == data
        return referenced_units(pool) - before + pool.drc.rc.count(PENDING)

    for _ in range(INCOMPRESSIBLE_STREAK):
        assert units_for(media, rng.randbytes(4 * BLOCK)) == 4
    assert units_for(docs, text) == 1
    raw = [units_for(media, text) for _ in range(LZ4_PROBE_EVERY)]
    # The streak counts on from INCOMPRESSIBLE_STREAK: the probe is the
    # write that brings it to a multiple of LZ4_PROBE_EVERY.
    probe = (-INCOMPRESSIBLE_STREAK - 1) % LZ4_PROBE_EVERY
    assert raw == [1 if i == probe else 4 for i in range(probe + 1)] + \
        [1] * (LZ4_PROBE_EVERY - probe - 1)
    assert units_for(docs, text) == 1
    for _ in range(INCOMPRESSIBLE_STREAK - 1):
        assert units_for(docs, rng.randbytes(4 * BLOCK)) == 4
    for _ in range(2 * INCOMPRESSIBLE_STREAK):
        assert units_for(docs, rng.randbytes(BLOCK) + bytes(BLOCK)) == 1
    assert units_for(docs, text) == 1
    pool.close()


@pytest.mark.parametrize("nb", [1, 2, 256])
def test_block_checksums_is_checksum_of_each_block(nb: int, checksum_path: str) -> None:
    """Proves: block_checksums puts format.checksum of block m of its data,
    from a memoryview starting anywhere, in item m of the array; a length
    that is not whole blocks, an array of another length or item size, or
    read-only output are refused with the array unchanged."""
    rng = random.Random(nb)
    buf = rng.randbytes((nb + 1) * BLOCK)
    view = memoryview(buf)[BLOCK:]
    out = array("Q", [7]) * nb
    block_checksums(view, out)
    assert list(out) == [checksum(view[m * BLOCK:(m + 1) * BLOCK]) for m in range(nb)]
    before = array("Q", out)
    for data, sums, error in ((view[1:], out, ValueError), (buf, out, ValueError),
                              (view, array("Q", [0]) * (nb + 1), ValueError),
                              (view, array("I", [0]) * nb, TypeError),
                              (view, bytes(8 * nb), BufferError)):
        with pytest.raises(error):
            block_checksums(data, sums)
    assert out == before
    block_checksums(b"", array("Q"))            # no blocks: nothing to do


@pytest.mark.parametrize("kinds", [["random"] * 8, ["random", "text", "zero", "random"] * 2],
                         ids=["raw", "mixed"])
def test_many_block_write_into_scattered_free_space(kinds: list[str]) -> None:
    """Proves: when the file system under the pool is full and the pool's
    free units are scattered (no run as long as the write), a write of
    several blocks still succeeds, one unit per stored block wherever one is
    free, reads back, survives a reopen, and leaves no unit reserved."""
    probe = SimStorage()
    Pool.mkfs(probe)
    storage = SimStorage(capacity=probe.used() + (40 << 20), label="writes-scattered")
    Pool.mkfs(storage, compression=True)
    pool = Pool.open(storage)
    rng = random.Random(len(kinds))
    keep, gone = pool.create_volume("keep", 0).id, pool.create_volume("gone", 0).id
    # Single blocks of the two volumes in turn take units in turn, until
    # the host has no room for the pool to grow.
    written: dict[int, bytes] = {}
    b = 0
    try:
        while True:
            data = rng.randbytes(BLOCK)
            pool.write(keep, b * BLOCK, data)
            written[b] = data
            pool.write(gone, b * BLOCK, rng.randbytes(BLOCK))
            b += 1
    except PoolError as err:
        assert err.errno == errno.ENOSPC, err
    pool.delete_volume(gone)
    pool.sync()
    nb = len(kinds)
    assert pool.drc.find_free(nb) == -1, "free space should have no run this long"
    data = b"".join(block(k, rng) for k in kinds)
    before = referenced_units(pool)
    pool.write(keep, 0, data)
    assert pool.read(keep, 0, len(data)) == data
    assert RESERVED not in pool.drc.rc
    assert referenced_units(pool) - before + pool.drc.rc.count(PENDING) == \
        sum(k != "zero" for k in kinds)
    pool.sync()
    assert pool.check() == []
    pool.close()
    pool = Pool.open(storage)
    assert pool.read(keep, 0, len(data)) == data
    for i in range(nb, b):
        assert pool.read(keep, i * BLOCK, BLOCK) == written[i], f"block {i}"
    assert pool.check() == []
    pool.close()
