"""Reads of data that is not in the host's page cache, through a real mount.

The daemon answers such a read only after letting the requests queued behind
it start their own disk reads, so a read can now be interleaved with other
requests.  Sixteen readers and a writer work on one volume whose data was
dropped from the page cache: every read must return a version of its block
that was written (never a mix, never another block's), the last one once
the writer is done, and ``.pool/status`` must show that reads were taken
from the disk and overlapped."""

from __future__ import annotations

import json
import os
import random
import struct
import threading
from collections.abc import Callable

import pytest

from helpers_mount import CowfsMount, drop_page_cache, write_file

pytestmark = pytest.mark.mount

BLOCK = 4096
BLOCKS = 8192            # 32 MiB
READERS = 16
READS_EACH = 300


def content(block: int, version: int) -> bytes:
    """What ``block`` holds at ``version``: its number and version, repeated."""
    return struct.pack("<QQ", block, version) * (BLOCK // 16)


def check(block: int, data: bytes, written: dict[int, int]) -> int:
    """The version ``data`` is of ``block``; fails if it is not one written."""
    got_block, version = struct.unpack_from("<QQ", data)
    assert got_block == block, f"block {block} read as block {got_block}"
    assert data == content(block, version), f"block {block}: torn or mixed content"
    assert version <= written[block], f"block {block}: version {version} never written"
    return version


def test_uncached_reads_overlap_and_stay_consistent(
        make_cowfs: Callable[..., CowfsMount]) -> None:
    cm = make_cowfs()
    vol = cm.mnt / "v.img"
    write_file(vol, b"".join(content(b, 0) for b in range(BLOCKS)), fsync=True)
    written = {b: 0 for b in range(BLOCKS)}
    drop_page_cache(cm.pool / "data")
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        vfd = os.open(vol, os.O_RDONLY)
        try:
            for _ in range(READS_EACH):
                b = rng.randrange(BLOCKS)
                data = os.pread(vfd, BLOCK, b * BLOCK)
                with lock:
                    check(b, data, written)
        except BaseException as e:
            errors.append(e)
        finally:
            os.close(vfd)

    def writer() -> None:
        rng = random.Random(99)
        vfd = os.open(vol, os.O_WRONLY)
        try:
            while not stop.is_set():
                b = rng.randrange(BLOCKS)
                with lock:
                    written[b] += 1
                    version = written[b]
                os.pwrite(vfd, content(b, version), b * BLOCK)
        except BaseException as e:
            errors.append(e)
        finally:
            os.close(vfd)

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(READERS)]
    w = threading.Thread(target=writer)
    for t in readers + [w]:
        t.start()
    for t in readers:
        t.join(120)
    stop.set()
    w.join(60)
    assert not errors, errors[0]
    # The writer's versions raced the readers' checks (a version counted
    # before its write); at rest, every block holds its last version.
    vfd = os.open(vol, os.O_RDONLY)
    try:
        for b in range(BLOCKS):
            assert check(b, os.pread(vfd, BLOCK, b * BLOCK), written) == written[b]
    finally:
        os.close(vfd)
    reads = json.loads((cm.mnt / ".pool" / "status").read_bytes())["reads"]
    assert reads["uncached"] > READERS, reads
    assert 0 < reads["overlapped"] <= reads["uncached"], reads
