"""fio benchmark: a cowfs volume side by side with its peers, on the same host.

Run it as root (it mounts FUSE file systems and attaches loop devices), from
the project's venv so that the ``cowfs`` command next to the interpreter is
the one under test::

    make bench                      # or: .venv/bin/python tools/bench.py
    .venv/bin/python tools/bench.py --size 4G --runtime 30 --reps 3
    .venv/bin/python tools/bench.py --size 64M --runtime 2 --reps 1 \\
        --targets cowfs,ceiling --accesses file --profiles rand-read-4K --no-pinned

Targets (``--targets``, default all four), each ``--size`` bytes, created in a
temporary directory under ``--dir``:

``cowfs``
    a volume in a fresh pool, mounted by the ``cowfs`` command;
``qcow2``
    a qcow2 image (``qemu-img create -f qcow2``, 64 KiB clusters) served as a
    file by qemu-storage-daemon's FUSE export (see :mod:`cowfs_tools.peers`);
``ceiling``
    an in-memory file served by :mod:`cowfs_tools.ceiling`: the bare
    per-request cost of a pyfuse3 + trio daemon, mounted and opened the way
    cowfs is;
``plain``
    a plain sparse file on the host file system (no FUSE at all).

Each target is written once in full with sequential 1 MiB writes (the *first
fill*, over unallocated space: its throughput is a row of its own), so that
reads meet data rather than holes.  Then every fio profile (``--profiles``)
runs on every target through every access mode (``--accesses``):

``file``
    fio on the file itself, with O_DIRECT;
``loop``
    a default loop device (``losetup``: the loop driver goes through the
    page cache of the file), fio with ``direct=1`` on ``/dev/loopN``;
``loop-dio``
    a loop device attached with ``losetup --direct-io=on``, fio ``direct=1``.

All three FUSE targets open their file with FUSE's ``direct_io`` flag
(qemu-storage-daemon does so on its own; cowfs and the ceiling set it), so
every request reaches the daemon, whatever the access mode; only ``plain``
gets the page cache under a default loop device.

Profiles: ``seq-write-1M``, ``seq-read-1M``, ``rand-write-4K``,
``rand-read-4K`` (``ioengine=psync``, queue depth 1) and
``rand-write-4K-QD16``, ``rand-read-4K-QD16`` (``ioengine=libaio``,
``iodepth=16``); writes end with an fsync, and every run draws fresh
random offsets (``--randrepeat=0``).  Runs are interleaved per
repetition and profile (cowfs, qcow2, ceiling, plain, cowfs, ...) so that
drift of the host affects all targets alike; the host page cache is dropped
before each run when the system allows it.  The table shows the median of
``--reps`` runs and cowfs's throughput divided by each peer's (below 1: cowfs
is slower).

Last comes the *pinned* pass (unless ``--no-pinned``): fio and the target's
daemon are pinned to one CPU (the highest this process may use) with
``taskset``, and ``rand-write-4K`` and ``rand-read-4K`` run ``--reps`` times
on each file, interleaved like the other runs, each read after one
sequential read of the whole file (so the host page cache is warm: the pass
is about software cost, not disk waits).  It reports the medians of IOPS
and of the daemon's CPU time per request: the growth of utime + stime in
``/proc/PID/stat`` (clock ticks, converted to microseconds) divided by the
number of I/Os fio did.  (One run each, as before, let one slow run decide:
cowfs's pinned writes took 37 and 59 us in two such runs of the same code,
41-43 us in three by hand.)  Daemons are pinned where they run,
with ``taskset -a -p`` (all threads; threads they start later inherit it):
the cowfs daemon is the process whose command line is the ``cowfs mount POOL
MOUNTPOINT`` that forked it (see :func:`cowfs_daemon_pid`); qemu-storage-daemon
and the ceiling are children of this process.  A plain file has no daemon
(``n/a``).

Results go to ``--dir``, named after the run: ``.md`` (the tables printed on
stdout, ending with the issue's targets, each marked met or not met),
``.json`` (every sample with fio's whole report) and ``.png`` (a chart of the
cowfs/ceiling and cowfs/qcow2 ratios; only if matplotlib can be imported).
Every mount, loop device and daemon started is stopped at the end, even after
an error or Ctrl-C.

O_DIRECT is used wherever the target accepts it.  If the kernel refuses it on
a file (EINVAL, found during the fill), that target falls back to buffered
I/O and the summary says so, since its reads may then be served from the page
cache.

Duration: 4 targets x 3 accesses x 6 profiles x ``--reps`` runs, plus the
pinned pass (2 profiles x 4 targets x ``--reps``), each ``--runtime``
seconds plus about 0.6 s for fio's start, the final fsync and the cache
drop (a pinned read run also reads the file once before), plus about 15 s
for set-up and the four fills at 1 GiB.  With the defaults (1 GiB, 6 s,
3 repetitions: 240 runs) that is about 27 minutes on a 2-CPU VM (two
full runs there took 27 min 25 s and 27 min 14 s).  Three, not two: the
median of two is their mean, so a slow run moves it by half its distance;
with two, runs of the same code gave cowfs's pinned writes 40 and 46 us
and the file's depth-16 write ratio 0.75 and 0.67.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cowfs.blockio import OsStorage
from cowfs.errors import PoolError
from cowfs_tools.peers import Ceiling, FuseDaemon, PeerError, Qcow2Export

log = logging.getLogger("cowfs.bench")

MiB = 1 << 20
KINDS = ("cowfs", "qcow2", "ceiling", "plain")
ACCESSES = ("file", "loop", "loop-dio")
# cowfs's throughput is divided by each of these peers' in the table.
RATIOS = ("ceiling", "qcow2", "plain")
# How long to wait for the background daemon to flush and let go of the pool
# after the unmount, before the temporary pool is deleted under it anyway.
DAEMON_EXIT_TIMEOUT = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


class DirectIORefused(BenchError):
    """fio's job failed with EINVAL: the target does not accept O_DIRECT."""


@dataclass(frozen=True)
class Profile:
    """One fio workload.  ``metric`` is what the table reports: ``"bw"``
    (MiB/s) for sequential runs, ``"iops"`` for random ones.  Queue depth 1
    runs with ``psync``, deeper queues with ``libaio``."""

    name: str
    rw: str
    bs: str
    metric: str
    iodepth: int = 1

    @property
    def writes(self) -> bool:
        """Whether the workload writes (and so ends with an fsync)."""
        return "write" in self.rw

    @property
    def ioengine(self) -> str:
        """The fio engine that can keep ``iodepth`` requests in flight."""
        return "psync" if self.iodepth == 1 else "libaio"


PROFILES = (
    Profile("seq-write-1M", "write", "1M", "bw"),
    Profile("seq-read-1M", "read", "1M", "bw"),
    Profile("rand-write-4K", "randwrite", "4k", "iops"),
    Profile("rand-read-4K", "randread", "4k", "iops"),
    Profile("rand-write-4K-QD16", "randwrite", "4k", "iops", 16),
    Profile("rand-read-4K-QD16", "randread", "4k", "iops", 16),
)
FILL = Profile("first-fill-1M", "write", "1M", "bw")
# The pinned pass: per-request cost, so small random I/O at queue depth 1.
PINNED_PROFILES = ("rand-write-4K", "rand-read-4K")
# Read once through each file before a pinned read run, so that the run
# measures software cost with a warm host page cache rather than disk waits.
WARM_UP = Profile("warm-up-read-1M", "read", "1M", "bw")


@dataclass
class Target:
    """A file or device fio is pointed at.

    ``kind`` is one of :data:`KINDS`, ``access`` one of :data:`ACCESSES`.
    ``direct`` says whether fio uses O_DIRECT on it; ``note`` records anything
    that qualifies the figures (a refused O_DIRECT, a loop device that could
    not use direct I/O on its backing file).
    """

    kind: str
    access: str
    filename: str
    size: int
    direct: bool = True
    note: str = ""


@dataclass
class Sample:
    """The outcome of one fio run.  ``ios`` is the number of I/Os fio did in
    the measured direction; ``daemon_us_per_io`` the target daemon's CPU
    microseconds per I/O (pinned pass only, None without a daemon)."""

    kind: str
    access: str
    profile: str
    rep: int
    direct: bool
    bw_bytes: float
    iops: float
    ios: int
    fio: dict[str, Any]  # fio's whole JSON report
    daemon_us_per_io: float | None = None

    def value(self, metric: str) -> float:
        """The figure the table reports for ``metric`` ("bw" or "iops")."""
        return self.bw_bytes if metric == "bw" else self.iops


@dataclass
class Bench:
    """The state of one benchmark run, including everything to undo."""

    args: argparse.Namespace
    tmp: Path
    targets: dict[tuple[str, str], Target] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    fills: list[Sample] = field(default_factory=list)
    pinned: list[Sample] = field(default_factory=list)
    pin_cpu: int | None = None
    loops: list[str] = field(default_factory=list)
    peers: dict[str, FuseDaemon] = field(default_factory=dict)
    stack: ExitStack = field(default_factory=ExitStack)  # the peers' daemons
    mounted: Path | None = None
    pool: Path | None = None
    cache_drops: bool = True
    seq: int = 0


# ----------------------------------------------------------------------------
# Helpers


def parse_size(text: str) -> int:
    """Parse ``1G``, ``512M``, ``1GiB`` or a plain byte count (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = t[-1:] if t[-1:] in units else ""
    number = t[: len(t) - len(suffix)]
    try:
        value = int(float(number) * units[suffix])
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not a number with an optional K/M/G/T unit") from None
    if value < 16 * MiB or value % MiB:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a whole number of MiB, at least 16 MiB")
    return value


def subset(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated subset of ``choices``, returned
    in the order of ``choices`` (which is the order runs interleave in)."""
    def parse(text: str) -> tuple[str, ...]:
        wanted = {w.strip() for w in text.split(",") if w.strip()}
        unknown = wanted.difference(choices)
        if unknown or not wanted:
            raise argparse.ArgumentTypeError(
                f"{text!r}: give a comma-separated list of {', '.join(choices)}")
        return tuple(c for c in choices if c in wanted)
    return parse


def run(cmd: Sequence[str], what: str, timeout: float | None = 120) -> str:
    """Run ``cmd``; return its stdout, or raise BenchError naming ``what``
    with the command's own error output."""
    log.debug("$ %s", " ".join(cmd))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: {cmd[0]} did not finish within {timeout:.0f} s") from None
    except FileNotFoundError:
        raise BenchError(f"{what}: command {cmd[0]} not found") from None
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip() or f"exit status {res.returncode}"
        raise BenchError(f"{what}: {detail}")
    return res.stdout


def human(value: float, metric: str) -> str:
    """Format a throughput figure for the table."""
    if metric == "bw":
        return f"{value / MiB:.1f} MiB/s"
    return f"{value:.0f} IOPS"


# ----------------------------------------------------------------------------
# fio


def fio(bench: Bench, target: Target, profile: Profile, *, timed: bool,
        cpu: int | None = None) -> dict[str, Any]:
    """Run one fio job on ``target`` and return its parsed JSON report.

    With ``timed`` the job loops over the target for ``--runtime`` seconds;
    without, it makes one pass over the whole target (the initial fill).
    With ``cpu``, fio runs pinned to that CPU.  Raises BenchError when fio
    fails, DirectIORefused when the job failed with EINVAL so that the caller
    can retry without O_DIRECT.
    """
    bench.seq += 1
    report = bench.tmp / f"fio-{bench.seq:03d}.json"
    cmd = [
        "fio",
        "--name=bench",
        f"--filename={target.filename}",
        f"--size={target.size}",
        f"--rw={profile.rw}",
        f"--bs={profile.bs}",
        f"--ioengine={profile.ioengine}",
        f"--iodepth={profile.iodepth}",
        f"--direct={int(target.direct)}",
        # fio's default seed repeats its random offsets in every run, so a
        # read run would visit blocks in the order the write run before it
        # wrote them: on cowfs, which writes each new block after the last,
        # that is sequential on its disk and the host's readahead answered
        # most "random" reads (17.4k against 7.0k IOPS at depth 16).
        "--randrepeat=0",
        "--output-format=json",
        f"--output={report}",
    ]
    if profile.writes:
        cmd.append("--end_fsync=1")
        if bench.args.compress_percentage is not None:
            cmd += ["--refill_buffers=1",
                    f"--buffer_compress_percentage={bench.args.compress_percentage}"]
    if timed:
        cmd += ["--time_based=1", f"--runtime={bench.args.runtime}"]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    # A timed run ends with an fsync whose length depends on the target, and
    # an untimed fill of a slow target can take a while: be generous, but do
    # not hang forever on a wedged mount.
    timeout = bench.args.runtime + 600 if timed else 3600
    log.debug("$ %s", " ".join(cmd))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio {profile.name} on {target.filename} did not finish within {timeout} s") from None
    try:
        data = json.loads(report.read_text())
        job = data["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        data, job = {}, {}
    err = job.get("error", 0)
    if res.returncode != 0 or err:
        detail = res.stderr.strip() or f"exit status {res.returncode}"
        if err == errno.EINVAL or "error=Invalid argument" in res.stderr:
            raise DirectIORefused(f"fio {profile.name} on {target.filename}: {detail}")
        raise BenchError(f"fio {profile.name} on {target.filename} failed: {detail}")
    return data


def sample(target: Target, profile: Profile, rep: int, data: dict[str, Any]) -> Sample:
    """Extract bandwidth, IOPS and I/O count of the relevant direction."""
    side = data["jobs"][0]["write" if profile.writes else "read"]
    return Sample(target.kind, target.access, profile.name, rep, target.direct,
                  float(side["bw_bytes"]), float(side["iops"]), int(side["total_ios"]), data)


def drop_caches(bench: Bench) -> None:
    """Start each run with a cold host page cache (best effort: a container
    may not allow it, which is then logged once and recorded)."""
    if not bench.cache_drops:
        return
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        log.warning("cannot drop the page cache (%s); runs start with a warm cache", e.strerror)
        bench.cache_drops = False


def fill(bench: Bench, target: Target) -> None:
    """Write the whole target once, so that reads meet data, not holes; the
    throughput of this first write over unallocated space is recorded.

    This is also where O_DIRECT is probed: if the file refuses it with
    EINVAL, the target is switched to buffered I/O for the rest of the run.
    """
    try:
        data = fio(bench, target, FILL, timed=False)
    except DirectIORefused as e:
        if not target.direct:
            raise
        log.warning("O_DIRECT refused on the %s file (%s); using buffered I/O there", target.kind, e)
        target.direct = False
        target.note = "O_DIRECT refused (EINVAL): buffered I/O, reads may hit the page cache"
        data = fio(bench, target, FILL, timed=False)
    s = sample(target, FILL, 0, data)
    bench.fills.append(s)
    log.info("filled %s: %s", target.kind, human(s.bw_bytes, "bw"))


def measure(bench: Bench) -> None:
    """Run every profile on every target and access, ``--reps`` times,
    interleaved."""
    for rep in range(1, bench.args.reps + 1):
        for profile in bench.args.profiles:
            for access in bench.args.accesses:
                for kind in bench.args.kinds:
                    target = bench.targets[(kind, access)]
                    drop_caches(bench)
                    s = sample(target, profile, rep, fio(bench, target, profile, timed=True))
                    bench.samples.append(s)
                    log.info("rep %d %-18s %-8s %-7s %s", rep, profile.name, access, kind,
                             human(s.value(profile.metric), profile.metric))


# ----------------------------------------------------------------------------
# The pinned pass


def cowfs_daemon_pid(pool: Path, mountpoint: Path) -> int:
    """The pid of the cowfs daemon serving ``pool`` on ``mountpoint``.

    ``cowfs mount`` forks its daemon without exec, so the daemon's
    ``/proc/PID/cmdline`` is the command's own, and the command has exited
    once the mount is live: the one process left whose arguments include
    ``mount``, the pool and the mount point (as given to ``cowfs mount``).
    """
    wanted = [b"mount", os.fsencode(pool), os.fsencode(mountpoint)]
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if all(arg in argv for arg in wanted):
            found.append(int(proc.name))
    if len(found) != 1:
        raise BenchError(f"expected one cowfs daemon for {pool} on {mountpoint}, found pids {found}")
    return found[0]


def daemon_pid(bench: Bench, kind: str) -> int | None:
    """The pid of the daemon serving target ``kind`` (None for plain)."""
    if kind == "cowfs":
        assert bench.pool is not None and bench.mounted is not None
        return cowfs_daemon_pid(bench.pool, bench.mounted)
    return bench.peers[kind].pid if kind in bench.peers else None


def cpu_ticks(pid: int) -> int:
    """utime + stime of process ``pid`` (all its threads), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def pinned_pass(bench: Bench) -> None:
    """With fio and each daemon on one CPU, run the random QD1 profiles
    ``--reps`` times on each file, interleaved (the read after a warm-up read
    of the whole file, the write from a cold cache like the other runs), and
    record IOPS and the daemon's CPU time per I/O of every run."""
    cpu = max(os.sched_getaffinity(0))
    bench.pin_cpu = cpu
    pids = {kind: daemon_pid(bench, kind) for kind in bench.args.kinds}
    for kind, pid in pids.items():
        if pid is not None:
            run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], f"pinning the {kind} daemon (pid {pid})")
            log.info("pinned the %s daemon (pid %d) to CPU %d", kind, pid, cpu)
    for rep in range(1, bench.args.reps + 1):
        for profile in (p for p in PROFILES if p.name in PINNED_PROFILES):
            for kind, pid in pids.items():
                target = bench.targets[(kind, "file")]
                if profile.writes:
                    drop_caches(bench)
                else:
                    fio(bench, target, WARM_UP, timed=False)
                before = cpu_ticks(pid) if pid is not None else 0
                s = sample(target, profile, rep, fio(bench, target, profile, timed=True, cpu=cpu))
                if pid is not None and s.ios:
                    s.daemon_us_per_io = (cpu_ticks(pid) - before) * 1e6 / CLOCK_TICKS / s.ios
                bench.pinned.append(s)
                log.info("pinned %-13s %-7s rep %d: %s, %s us/request", profile.name, kind, rep,
                         human(s.iops, "iops"), format_us(s.daemon_us_per_io))


def pinned_medians(pinned: Sequence[Sample]) -> dict[tuple[str, str], tuple[float, float | None]]:
    """Per (profile, kind) of the pinned pass: the median IOPS and the
    median daemon CPU microseconds per request (None without a daemon) of
    its runs."""
    runs: dict[tuple[str, str], list[Sample]] = {}
    for s in pinned:
        runs.setdefault((s.profile, s.kind), []).append(s)
    out: dict[tuple[str, str], tuple[float, float | None]] = {}
    for key, group in runs.items():
        us = [s.daemon_us_per_io for s in group if s.daemon_us_per_io is not None]
        out[key] = (statistics.median(s.iops for s in group), statistics.median(us) if us else None)
    return out


# ----------------------------------------------------------------------------
# Set-up and tear-down


def cowfs_command() -> str:
    """The ``cowfs`` command installed beside the running interpreter."""
    path = Path(sys.executable).parent / "cowfs"
    if not os.access(path, os.X_OK):
        raise BenchError(f"no cowfs command at {path}: run from the project venv after `make deps`")
    return str(path)


def check_prerequisites(args: argparse.Namespace) -> None:
    """Refuse early, with the reason, what would fail half-way."""
    if os.geteuid() != 0:
        raise BenchError("the benchmark needs root (it attaches loop devices and mounts FUSE file systems)")
    tools = ["fio", "losetup", "umount"]
    if "qcow2" in args.kinds:
        tools += ["qemu-img", "qemu-storage-daemon"]
    if args.pinned:
        tools.append("taskset")
    for tool in tools:
        if shutil.which(tool) is None:
            raise BenchError(f"command {tool} not found: run `make deps`")
    if "cowfs" in args.kinds:
        cowfs_command()
    args.dir.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(args.dir)
    # Each target on disk needs its full size; cowfs also needs room for
    # metadata and for new copies written before old ones are freed.
    on_disk = [k for k in args.kinds if k != "ceiling"]
    need = int(args.size * len(on_disk) * 1.25)
    have = st.f_bavail * st.f_frsize
    if have < need:
        raise BenchError(f"work directory {args.dir} has {have // MiB} MiB free; "
                         f"{need // MiB} MiB needed for --size {args.size // MiB} MiB")


def make_file(path: Path, size: int) -> None:
    """Create ``path`` as a sparse file of ``size`` bytes (like truncate -s)."""
    with open(path, "xb") as f:
        f.truncate(size)


def setup_cowfs(bench: Bench) -> Path:
    """mkfs and mount a fresh pool; return the volume's path."""
    cowfs = cowfs_command()
    pool, mnt = bench.tmp / "pool", bench.tmp / "mnt"
    pool.mkdir()
    mnt.mkdir()
    run([cowfs, "mkfs", str(pool)], f"cowfs mkfs {pool}")
    bench.pool = pool
    run([cowfs, "mount", str(pool), str(mnt)], f"cowfs mount {pool} on {mnt}")
    bench.mounted = mnt
    if not os.path.ismount(mnt):
        raise BenchError(f"cowfs mount returned success but {mnt} is not a mount point")
    log.info("mounted cowfs pool %s on %s", pool, mnt)
    vol = mnt / "bench.img"
    make_file(vol, bench.args.size)
    return vol


def setup_target(bench: Bench, kind: str) -> Path:
    """Create target ``kind`` of ``--size`` bytes, with its daemon if it has
    one (stopped by teardown); return the file fio is to use."""
    size = bench.args.size
    if kind == "cowfs":
        return setup_cowfs(bench)
    if kind == "plain":
        path = bench.tmp / "plain.img"
        make_file(path, size)
        return path
    peer: FuseDaemon
    if kind == "qcow2":
        image = bench.tmp / "qcow2.img"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)], f"qemu-img create {image}")
        peer = Qcow2Export(image, bench.tmp / "qcow2.raw")
    else:
        peer = Ceiling(bench.tmp / "ceiling.raw", size)
    bench.peers[kind] = bench.stack.enter_context(peer)
    return peer.path


def attach_loop(bench: Bench, target: Target, access: str) -> Target:
    """Attach a loop device to a file target, with direct I/O on its backing
    file for ``loop-dio``; return the loop target."""
    dio = access == "loop-dio"
    dev = run(["losetup", *(["--direct-io=on"] if dio else []), "-f", "--show", target.filename],
              f"losetup on {target.filename}").strip()
    bench.loops.append(dev)
    note = ""
    if dio:
        try:
            if Path("/sys/block", Path(dev).name, "loop", "dio").read_text().strip() != "1":
                note = "loop device could not use direct I/O on its backing file"
        except OSError:
            note = "loop direct-I/O state unknown"
    if note:
        log.warning("%s (%s): %s", dev, target.kind, note)
    log.info("attached %s (%s) to %s", dev, access, target.filename)
    return Target(target.kind, access, dev, target.size, True, note)


def wait_for_daemon(pool: Path) -> None:
    """Wait until the background daemon has let go of the pool's lock, i.e.
    has flushed and exited after the unmount."""
    storage = OsStorage(str(pool))
    deadline = time.monotonic() + DAEMON_EXIT_TIMEOUT
    while True:
        try:
            storage.lock()
        except PoolError:
            if time.monotonic() > deadline:
                log.warning("cowfs daemon still holds %s after %.0f s", pool, DAEMON_EXIT_TIMEOUT)
                return
            time.sleep(0.2)
            continue
        storage.unlock()
        return


def teardown(bench: Bench) -> None:
    """Undo whatever set-up got done: loops, peer daemons, cowfs mount,
    temporary files.  Each step is attempted even if an earlier one failed."""
    for dev in reversed(bench.loops):
        try:
            run(["losetup", "-d", dev], f"detaching {dev}")
        except BenchError as e:
            log.error("%s", e)
    try:
        bench.stack.close()
    except (PeerError, OSError) as e:
        log.error("stopping a peer daemon: %s", e)
    if bench.mounted is not None:
        try:
            run(["umount", str(bench.mounted)], f"unmounting {bench.mounted}")
        except BenchError as e:
            log.error("%s; trying fusermount3 -u", e)
            try:
                run(["fusermount3", "-u", str(bench.mounted)], f"unmounting {bench.mounted}")
            except BenchError as e2:
                log.error("%s; leaving %s in place", e2, bench.tmp)
                return
    if bench.pool is not None:
        wait_for_daemon(bench.pool)
    shutil.rmtree(bench.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------
# Report


@dataclass
class Row:
    """One line of the main table: the median per target of one access and
    profile."""

    access: str
    profile: str
    metric: str
    medians: dict[str, float]

    def ratio(self, peer: str) -> float | None:
        """cowfs's median divided by ``peer``'s, if both were measured."""
        mine, theirs = self.medians.get("cowfs"), self.medians.get(peer)
        return mine / theirs if mine is not None and theirs else None


def rows(bench: Bench) -> list[Row]:
    """The first fill, then every access and profile measured."""
    out = [Row("file", FILL.name, FILL.metric, {s.kind: s.bw_bytes for s in bench.fills})]
    for access in bench.args.accesses:
        for profile in bench.args.profiles:
            medians = {kind: statistics.median(
                s.value(profile.metric) for s in bench.samples
                if (s.kind, s.access, s.profile) == (kind, access, profile.name))
                for kind in bench.args.kinds}
            out.append(Row(access, profile.name, profile.metric, medians))
    return out


def ratio_peers(kinds: Sequence[str]) -> list[str]:
    """The peers cowfs is compared with in this run."""
    return [peer for peer in RATIOS if "cowfs" in kinds and peer in kinds]


def markdown(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def format_ratio(value: float | None) -> str:
    """A ratio for the tables, ``-`` if there is none."""
    return "-" if value is None else f"{value:.2f}"


def format_us(value: float | None) -> str:
    """CPU microseconds per request, ``n/a`` without a daemon."""
    return "n/a" if value is None else f"{value:.0f}"


def table(bench: Bench) -> str:
    """The markdown table of medians, the targets side by side, then
    cowfs's ratio to each peer."""
    kinds, peers = bench.args.kinds, ratio_peers(bench.args.kinds)
    head = ["access", "profile", *kinds, *(f"cowfs/{p}" for p in peers)]
    body = [[r.access, r.profile, *(human(r.medians[k], r.metric) for k in kinds),
             *(format_ratio(r.ratio(p)) for p in peers)] for r in rows(bench)]
    return markdown(head, body)


def pinned_table(bench: Bench) -> str:
    """The pinned pass: IOPS and daemon CPU per request for each target, and
    cowfs's CPU per request over the ceiling's."""
    kinds = bench.args.kinds
    both = "cowfs" in kinds and "ceiling" in kinds
    head = ["profile (file, pinned)"]
    for k in kinds:
        head += [f"{k} IOPS", f"{k} us/req"]
    head += ["cowfs/ceiling us/req"] if both else []
    body = []
    medians = pinned_medians(bench.pinned)
    for name in PINNED_PROFILES:
        row = [name]
        for k in kinds:
            iops, us = medians[(name, k)]
            row += [f"{iops:.0f}", format_us(us)]
        if both:
            mine, theirs = medians[(name, "cowfs")][1], medians[(name, "ceiling")][1]
            row.append(format_ratio(mine / theirs if mine is not None and theirs else None))
        body.append(row)
    return markdown(head, body)


@dataclass(frozen=True)
class Verdict:
    """One target of the performance issue checked against this run:
    ``value`` (a ratio, or MiB/s for the throughput floors) against
    ``bound``; ``at_most`` for the pinned CPU ratio, where lower is better."""

    target: str
    measure: str
    value: float
    bound: float
    at_most: bool = False
    unit: str = "ratio"  # or "MiB/s"

    @property
    def met(self) -> bool:
        """Whether ``value`` is on the right side of ``bound`` (the bound
        itself counts as met)."""
        return meets(self.value, self.bound, self.at_most)


def meets(value: float, bound: float, at_most: bool = False) -> bool:
    """Whether ``value`` meets a target of ``>= bound`` (``<= bound`` if
    ``at_most``).  Exact: 0.897 does not meet 0.9, however it is printed."""
    return value <= bound if at_most else value >= bound


# The targets for this benchmark, checked by verdicts(): every queue-depth-1 profile (the first fill included) >= 0.9 of the
# ceiling, every queue-depth-16 profile >= 0.75 of it; 4 KiB random writes at
# depth 1 >= 1.1 of qcow2; 4 KiB random reads at depth 1 >= 1.0 of qcow2 on
# the file and >= 0.9 of it through each loop mode; sequential profiles >= 500
# MiB/s on the file and through loop --direct-io=on.  The pinned pass adds
# cowfs's CPU per request <= 1.5x the ceiling's.
SEQ_FLOOR_MIB = 500.0
PINNED_CPU_BOUND = 1.5


def verdicts(table_rows: Sequence[Row], pinned: Sequence[Sample]) -> list[Verdict]:
    """Every target of the issue that this run measured, checked; a target
    whose figures are missing (a peer, access or profile left out) is not
    listed rather than guessed."""
    depth = {p.name: p.iodepth for p in (*PROFILES, FILL)}
    out: list[Verdict] = []

    def add(target: str, row: Row, value: float | None, bound: float, unit: str = "ratio") -> None:
        if value is not None:
            out.append(Verdict(target, f"{row.access} {row.profile}", value, bound, unit=unit))

    for r in table_rows:
        qd1 = depth.get(r.profile) == 1
        add("cowfs/ceiling, queue depth 1" if qd1 else "cowfs/ceiling, queue depth 16",
            r, r.ratio("ceiling"), 0.9 if qd1 else 0.75)
        if r.profile == "rand-write-4K":
            add("cowfs/qcow2, 4K random writes", r, r.ratio("qcow2"), 1.1)
        if r.profile == "rand-read-4K":
            add("cowfs/qcow2, 4K random reads", r, r.ratio("qcow2"), 1.0 if r.access == "file" else 0.9)
        if r.metric == "bw" and r.access in ("file", "loop-dio") and "cowfs" in r.medians:
            add("sequential MiB/s", r, r.medians["cowfs"] / MiB, SEQ_FLOOR_MIB, "MiB/s")
    medians = pinned_medians(pinned)
    for name in PINNED_PROFILES:
        mine = medians.get((name, "cowfs"), (0.0, None))[1]
        theirs = medians.get((name, "ceiling"), (0.0, None))[1]
        if mine is not None and theirs:
            out.append(Verdict("pinned CPU per request, cowfs/ceiling", f"file {name}",
                               mine / theirs, PINNED_CPU_BOUND, at_most=True))
    return out


def _shown(v: Verdict) -> str:
    """``v.value`` (ratios with three decimals, MiB/s with none), with as
    many more as it takes for a figure that misses its bound not to print
    as the bound itself."""
    for digits in range(3 if v.unit == "ratio" else 0, 7):
        text = f"{v.value:.{digits}f}"
        if v.met or float(text) != v.bound:
            return text
    return repr(v.value)


def targets_table(found: Sequence[Verdict]) -> str:
    """The checked targets as a markdown table, and how many are met."""
    body = [[v.target, v.measure, _shown(v), f"{'<=' if v.at_most else '>='} {v.bound:g}",
             "met" if v.met else "**not met**"] for v in found]
    met = sum(v.met for v in found)
    return (markdown(["target", "measure", "cowfs", "bound", "verdict"], body)
            + f"\n\n{met} of {len(found)} targets met in this run.")


def summary(bench: Bench, fio_version: str) -> str:
    """Tables plus the conditions they were measured under."""
    a = bench.args
    out = [
        f"cowfs benchmark: {fio_version}, psync at QD1, libaio at QD16, target size {a.size // MiB} MiB, "
        f"{a.runtime} s per run, median of {a.reps} runs; host kernel {platform.release()}",
        f"page cache dropped before each run: {'yes' if bench.cache_drops else 'no'}; "
        "ratios: cowfs's throughput over the peer's (below 1: cowfs is slower)",
    ]
    for t in bench.targets.values():
        out.append(f"- {t.kind} {t.access} ({t.filename}): {'O_DIRECT' if t.direct else 'buffered'}"
                   + (f"; {t.note}" if t.note else ""))
    out += ["", table(bench)]
    if bench.pinned:
        runs = max(s.rep for s in bench.pinned)
        out += ["", f"Pinned pass: fio and each daemon on CPU {bench.pin_cpu}, median of {runs} "
                f"run{'s' if runs > 1 else ''} of {a.runtime} s each, reads after a sequential read "
                "of the file (warm host page cache); us/req = the daemon's CPU time (user + system) "
                "per I/O", "", pinned_table(bench)]
    found = verdicts(rows(bench), bench.pinned)
    if found:
        out += ["", "Targets of the performance issue (ratios as in the tables above; the "
                "sequential floors in MiB/s):", "", targets_table(found)]
    return "\n".join(out)


def chart(bench: Bench, path: Path) -> bool:
    """Draw cowfs/ceiling and cowfs/qcow2 per access and profile as a PNG
    at ``path``; False (logged) if matplotlib is missing or there is no
    such ratio in this run."""
    peers = [p for p in ratio_peers(bench.args.kinds) if p in ("ceiling", "qcow2")]
    if not peers:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter
    except ImportError:
        log.info("matplotlib is not installed: no chart (it comes with the project's bench extra)")
        return False
    data = rows(bench)
    width = 0.8 / len(peers)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.7 * len(data)), 6.0))
    lowest = 1.0
    for i, peer in enumerate(peers):
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(data))]
        ratios = [r.ratio(peer) for r in data]
        lowest = min([lowest, *(v for v in ratios if v is not None)])
        bars = ax.bar(xs, [float("nan") if v is None else v for v in ratios], width, label=f"cowfs/{peer}")
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=lowest / 2)  # the lowest bar stays visible
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=6)
    ax.set_xticks(range(len(data)), [f"{r.access} {r.profile}" for r in data],
                  rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("throughput ratio (log scale; below 1: cowfs slower)")
    ax.set_title(f"cowfs vs peers, {bench.args.size // MiB} MiB, median of {bench.args.reps}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def save(bench: Bench, started: str, fio_version: str) -> Path:
    """Write the run's raw data (every sample with its fio report) as JSON."""
    path = bench.args.dir / f"{bench.tmp.name}.json"
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(bench.args).items()}
    args["profiles"] = [p.name for p in bench.args.profiles]
    doc = {
        "started": started,
        "fio_version": fio_version,
        "kernel": platform.release(),
        "args": args,
        "page_cache_dropped": bench.cache_drops,
        "clock_ticks_per_second": CLOCK_TICKS,
        "pinned_cpu": bench.pin_cpu,
        "targets": [asdict(t) for t in bench.targets.values()],
        "fills": [asdict(s) for s in bench.fills],
        "samples": [asdict(s) for s in bench.samples],
        "pinned": [asdict(s) for s in bench.pinned],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def load(path: Path) -> tuple[Bench, str]:
    """A finished run as :func:`save` wrote it, ready for :func:`summary`,
    and its fio version.  Raises BenchError if the file is not such a run."""
    try:
        doc = json.loads(path.read_text())
        args = argparse.Namespace(**doc["args"])
        args.dir = Path(args.dir)
        args.profiles = tuple(p for p in PROFILES if p.name in doc["args"]["profiles"])
        bench = Bench(args, path.with_suffix(""))
        bench.cache_drops = doc["page_cache_dropped"]
        bench.pin_cpu = doc["pinned_cpu"]
        bench.targets = {(t["kind"], t["access"]): Target(**t) for t in doc["targets"]}
        bench.fills = [Sample(**s) for s in doc["fills"]]
        bench.samples = [Sample(**s) for s in doc["samples"]]
        bench.pinned = [Sample(**s) for s in doc["pinned"]]
        return bench, doc["fio_version"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BenchError(f"{path}: not the raw results of a bench run ({e!r})") from None


def report(bench: Bench, fio_version: str) -> None:
    """Print the summary and save it as markdown, with the chart beside it."""
    text = summary(bench, fio_version)
    print(text)
    md = bench.args.dir / f"{bench.tmp.name}.md"
    md.write_text(text + "\n")
    log.info("tables saved to %s", md)
    png = md.with_suffix(".png")
    if chart(bench, png):
        log.info("chart saved to %s", png)


# ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    names = [p.name for p in PROFILES]
    p = argparse.ArgumentParser(description="fio benchmark: a cowfs volume against qcow2 on "
                                "qemu-storage-daemon, a do-nothing pyfuse3 file and a plain file")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/cowfs-bench"),
                   help="work directory for the temporary targets and the results (default %(default)s)")
    p.add_argument("--size", type=parse_size, default=parse_size("1G"),
                   help="size of each target (default 1G)")
    p.add_argument("--runtime", type=int, default=6, help="seconds per fio run (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each run (default %(default)s)")
    p.add_argument("--targets", dest="kinds", metavar="LIST", type=subset(KINDS), default=KINDS,
                   help=f"comma-separated targets (default: {','.join(KINDS)})")
    p.add_argument("--accesses", metavar="LIST", type=subset(ACCESSES), default=ACCESSES,
                   help=f"comma-separated access modes (default: {','.join(ACCESSES)})")
    p.add_argument("--profiles", metavar="LIST", type=subset(names), default=tuple(names),
                   help=f"comma-separated fio profiles (default: {','.join(names)})")
    p.add_argument("--no-pinned", dest="pinned", action="store_false",
                   help="skip the pass with fio and the daemons pinned to one CPU")
    p.add_argument("--compress-percentage", type=int, metavar="PCT",
                   help="make written data about PCT%% compressible (fio buffer_compress_percentage); "
                        "default: incompressible")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="run nothing: print the tables of a finished run again from its .json "
                        "(with the targets checked by this version)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command")
    args = p.parse_args(argv)
    if args.runtime < 1 or args.reps < 1:
        p.error("--runtime and --reps must be at least 1")
    if args.compress_percentage is not None and not 0 <= args.compress_percentage <= 100:
        p.error("--compress-percentage must be between 0 and 100")
    args.profiles = tuple(prof for prof in PROFILES if prof.name in args.profiles)
    args.dir = args.dir.resolve()
    return args


def prepare(bench: Bench) -> None:
    """Create, fill and attach every target for every access mode."""
    for kind in bench.args.kinds:
        target = Target(kind, "file", str(setup_target(bench, kind)), bench.args.size)
        bench.targets[(kind, "file")] = target
        fill(bench, target)
    for access in bench.args.accesses:
        if access != "file":
            for kind in bench.args.kinds:
                bench.targets[(kind, access)] = attach_loop(bench, bench.targets[(kind, "file")], access)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the tables on stdout.  Returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.report is not None:
        try:
            print(summary(*load(args.report)))
        except BenchError as e:
            log.error("%s", e)
            return 1
        return 0
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        check_prerequisites(args)
        fio_version = run(["fio", "--version"], "fio --version").strip()
    except BenchError as e:
        log.error("%s", e)
        return 1
    bench = Bench(args, Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=args.dir)))
    try:
        prepare(bench)
        measure(bench)
        if args.pinned:
            pinned_pass(bench)
    except (BenchError, PeerError, OSError) as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted: tearing down")
        return 130
    finally:
        teardown(bench)
        if bench.samples or bench.fills:
            log.info("raw results saved to %s", save(bench, started, fio_version))
    report(bench, fio_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
