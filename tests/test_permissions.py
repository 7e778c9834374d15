"""Who may do what on a mount: an unprivileged user (uid/gid 65534, no
supplementary groups, run through ``setpriv``) against a pool mounted by
root, with and without ``-o allow_other``.

Every refusal here comes from the kernel (``default_permissions``) checking
the owner, group and mode the daemon reports: volumes keep the ones chown,
chgrp and chmod gave them, across remounts; the mount root, the control
directories and the ctl files belong to root, so only root creates, removes
or renames volumes and takes, restores, deletes or clones snapshots.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import pytest

from helpers_mount import CowfsMount, read_file, run, write_file

pytestmark = pytest.mark.mount

NOBODY = 65534          # the unprivileged user (and group) the tests act as
STRANGER = 65533        # another unprivileged user, in no group of NOBODY's


def as_user(uid: int, *cmd: str | os.PathLike[str]) -> tuple[int, str]:
    """Run ``cmd`` as ``uid`` (gid the same, no supplementary groups);
    return its exit status and stderr."""
    proc = run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd],
               timeout=60)
    return proc.returncode, proc.stderr + proc.stdout


def allowed(uid: int, *cmd: str | os.PathLike[str]) -> None:
    """Assert ``uid`` may run ``cmd``."""
    rc, out = as_user(uid, *cmd)
    assert rc == 0, f"uid {uid} could not run {[os.fspath(c) for c in cmd]}: {out}"


def refused(uid: int, reason: str, *cmd: str | os.PathLike[str]) -> None:
    """Assert ``cmd`` run as ``uid`` fails with ``reason`` (an strerror)."""
    rc, out = as_user(uid, *cmd)
    assert rc != 0, f"uid {uid} was allowed to run {[os.fspath(c) for c in cmd]}"
    assert reason in out, f"expected {reason!r} from {[os.fspath(c) for c in cmd]}, got: {out}"


def shell(command: str) -> list[str]:
    """A command line running ``command`` with sh (for redirections)."""
    return ["sh", "-c", command]


@pytest.fixture
def public_mount(make_cowfs: Callable[..., CowfsMount], cleanup: ExitStack) -> CowfsMount:
    """An unmounted pool whose mountpoint other users can reach: the pool
    stays in the test's private directory, the mountpoint lives in a 0755
    directory under /tmp."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    base = Path(tempfile.mkdtemp(prefix="cowfs-perm-", dir="/tmp"))
    base.chmod(0o755)
    # Registered first, so it runs after the mount's teardown.
    cleanup.callback(shutil.rmtree, base, ignore_errors=True)
    return make_cowfs(mnt=base / "mnt", mount=False)


def test_pool_directory_is_private(make_cowfs: Callable[..., CowfsMount], tmp_path: Path) -> None:
    # Made with umask 0, to show the modes are cowfs's own choice.
    pool = tmp_path / "newpool"
    m = make_cowfs(pool=tmp_path / "unused", mkfs=False, mount=False)
    proc = run(["sh", "-c", 'umask 0 && exec "$0" mkfs "$1"', m.bin, pool], check=True)
    assert stat.S_IMODE(pool.stat().st_mode) == 0o700, proc.stdout
    files = sorted(pool.iterdir())
    assert files, "mkfs created no files"
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path} has mode {path.stat().st_mode:o}"
    # Even with the directory opened up, nobody else can read pool files.
    os.chmod(tmp_path, 0o755)
    os.chmod(pool, 0o755)
    refused(NOBODY, "Permission denied", "cat", pool / "superblock")


def test_without_allow_other_only_root_sees_the_mount(public_mount: CowfsMount) -> None:
    m = public_mount
    m.mount()
    write_file(m.mnt / "open.img", b"open to all" + bytes(4085))
    os.chmod(m.mnt / "open.img", 0o666)
    assert read_file(m.mnt / "open.img", 0, 11) == b"open to all"
    # Not even a world-readable, world-writable volume is reachable.
    refused(NOBODY, "Permission denied", "stat", m.mnt)
    refused(NOBODY, "Permission denied", "ls", m.mnt)
    refused(NOBODY, "Permission denied", "cat", m.mnt / "open.img")
    refused(NOBODY, "Permission denied", "truncate", "-s", "1M", m.mnt / "new.img")


def test_allow_other_enforces_owner_group_and_mode(public_mount: CowfsMount) -> None:
    m = public_mount
    m.mount("-o", "allow_other")
    vol = m.mnt / "vm1.img"
    write_file(vol, b"root's data" + bytes(4085), fsync=True)
    os.chmod(vol, 0o644)

    # A root-owned 0644 volume: others may read it, not write, chmod or remove it.
    allowed(NOBODY, "ls", "-l", m.mnt)
    rc, out = as_user(NOBODY, "head", "-c", "11", vol)
    assert rc == 0, out
    refused(NOBODY, "Permission denied", *shell(f"echo x > {vol}"))
    refused(NOBODY, "Permission denied", "truncate", "-s", "0", vol)
    refused(NOBODY, "Operation not permitted", "chmod", "666", vol)
    refused(NOBODY, "Permission denied", "touch", "-d", "2001-01-01", vol)
    # The root directory is root's: no creating, removing or renaming volumes.
    refused(NOBODY, "Permission denied", "truncate", "-s", "1M", m.mnt / "mine.img")
    refused(NOBODY, "Permission denied", "rm", "-f", vol)
    refused(NOBODY, "Permission denied", "mv", vol, m.mnt / "moved.img")

    # Given to the user (as libvirt does with a VM's disk) and made private.
    os.chown(vol, NOBODY, NOBODY)
    os.chmod(vol, 0o600)
    allowed(NOBODY, *shell(f"printf 'guest data' | dd of={vol} conv=notrunc status=none"))
    assert read_file(vol, 0, 10) == b"guest data"
    allowed(NOBODY, "truncate", "-s", "8M", vol)
    assert vol.stat().st_size == 8 << 20
    refused(STRANGER, "Permission denied", "head", "-c", "1", vol)
    # The owner may chmod and chgrp to its own group, never give it away.
    allowed(NOBODY, "chmod", "640", vol)
    allowed(NOBODY, "chgrp", str(NOBODY), vol)
    refused(NOBODY, "Operation not permitted", "chown", "0", vol)
    refused(NOBODY, "Operation not permitted", "chgrp", "0", vol)
    # Group read: a member of the volume's group reads it, a stranger does not.
    os.chown(vol, 0, STRANGER)
    rc, out = as_user(STRANGER, "head", "-c", "10", vol)
    assert rc == 0 and "Permission denied" not in out, out
    refused(STRANGER, "Permission denied", *shell(f"echo x >> {vol}"))
    os.chown(vol, NOBODY, NOBODY)

    # Owner, group and mode survive a remount and are still enforced.
    m.umount()
    m.mount("-o", "allow_other")
    st = vol.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)
    allowed(NOBODY, *shell(f"printf 'after remount' | dd of={vol} conv=notrunc status=none"))
    refused(STRANGER, "Permission denied", "head", "-c", "1", vol)


def test_only_root_controls_snapshots_and_clones(public_mount: CowfsMount) -> None:
    m = public_mount
    m.mount("-o", "allow_other")
    vol = m.mnt / "vm1.img"
    write_file(vol, b"v1" + bytes(4094), fsync=True)
    os.chown(vol, NOBODY, NOBODY)
    os.chmod(vol, 0o640)
    snapdir = m.mnt / ".snapshots" / "vm1.img"
    (snapdir / "base").touch()                       # root takes a snapshot

    # Control directories and ctl files are root's and closed to others.
    for path in (m.mnt, m.mnt / ".snapshots", snapdir, m.mnt / ".clones"):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755), f"{path}: {st}"
    ctl_files = [m.mnt / ".snapshots" / "ctl", m.mnt / ".clones" / "ctl"]
    if (m.mnt / ".pool" / "ctl").exists():
        ctl_files.append(m.mnt / ".pool" / "ctl")
    for ctl in ctl_files:
        st = ctl.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), f"{ctl}: {st}"

    # Even the volume's owner can take, delete, rename or restore nothing.
    refused(NOBODY, "Permission denied", "touch", snapdir / "mine")
    refused(NOBODY, "Permission denied", "rm", "-f", snapdir / "base")
    refused(NOBODY, "Permission denied", "mv", snapdir / "base", snapdir / "renamed")
    refused(NOBODY, "Permission denied", *shell(f"echo 'snapshot s2' > {ctl_files[0]}"))
    refused(NOBODY, "Permission denied", *shell(f"echo 'restore base vm1.img' > {ctl_files[0]}"))
    refused(NOBODY, "Permission denied", *shell(f"echo 'clone vm1.img c.img' > {ctl_files[1]}"))
    refused(NOBODY, "Permission denied", "cat", ctl_files[0])
    for ctl in ctl_files[2:]:
        refused(NOBODY, "Permission denied", *shell(f"echo scrub > {ctl}"))
    assert sorted(os.listdir(snapdir)) == ["base"]
    assert sorted(os.listdir(m.mnt)) == ["vm1.img"]

    # The snapshot image keeps the volume's owner and mode, minus write.
    st = (snapdir / "base").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o440)
    rc, out = as_user(NOBODY, "head", "-c", "2", snapdir / "base")
    assert rc == 0, out
    refused(NOBODY, "Permission denied", *shell(f"echo x >> {snapdir / 'base'}"))
    refused(NOBODY, "Read-only file system", "chmod", "640", snapdir / "base")
    refused(STRANGER, "Permission denied", "head", "-c", "1", snapdir / "base")

    # Root still can.
    with open(ctl_files[0], "w") as ctl:
        ctl.write("snapshot s2 vm1.img")
    with open(ctl_files[1], "w") as ctl:
        ctl.write("clone vm1.img@base c.img")
    assert sorted(os.listdir(snapdir)) == ["base", "s2"]
    assert "c.img" in os.listdir(m.mnt)
