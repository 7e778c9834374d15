"""Scale: a 64 GiB volume holding 2 million scattered 4 KiB blocks.

The mapping metadata lives on disk behind a bounded cache, so the daemon's
peak RSS must stay under 256 MiB while it serves random reads and random
overwrites across all 2 million mappings, and a remount of the pool must take
under 2 s.  The pool is filled through the engine in a child process (the
same code the daemon runs, minus FUSE, which would make filling 8 GiB take
minutes); everything measured afterwards goes through the real mount.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from helpers_mount import CowfsMount

log = logging.getLogger(__name__)

VOLUME_SIZE = 64 << 30
BLOCKS = VOLUME_SIZE // 4096
MAPPINGS = 2_000_000
STRIDE = 2_654_435_761 % BLOCKS | 1          # odd, so i*STRIDE mod 2^24 is a permutation
RSS_LIMIT = 256 << 20
REMOUNT_LIMIT = 2.0

FILL = r"""
import os, sys
from cowfs.blockio import OsStorage
from cowfs.pool import Pool
pool_dir, mappings, blocks, stride = sys.argv[1], *map(int, sys.argv[2:5])
pool = Pool.open(OsStorage(pool_dir))
vid = pool.create_volume("big.img", blocks * 4096).id
block = bytearray(os.urandom(4096))
for b in sorted(i * stride % blocks for i in range(mappings)):
    block[:8] = b.to_bytes(8, "little")
    pool.write(vid, b * 4096, block)
pool.close()
"""


def _tag(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def _timed_mount(cm: CowfsMount) -> float:
    t = time.monotonic()
    cm.mount()
    return time.monotonic() - t


def test_two_million_mappings_bounded_rss_and_fast_remount(
        make_cowfs: Callable[..., CowfsMount]) -> None:
    """2M scattered mappings: peak daemon RSS < 256 MiB under random I/O over
    all of them, remount < 2 s, and every block read back carries its tag."""
    cm = make_cowfs(mount=False)
    subprocess.run([sys.executable, "-c", FILL, str(cm.pool), str(MAPPINGS), str(BLOCKS),
                    str(STRIDE)], check=True, timeout=900)
    first_mount = _timed_mount(cm)
    vol = cm.mnt / "big.img"
    assert vol.stat().st_size == VOLUME_SIZE
    assert vol.stat().st_blocks * 512 == MAPPINGS * 4096

    rng = random.Random(7)
    mapped = [i * STRIDE % BLOCKS for i in rng.sample(range(MAPPINGS), 40_000)]
    rewritten: dict[int, int] = {}
    fd = os.open(vol, os.O_RDWR)
    try:
        for b in mapped[:20_000]:                       # random reads over the whole tree
            got = os.pread(fd, 4096, b * 4096)
            assert _tag(got) == b, f"block {b} reads tag {_tag(got)}"
        payload = bytearray(os.urandom(4096))
        for n, b in enumerate(mapped[20_000:]):         # random-order overwrites
            payload[:8] = (b + (n + 1) * BLOCKS).to_bytes(8, "little")
            os.pwrite(fd, payload, b * 4096)
            rewritten[b] = b + (n + 1) * BLOCKS
        os.fsync(fd)
    finally:
        os.close(fd)
    peak = _peak_rss(cm.daemon_pid())

    cm.umount()
    remount = _timed_mount(cm)
    fd = os.open(vol, os.O_RDONLY)
    try:
        for b, tag in list(rewritten.items())[:2000]:
            assert _tag(os.pread(fd, 4096, b * 4096)) == tag
        for b in mapped[:2000]:
            assert _tag(os.pread(fd, 4096, b * 4096)) == rewritten.get(b, b)
    finally:
        os.close(fd)
    log.warning("2M mappings: peak daemon RSS %.0f MiB, first mount %.2f s, remount %.2f s",
                peak / 2**20, first_mount, remount)
    assert peak < RSS_LIMIT, f"daemon peak RSS {peak / 2**20:.0f} MiB >= 256 MiB"
    assert remount < REMOUNT_LIMIT, f"remount took {remount:.2f} s"
