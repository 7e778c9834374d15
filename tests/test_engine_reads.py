"""Pool.read without waiting for the disk: what the FUSE layer uses to let
queued requests start their disk reads before one of them waits."""

from __future__ import annotations

import random

from cowfs.blockio import SimStorage
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
