"""Online integrity checks through a real mount: the ``.pool`` control
directory, ``cowfs scrub`` and ``cowfs status``.

A bit flipped in a stored data block while the pool is unmounted (found in
the pool's ``data`` file by a distinctive pattern, with compression off so
the block is stored as written) must make exactly that block of the volume,
and of a snapshot sharing it, read as EIO, leave the rest readable, be
logged once per failed read, and be reported by ``cowfs scrub`` by volume,
snapshot and offset.  A scrub of a clean pool under a concurrent fio read
load finds nothing and does not stop fio; ``--rate`` holds it back; one
scrub runs at a time and can be cancelled.

The pattern and bit-flip helpers at the top are shared with
``test_cli_fsck.py``.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from helpers_mount import MIB, CowfsMount, wait_until, write_file
from test_mount_snapshots import SNAPS, ctl_ok, ctl_refused, ctl_rw

pytestmark = pytest.mark.mount

POOL = ".pool"
BLOCK = 4096
# The block that gets damaged, and its byte offset in the volume.
TARGET_BLOCK = 100
TARGET_OFFSET = TARGET_BLOCK * BLOCK
# A 4 KiB block no random data or metadata will ever contain.
PATTERN = (b"cowfs scrub test: the block to be damaged. " * 100)[:BLOCK]


# ----------------------------------------------------------------------------
# Shared helpers


def volume_with_target(mnt: Path, name: str, size: int, seed: int) -> bytes:
    """Create volume ``name`` of ``size`` bytes of random data whose block
    TARGET_BLOCK is PATTERN; fsync it and return its content."""
    rng = random.Random(seed)
    content = bytearray(rng.randbytes(size))
    content[TARGET_OFFSET:TARGET_OFFSET + BLOCK] = PATTERN
    write_file(mnt / name, bytes(content), fsync=True)
    return bytes(content)


def flip_bit_in_stored_target(pool_dir: Path) -> int:
    """Flip one bit in the middle of the one copy of PATTERN in the pool's
    ``data`` file (the pool must not be mounted); return where it lies."""
    data_file = pool_dir / "data"
    stored = data_file.read_bytes()
    at = stored.find(PATTERN)
    assert at >= 0, f"the target block is not stored as written in {data_file}"
    assert stored.find(PATTERN, at + 1) < 0, f"the target block is stored twice in {data_file}"
    fd = os.open(data_file, os.O_RDWR)
    try:
        middle = at + BLOCK // 2
        os.pwrite(fd, bytes([stored[middle] ^ 0x10]), middle)
        os.fsync(fd)
    finally:
        os.close(fd)
    return at


def read_direct(path: Path, offset: int, length: int) -> bytes:
    """Read with O_DIRECT, so that exactly this range is asked of the daemon
    (buffered reads pull neighbouring blocks in, and fail with them)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, length) as buf:   # page-aligned, as O_DIRECT needs
            n = os.preadv(fd, [buf], offset)
            return bytes(buf[:n])
    finally:
        os.close(fd)


def read_direct_eio(path: Path, offset: int) -> None:
    """Assert that reading the block at ``offset`` of ``path`` fails with EIO."""
    with pytest.raises(OSError) as caught:
        read_direct(path, offset, BLOCK)
    assert caught.value.errno == errno.EIO, f"{path} at {offset}: {caught.value!r}, wanted EIO"


def pool_status(mnt: Path) -> dict:
    """The JSON of ``MOUNT/.pool/status``."""
    return json.loads((mnt / POOL / "status").read_bytes())


def cli(m: CowfsMount, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``cowfs ARGS``; never a Python traceback."""
    proc = m.cli(*args, timeout=timeout)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def cli_json(m: CowfsMount, *args: str, code: int = 0, timeout: float = 120) -> dict:
    """``cowfs ARGS --json``: must exit ``code`` and print one JSON document."""
    proc = cli(m, *args, "--json", timeout=timeout)
    assert proc.returncode == code, (f"cowfs {' '.join(args)}: exit {proc.returncode}, wanted "
                                     f"{code}:\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout)


def bad_places(scrub: dict) -> set[tuple[str, int]]:
    """(volume or snapshot, offset) of each bad block a scrub reported."""
    return {(f["object"], f["offset"]) for f in scrub["bad_blocks"]}


def scrub_seconds(scrub: dict) -> float:
    """How long a scrub ran, from its report."""
    return (scrub["finished_ns"] - scrub["started_ns"]) / 1e9


def daemon_log(m: CowfsMount) -> list[str]:
    """The lines of the daemon's log so far."""
    path = m.logdir / "daemon.log"
    return path.read_text(errors="replace").splitlines() if path.exists() else []


# ----------------------------------------------------------------------------
# Tests


def test_pool_directory_and_ctl_refusals(mounted: CowfsMount) -> None:
    """Proves: ``.pool`` is hidden from the root listing but found by name and
    holds ``ctl`` (root, 0600) and ``status`` (0444, JSON, size = content);
    status is read-only; nothing can be created or removed there; bad
    commands, a bad rate and a cancel with no scrub running are refused with
    EINVAL/ENOENT, read back as ``error:`` and logged once each."""
    mnt = mounted.mnt
    write_file(mnt / "vm1.img", random.Random(1).randbytes(MIB), fsync=True)
    assert os.listdir(mnt) == ["vm1.img"]
    assert sorted(os.listdir(mnt / POOL)) == ["ctl", "status"]
    ctl, status = os.stat(mnt / POOL / "ctl"), os.stat(mnt / POOL / "status")
    assert (ctl.st_mode & 0o7777, ctl.st_uid) == (0o600, 0)
    assert status.st_mode & 0o7777 == 0o444
    raw = (mnt / POOL / "status").read_bytes()
    assert status.st_size == len(raw)
    doc = json.loads(raw)
    assert doc["pool"] == str(mounted.pool)
    assert (doc["volumes"], doc["snapshots"], doc["checksum_errors"], doc["io_errors"],
            doc["scrub"], doc["state"], doc["reason"]) == (1, 0, 0, 0, None, "serving", None), doc

    with pytest.raises(OSError) as caught:
        os.open(mnt / POOL / "status", os.O_WRONLY)
    assert caught.value.errno in (errno.EROFS, errno.EACCES), caught.value
    for action in (lambda: (mnt / POOL / "new").touch(), lambda: (mnt / POOL / "ctl").unlink(),
                   lambda: (mnt / POOL).rmdir(), lambda: (mnt / POOL / "x").mkdir()):
        with pytest.raises(OSError) as caught:
            action()
        assert caught.value.errno == errno.EPERM, caught.value

    refusals = [("frobnicate", errno.EINVAL, "unknown command"),
                ("scrub --rate", errno.EINVAL, "needs a value"),
                ("scrub --rate lots", errno.EINVAL, "lots"),
                ("scrub --rate 100", errno.EINVAL, "below one"),
                ("scrub extra", errno.EINVAL, "unexpected word"),
                ("scrub-cancel", errno.ENOENT, "no scrub is running")]
    for command, want, mention in refusals:
        ctl_refused(mnt, POOL, command, want, mention)
    logged = [line for line in daemon_log(mounted) if ".pool/ctl: command" in line]
    assert len(logged) == len(refusals), "\n".join(logged)
    for (command, _, _), line in zip(refusals, logged):
        assert repr(command) in line and "refused" in line, line
    assert pool_status(mnt)["scrub"] is None


def test_bit_flip_eio_scrub_and_status(make_cowfs: Callable[..., CowfsMount]) -> None:
    """Proves: a bit flipped in one stored data block makes that block read
    EIO in the volume and in a snapshot sharing it, every other block of
    both (and another volume) reads back as written; each failed read is
    logged once naming the volume and offset and counted in
    ``.pool/status``; ``cowfs scrub`` reports exactly that block, by volume
    and by snapshot name, and exits 4; ``cowfs status`` shows the scrub
    result and the checksum error counter."""
    m = make_cowfs(mkfs_args=("--no-compression",))
    mnt = m.mnt
    size = 8 * MIB
    content = volume_with_target(mnt, "vm1.img", size, seed=5)
    other = random.Random(6).randbytes(2 * MIB)
    write_file(mnt / "vm2.img", other, fsync=True)
    (mnt / SNAPS / "vm1.img" / "before").touch()
    m.umount()
    flip_bit_in_stored_target(m.pool)
    m.mount()

    vol, snap = mnt / "vm1.img", mnt / SNAPS / "vm1.img" / "before"
    for path in (vol, snap):
        read_direct_eio(path, TARGET_OFFSET)
        assert read_direct(path, 0, TARGET_OFFSET) == content[:TARGET_OFFSET]
        rest = TARGET_OFFSET + BLOCK
        assert read_direct(path, rest, size - rest) == content[rest:], f"{path}: rest differs"
    assert read_direct(mnt / "vm2.img", 0, len(other)) == other

    status = pool_status(mnt)
    assert status["checksum_errors"] == 2, status
    failures = [line for line in daemon_log(m) if "checksum" in line.lower()]
    assert len(failures) == 2, "one log line per failed read expected:\n" + "\n".join(failures)
    for line in failures:
        assert "vm1.img" in line and str(TARGET_OFFSET) in line, line

    doc = cli_json(m, "scrub", str(mnt), code=4)
    scrub = doc["scrub"]
    assert scrub["state"] == "finished" and scrub["blocks_checked"] == scrub["blocks_total"]
    assert bad_places(scrub) == {("vm1.img", TARGET_OFFSET), ("vm1.img@before", TARGET_OFFSET)}
    proc = cli(m, "scrub", str(mnt))
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "2 bad blocks" in proc.stdout, proc.stdout
    for name in ("vm1.img@before", "vm1.img ", str(TARGET_OFFSET)):
        assert name in proc.stdout, f"{name!r} missing from:\n{proc.stdout}"
    assert "vm2.img" not in proc.stdout

    shown = cli(m, "status", str(mnt))
    assert shown.returncode == 0, shown.stderr
    errors_line = next(line for line in shown.stdout.splitlines() if line.startswith("errors:"))
    counted = pool_status(mnt)["checksum_errors"]
    assert counted >= 3 and f"{counted} checksum" in errors_line, (counted, errors_line)
    scrub_line = next(line for line in shown.stdout.splitlines() if line.startswith("scrub:"))
    assert "finished" in scrub_line and "2 bad blocks" in scrub_line, scrub_line
    assert "vm1.img@before" in shown.stdout, shown.stdout
    doc = cli_json(m, "status", str(mnt))
    assert doc["errors"]["checksum"] == counted and doc["errors"]["io"] == 0
    assert bad_places(doc["scrub"]) == bad_places(scrub)


@pytest.mark.mount_timeout(240)
def test_scrub_clean_pool_under_fio_load(mounted: CowfsMount, fio: str) -> None:
    """Proves: scrubs of a clean pool, while fio reads a volume at random
    with O_DIRECT, check every block of every volume and snapshot and find
    nothing; fio keeps getting answers throughout (no read waits a second)
    and ends without an error."""
    mnt = mounted.mnt
    for name, seed in (("load.img", 1), ("quiet.img", 2)):
        write_file(mnt / name, random.Random(seed).randbytes(64 * MIB), fsync=True)
    (mnt / SNAPS / "quiet.img" / "s1").touch()
    job = [fio, "--name=readload", f"--filename={mnt / 'load.img'}", "--rw=randread",
           "--bs=4k", "--size=64M", "--direct=1", "--ioengine=psync", "--time_based",
           "--runtime=12", "--output-format=json"]
    load = subprocess.Popen(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)   # fio is reading before the first scrub starts
        for _ in range(3):
            scrub = cli_json(mounted, "scrub", str(mnt))["scrub"]
            assert scrub["state"] == "finished" and scrub["bad_blocks"] == [], scrub
            assert scrub["blocks_checked"] == scrub["blocks_total"] == 3 * 64 * MIB // BLOCK
            assert load.poll() is None, "fio ended before the scrubs did"
        out, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0, f"fio failed:\n{out}\n{err}"
    result = json.loads(out[out.index("{"):])["jobs"][0]
    assert result["error"] == 0 and result["read"]["io_bytes"] > 0, result
    # No read waited long behind a scrub (it yields between slices).
    assert result["read"]["clat_ns"]["max"] < 1e9, result["read"]["clat_ns"]
    assert pool_status(mnt)["checksum_errors"] == 0


@pytest.mark.mount_timeout(240)
def test_scrub_rate_busy_and_cancel(mounted: CowfsMount) -> None:
    """Proves: ``--rate`` holds a scrub to about that many bytes per second
    (loose bound); a second scrub is refused (EBUSY; CLI exit 1 saying how to
    follow or cancel it) while one runs; ``cowfs scrub --cancel`` stops a
    running scrub and ``cowfs status`` says so; without a rate the same
    scrub is much faster; unmounting during a scrub is clean."""
    m, mnt = mounted, mounted.mnt
    write_file(mnt / "vm1.img", random.Random(3).randbytes(16 * MIB), fsync=True)
    blocks = 16 * MIB // BLOCK

    fast = cli_json(m, "scrub", str(mnt))["scrub"]
    assert fast["blocks_checked"] == blocks
    rated = subprocess.Popen([m.bin, "scrub", str(mnt), "--rate", "4M", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: (pool_status(mnt)["scrub"] or {}).get("rate") == 4 * MIB
                          and pool_status(mnt)["scrub"]["state"] == "running", 10)
        busy = cli(m, "scrub", str(mnt))
        assert busy.returncode == 1, busy.stdout + busy.stderr
        assert "already running" in busy.stderr and "--cancel" in busy.stderr, busy.stderr
        ctl_refused(mnt, POOL, "scrub", errno.EBUSY, "already running")
        running = cli(m, "status", str(mnt)).stdout
        assert re.search(r"scrub: +in progress", running), running
        out, err = rated.communicate(timeout=60)
    finally:
        if rated.poll() is None:
            rated.kill()
            rated.wait()
    assert rated.returncode == 0, out + err
    scrub = json.loads(out)["scrub"]
    assert scrub["blocks_checked"] == blocks and scrub["rate"] == 4 * MIB
    # 16 MiB at 4 MiB/s: about 4 s.
    assert 2.5 <= scrub_seconds(scrub) <= 20, scrub
    assert scrub_seconds(fast) < scrub_seconds(scrub) / 2, (fast, scrub)

    started = ctl_ok(mnt, POOL, "scrub --rate 1M")
    assert started["state"] == "running" and started["rate"] == MIB
    time.sleep(0.5)
    cancelled = cli_json(m, "scrub", str(mnt), "--cancel")["scrub"]
    assert cancelled["state"] == "cancelled" and cancelled["blocks_checked"] < blocks
    time.sleep(0.5)
    assert pool_status(mnt)["scrub"]["blocks_checked"] == cancelled["blocks_checked"]
    shown = cli(m, "status", str(mnt)).stdout
    assert re.search(r"scrub: +cancelled", shown), shown
    err, reply = ctl_rw(mnt, POOL, "scrub-cancel")
    assert err == errno.ENOENT and "no scrub is running" in reply

    # Unmounting in the middle of a scrub is clean (the teardown fails the
    # test on any traceback in the daemon's log); the next mount starts afresh.
    ctl_ok(mnt, POOL, "scrub --rate 1M")
    m.remount()
    assert pool_status(mnt)["scrub"] is None
