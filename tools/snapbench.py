"""Snapshot and clone figures: do they stay instant as data, count and depth grow?

Run as root from the project venv (``make snapbench``).  In a fresh pool it
measures, through the mount's control files only:

* the time of a snapshot (``touch .snapshots/VOL/NAME``) and of a clone
  (a ``clone`` line written to ``.clones/ctl``) with 1 GiB and with 8 GiB
  written to the volume;
* the 1st versus the 1000th snapshot of one volume, and the 1st versus the
  1000th clone of one snapshot;
* fio 4 KiB random-read IOPS (QD1, psync, O_DIRECT) on the original volume and on a
  clone 32 levels deep (a clone of a clone of ...), interleaved, twice.

It prints a markdown table and saves the figures as JSON in the work directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from cowfs_tools.bench import BenchError, cowfs_command, run, wait_for_daemon

log = logging.getLogger("snapbench")
GiB = 1 << 30


def timed(action) -> float:
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


def fill(path: Path, start: int, length: int) -> None:
    """Write ``length`` bytes of incompressible data at ``start`` and fsync."""
    run(["fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1M",
         f"--offset={start}", f"--size={length}", "--ioengine=psync", "--end_fsync=1",
         "--refill_buffers=1"], f"filling {path}", timeout=3600)


def randread_iops(path: Path, size: int, runtime: int) -> float:
    """fio 4 KiB random-read IOPS, QD1, over the first ``size`` bytes of ``path``,
    starting with a cold host page cache so that no run reads what the one
    before it left in memory (fio repeats the same offsets)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    out = run(["fio", "--name=rr", f"--filename={path}", "--rw=randread", "--bs=4k",
               f"--size={size}", "--ioengine=psync", "--iodepth=1", "--time_based=1",
               f"--runtime={runtime}", "--direct=1", "--output-format=json"],
              f"random reads on {path}", timeout=runtime + 300)
    return float(json.loads(out)["jobs"][0]["read"]["iops"])


def snapshot_times(mnt: Path, vol: str, res: dict, reps: int = 5) -> None:
    """Snapshot and clone time (median of ``reps``) at 1 GiB and 8 GiB written.
    Each is durable on return, so an fsync of the host file system is part of
    it: the median keeps one slow fsync from deciding the figure."""
    clones = mnt / ".clones" / "ctl"
    for label, start, length in (("1g", 0, GiB), ("8g", GiB, 7 * GiB)):
        fill(mnt / vol, start, length)
        os.sync()
        res[f"snapshot_{label}_s"] = statistics.median(
            timed(lambda i=i: touch(mnt / ".snapshots" / vol / f"at{label}-{i}"))
            for i in range(reps))
        res[f"clone_{label}_s"] = statistics.median(
            timed(lambda i=i: ctl(clones, f"clone {vol}@at{label}-{i} c{label}-{i}.img"))
            for i in range(reps))


def count_scaling(mnt: Path, vol: str, n: int, res: dict) -> None:
    """1st versus n-th snapshot of one volume and clone of one snapshot."""
    snaps = [timed(lambda i=i: touch(mnt / ".snapshots" / vol / f"s{i:04d}")) for i in range(n)]
    clones = [timed(lambda i=i: ctl(mnt / ".clones" / "ctl", f"clone {vol}@s0000 k{i:04d}.img"))
              for i in range(n)]
    res["snapshot_first_s"], res["snapshot_last_s"] = snaps[0], snaps[-1]
    res["snapshot_last10_median_s"] = statistics.median(snaps[-10:])
    res["clone_first_s"], res["clone_last_s"] = clones[0], clones[-1]
    res["clone_last10_median_s"] = statistics.median(clones[-10:])


def depth_reads(mnt: Path, vol: str, depth: int, runtime: int, res: dict) -> None:
    """Random-read IOPS on the original and on a clone ``depth`` levels deep."""
    src = vol
    for level in range(1, depth + 1):
        ctl(mnt / ".clones" / "ctl", f"clone {src} d{level:02d}.img")
        src = f"d{level:02d}.img"
    orig, deep = [], []
    for _ in range(2):
        orig.append(randread_iops(mnt / vol, GiB, runtime))
        deep.append(randread_iops(mnt / src, GiB, runtime))
    res["randread_orig_iops"] = statistics.median(orig)
    res["randread_deep_iops"] = statistics.median(deep)
    res["depth"] = depth


def report(res: dict) -> str:
    """Markdown table of the figures with the ratios the issue asks for."""
    ms = lambda s: f"{s * 1000:.2f} ms"  # noqa: E731
    rows = [
        ("snapshot, 1 GiB written (median of 5)", ms(res["snapshot_1g_s"])),
        ("snapshot, 8 GiB written (median of 5)", ms(res["snapshot_8g_s"])),
        ("ratio 8 GiB / 1 GiB", f"{res['snapshot_8g_s'] / res['snapshot_1g_s']:.2f}"),
        ("clone, 1 GiB written (median of 5)", ms(res["clone_1g_s"])),
        ("clone, 8 GiB written (median of 5)", ms(res["clone_8g_s"])),
        ("ratio 8 GiB / 1 GiB", f"{res['clone_8g_s'] / res['clone_1g_s']:.2f}"),
        ("1st snapshot", ms(res["snapshot_first_s"])),
        (f"{res['count']}th snapshot (median of last 10)", ms(res["snapshot_last10_median_s"])),
        ("1st clone of one snapshot", ms(res["clone_first_s"])),
        (f"{res['count']}th clone (median of last 10)", ms(res["clone_last10_median_s"])),
        ("4K rand read, original volume", f"{res['randread_orig_iops']:.0f} IOPS"),
        (f"4K rand read, clone {res['depth']} deep", f"{res['randread_deep_iops']:.0f} IOPS"),
        ("ratio deep / original",
         f"{res['randread_deep_iops'] / res['randread_orig_iops']:.2f}"),
    ]
    return "\n".join(["| measure | figure |", "| --- | --- |"]
                     + [f"| {a} | {b} |" for a, b in rows])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/cowfs-snapbench"),
                   help="work directory (needs about 9 GiB free)")
    p.add_argument("--count", type=int, default=1000, help="snapshots and clones to take")
    p.add_argument("--depth", type=int, default=32, help="clone chain depth")
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement; 0 on success, 1 with a message on failure."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=args.dir))
    pool, mnt = tmp / "pool", tmp / "mnt"
    pool.mkdir()
    mnt.mkdir()
    cowfs = cowfs_command()
    mounted = False
    res: dict = {"count": args.count}
    try:
        run([cowfs, "mkfs", str(pool)], "cowfs mkfs")
        run([cowfs, "mount", str(pool), str(mnt)], "cowfs mount")
        mounted = True
        vol = "vm.img"
        with open(mnt / vol, "xb") as f:
            f.truncate(16 * GiB)
        log.info("snapshot and clone time at 1 GiB and 8 GiB written")
        snapshot_times(mnt, vol, res)
        log.info("%d snapshots and %d clones", args.count, args.count)
        count_scaling(mnt, vol, args.count, res)
        log.info("random reads on a clone %d deep", args.depth)
        depth_reads(mnt, vol, args.depth, args.runtime, res)
    except BenchError as e:
        log.error("%s", e)
        return 1
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
            wait_for_daemon(pool)
        shutil.rmtree(tmp, ignore_errors=True)
    table = report(res)
    print(table)
    out = args.dir / f"snapbench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    log.info("figures saved in %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
