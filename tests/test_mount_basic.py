"""The CLI's life cycle through a real FUSE mount: mkfs refusals, every clean
way of unmounting, the pool lock, and a mount outliving killed clients."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from helpers_mount import (
    MIB,
    CowfsMount,
    assert_clean_refusal,
    daemons_for,
    is_mounted,
    read_file,
    run,
    sha256,
    wait_until,
    write_file,
)

pytestmark = pytest.mark.mount


def pool_fingerprint(pool: Path) -> dict[str, str]:
    """Name -> sha256 of every file in the pool directory except the lock
    (whose pid content changes on every mount)."""
    return {p.name: sha256(p.read_bytes()) for p in sorted(pool.iterdir())
            if p.is_file() and p.name != "lock"}


def test_mkfs_refuses_non_empty_dir(make_cowfs: Callable[..., CowfsMount]) -> None:
    """mkfs on a directory holding a foreign file exits non-zero, names the
    directory, changes nothing; with --force it makes a pool that mounts."""
    cm = make_cowfs(mkfs=False, mount=False)
    (cm.pool / "precious.txt").write_text("keep me\n")
    proc = cm.cli("mkfs", cm.pool)
    assert_clean_refusal(proc.returncode, proc.stdout + proc.stderr, str(cm.pool))
    assert sorted(os.listdir(cm.pool)) == ["precious.txt"], "a refused mkfs left files behind"
    assert (cm.pool / "precious.txt").read_text() == "keep me\n"

    proc = cm.cli("mkfs", cm.pool, "--force")
    assert proc.returncode == 0, f"mkfs --force failed:\n{proc.stdout}{proc.stderr}"
    cm.mount()
    write_file(cm.mnt / "v", b"x" * 10000, fsync=True)
    assert os.listdir(cm.mnt) == ["v"]


def test_mkfs_refuses_existing_pool(make_cowfs: Callable[..., CowfsMount]) -> None:
    """mkfs over an existing pool is refused without touching it (its data
    mounts again intact); with --force it makes a new, empty pool."""
    cm = make_cowfs()
    data = os.urandom(MIB + 17)
    write_file(cm.mnt / "vol", data, fsync=True)
    cm.umount()
    before = pool_fingerprint(cm.pool)

    proc = cm.cli("mkfs", cm.pool)
    assert_clean_refusal(proc.returncode, proc.stdout + proc.stderr, str(cm.pool))
    assert pool_fingerprint(cm.pool) == before, "a refused mkfs modified the pool"
    cm.mount()
    assert read_file(cm.mnt / "vol") == data
    cm.umount()

    proc = cm.cli("mkfs", cm.pool, "--force")
    assert proc.returncode == 0, f"mkfs --force failed:\n{proc.stdout}{proc.stderr}"
    cm.mount()
    assert os.listdir(cm.mnt) == [], "mkfs --force kept volumes of the old pool"


def test_mkfs_force_refuses_mounted_pool(mounted: CowfsMount) -> None:
    """Even with --force, mkfs must not wipe a pool that is mounted: it is
    refused and the mounted data stays readable, also after a remount."""
    data = os.urandom(300_000)
    write_file(mounted.mnt / "live", data, fsync=True)
    proc = mounted.cli("mkfs", mounted.pool, "--force")
    assert_clean_refusal(proc.returncode, proc.stdout + proc.stderr, str(mounted.pool))
    assert read_file(mounted.mnt / "live") == data
    mounted.remount()
    assert read_file(mounted.mnt / "live") == data


@pytest.mark.parametrize("how", ["umount", "fusermount3", "SIGTERM", "SIGINT"])
def test_clean_unmount(mounted: CowfsMount, how: str) -> None:
    """Each clean way of unmounting removes the mount, ends the daemon and
    keeps everything written before, even without fsync (the daemon flushes
    on the way out)."""
    small = os.urandom(3 * MIB + 123)
    big_part = os.urandom(MIB)
    write_file(mounted.mnt / "small.img", small)
    run(["truncate", "-s", "1G", mounted.mnt / "big.img"], check=True)
    write_file(mounted.mnt / "big.img", big_part, offset=512 * MIB + 1)
    pid = mounted.daemon_pid()

    mounted.umount(how)  # asserts: not in the mount table, daemon exited
    assert not is_mounted(mounted.mnt)
    assert os.listdir(mounted.mnt) == [], "the mountpoint does not show its own empty directory"
    assert pid not in daemons_for(mounted.mnt)

    mounted.mount()
    assert sorted(os.listdir(mounted.mnt)) == ["big.img", "small.img"]
    assert read_file(mounted.mnt / "small.img") == small
    assert os.stat(mounted.mnt / "big.img").st_size == 1 << 30
    assert read_file(mounted.mnt / "big.img", 512 * MIB + 1, MIB) == big_part
    assert read_file(mounted.mnt / "big.img", 0, 4096) == bytes(4096)


def test_second_mount_refused(mounted: CowfsMount, tmp_path: Path) -> None:
    """Mounting a pool that is already mounted fails with a message naming
    the pool and saying it is in use; the first mount keeps serving."""
    data = os.urandom(50_000)
    write_file(mounted.mnt / "vol", data, fsync=True)
    other = tmp_path / "second-mnt"
    other.mkdir()
    rc, output = mounted.try_mount(mnt=other)
    assert_clean_refusal(rc, output, str(mounted.pool))
    assert re.search(r"already|in use|busy|locked", output, re.I), (
        f"message does not say the pool is in use:\n{output}")
    assert not is_mounted(other)
    assert wait_until(lambda: not daemons_for(other), 10), "a refused mount left a daemon running"
    assert read_file(mounted.mnt / "vol") == data
    write_file(mounted.mnt / "vol2", data, fsync=True)
    assert read_file(mounted.mnt / "vol2") == data


def test_mount_survives_killed_clients(mounted: CowfsMount) -> None:
    """SIGKILL of a writer and a reader in the middle of their I/O leaves the
    daemon alive and serving, and a clean unmount afterwards still works."""
    run(["truncate", "-s", "2G", mounted.mnt / "w.img"], check=True)
    seed = os.urandom(8 * MIB)
    write_file(mounted.mnt / "r.img", seed, fsync=True)
    pid = mounted.daemon_pid()
    writer = subprocess.Popen(
        ["dd", "if=/dev/urandom", f"of={mounted.mnt / 'w.img'}", "bs=1M", "count=2000",
         "conv=notrunc"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # 4 KiB reads: with 64 KiB ones the reader once got through the 2 GiB
    # (mostly holes) within the 1.5 s below.
    reader = subprocess.Popen(
        ["dd", f"if={mounted.mnt / 'w.img'}", "of=/dev/null", "bs=4k"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        assert writer.poll() is None, "dd finished before it could be killed; raise its count"
        assert reader.poll() is None, "the reader finished before it could be killed"
    finally:
        writer.send_signal(signal.SIGKILL)
        reader.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        reader.wait(timeout=30)

    assert mounted.daemon_pid() == pid, "the daemon changed or died"
    fresh = os.urandom(MIB)
    write_file(mounted.mnt / "after.img", fresh, fsync=True)
    assert read_file(mounted.mnt / "after.img") == fresh
    assert read_file(mounted.mnt / "r.img") == seed
    assert os.stat(mounted.mnt / "w.img").st_size >= 2 << 30
    mounted.remount()
    assert read_file(mounted.mnt / "after.img") == fresh
    assert read_file(mounted.mnt / "r.img") == seed


def test_read_only_mount(mounted: CowfsMount) -> None:
    """With ``-o ro`` volumes read normally and every change fails with
    EROFS; the volumes are unchanged when mounted read-write again."""
    data = os.urandom(200_000)
    write_file(mounted.mnt / "vol", data, fsync=True)
    mounted.umount()
    mounted.mount("-o", "ro")
    assert read_file(mounted.mnt / "vol") == data
    changes: list[Callable[[], object]] = [
        lambda: write_file(mounted.mnt / "vol", b"x"),
        lambda: os.truncate(mounted.mnt / "vol", 10),
        lambda: write_file(mounted.mnt / "new", b"x"),
        lambda: os.unlink(mounted.mnt / "vol"),
        lambda: os.rename(mounted.mnt / "vol", mounted.mnt / "moved"),
        lambda: os.chmod(mounted.mnt / "vol", 0o600),
    ]
    for change in changes:
        with pytest.raises(OSError) as err:
            change()
        assert err.value.errno == errno.EROFS, f"got {err.value!r}"
    mounted.remount()
    assert os.listdir(mounted.mnt) == ["vol"]
    assert read_file(mounted.mnt / "vol") == data
