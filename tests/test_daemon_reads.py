"""The daemon's reads that do not wait, driven in trio without a mount
(VolumeOps on a pool on real files): what a mount cannot be made to do on
purpose, a reload of the pool while requests wait for their disk reads."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from cowfs.blockio import OsStorage
from cowfs.format import BLOCK
from cowfs.pool import Pool
from cowfs_daemon import fuse_ops

BLOCKS = 64


def test_reads_waiting_for_the_disk_are_answered_after_a_pool_reload(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: 16 cold 4 KiB reads that started their disk reads on the
    data file and wait for them (their completions held back) are woken when
    the pool reloads its durable state (which opens the data file again and
    drops those reads), start again on the new file and are answered with
    the right bytes; reads that do not wait are on again after the reload."""
    storage = OsStorage(str(tmp_path))
    Pool.mkfs(storage, compression=False)
    pool = Pool.open(storage)
    vid = pool.create_volume("disk", BLOCKS * BLOCK).id
    payload = random.Random(3).randbytes(BLOCKS * BLOCK)
    pool.write(vid, 0, payload)
    pool.sync()
    os.posix_fadvise(pool.data.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    # VolumeOps assumes requests are queued unless told otherwise, so every
    # cold read starts a disk read and waits for it.
    ops = fuse_ops.VolumeOps(pool)
    held = [True]
    real_reap = Pool.reap_reads
    monkeypatch.setattr(Pool, "reap_reads", lambda self: [] if held[0] else real_reap(self))
    answers: dict[int, bytes] = {}
    blocks = range(0, BLOCKS, BLOCKS // 16)
    unsupported = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.serve_disk_reads)
            await trio.testing.wait_all_tasks_blocked()
            if not ops._async_reads:
                # Skipped outside trio: inside, the nursery would wrap it.
                unsupported.append(True)
                nursery.cancel_scope.cancel()
                return
            info = await ops.open(fuse_ops.VOLUME_INODE_BASE + vid, os.O_RDONLY, None)

            async def read(b: int) -> None:
                answers[b] = await ops.read(info.fh, b * BLOCK, BLOCK)

            for b in blocks:
                nursery.start_soon(read, b)
            await trio.testing.wait_all_tasks_blocked()
            assert len(ops._disk_waiters) == len(blocks) and not answers
            pool.stale = "a test"           # the next housekeeping tick reloads
            held[0] = False
            pool.tick()
            assert pool.reloads == 1 and ops._async_reads
            with trio.fail_after(10):
                while len(answers) < len(blocks):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    if unsupported:
        pool.close()
        pytest.skip("no native AIO, cachestat or O_DIRECT here")
    for b in blocks:
        assert answers[b] == payload[b * BLOCK:(b + 1) * BLOCK], f"block {b}"
    pool.close()
