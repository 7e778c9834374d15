"""``cowfs snapshot --freeze``: a consistent snapshot of a live file system.

ext4 on a loop device over a volume, under a fio write load; ``cowfs
snapshot MOUNT NAME VOL --freeze FSMOUNT`` freezes it, takes the snapshot and
thaws it; a clone of the snapshot attached read-write to another loop device
passes ``fsck.ext4 -fn`` and mounts; the live file system takes writes again
afterwards, also when the snapshot was refused.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from helpers_mount import CowfsMount, force_unmount, loop_attach, loop_detach, run

pytestmark = [pytest.mark.mount, pytest.mark.mount_timeout(240)]

FIO_SECONDS = 10


def writable(fsmount: Path, name: str) -> bool:
    """Whether a file can be created, written and fsynced on ``fsmount``
    within 10 s (a frozen file system blocks the writer)."""
    try:
        proc = run(["dd", "if=/dev/urandom", f"of={fsmount / name}", "bs=64k", "count=4",
                    "conv=fsync", "status=none"], timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def test_freeze_snapshot_under_fio_load(mounted: CowfsMount, tmp_path: Path,
                                        loop_devices: None) -> None:
    """Proves: under a fio random-write load, ``cowfs snapshot --freeze``
    succeeds and reports the freeze; the file system is thawed afterwards
    (and after a refused snapshot too); a read-write clone of the snapshot
    on another loop device is clean for ``fsck.ext4 -fn`` and mounts with
    fio's files in it."""
    mnt = mounted.mnt
    vol = mnt / "vm1.img"
    run(["truncate", "-s", "1G", vol], check=True)
    dev = loop_attach(vol)
    fsmount = tmp_path / "fs"
    fsmount.mkdir()
    fio: subprocess.Popen[str] | None = None
    try:
        run(["mkfs.ext4", "-q", "-F", dev], timeout=120, check=True)
        run(["mount", dev, fsmount], check=True)
        fio = subprocess.Popen(
            ["fio", "--name=load", f"--directory={fsmount}", "--rw=randwrite", "--bs=4k",
             "--size=32M", "--numjobs=2", "--ioengine=psync", "--fsync=32", "--time_based",
             f"--runtime={FIO_SECONDS}", "--group_reporting"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(3)
        assert fio.poll() is None, f"fio ended early:\n{fio.communicate()[0]}"
        proc = mounted.cli("snapshot", str(mnt), "frozen", "vm1.img", "--freeze", str(fsmount),
                           timeout=60)
        assert proc.returncode == 0, f"cowfs snapshot --freeze failed:\n{proc.stdout}{proc.stderr}"
        assert "froze" in proc.stdout and str(fsmount) in proc.stdout, proc.stdout
        assert writable(fsmount, "after-snapshot"), "the file system stayed frozen after the snapshot"
        # A refused snapshot (the name is taken) must thaw as well.
        proc = mounted.cli("snapshot", str(mnt), "frozen", "vm1.img", "--freeze", str(fsmount),
                           timeout=60)
        assert proc.returncode == 1 and "frozen" in proc.stderr, proc.stderr
        assert writable(fsmount, "after-refusal"), "the file system stayed frozen after a refusal"
        out, _ = fio.communicate(timeout=FIO_SECONDS + 60)
        assert fio.returncode == 0, f"fio failed:\n{out}"
    finally:
        if fio is not None and fio.poll() is None:
            fio.kill()
            fio.wait()
        # Never leave a frozen file system behind, whatever failed.
        run(["fsfreeze", "-u", fsmount], timeout=30)
        force_unmount(fsmount)
        loop_detach(dev)

    proc = mounted.cli("clone", str(mnt), "vm1.img@frozen", "clone.img")
    assert proc.returncode == 0, proc.stderr
    dev2 = loop_attach(mnt / "clone.img")
    check = tmp_path / "check"
    check.mkdir()
    try:
        fsck = run(["fsck.ext4", "-fn", dev2], timeout=120)
        assert fsck.returncode == 0, (f"fsck.ext4 -fn on the clone: exit {fsck.returncode}\n"
                                      f"{fsck.stdout}{fsck.stderr}")
        run(["mount", dev2, check], check=True)
        names = {p.name for p in check.iterdir()}
        assert any(n.startswith("load.") for n in names), f"fio's files missing in the clone: {names}"
    finally:
        force_unmount(check)
        loop_detach(dev2)
