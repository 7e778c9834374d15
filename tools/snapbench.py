"""Snapshot, clone and metadata figures of cowfs, side by side with qcow2.

Run as root from the project venv (``make snapbench``; ``--help`` lists the
options).  The cowfs side is driven only through the mount's files (volumes,
``.snapshots``, ``.clones/ctl``) and the ``cowfs`` command.  The qcow2 peer is
snapshotted with ``qemu-img snapshot -c`` while no export runs, cloned with
``qemu-img create -b`` (an overlay), and read and written by fio through a
qemu-storage-daemon FUSE export (:class:`cowfs_tools.peers.Qcow2Export`);
its sequential fills are written with ``qemu-img bench`` (the data only has
to be there).  Each part uses a fresh pool and fresh images in a temporary
directory under ``--dir``, removed when the part ends.

1. **Writes into shared blocks.**  A volume (qcow2: an image) of four
   ``--small`` regions is written in full, snapshotted, and its last region
   written again.  Then 4 KiB writes (fio, psync, QD1, O_DIRECT, ending with
   an fsync, ``--runtime`` s at most), alternately into shared and into owned
   blocks, the same job on both sides: fio replays writes in random order at
   64 KiB strides over a region.  Shared: a region not written since the
   snapshot (a fresh one each repetition), so that each write is the first
   into its 4 KiB block *and* into its qcow2 cluster (a region written in
   full before the time is up gives a shorter run).  Owned: the rewritten
   region, in another order each repetition.
2. **Snapshot and clone time**, median of 21 (qcow2: 5), with ``--small``
   and ``--large`` written (cowfs's at ``--large`` each in turn with one in
   a second pool that holds the same volume with ``--small`` written, the
   *reference*: cowfs's ratio is taken against that, see
   :func:`cowfs_times`); the 1st versus the ``--count``-th snapshot of one
   volume and clone of one snapshot (medians of the first and of the last
   50). qcow2's internal snapshots slow down as they add up (about 1 ms more
   per existing snapshot with 8 GiB written), so it takes only
   ``--qcow2-count`` of each; its overlays all have the image itself as
   backing file.
3. **Reads through clones.**  fio 4 KiB random reads (psync, QD1, O_DIRECT,
   host page cache dropped before each run) over ``--small`` written on the
   original volume and on clones 1, 8 and ``--depth`` levels deep (qcow2: the
   base image and overlay chains of those depths, data only in the base),
   shallow to deep in one repetition and deep to shallow in the next, four
   repetitions.
4. **Scattered mappings and metadata.** Every other 4 KiB block of a volume
   of 2 x ``--mappings`` blocks is written through the mount (qcow2: through
   the export, into an image preallocated in full, see
   :func:`qcow2_scattered`) with fio ``rw=write:4k``, libaio QD16, O_DIRECT:
   2,097,152 mappings over 16 GiB by default. Then: the daemon's VmHWM and
   VmRSS; snapshot and clone time, each in turn with one of a reference as
   in part 2; the time from ``umount`` until the daemon has exited; the
   remount time, ``cowfs mount`` (host page cache dropped first) until the
   volume answers a stat and an O_DIRECT 4 KiB read, and the new daemon's
   memory. The qcow2 peer of the remount is starting a fresh export until
   the same answers, and its qemu-storage-daemon's memory.

IOPS runs alternate between cowfs and qcow2 and are repeated twice; the table
gives medians, the targets of the issue and whether cowfs meets each.  It goes
to stdout and, with the raw samples as JSON, to ``snapbench-TIME.md`` and
``.json`` in ``--dir``.

A full default run takes 11 to 14 minutes on this project's 2-core VM (parts
1 to 4: about 1.5, 1, 6 and 5 minutes; writing the 2M scattered mappings
through the cowfs mount alone takes 3) and needs about 20 GiB free in
``--dir``.  ``--skip-2m`` saves the 5 minutes of part 4.  A smoke run of about
1 minute: ``--small 64M --large 256M --mappings 20000 --count 20
--qcow2-count 20 --depth 8 --runtime 2``.
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cowfs_daemon.server import unescape_mountinfo
from cowfs_tools.bench import (DAEMON_EXIT_TIMEOUT, BenchError, cowfs_command, cowfs_daemon_pid,
                               make_file, meets, parse_size, run, wait_for_daemon)
from cowfs_tools.peers import PeerError, Qcow2Export
from cowfs_tools.procs import running
from cowfs_tools.signals import Interrupted, signals_raise

log = logging.getLogger("cowfs.snapbench")

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BLOCK = 4 * KiB
CLUSTER = 64 * KiB         # qcow2's default cluster size: the stride of the write replays
# Repetitions of the write runs of part 1 (the table gives medians).
# Measured while owned blocks were written by a randwrite run (see
# replay_write_iops): with two (a mean), one run of 11.8k shared-block writes next to 19.4k set
# the ratio to 0.86; with three, single runs of the same code gave ratios
# from 0.59 to 1.14 (two of them slow moved the median).  Five, so that two
# slow runs cannot.
IOPS_REPS = 5
# The clone-depth reads (part 3) are cold random reads, disk waits mostly:
# one volume's runs varied 9.2k-10.4k IOPS within one snapbench run, against
# a target ratio of 0.95.  More repetitions there, in alternating order.
DEPTH_REPS = 4
# Snapshots and clones timed at each amount of data.  A cowfs snapshot takes
# 0.3-0.6 ms, mostly one journal fsync: with medians of 5, four runs of the
# same code gave 0.70, 0.85, 0.88 and 1.57 for the 2M-mappings / 1 GiB ratio.
# qcow2 keeps 5: each internal snapshot it keeps slows the next one down.
TIME_REPS = 21
QCOW2_TIME_REPS = 5
# First and last snapshots/clones whose medians are compared.  One cowfs
# snapshot is mostly a journal fsync, whose latency varies from one to the
# next: medians of 100 successive snapshots through the mount ranged
# 0.39-0.54 ms over 1000 of them with no trend, so windows of 10 made the
# ratio depend on which few fsyncs were slow.
COUNT_WINDOW = 50
UNMOUNT_RETRY = 15.0       # seconds an unmount is retried while the mount is busy
SIDES = ("cowfs", "qcow2")


@dataclass
class Run:
    """One benchmark run: options, scratch directory and the figures so far.
    ``res[side][key]`` is a list of samples (seconds, IOPS or bytes)."""

    args: argparse.Namespace
    tmp: Path
    res: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {side: {} for side in SIDES})
    fio_runs: int = 0

    @property
    def qcow2(self) -> bool:
        """Whether the qcow2 peer is measured."""
        return not self.args.skip_qcow2

    def add(self, side: str, key: str, value: float) -> None:
        """Record one sample of a figure."""
        self.res[side].setdefault(key, []).append(value)

    def fio(self, options: Sequence[str], what: str, timeout: float) -> dict[str, Any]:
        """Run one fio job; return its job report, or raise BenchError.  The
        job is a thread of the fio process (``--thread``), so that killing fio
        (as :func:`run` does on a timeout or a signal) stops its I/O at once
        rather than leaving a forked job process holding the file open."""
        self.fio_runs += 1
        report = self.tmp / f"fio-{self.fio_runs:03d}.json"
        # --randrepeat=0: fresh random offsets in each run (see tools/bench.py).
        run(["fio", "--name=snapbench", "--thread", "--randrepeat=0", *options,
             "--output-format=json", f"--output={report}"], what, timeout=timeout)
        job = json.loads(report.read_text())["jobs"][0]
        if job.get("error"):
            raise BenchError(f"{what}: fio job error {job['error']} ({os.strerror(job['error'])})")
        return job


# ----------------------------------------------------------------------------
# Small helpers


def timed(action: Callable[[], object]) -> float:
    """Seconds one call of ``action`` takes."""
    t = time.perf_counter()
    action()
    return time.perf_counter() - t


def ctl(path: Path, command: str) -> None:
    """Write one command to a ctl file; raise BenchError with its answer on refusal."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.write(fd, command.encode() + b"\n")
        except OSError as e:
            os.lseek(fd, 0, os.SEEK_SET)
            raise BenchError(f"{command!r} refused: {e.strerror}: "
                             f"{os.read(fd, 4096).decode(errors='replace').strip()}") from None
    finally:
        os.close(fd)


def touch(path: Path) -> None:
    """Create ``path`` as touch(1) would (here: take a snapshot)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def drop_caches() -> None:
    """Empty the host page cache, so that the next run starts cold."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def answer(path: Path) -> None:
    """Stat ``path`` and read its first 4 KiB with O_DIRECT (past any cache)."""
    path.stat()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, BLOCK) as buf:  # page-aligned, as O_DIRECT wants
            if os.preadv(fd, [buf], 0) != BLOCK:
                raise BenchError(f"short 4 KiB read from {path}")
    finally:
        os.close(fd)


def memory(pid: int) -> tuple[int, int]:
    """VmHWM and VmRSS of process ``pid``, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmHWM"].split()[0]) * KiB, int(fields["VmRSS"].split()[0]) * KiB


def wait_exit(pid: int, timeout: float = DAEMON_EXIT_TIMEOUT) -> None:
    """Wait until process ``pid`` has exited (see :func:`running`)."""
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            raise BenchError(f"process {pid} still running {timeout:.0f} s after the unmount")
        time.sleep(0.01)


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory`` (to never delete through one)."""
    prefix = os.fsencode(directory.resolve())
    with open("/proc/self/mountinfo", "rb") as table:
        points = [unescape_mountinfo(line.split()[4]) for line in table]
    return [os.fsdecode(p) for p in points if p == prefix or p.startswith(prefix + b"/")]


def slots(start: int, length: int, seed: int) -> list[int]:
    """The 64 KiB-aligned offsets of ``[start, start + length)``, shuffled."""
    offsets = list(range(start, start + length, CLUSTER))
    random.Random(seed).shuffle(offsets)
    return offsets


def size_label(size: int) -> str:
    """``1 GiB``, ``256 MiB``."""
    return f"{size // GiB} GiB" if size % GiB == 0 else f"{size // MiB} MiB"


# ----------------------------------------------------------------------------
# fio


def fill(r: Run, path: Path, start: int, length: int) -> None:
    """Write ``length`` bytes of incompressible data at ``start`` and fsync."""
    r.fio([f"--filename={path}", "--rw=write", "--bs=1M", f"--offset={start}", f"--size={length}",
           "--ioengine=psync", "--end_fsync=1", "--refill_buffers=1"],
          f"filling {path}", timeout=3600)


def scatter(r: Run, path: Path, mappings: int) -> None:
    """Write every other 4 KiB block of ``path`` (``mappings`` blocks), libaio QD16."""
    job = r.fio([f"--filename={path}", "--rw=write:4k", "--bs=4k", f"--size={2 * BLOCK * mappings}",
                 f"--io_size={BLOCK * mappings}", "--ioengine=libaio", "--iodepth=16", "--direct=1",
                 "--end_fsync=1"],
                f"scattered writes on {path}", timeout=7200)
    written = job["write"]["total_ios"]
    if written != mappings:
        raise BenchError(f"scattered writes on {path}: fio wrote {written} blocks, not {mappings}")
    log.info("%d scattered 4 KiB writes at %.0f IOPS", mappings, job["write"]["iops"])


def replay_write_iops(r: Run, path: Path, offsets: Sequence[int]) -> float:
    """4 KiB writes at ``offsets``, in that order (psync, QD1, O_DIRECT, ending
    with an fsync; at most ``--runtime`` s): fio's IOPS.  A replayed log,
    unlike fio's random map, writes each slot once at a 64 KiB stride.
    Shared and owned blocks are both written this way: when owned ones were
    written by a ``--runtime`` s fio ``randwrite`` instead (a run ten times
    as long, another fio job), cowfs's shared / owned ratio was 0.82-0.96 in
    six runs (median 0.89), and 0.84-1.09 in six runs like this (median
    1.00), with the same code: runs of about 1 s vary that much here."""
    log_path = r.tmp / f"replay-{r.fio_runs + 1:03d}.log"
    with open(log_path, "w") as f:
        f.write(f"fio version 2 iolog\n{path} add\n{path} open\n")
        f.writelines(f"{path} write {offset} {BLOCK}\n" for offset in offsets)
        f.write(f"{path} close\n")
    job = r.fio([f"--read_iolog={log_path}", "--replay_no_stall=1", "--ioengine=psync",
                 "--iodepth=1", "--direct=1", "--end_fsync=1", f"--runtime={r.args.runtime}"],
                f"random writes on {path}", timeout=r.args.runtime + 600)
    return float(job["write"]["iops"])


def randread_iops(r: Run, path: Path) -> float:
    """fio 4 KiB random-read IOPS (psync, QD1, O_DIRECT) over the first
    ``--small`` bytes of ``path``, from a cold host page cache so that no run
    reads what the one before it left in memory."""
    drop_caches()
    job = r.fio([f"--filename={path}", "--rw=randread", "--bs=4k", f"--size={r.args.small}",
                 "--ioengine=psync", "--iodepth=1", "--direct=1", "--time_based=1",
                 f"--runtime={r.args.runtime}"],
                f"random reads on {path}", timeout=r.args.runtime + 300)
    return float(job["read"]["iops"])


# ----------------------------------------------------------------------------
# cowfs


class CowfsPool:
    """A fresh pool in ``root``, mounted on ``root/mnt`` (see :func:`cowfs_pool`)."""

    def __init__(self, root: Path) -> None:
        self.cowfs = cowfs_command()
        self.pool, self.mnt = root / "pool", root / "mnt"
        self.mounted = False

    def mount(self) -> None:
        """``cowfs mount``, which returns once the mount is live."""
        run([self.cowfs, "mount", str(self.pool), str(self.mnt)], f"cowfs mount {self.pool}")
        self.mounted = True
        if not os.path.ismount(self.mnt):
            raise BenchError(f"cowfs mount returned success but {self.mnt} is not a mount point")

    def unmount(self) -> None:
        """``umount``, retried for a while if the mount is busy (a process
        just killed may not have closed its files yet), then ``fusermount3
        -u``; the daemon exits afterwards."""
        deadline = time.monotonic() + UNMOUNT_RETRY
        while True:
            try:
                run(["umount", str(self.mnt)], f"unmounting {self.mnt}")
                break
            except BenchError as e:
                if time.monotonic() > deadline:
                    log.warning("%s; trying fusermount3 -u", e)
                    run(["fusermount3", "-u", str(self.mnt)], f"unmounting {self.mnt}")
                    break
                time.sleep(0.5)
        self.mounted = False

    def daemon_pid(self) -> int:
        """The daemon serving this pool (see :func:`cowfs_daemon_pid`)."""
        return cowfs_daemon_pid(self.pool, self.mnt)

    def snapshot(self, vol: str, name: str) -> float:
        """Take snapshot ``vol@name``; seconds it took."""
        return timed(lambda: touch(self.mnt / ".snapshots" / vol / name))

    def clone(self, source: str, new: str) -> float:
        """Clone ``source`` (a volume or ``vol@snap``) as ``new``; seconds it took."""
        return timed(lambda: ctl(self.mnt / ".clones" / "ctl", f"clone {source} {new}"))


@contextmanager
def cowfs_pool(root: Path) -> Iterator[CowfsPool]:
    """mkfs and mount a pool in ``root`` for the ``with`` block; unmount it,
    wait for the daemon and delete ``root`` on the way out."""
    root.mkdir()
    (root / "pool").mkdir()
    (root / "mnt").mkdir()
    pool = CowfsPool(root)
    try:
        run([pool.cowfs, "mkfs", str(pool.pool)], "cowfs mkfs")
        pool.mount()
        yield pool
    finally:
        try:
            if pool.mounted:
                pool.unmount()
        except BenchError as e:
            log.error("%s: %s is left in place", e, root)
        else:
            wait_for_daemon(pool.pool)
            shutil.rmtree(root)


# ----------------------------------------------------------------------------
# qcow2


def qemu_img(what: str, *args: str) -> str:
    """Run ``qemu-img ARGS``."""
    return run(["qemu-img", *args], what, timeout=3600)


def qcow2_create(image: Path, size: int | None = None, backing: Path | None = None,
                 preallocation: str = "off") -> float:
    """Create a qcow2 image of ``size`` bytes, or an overlay of ``backing``
    (of the backing image's size); seconds it took."""
    if backing:
        extra = ["-b", str(backing), "-F", "qcow2"]
    else:
        extra = ["-o", f"preallocation={preallocation}", str(size)]
    return timed(lambda: qemu_img(f"creating {image}", "create", "-q", "-f", "qcow2",
                                  str(image), *extra))


def qcow2_fill(image: Path, start: int, length: int) -> None:
    """Write ``[start, start + length)`` of ``image`` (``qemu-img bench -w``:
    1 MiB requests, 4 in flight, O_DIRECT, a non-zero pattern)."""
    qemu_img(f"writing {image}", "bench", "-q", "-w", "-f", "qcow2", "-t", "none", "--pattern=165",
             "-o", str(start), "-c", str(length // MiB), "-s", str(MiB), "-d", "4", str(image))


def qcow2_snapshot(image: Path, name: str) -> float:
    """Take internal snapshot ``name`` of ``image``; seconds it took."""
    return timed(lambda: qemu_img(f"snapshot of {image}", "snapshot", "-c", name, str(image)))


@contextmanager
def scratch(root: Path) -> Iterator[Path]:
    """A directory for the ``with`` block, deleted on the way out."""
    root.mkdir()
    try:
        yield root
    finally:
        shutil.rmtree(root)


# ----------------------------------------------------------------------------
# 1. Writes into blocks shared with a snapshot, and into owned blocks


def cowfs_write_target(r: Run, stack: ExitStack) -> Path:
    """A volume written in full, snapshotted, its last region written again."""
    s = r.args.small
    pool = stack.enter_context(cowfs_pool(r.tmp / "writes"))
    vol = pool.mnt / "w.img"
    make_file(vol, (IOPS_REPS + 1) * s)
    fill(r, vol, 0, (IOPS_REPS + 1) * s)
    pool.snapshot("w.img", "base")
    fill(r, vol, IOPS_REPS * s, s)
    return vol


def qcow2_write_target(r: Run, stack: ExitStack) -> Path:
    """The same as :func:`cowfs_write_target` for a qcow2 image (internal
    snapshot), exported; returns the export's file."""
    s = r.args.small
    work = stack.enter_context(scratch(r.tmp / "writes-qcow2"))
    image = work / "w.qcow2"
    qcow2_create(image, (IOPS_REPS + 1) * s)
    qcow2_fill(image, 0, (IOPS_REPS + 1) * s)
    qcow2_snapshot(image, "base")
    qcow2_fill(image, IOPS_REPS * s, s)
    return stack.enter_context(Qcow2Export(image, work / "export")).path


def part_writes(r: Run) -> None:
    """4 KiB random-write IOPS into shared blocks versus owned blocks."""
    log.info("part 1: 4 KiB writes into shared and into owned blocks")
    s = r.args.small
    with ExitStack() as stack:
        targets = {"cowfs": cowfs_write_target(r, stack)}
        if r.qcow2:
            targets["qcow2"] = qcow2_write_target(r, stack)
        for rep in range(IOPS_REPS):
            shared = slots(rep * s, s, seed=rep)
            owned = slots(IOPS_REPS * s, s, seed=IOPS_REPS + rep)
            for side, path in targets.items():
                r.add(side, "write_shared_iops", replay_write_iops(r, path, shared))
            for side, path in targets.items():
                r.add(side, "write_owned_iops", replay_write_iops(r, path, owned))
            log.info("rep %d 4 KiB writes, shared / owned: %s", rep + 1, ", ".join(
                f"{side} {r.res[side]['write_shared_iops'][-1]:.0f} / "
                f"{r.res[side]['write_owned_iops'][-1]:.0f} IOPS" for side in targets))


# ----------------------------------------------------------------------------
# 2. Snapshot and clone time against data written and against their number


def cowfs_times(r: Run, pool: CowfsPool, vol: str, label: str,
                reference: tuple[CowfsPool, str] | None = None) -> None:
    """Snapshot and clone time (``TIME_REPS`` of each) of ``vol`` as it is.
    Each is durable on return, so an fsync of the host file system is part
    of it: the median keeps one slow fsync from deciding the figure.

    With ``reference`` (a pool and its volume), each snapshot and clone of
    ``vol`` is paired with one of the reference volume, in alternating
    order, recorded as ``LABEL_reference``.  Times drift with the host: in
    one series of 21 clones they went from 0.9-1.2 ms to 1.7-2.1 ms halfway
    with no checkpoint in the daemon's log, and the ratio to part 2's
    figure, taken minutes earlier, came out at 1.56 and 0.72 in two runs of
    the same code."""
    os.sync()
    sides = [(pool, vol, label)]
    if reference is not None:
        sides.append((*reference, f"{label}_reference"))

    def in_turn(i: int) -> list[tuple[CowfsPool, str, str]]:
        return sides if i % 2 == 0 else sides[::-1]

    for i in range(TIME_REPS):
        for p, v, lab in in_turn(i):
            r.add("cowfs", f"snapshot_{lab}_s", p.snapshot(v, f"at-{lab}-{i}"))
    for i in range(TIME_REPS):
        for p, v, lab in in_turn(i):
            r.add("cowfs", f"clone_{lab}_s", p.clone(f"{v}@at-{lab}-{i}", f"c-{lab}-{i}.img"))


def qcow2_times(r: Run, image: Path, label: str) -> None:
    """``qemu-img snapshot -c`` and overlay creation time (``QCOW2_TIME_REPS``
    of each)."""
    os.sync()
    for i in range(QCOW2_TIME_REPS):
        r.add("qcow2", f"snapshot_{label}_s", qcow2_snapshot(image, f"at-{label}-{i}"))
    for i in range(QCOW2_TIME_REPS):
        overlay = image.with_name(f"c-{label}-{i}.qcow2")
        r.add("qcow2", f"clone_{label}_s", qcow2_create(overlay, backing=image))


def cowfs_count(r: Run, pool: CowfsPool, vol: str) -> None:
    """``--count`` snapshots of one volume, then as many clones of one snapshot."""
    os.sync()
    for i in range(r.args.count):
        r.add("cowfs", "snapshot_each_s", pool.snapshot(vol, f"s{i:05d}"))
    os.sync()
    for i in range(r.args.count):
        r.add("cowfs", "clone_each_s", pool.clone(f"{vol}@s00000", f"k{i:05d}.img"))


def qcow2_count(r: Run, image: Path) -> None:
    """``--qcow2-count`` internal snapshots of one image, then as many overlays of it."""
    os.sync()
    for i in range(r.args.qcow2_count):
        r.add("qcow2", "snapshot_each_s", qcow2_snapshot(image, f"s{i:05d}"))
    os.sync()
    for i in range(r.args.qcow2_count):
        r.add("qcow2", "clone_each_s", qcow2_create(image.with_name(f"k{i:05d}.qcow2"), backing=image))


def reference_volume(r: Run, stack: ExitStack) -> tuple[CowfsPool, str]:
    """A second pool, mounted for the life of ``stack``, with a volume as
    part 2's with ``--small`` written: what cowfs's times with ``--large``
    written and with the scattered mappings are taken in turn with (see
    :func:`cowfs_times`)."""
    ref = stack.enter_context(cowfs_pool(r.tmp / "reference"))
    make_file(ref.mnt / "r.img", 2 * r.args.large)
    fill(r, ref.mnt / "r.img", 0, r.args.small)
    return ref, "r.img"


def part_snapshots(r: Run) -> None:
    """Snapshot and clone time at ``--small`` and ``--large`` written, and
    the first against the last of ``--count``."""
    a = r.args
    log.info("part 2: snapshot and clone time at %s and %s written, %d of each",
             size_label(a.small), size_label(a.large), a.count)
    with ExitStack() as stack:
        pool = stack.enter_context(cowfs_pool(r.tmp / "snapshots"))
        reference = reference_volume(r, stack)
        make_file(pool.mnt / "vm.img", 2 * a.large)
        image = None
        if r.qcow2:
            image = stack.enter_context(scratch(r.tmp / "snapshots-qcow2")) / "vm.qcow2"
            qcow2_create(image, 2 * a.large)
        for label, start, end in (("small", 0, a.small), ("large", a.small, a.large)):
            fill(r, pool.mnt / "vm.img", start, end - start)
            cowfs_times(r, pool, "vm.img", label, reference if label == "large" else None)
            if image:
                qcow2_fill(image, start, end - start)
                qcow2_times(r, image, label)
        cowfs_count(r, pool, "vm.img")
        if image:
            qcow2_count(r, image)


# ----------------------------------------------------------------------------
# 3. Random reads through clones and backing chains


def depths(r: Run) -> list[int]:
    """The clone depths read: 1, 8 and ``--depth`` (those not above it)."""
    return sorted({d for d in (1, 8, r.args.depth) if d <= r.args.depth})


def cowfs_chain(r: Run, stack: ExitStack) -> dict[int, Path]:
    """A volume with ``--small`` written and a chain of clones of it;
    the volume at each measured depth (0: the original)."""
    pool = stack.enter_context(cowfs_pool(r.tmp / "depth"))
    make_file(pool.mnt / "d00.img", r.args.small)
    fill(r, pool.mnt / "d00.img", 0, r.args.small)
    for level in range(1, r.args.depth + 1):
        pool.clone(f"d{level - 1:02d}.img", f"d{level:02d}.img")
    return {d: pool.mnt / f"d{d:02d}.img" for d in [0, *depths(r)]}


def qcow2_chain(r: Run, stack: ExitStack) -> dict[int, Path]:
    """A base image with ``--small`` written and a chain of overlays over it;
    the image at each measured depth (0: the base)."""
    work = stack.enter_context(scratch(r.tmp / "depth-qcow2"))
    qcow2_create(work / "d00.qcow2", r.args.small)
    qcow2_fill(work / "d00.qcow2", 0, r.args.small)
    for level in range(1, r.args.depth + 1):
        qcow2_create(work / f"d{level:02d}.qcow2", backing=work / f"d{level - 1:02d}.qcow2")
    return {d: work / f"d{d:02d}.qcow2" for d in [0, *depths(r)]}


def qcow2_randread_iops(r: Run, image: Path) -> float:
    """:func:`randread_iops` through an export of ``image`` started for the run
    (one image of a chain can be exported at a time: the others hold locks)."""
    with Qcow2Export(image, image.with_name("export")) as export:
        return randread_iops(r, export.path)


def part_depth(r: Run) -> None:
    """4 KiB random-read IOPS on clones (qcow2: overlays) of growing depth."""
    log.info("part 3: random reads on clones %s deep", ", ".join(map(str, depths(r))))
    with ExitStack() as stack:
        cowfs = cowfs_chain(r, stack)
        qcow2 = qcow2_chain(r, stack) if r.qcow2 else {}
        for rep in range(DEPTH_REPS):
            # Each repetition runs the depths in the opposite order of the
            # one before: cold reads of one region drifted by 10% from run
            # to run, which in a fixed order showed as a cost of depth.
            order = list(cowfs) if rep % 2 == 0 else list(reversed(cowfs))
            for depth in order:
                key = f"randread_depth{depth}_iops"
                r.add("cowfs", key, randread_iops(r, cowfs[depth]))
                if depth in qcow2:
                    r.add("qcow2", key, qcow2_randread_iops(r, qcow2[depth]))
                log.info("rep %d random reads at depth %2d: %s", rep + 1, depth,
                         ", ".join(f"{side} {r.res[side][key][-1]:.0f} IOPS"
                                   for side in SIDES if key in r.res[side]))


# ----------------------------------------------------------------------------
# 4. Scattered mappings: snapshot, clone, memory, remount


def record_memory(r: Run, side: str, when: str, pid: int) -> None:
    """Record VmHWM and VmRSS of the daemon ``pid`` under ``when``."""
    hwm, rss = memory(pid)
    r.add(side, f"{when}_vmhwm_bytes", hwm)
    r.add(side, f"{when}_vmrss_bytes", rss)


def cowfs_remount(r: Run, pool: CowfsPool, vol: Path) -> None:
    """Time ``umount`` until the daemon exits, then ``cowfs mount`` (from a
    cold host page cache) until ``vol`` answers; the new daemon's memory."""
    pid = pool.daemon_pid()
    started = time.perf_counter()
    pool.unmount()
    wait_exit(pid)
    r.add("cowfs", "unmount_s", time.perf_counter() - started)
    drop_caches()
    started = time.perf_counter()
    pool.mount()
    answer(vol)
    r.add("cowfs", "remount_s", time.perf_counter() - started)
    record_memory(r, "cowfs", "remount", pool.daemon_pid())


def cowfs_scattered(r: Run) -> None:
    """The cowfs half of part 4."""
    with ExitStack() as stack:
        reference = reference_volume(r, stack)
        pool = stack.enter_context(cowfs_pool(r.tmp / "scattered"))
        vol = pool.mnt / "s.img"
        make_file(vol, 2 * BLOCK * r.args.mappings)
        scatter(r, vol, r.args.mappings)
        record_memory(r, "cowfs", "written", pool.daemon_pid())
        cowfs_times(r, pool, "s.img", "scattered", reference)
        cowfs_remount(r, pool, vol)


def qcow2_scattered(r: Run) -> None:
    """The qcow2 half of part 4, written through an export like the cowfs
    volume; the start of a fresh export stands for the remount.

    The image is preallocated in full: the writes touch every cluster anyway
    (8 per 64 KiB cluster), but into fresh clusters they would leave the
    host file in millions of extents (each cluster is zeroed with fallocate,
    then written in part), and deleting that from a file system mounted with
    ``discard`` takes minutes."""
    with scratch(r.tmp / "scattered-qcow2") as work:
        image = work / "s.qcow2"
        qcow2_create(image, 2 * BLOCK * r.args.mappings, preallocation="full")
        with Qcow2Export(image, work / "export") as export:
            scatter(r, export.path, r.args.mappings)
            record_memory(r, "qcow2", "written", export.pid)
        qcow2_times(r, image, "scattered")
        drop_caches()
        started = time.perf_counter()
        with Qcow2Export(image, work / "export") as export:
            answer(export.path)
            r.add("qcow2", "remount_s", time.perf_counter() - started)
            record_memory(r, "qcow2", "remount", export.pid)


def part_scattered(r: Run) -> None:
    """Snapshot and clone time with ``--mappings`` scattered 4 KiB mappings,
    the daemon's memory and the remount time."""
    log.info("part 4: %d scattered 4 KiB mappings", r.args.mappings)
    cowfs_scattered(r)
    if r.qcow2:
        qcow2_scattered(r)


# ----------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure of each side in ``unit`` and the
    issue's target for cowfs (``(">=" or "<=", bound)``) if it sets one."""

    measure: str
    unit: str
    cowfs: float | None
    qcow2: float | None
    target: tuple[str, float] | None = None

    def cell(self, value: float | None) -> str:
        """One figure, formatted."""
        if value is None:
            return "–"
        digits = {"IOPS": 0, "MiB": 1, "ratio": 2}.get(self.unit, 2)
        return f"{value:.{digits}f}" + ("" if self.unit == "ratio" else f" {self.unit}")

    def met(self) -> str:
        """Whether the cowfs figure meets the target."""
        if self.target is None or self.cowfs is None:
            return ""
        op, bound = self.target
        return "met" if meets(self.cowfs, bound, at_most=op == "<=") else "**not met**"

    def line(self) -> str:
        """The markdown table row."""
        target = ""
        if self.target:
            target = f"{'≤' if self.target[0] == '<=' else '≥'} {self.cell(self.target[1])}"
        cells = [self.measure, self.cell(self.cowfs), self.cell(self.qcow2), target, self.met()]
        return "| " + " | ".join(cells) + " |"


class Figures:
    """Medians of a run's samples, scaled for the table, per side."""

    def __init__(self, r: Run) -> None:
        self.res = r.res

    def get(self, side: str, key: str, scale: float = 1.0, window: slice = slice(None)) -> float | None:
        """Median of ``res[side][key][window]`` times ``scale``, None if absent."""
        values = self.res[side].get(key, [])[window]
        return statistics.median(values) * scale if values else None

    def both(self, key: str, scale: float = 1.0, window: slice = slice(None)) -> tuple[float | None, ...]:
        """The figure on each side."""
        return tuple(self.get(side, key, scale, window) for side in SIDES)

    def ratio(self, num: tuple[str, slice], den: tuple[str, slice]) -> tuple[float | None, ...]:
        """``median(num) / median(den)`` on each side."""
        out = []
        for side in SIDES:
            a, b = self.get(side, num[0], window=num[1]), self.get(side, den[0], window=den[1])
            out.append(a / b if a is not None and b else None)
        return tuple(out)


def write_rows(f: Figures) -> list[Row]:
    """Part 1."""
    return [
        Row("4K rand write, blocks shared with a snapshot", "IOPS", *f.both("write_shared_iops")),
        Row("4K rand write, blocks the volume owns", "IOPS", *f.both("write_owned_iops")),
        Row("ratio shared / owned", "ratio",
            *f.ratio(("write_shared_iops", slice(None)), ("write_owned_iops", slice(None))), (">=", 0.9)),
    ]


def time_rows(f: Figures, a: argparse.Namespace, op: str, peer: str) -> list[Row]:
    """Part 2 and the time half of part 4 for ``op`` (snapshot or clone)."""
    small, large = size_label(a.small), size_label(a.large)
    mappings = f"{a.mappings:,} scattered 4K mappings"
    w = min(COUNT_WINDOW, a.count // 2, a.qcow2_count // 2)
    first, last = slice(None, w), slice(-w, None)
    every = slice(None)
    qcow2_last = "" if a.qcow2_count == a.count else f" (qcow2: {a.qcow2_count - w + 1}–{a.qcow2_count})"

    def ratio_to_small(label: str) -> tuple[float | None, ...]:
        # cowfs's figure against its reference, timed in turn with it (see
        # cowfs_times); qcow2's against its figure with --small written.
        return (f.ratio((f"{op}_{label}_s", every), (f"{op}_{label}_reference_s", every))[0],
                f.ratio((f"{op}_{label}_s", every), (f"{op}_small_s", every))[1])

    def reference(label: str) -> Row:
        return Row(f"{op}, {small} written, timed in turn with the line above: reference (cowfs)",
                   "ms", f.get("cowfs", f"{op}_{label}_reference_s", 1000), None)
    return [
        Row(f"{op} ({peer}), {small} written", "ms", *f.both(f"{op}_small_s", 1000), ("<=", 20)),
        Row(f"{op}, {large} written", "ms", *f.both(f"{op}_large_s", 1000), ("<=", 20)),
        reference("large"),
        Row(f"{op}, {mappings}", "ms", *f.both(f"{op}_scattered_s", 1000), ("<=", 20)),
        reference("scattered"),
        Row(f"{op} ratio {large} / {small} (cowfs: / reference)", "ratio",
            *ratio_to_small("large"), ("<=", 1.5)),
        Row(f"{op} ratio {a.mappings:,} mappings / {small} (cowfs: / reference)", "ratio",
            *ratio_to_small("scattered"), ("<=", 1.5)),
        Row(f"{op}s 1–{w} (median)", "ms", *f.both(f"{op}_each_s", 1000, first)),
        Row(f"{op}s {a.count - w + 1}–{a.count}{qcow2_last} (median)", "ms",
            *f.both(f"{op}_each_s", 1000, last)),
        Row(f"{op} ratio last / first", "ratio",
            *f.ratio((f"{op}_each_s", last), (f"{op}_each_s", first)), ("<=", 1.5)),
    ]


def read_rows(f: Figures, r: Run) -> list[Row]:
    """Part 3."""
    rows = [Row("4K rand read, original volume (qcow2: base image)", "IOPS",
                *f.both("randread_depth0_iops"))]
    for d in depths(r):
        key = f"randread_depth{d}_iops"
        rows += [Row(f"4K rand read, clone {d} deep (qcow2: overlay chain)", "IOPS", *f.both(key)),
                 Row(f"ratio clone {d} deep / original", "ratio",
                     *f.ratio((key, slice(None)), ("randread_depth0_iops", slice(None))),
                     (">=", 0.95) if d == 32 else None)]
    return rows


def metadata_rows(f: Figures, a: argparse.Namespace) -> list[Row]:
    """The metadata half of part 4."""
    m = f"{a.mappings:,} mappings"
    return [
        Row(f"daemon VmHWM after writing {m}", "MiB", *f.both("written_vmhwm_bytes", 1 / MiB), ("<=", 256)),
        Row(f"daemon VmRSS after writing {m}", "MiB", *f.both("written_vmrss_bytes", 1 / MiB), ("<=", 256)),
        Row("umount until the daemon has exited", "s", *f.both("unmount_s")),
        Row("remount: mount (qcow2: export start), cold cache, until stat + 4K read answer",
            "s", *f.both("remount_s"), ("<=", 2)),
        Row("daemon VmHWM after the remount", "MiB", *f.both("remount_vmhwm_bytes", 1 / MiB), ("<=", 256)),
        Row("daemon VmRSS after the remount", "MiB", *f.both("remount_vmrss_bytes", 1 / MiB), ("<=", 256)),
    ]


def rows(r: Run) -> list[Row]:
    """The rows of the table that have a figure, in the order of the issue."""
    f = Figures(r)
    every = (write_rows(f) + time_rows(f, r.args, "snapshot", "qcow2: qemu-img snapshot -c")
             + time_rows(f, r.args, "clone", "qcow2: qemu-img create -b overlay")
             + read_rows(f, r) + metadata_rows(f, r.args))
    return [row for row in every if row.cowfs is not None or row.qcow2 is not None]


def report(r: Run, table: list[Row], versions: dict[str, str]) -> str:
    """The markdown report: conditions, then the table."""
    a = r.args
    peer = ("" if a.skip_qcow2 else
            " qcow2: read and written by fio through a qemu-storage-daemon FUSE export (sequential "
            "fills with qemu-img bench; the scattered mappings' image preallocated in full); its "
            "snapshot and overlay times include starting qemu-img.")
    return "\n".join([
        f"cowfs snapbench, {time.strftime('%Y-%m-%d %H:%M %Z')}: {versions['fio']}, {versions['qemu-img']}, "
        f"kernel {platform.release()}.",
        f"IOPS: fio psync QD1 O_DIRECT 4 KiB, runs of at most {a.runtime} s, median of {IOPS_REPS} "
        f"({DEPTH_REPS} for the clone-depth reads); "
        f"snapshot and clone times: median of {TIME_REPS} (qcow2: {QCOW2_TIME_REPS}).{peer}",
        "",
        "| measure | cowfs | qcow2 | target | cowfs meets it |",
        "| --- | --- | --- | --- | --- |",
        *(row.line() for row in table),
    ])


def save(r: Run, text: str, table: list[Row], versions: dict[str, str], started: str) -> Path:
    """Write the report (.md) and the raw figures (.json) to ``--dir``."""
    stem = r.args.dir / f"snapbench-{time.strftime('%Y%m%dT%H%M%S')}"
    stem.with_suffix(".md").write_text(text + "\n")
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(r.args).items()}
    doc = {"started": started, "kernel": platform.release(), "versions": versions, "args": args,
           "samples": r.res, "rows": [asdict(row) for row in table]}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    return stem


# ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/cowfs-snapbench"),
                   help="work directory (default %(default)s; needs about 20 GiB free with the defaults)")
    p.add_argument("--count", type=int, default=1000,
                   help="snapshots of one volume and clones of one snapshot (default %(default)s)")
    p.add_argument("--qcow2-count", type=int, default=200,
                   help="the same for qcow2, whose snapshots slow down as they add up (default %(default)s)")
    p.add_argument("--depth", type=int, default=32, help="deepest clone chain read (default %(default)s)")
    p.add_argument("--runtime", type=int, default=10,
                   help="seconds per fio run, at most (default %(default)s)")
    p.add_argument("--small", type=parse_size, default=parse_size("1G"),
                   help="first amount of data written; also each write and read region (default 1G)")
    p.add_argument("--large", type=parse_size, default=parse_size("8G"),
                   help="second amount of data written (default 8G)")
    p.add_argument("--mappings", type=int, default=2 * 1024 * 1024,
                   help="scattered 4 KiB mappings written for part 4 (default %(default)s)")
    p.add_argument("--skip-qcow2", action="store_true", help="measure cowfs only")
    p.add_argument("--skip-2m", action="store_true",
                   help="leave out the scattered mappings, memory and remount (part 4)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command")
    args = p.parse_args(argv)
    if min(args.count, args.qcow2_count) < 2 or min(args.depth, args.runtime, args.mappings) < 1:
        p.error("--count and --qcow2-count must be at least 2, --depth, --runtime and --mappings at least 1")
    if args.large <= args.small:
        p.error("--large must be more than --small")
    args.dir = args.dir.resolve()
    return args


def check_prerequisites(args: argparse.Namespace) -> None:
    """Refuse early, with the reason, what would fail half-way."""
    if os.geteuid() != 0:
        raise BenchError("snapbench needs root (it mounts cowfs and drops the page cache)")
    tools = ["fio", "umount"] + ([] if args.skip_qcow2 else ["qemu-img", "qemu-storage-daemon"])
    for tool in tools:
        if shutil.which(tool) is None:
            raise BenchError(f"command {tool} not found: run `make deps`")
    cowfs_command()
    args.dir.mkdir(parents=True, exist_ok=True)
    # Peak use: part 1 holds IOPS_REPS + 2 regions in the pool and in the
    # image, part 2 --large in each, part 4 one 64 KiB qcow2 cluster per 8
    # mappings; cowfs also needs room for metadata.
    need = int(max(2 * (IOPS_REPS + 2) * args.small, 2 * args.large,
                   0 if args.skip_2m else 2 * BLOCK * args.mappings) * 1.25)
    st = os.statvfs(args.dir)
    if st.f_bavail * st.f_frsize < need:
        raise BenchError(f"{args.dir} has {st.f_bavail * st.f_frsize // MiB} MiB free; "
                         f"these options need about {need // MiB} MiB")


def versions(args: argparse.Namespace) -> dict[str, str]:
    """fio's and qemu-img's versions, for the report."""
    out = {"fio": run(["fio", "--version"], "fio --version").strip(), "qemu-img": "qemu-img not used"}
    if not args.skip_qcow2:
        out["qemu-img"] = run(["qemu-img", "--version"], "qemu-img --version").splitlines()[0]
    return out


def measure(r: Run) -> None:
    """Run every part the options ask for."""
    parts = [part_writes, part_snapshots, part_depth] + ([] if r.args.skip_2m else [part_scattered])
    for part in parts:
        log.info("%s took %.0f s", part.__name__, timed(lambda: part(r)))


def cleanup(tmp: Path) -> None:
    """Delete the scratch directory, unless something is still mounted in it."""
    left = mounts_under(tmp)
    if left:
        log.error("still mounted, so %s is left in place: %s", tmp, ", ".join(left))
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement; print and save the table.  0 on success, 1
    (with whatever figures were taken) on failure."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    status = 0
    with signals_raise():
        try:
            check_prerequisites(args)
            info = versions(args)
        except BenchError as e:
            log.error("%s", e)
            return 1
        r = Run(args, Path(tempfile.mkdtemp(prefix="run-", dir=args.dir)))
        try:
            measure(r)
        except (BenchError, PeerError, OSError, Interrupted) as e:
            log.error("%s", e)
            status = 1
        finally:
            cleanup(r.tmp)
    table = rows(r)
    if table:
        text = report(r, table, info)
        print(text)
        log.info("report and raw samples saved as %s.md and .json", save(r, text, table, info, started))
    return status


if __name__ == "__main__":
    sys.exit(main())
