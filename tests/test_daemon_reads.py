"""The daemon's reads that do not wait, driven in trio without a mount
(VolumeOps on a pool on real files): what a mount cannot be made to do on
purpose, a reload of the pool while requests wait for their disk reads, and
a cancelled request while it watches the request queue."""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from cowfs.aio import DiskReads
from cowfs.blockio import OsStorage
from cowfs.format import BLOCK
from cowfs.pool import Pool
from cowfs_daemon import fuse_ops

BLOCKS = 64
READ_BLOCKS = range(0, BLOCKS, BLOCKS // 16)     # 16 reads, one block each


def _cold_volume(tmp_path: Path) -> tuple[Pool, int, bytes]:
    """A pool on real files with one volume of ``BLOCKS`` random blocks,
    synced and dropped from the host page cache: (pool, volume id, bytes)."""
    storage = OsStorage(str(tmp_path))
    Pool.mkfs(storage, compression=False)
    pool = Pool.open(storage)
    vid = pool.create_volume("disk", BLOCKS * BLOCK).id
    payload = random.Random(3).randbytes(BLOCKS * BLOCK)
    pool.write(vid, 0, payload)
    pool.sync()
    os.posix_fadvise(pool.data.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return pool, vid, payload


def _run_reads(ops: fuse_ops.VolumeOps, vid: int,
               read: Callable[[int, int], Awaitable[None]],
               then: Callable[[], Awaitable[None]], one_per_turn: bool = False) -> None:
    """In trio, with the daemon's reads that do not wait on: open volume
    ``vid``, start ``read(fh, block)`` for each of ``READ_BLOCKS`` (all at
    once, or one each turn of the loop, as requests taken up one by one),
    run ``then()`` and stop.  Skips where the system cannot do such reads
    (once out of trio: inside, the nursery would make the skip an error)."""
    supported = [True]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.serve_disk_reads)
            await trio.testing.wait_all_tasks_blocked()
            if not ops._async_reads:
                supported[0] = False
            else:
                info = await ops.open(fuse_ops.VOLUME_INODE_BASE + vid, os.O_RDONLY, None)
                for b in READ_BLOCKS:
                    nursery.start_soon(read, info.fh, b)
                    if one_per_turn:
                        await trio.lowlevel.checkpoint()
                await then()
            nursery.cancel_scope.cancel()

    trio.run(main)
    if not supported[0]:
        ops.pool.close()
        pytest.skip("no native AIO, cachestat or O_DIRECT here")


async def _answered(answers: dict[int, bytes], count: int) -> None:
    """Return once ``answers`` holds ``count`` reads (fails after 10 s)."""
    with trio.fail_after(10):
        while len(answers) < count:
            await trio.sleep(0.01)


def test_reads_waiting_for_the_disk_are_answered_after_a_pool_reload(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: 16 cold 4 KiB reads that started their disk reads on the
    data file and wait for them (their completions held back) are woken when
    the pool reloads its durable state (which opens the data file again and
    drops those reads), start again on the new file and are answered with
    the right bytes; reads that do not wait are on again after the reload."""
    pool, vid, payload = _cold_volume(tmp_path)
    # VolumeOps assumes requests are queued unless told otherwise, so every
    # cold read starts a disk read and waits for it.
    ops = fuse_ops.VolumeOps(pool)
    held = [True]
    real_reap = Pool.reap_reads
    monkeypatch.setattr(Pool, "reap_reads", lambda self: [] if held[0] else real_reap(self))
    answers: dict[int, bytes] = {}

    async def read(fh: int, b: int) -> None:
        answers[b] = await ops.read(fh, b * BLOCK, BLOCK)

    async def reload_then_wait() -> None:
        await trio.testing.wait_all_tasks_blocked()
        assert len(ops._disk_waiters) == len(READ_BLOCKS) and not answers
        pool.stale = "a test"           # the next housekeeping tick reloads
        held[0] = False
        pool.tick()
        assert pool.reloads == 1 and ops._async_reads
        await _answered(answers, len(READ_BLOCKS))

    _run_reads(ops, vid, read, reload_then_wait)
    for b in READ_BLOCKS:
        assert answers[b] == payload[b * BLOCK:(b + 1) * BLOCK], f"block {b}"
    pool.close()


@pytest.mark.parametrize("case", ["together", "watcher cancelled", "one per turn"])
def test_reads_taken_up_meanwhile_go_to_the_disk_with_the_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """Proves: of 16 cold reads that arrive together, the first watches the
    request queue and, once all 16 have started their disk reads, sends them
    to the disk in one call; the other 15 wait only for their own disk read
    (nobody sends again).  Should the watching request be cancelled while
    it watches, it still sends the others' reads on its way out, and they
    are answered with the right bytes.  Reads taken up one by one go in
    batches: the watcher sends once ``READ_BATCH`` wait to be sent, before
    the queue is empty, and the next read watches for the rest."""
    pool, vid, payload = _cold_volume(tmp_path)
    ops = fuse_ops.VolumeOps(pool)
    cancel_watcher = case == "watcher cancelled"
    if case != "one per turn":
        monkeypatch.setattr(fuse_ops, "READ_BATCH", 2 * len(READ_BLOCKS))
    scopes: dict[trio.lowlevel.Task, trio.CancelScope] = {}
    sent: list[int] = []            # reads queued at each send to the disk
    real_submit = DiskReads.submit

    def submit(self: DiskReads) -> list[object]:
        sent.append(self.queued)
        return real_submit(self)

    def queue_empty() -> bool:
        # The queue is "taken up" once every read has started its disk read;
        # until then the watcher keeps watching.
        if len(ops._disk_waiters) < len(READ_BLOCKS):
            return False
        if cancel_watcher:
            scopes[trio.lowlevel.current_task()].cancel()
            return False
        return True

    monkeypatch.setattr(DiskReads, "submit", submit)
    ops.queue_watched = True
    ops.queue_empty = queue_empty
    answers: dict[int, bytes] = {}

    async def read(fh: int, b: int) -> None:
        with trio.CancelScope() as scope:
            scopes[trio.lowlevel.current_task()] = scope
            answers[b] = await ops.read(fh, b * BLOCK, BLOCK)

    _run_reads(ops, vid, read, lambda: _answered(answers, len(READ_BLOCKS) - cancel_watcher),
               one_per_turn=case == "one per turn")
    pool.close()
    if case == "one per turn":
        assert fuse_ops.READ_BATCH <= sent[0] < len(READ_BLOCKS), sent
        assert sum(sent) == len(READ_BLOCKS) and 0 not in sent, sent
    else:
        assert sent == [len(READ_BLOCKS)]
    assert len(answers) == len(READ_BLOCKS) - cancel_watcher
    for b, data in answers.items():
        assert data == payload[b * BLOCK:(b + 1) * BLOCK], f"block {b}"


def test_disk_read_polling_is_off_while_the_daemon_may_run_on_one_cpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves: the poller gives the pool's reads its window only while the
    daemon may run on two CPUs or more, and takes it back (0: reads that
    wait for the disk sleep at once) when it is confined to one, where
    polling would only take the client's CPU."""
    pool, _, _ = _cold_volume(tmp_path)
    ops = fuse_ops.VolumeOps(pool, poll_window=250e-6)
    ops.queue_watched = True
    cpus = [{0, 1}]
    monkeypatch.setattr(fuse_ops.os, "sched_getaffinity", lambda pid: cpus[0])
    monkeypatch.setattr(fuse_ops, "POLL_RECHECK", 0.01)
    seen = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.serve_polling)
            await trio.sleep(0.05)
            seen.append(pool.read_poll)
            cpus[0] = {1}
            ops._request_done()     # a request: the poller looks at its CPUs again
            await trio.sleep(0.05)
            seen.append(pool.read_poll)
            cpus[0] = {0, 1}
            await trio.sleep(0.05)
            seen.append(pool.read_poll)
            nursery.cancel_scope.cancel()

    ops.queue_empty = lambda: True
    try:
        trio.run(main)
    finally:
        pool.close()
    assert seen == [250e-6, 0.0, 250e-6]
