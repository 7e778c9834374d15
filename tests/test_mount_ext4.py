"""A real ext4 file system on a loop device backed by a cowfs volume: files
written through it survive unmounting everything and remounting cowfs, fsck
finds the file system clean, and every file's checksum matches."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from helpers_mount import (
    CowfsMount,
    force_unmount,
    loop_attach,
    loop_detach,
    loop_uses_direct_io,
    run,
    sha256,
)

pytestmark = [pytest.mark.mount, pytest.mark.mount_timeout(240)]

FILE_SIZES = [0, 1, 4095, 4096, 10_000, 65_536, 300_001, 1 << 20, 3 << 20]


def attach(volume: Path, direct_io: bool) -> str:
    """Attach a loop device to ``volume``; with ``direct_io`` skip the test
    when the kernel will not do direct I/O to a FUSE file."""
    if not direct_io:
        return loop_attach(volume)
    proc = run(["losetup", "-f", "--show", "--direct-io=on", volume])
    if proc.returncode != 0:
        pytest.skip(f"losetup refuses --direct-io=on on a cowfs volume: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    if not loop_uses_direct_io(dev):
        loop_detach(dev)
        pytest.skip("the kernel fell back to buffered I/O for a loop device on a cowfs volume")
    return dev


def fill(root: Path, rng: random.Random) -> dict[str, str]:
    """Write 80 files of assorted sizes (some in subdirectories) and return
    relative path -> sha256."""
    sums = {}
    for i in range(80):
        rel = f"d{i % 5}/f{i:03d}.bin" if i % 3 else f"f{i:03d}.bin"
        path = root / rel
        path.parent.mkdir(exist_ok=True)
        data = rng.randbytes(rng.choice(FILE_SIZES))
        path.write_bytes(data)
        sums[rel] = sha256(data)
    return sums


def checksums(root: Path, names: list[str]) -> dict[str, str]:
    """relative path -> sha256 of the current content."""
    return {rel: sha256((root / rel).read_bytes()) for rel in names}


@pytest.mark.usefixtures("loop_devices")
@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct-io"])
def test_ext4_on_volume_survives_remount(mounted: CowfsMount, tmp_path: Path,
                                         direct_io: bool) -> None:
    """mkfs.ext4 on a 1 GiB volume via losetup, 80 files, sync, full teardown
    (ext4, loop, cowfs), remount: fsck -fn exits 0 and every checksum matches."""
    rng = random.Random(f"ext4-{direct_io}")
    volume = mounted.mnt / "ext4.img"
    run(["truncate", "-s", "1G", volume], check=True)
    ext = tmp_path / "ext"
    ext.mkdir()

    dev = attach(volume, direct_io)
    run(["mkfs.ext4", "-q", dev], timeout=120, check=True)
    run(["mount", dev, ext], check=True)
    sums = fill(ext, rng)
    assert len(sums) == 80
    run(["sync"], timeout=120, check=True)
    run(["umount", ext], timeout=120, check=True)
    loop_detach(dev)
    mounted.remount()

    dev = attach(volume, direct_io)
    fsck = run(["fsck.ext4", "-fn", dev], timeout=180)
    assert fsck.returncode == 0, f"fsck.ext4 -fn exited {fsck.returncode}:\n{fsck.stdout}{fsck.stderr}"
    run(["mount", dev, ext], check=True)
    try:
        assert checksums(ext, sorted(sums)) == sums
        written = {str(p.relative_to(ext)) for p in ext.rglob("*.bin")}
        assert written == set(sums)
    finally:
        force_unmount(ext)
        loop_detach(dev)
    assert os.stat(volume).st_size == 1 << 30


@pytest.mark.usefixtures("loop_devices")
def test_ext4_survives_daemon_sigkill(mounted: CowfsMount, tmp_path: Path) -> None:
    """ext4 on a direct-I/O loop device over a volume: after ``sync`` the
    daemon is SIGKILLed with ext4 still mounted.  After remounting cowfs,
    ext4 mounts (replaying its journal), fsck -fn then finds it clean, and
    every file written before the sync has its checksum."""
    rng = random.Random("ext4-sigkill")
    volume = mounted.mnt / "crash.img"
    run(["truncate", "-s", "512M", volume], check=True)
    ext = tmp_path / "ext"
    ext.mkdir()
    dev = attach(volume, direct_io=True)
    run(["mkfs.ext4", "-q", dev], timeout=120, check=True)
    run(["mount", dev, ext], check=True)
    sums = fill(ext, rng)
    run(["sync"], timeout=120, check=True)
    # Keep ext4 busy with unsynced changes while the daemon dies.
    for i in range(10):
        (ext / f"late{i}.bin").write_bytes(rng.randbytes(200_000))
    mounted.kill_daemon()
    # The dead loop device takes ext4's last writes as I/O errors.
    run(["umount", "-l", ext], timeout=60)
    loop_detach(dev)
    mounted.clear_dead_mount()
    mounted.mount()

    dev = attach(volume, direct_io=True)
    run(["mount", dev, ext], check=True)
    run(["umount", ext], timeout=120, check=True)
    fsck = run(["fsck.ext4", "-fn", dev], timeout=180)
    assert fsck.returncode == 0, f"fsck.ext4 -fn exited {fsck.returncode}:\n{fsck.stdout}{fsck.stderr}"
    run(["mount", dev, ext], check=True)
    try:
        assert checksums(ext, sorted(sums)) == sums
    finally:
        force_unmount(ext)
        loop_detach(dev)
