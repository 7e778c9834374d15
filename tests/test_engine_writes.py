"""Pool.write of many blocks: which blocks it stores, how (compressed or
as they came), and the space it takes for them, exactly."""

from __future__ import annotations

import random

import pytest

from cowfs.blockio import SimStorage
from cowfs.pool import BLOCK, INCOMPRESSIBLE_GIVE_UP, Pool
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
    no unit reserved."""
    rng = random.Random(seed)
    storage = SimStorage(label=f"writes-{seed}")
    Pool.mkfs(storage, compression=compression)
    pool = Pool.open(storage)
    vid = pool.create_volume("v", 1 << 20).id
    for step in range(30):
        nb = rng.randrange(2, 65)
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
        # lz4 is tried until INCOMPRESSIBLE_GIVE_UP random blocks failed it:
        # text blocks before that are packed (1 to n units for n), every
        # other non-zero block takes a unit of its own.
        tried = nb
        if compression:
            misses = 0
            for i, k in enumerate(kinds):
                misses += k == "random"
                if misses == INCOMPRESSIBLE_GIVE_UP:
                    tried = i + 1
                    break
        else:
            tried = 0
        packed = sum(k == "text" for k in kinds[:tried])
        own = sum(k != "zero" for k in kinds) - packed
        assert own + min(packed, 1) <= taken <= own + packed, \
            f"step {step}: {taken} units for {kinds}"
    pool.close()
