"""Polling between requests (mount option ``poll_us``), through a real mount.

After a request that leaves the queue empty, the daemon's request loop keeps
polling for the next one for ``poll_us`` microseconds instead of sleeping.
What can be seen from outside, and is checked here: the request thread
sleeps far less often per request when a client sends requests one after the
other; a read that waits for the disk polls for its data rather than
sleeping; it stops polling once requests stop (an idle daemon uses no CPU);
it does not poll where it may only run on one CPU; and a bad ``poll_us`` is
refused before anything is mounted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cowfs_daemon import fuse_ops
from cowfs_daemon.server import MountError, own_options

from helpers_mount import CowfsMount, drop_page_cache

WRITES = 3000
GAP = 40e-6     # seconds between one write's answer and the next write
POLL_ROUNDS = 5
BLOCK = 4096
COLD_BLOCKS = 16384     # 64 MiB
COLD_READS = 300

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                reason="polling is off on a single CPU")


def _sleeps(pid: int) -> int:
    """Voluntary context switches of the daemon's request thread (its main
    thread: the trio loop runs there)."""
    for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for daemon {pid}")


def _cpu_seconds(pid: int) -> float:
    """User and system CPU of the whole daemon so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sleeps_per_write(cm: CowfsMount) -> float:
    """Write WRITES blocks one after the other (each one FUSE request: volume
    files are opened direct_io), GAP apart, and count the request thread's
    sleeps.  The gap, spent spinning here, is shorter than the default
    polling window and long enough that a daemon that does not poll is
    asleep by the time the next write comes."""
    vol = cm.mnt / "v.img"
    if not vol.exists():
        vol.touch()
        os.truncate(vol, 64 << 20)
    data = os.urandom(BLOCK)

    def writes(fd: int) -> None:
        for i in range(WRITES):
            os.pwrite(fd, data, (i * 7919 % 16384) * BLOCK)
            start = time.perf_counter()
            while time.perf_counter() - start < GAP:
                pass

    return _sleeps_during(cm, vol, os.O_RDWR, writes) / WRITES


def _sleeps_during(cm: CowfsMount, vol: Path, flags: int, requests: Callable[[int], None]) -> int:
    """The request thread's sleeps while ``requests`` runs on ``vol`` opened
    with ``flags``, after a first read (a request that leaves the queue
    empty: polling is on from then)."""
    pid = cm.daemon_pid()
    fd = os.open(vol, flags)
    try:
        os.pread(fd, BLOCK, 0)
        before = _sleeps(pid)
        requests(fd)
        return _sleeps(pid) - before
    finally:
        os.close(fd)


def test_request_thread_polls_between_requests(make_cowfs: Callable[..., CowfsMount]) -> None:
    cm = make_cowfs(mount=False)
    cm.mount("-o", "poll_us=0")
    sleeping = _sleeps_per_write(cm)
    cm.umount()
    cm.mount()      # the default window
    # The best of a few rounds: while something else holds one of the two
    # CPUs (the kernel writing back what earlier tests wrote), the client
    # and the daemon share the other, and polling cannot help then.  In a
    # full test run that once gave 0.79 sleeps a write against 0.12-0.14
    # when run alone.
    polling = min(_sleeps_per_write(cm) for _ in range(POLL_ROUNDS))
    # Without polling the thread sleeps in epoll_wait between the requests.
    assert sleeping > 0.7, f"{sleeping:.3f} sleeps a write without polling"
    assert polling < 0.3, (
        f"{polling:.3f} sleeps a write with polling, {sleeping:.3f} without")


def _sleeps_per_cold_read(cm: CowfsMount) -> float:
    """Read COLD_READS blocks of a volume written in full, at scattered
    places, one after the other, with the pool's data file out of the page cache;
    count the request thread's sleeps."""
    vol = cm.mnt / "cold.img"
    if not vol.exists():
        with open(vol, "wb") as f:
            f.write(os.urandom(COLD_BLOCKS * BLOCK))
            os.fsync(f.fileno())
    drop_page_cache(cm.pool / "data")

    def reads(fd: int) -> None:
        for i in range(1, COLD_READS + 1):
            os.pread(fd, BLOCK, (i * 7919 % COLD_BLOCKS) * BLOCK)

    return _sleeps_during(cm, vol, os.O_RDONLY, reads) / COLD_READS


def test_lone_cold_read_polls_for_the_disk(make_cowfs: Callable[..., CowfsMount]) -> None:
    cm = make_cowfs(mount=False)
    cm.mount("-o", "poll_us=0")
    sleeping = _sleeps_per_cold_read(cm)
    cm.umount()
    # A window well over a disk read here (about 70 us), so that the
    # disk's speed does not decide the test.
    cm.mount("-o", "poll_us=5000")
    polling = min(_sleeps_per_cold_read(cm) for _ in range(POLL_ROUNDS))
    # Without polling the thread sleeps in its pread (and in epoll_wait).
    assert sleeping > 0.7, f"{sleeping:.3f} sleeps a cold read without polling"
    assert polling < 0.3, (
        f"{polling:.3f} sleeps a cold read with polling, {sleeping:.3f} without")


def test_idle_daemon_stops_polling(mounted: CowfsMount) -> None:
    _sleeps_per_write(mounted)
    pid = mounted.daemon_pid()
    time.sleep(0.2)
    before = _cpu_seconds(pid)
    time.sleep(1.0)
    used = _cpu_seconds(pid) - before
    assert used < 0.1, f"the idle daemon used {used:.2f} s of CPU in 1 s"


def test_no_polling_on_one_cpu(mounted: CowfsMount) -> None:
    pid = mounted.daemon_pid()
    cpu = min(os.sched_getaffinity(pid))
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})
    # The poller looks at its CPUs once a polling window ends (or once every
    # POLL_RECHECK seconds while it may not poll): a few requests, a pause.
    _sleeps_per_write(mounted)
    time.sleep(fuse_ops.POLL_RECHECK + 0.2)
    pinned = _sleeps_per_write(mounted)
    assert pinned > 0.7, f"{pinned:.3f} sleeps a write on one CPU: still polling"


@pytest.mark.parametrize("option", ["poll_us=", "poll_us=ten", "poll_us=-5",
                                    f"poll_us={fuse_ops.POLL_US_MAX + 1}"])
def test_bad_poll_us_refused(pool: CowfsMount, option: str) -> None:
    rc, text = pool.try_mount("-o", option)
    assert rc != 0
    assert "poll_us" in text and option in text, text
    assert not pool.is_mounted()


def test_own_options_leaves_the_rest_to_libfuse() -> None:
    rest, window = own_options(["allow_other", "poll_us=250", "ro"])
    assert rest == ["allow_other", "ro"]
    assert window == pytest.approx(250e-6)
    assert own_options(["ro"]) == (["ro"], fuse_ops.POLL_US / 1e6)
    assert own_options(["poll_us=0"])[1] == 0
    with pytest.raises(MountError, match="poll_us"):
        own_options(["poll_us=1e3"])
