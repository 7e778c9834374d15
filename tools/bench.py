"""fio benchmark: a cowfs volume against a plain file on the same host disk.

Run it as root (it mounts cowfs and attaches loop devices), from the project's
venv so that the ``cowfs`` command next to the interpreter is the one under
test::

    make bench                      # or: .venv/bin/python tools/bench.py
    .venv/bin/python tools/bench.py --size 4G --runtime 30 --reps 3

It makes a fresh pool and mountpoint in a temporary directory under ``--dir``,
mounts the pool, creates one volume there (``truncate``) and a plain sparse
file of the same size beside the pool, fills both once with a sequential write
so that reads hit real data rather than holes, then runs four fio profiles
(sequential 1 MiB write/read, random 4 KiB write/read; ``ioengine=psync``,
queue depth 1, writes end with an fsync) against each target, first on the
file itself and then through a loop device (``losetup --direct-io=on``).  Runs
are interleaved (cowfs, plain, cowfs, plain, ...) so that drift of the host
disk affects both alike.  The median of each series goes to stdout as a
markdown table; all fio JSON reports are saved in one file in ``--dir``.

O_DIRECT is used wherever the target accepts it.  If the kernel refuses it on
the cowfs file (EINVAL), that target falls back to buffered I/O and the table
says so, since its reads may then be served from the page cache.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cowfs.blockio import OsStorage
from cowfs.errors import PoolError

log = logging.getLogger("cowfs.bench")

MiB = 1 << 20
KINDS = ("cowfs", "plain")
ACCESSES = ("file", "loop")
# How long to wait for the background daemon to flush and let go of the pool
# after the unmount, before the temporary pool is deleted under it anyway.
DAEMON_EXIT_TIMEOUT = 60.0


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


class DirectIORefused(BenchError):
    """fio's job failed with EINVAL: the target does not accept O_DIRECT."""


@dataclass(frozen=True)
class Profile:
    """One fio workload.  ``metric`` is what the table reports: ``"bw"``
    (MiB/s) for sequential runs, ``"iops"`` for random ones."""

    name: str
    rw: str
    bs: str
    metric: str

    @property
    def writes(self) -> bool:
        """Whether the workload writes (and so ends with an fsync)."""
        return "write" in self.rw


PROFILES = (
    Profile("seq-write 1M", "write", "1M", "bw"),
    Profile("seq-read 1M", "read", "1M", "bw"),
    Profile("rand-write 4K", "randwrite", "4k", "iops"),
    Profile("rand-read 4K", "randread", "4k", "iops"),
)


@dataclass
class Target:
    """A file or device fio is pointed at.

    ``kind`` is ``"cowfs"`` or ``"plain"``, ``access`` is ``"file"`` or
    ``"loop"``.  ``direct`` says whether fio uses O_DIRECT on it; ``note``
    records anything that qualifies the figures (a refused O_DIRECT, a loop
    device that could not use direct I/O on its backing file).
    """

    kind: str
    access: str
    filename: str
    size: int
    direct: bool = True
    note: str = ""


@dataclass
class Sample:
    """The outcome of one fio run."""

    kind: str
    access: str
    profile: str
    rep: int
    direct: bool
    bw_bytes: float
    iops: float
    fio: dict[str, Any]  # fio's whole JSON report


@dataclass
class Bench:
    """The state of one benchmark run, including everything to undo."""

    args: argparse.Namespace
    tmp: Path
    targets: dict[tuple[str, str], Target] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    fills: list[Sample] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)
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


def fio(bench: Bench, target: Target, profile: Profile, *, timed: bool) -> dict[str, Any]:
    """Run one fio job on ``target`` and return its parsed JSON report.

    With ``timed`` the job loops over the target for ``--runtime`` seconds;
    without, it makes one pass over the whole target (the initial fill).
    Raises BenchError when fio fails, DirectIORefused when the job failed
    with EINVAL so that the caller can retry without O_DIRECT.
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
        "--ioengine=psync",
        "--iodepth=1",
        f"--direct={int(target.direct)}",
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
    """Extract bandwidth and IOPS of the relevant direction from a report."""
    side = data["jobs"][0]["write" if profile.writes else "read"]
    return Sample(target.kind, target.access, profile.name, rep, target.direct,
                  float(side["bw_bytes"]), float(side["iops"]), data)


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
    """Write the whole target once, so that reads meet data, not holes.

    This is also where O_DIRECT is probed: if the cowfs file refuses it with
    EINVAL, the target is switched to buffered I/O for the rest of the run.
    """
    profile = Profile("fill 1M", "write", "1M", "bw")
    try:
        data = fio(bench, target, profile, timed=False)
    except DirectIORefused as e:
        if target.kind != "cowfs" or not target.direct:
            raise
        log.warning("O_DIRECT refused on the cowfs file (%s); using buffered I/O there", e)
        target.direct = False
        target.note = "O_DIRECT refused (EINVAL): buffered I/O, reads may hit the page cache"
        data = fio(bench, target, profile, timed=False)
    s = sample(target, profile, 0, data)
    bench.fills.append(s)
    log.info("filled %s %s: %s", target.kind, target.access, human(s.bw_bytes, "bw"))


def measure(bench: Bench) -> None:
    """Run every profile on every target, ``--reps`` times, interleaved."""
    for rep in range(1, bench.args.reps + 1):
        for profile in PROFILES:
            for access in ACCESSES:
                for kind in bench.args.kinds:
                    target = bench.targets[(kind, access)]
                    drop_caches(bench)
                    data = fio(bench, target, profile, timed=True)
                    s = sample(target, profile, rep, data)
                    bench.samples.append(s)
                    log.info("rep %d %-13s %-5s %-5s %s", rep, profile.name, access, kind,
                             human(s.bw_bytes if profile.metric == "bw" else s.iops, profile.metric))


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
        raise BenchError("the benchmark needs root (it attaches loop devices and mounts cowfs)")
    for tool in ("fio", "losetup", "umount"):
        if shutil.which(tool) is None:
            raise BenchError(f"command {tool} not found: run `make deps`")
    if "cowfs" in args.kinds:
        cowfs_command()
    args.dir.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(args.dir)
    # Each target needs its full size; cowfs also needs room for metadata and
    # for new copies written before old ones are freed.
    need = int(args.size * len(args.kinds) * 1.25)
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


def attach_loop(bench: Bench, target: Target) -> Target:
    """Attach a direct-I/O loop device to a file target; return the loop target."""
    dev = run(["losetup", "--direct-io=on", "-f", "--show", target.filename],
              f"losetup on {target.filename}").strip()
    bench.loops.append(dev)
    note = ""
    dio = Path("/sys/block", Path(dev).name, "loop", "dio")
    try:
        if dio.read_text().strip() != "1":
            note = "loop device could not use direct I/O on its backing file"
    except OSError:
        note = "loop direct-I/O state unknown"
    if note:
        log.warning("%s (%s): %s", dev, target.kind, note)
    log.info("attached %s to %s", dev, target.filename)
    return Target(target.kind, "loop", dev, target.size, True, note)


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
    """Undo whatever set-up got done: loops, mount, temporary files.  Each
    step is attempted even if an earlier one failed."""
    for dev in reversed(bench.loops):
        try:
            run(["losetup", "-d", dev], f"detaching {dev}")
        except BenchError as e:
            log.error("%s", e)
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


def table(bench: Bench) -> str:
    """The markdown table of medians, cowfs and plain side by side."""
    kinds = bench.args.kinds
    both = len(kinds) == 2
    head = ["access", "profile", *kinds] + (["cowfs/plain"] if both else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for access in ACCESSES:
        for profile in PROFILES:
            medians: dict[str, float] = {}
            for kind in kinds:
                values = [s.bw_bytes if profile.metric == "bw" else s.iops
                          for s in bench.samples
                          if (s.kind, s.access, s.profile) == (kind, access, profile.name)]
                medians[kind] = statistics.median(values)
            row = [access, profile.name, *(human(medians[k], profile.metric) for k in kinds)]
            if both:
                row.append(f"{medians['cowfs'] / medians['plain']:.2f}" if medians["plain"] else "-")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary(bench: Bench, fio_version: str) -> str:
    """Table plus the conditions it was measured under."""
    a = bench.args
    out = [
        f"cowfs benchmark: {fio_version}, ioengine=psync, iodepth=1, target size {a.size // MiB} MiB, "
        f"{a.runtime} s per run, median of {a.reps} runs; host kernel {platform.release()}",
        f"page cache dropped before each run: {'yes' if bench.cache_drops else 'no'}",
    ]
    for t in bench.targets.values():
        out.append(f"- {t.kind} {t.access} ({t.filename}): {'O_DIRECT' if t.direct else 'buffered'}"
                   + (f"; {t.note}" if t.note else ""))
    out += ["", table(bench)]
    return "\n".join(out)


def save(bench: Bench, started: str, fio_version: str) -> Path:
    """Write the run's raw data (every sample with its fio report) as JSON."""
    path = bench.args.dir / f"{bench.tmp.name}.json"
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(bench.args).items()}
    doc = {
        "started": started,
        "fio_version": fio_version,
        "kernel": platform.release(),
        "args": args,
        "page_cache_dropped": bench.cache_drops,
        "targets": [asdict(t) for t in bench.targets.values()],
        "fills": [asdict(s) for s in bench.fills],
        "samples": [asdict(s) for s in bench.samples],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; see ``--help``."""
    p = argparse.ArgumentParser(description="fio benchmark: cowfs volume vs. plain file on the same disk")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/cowfs-bench"),
                   help="work directory for the temporary pool and the JSON results (default %(default)s)")
    p.add_argument("--size", type=parse_size, default=parse_size("1G"),
                   help="size of the volume and of the plain file (default 1G)")
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio run (default %(default)s)")
    p.add_argument("--reps", type=int, default=2, help="repetitions of each run (default %(default)s)")
    p.add_argument("--only", choices=KINDS, help="benchmark only this target")
    p.add_argument("--compress-percentage", type=int, metavar="PCT",
                   help="make written data about PCT%% compressible (fio buffer_compress_percentage); "
                        "default: incompressible")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command")
    args = p.parse_args(argv)
    if args.runtime < 1 or args.reps < 1:
        p.error("--runtime and --reps must be at least 1")
    if args.compress_percentage is not None and not 0 <= args.compress_percentage <= 100:
        p.error("--compress-percentage must be between 0 and 100")
    args.kinds = (args.only,) if args.only else KINDS
    args.dir = args.dir.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table on stdout.  Returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        check_prerequisites(args)
        fio_version = run(["fio", "--version"], "fio --version").strip()
    except BenchError as e:
        log.error("%s", e)
        return 1
    bench = Bench(args, Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=args.dir)))
    try:
        files: dict[str, Path] = {}
        if "plain" in args.kinds:
            files["plain"] = bench.tmp / "plain.img"
            make_file(files["plain"], args.size)
        if "cowfs" in args.kinds:
            files["cowfs"] = setup_cowfs(bench)
        for kind in args.kinds:
            target = Target(kind, "file", str(files[kind]), args.size)
            bench.targets[(kind, "file")] = target
            fill(bench, target)
        for kind in args.kinds:
            bench.targets[(kind, "loop")] = attach_loop(bench, bench.targets[(kind, "file")])
        measure(bench)
    except (BenchError, OSError) as e:
        log.error("%s", e)
        return 1
    finally:
        teardown(bench)
        if bench.samples or bench.fills:
            log.info("raw results saved to %s", save(bench, started, fio_version))
    print(summary(bench, fio_version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
