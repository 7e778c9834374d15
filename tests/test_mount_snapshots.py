"""Snapshots and restore through a real mount, with plain shell tools.

Every row of the contract that concerns snapshots, exactly as the README
writes it: ``touch``, ``ls -l``, ``cp --sparse=always``, ``losetup -r``,
``rm`` and ``mv`` in ``MOUNT/.snapshots/VOL/``, ``echo "snapshot ..." >
MOUNT/.snapshots/ctl`` for one volume, several and all, ``restore`` (busy
rule, ``--force``, undo snapshot, size, later snapshots, ``--dry-run``, an
open handle seeing the restored bytes at once), the read-back of a
read-write ctl handle, and space as ``user.cowfs.*`` attributes and ``df``.

The helpers at the top are shared by the other ``test_mount_*`` files of
issue 3 (clones, ctl bad input, CLI, freeze).
"""

from __future__ import annotations

import calendar
import errno
import hashlib
import json
import os
import random
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from helpers_mount import MIB, CowfsMount, loop_attach, loop_detach, read_file, run, write_file

pytestmark = pytest.mark.mount

SNAPS = ".snapshots"
CLONES = ".clones"


# ----------------------------------------------------------------------------
# Shared helpers


def sh(script: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with bash (stdin closed, output captured, no check)."""
    return run(["bash", "-c", script], timeout=timeout)


def q(path: Path | str) -> str:
    """A path quoted for a shell script."""
    return shlex.quote(os.fspath(path))


def echo_ctl(mnt: Path, which: str, command: str) -> subprocess.CompletedProcess[str]:
    """``echo "COMMAND" > MOUNT/WHICH/ctl`` exactly as an administrator types it."""
    return sh(f"echo {shlex.quote(command)} > {q(mnt / which / 'ctl')}")


def ctl_rw(mnt: Path, which: str, data: bytes | str) -> tuple[int, str]:
    """Open ``WHICH/ctl`` read-write, write ``data`` in one write(), read the
    reply back from the same handle.  Returns (0 or the write's errno, reply)."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(mnt / which / "ctl", os.O_RDWR)
    try:
        try:
            n = os.write(fd, raw)
            assert n == len(raw), f"ctl write of {len(raw)} bytes returned {n}"
            err = 0
        except OSError as exc:
            err = exc.errno or -1
        reply = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
    finally:
        os.close(fd)
    return err, reply


def ctl_ok(mnt: Path, which: str, command: str) -> dict:
    """Run a command that must succeed; return the JSON of its ``ok`` reply."""
    err, reply = ctl_rw(mnt, which, command)
    assert err == 0, f"{command!r} refused with {errno.errorcode.get(err, err)}: {reply!r}"
    assert reply.startswith("ok ") and reply.endswith("\n"), f"{command!r}: reply {reply!r}"
    return json.loads(reply[3:])


def ctl_refused(mnt: Path, which: str, command: bytes | str, want: int,
                *mentions: str) -> str:
    """Run a command that must be refused with ``want``, change nothing and
    read back ``error: <message>`` naming each of ``mentions``."""
    before = mount_state(mnt)
    err, reply = ctl_rw(mnt, which, command)
    shown = command[:100]
    assert err == want, (f"{shown!r}: errno {errno.errorcode.get(err, err)}, wanted "
                         f"{errno.errorcode[want]}; reply {reply!r}")
    assert reply.startswith("error: ") and reply.endswith("\n"), f"{shown!r}: reply {reply!r}"
    for word in mentions:
        assert word in reply, f"{shown!r}: reply {reply!r} does not mention {word!r}"
    after = mount_state(mnt)
    assert after == before, f"{shown!r} was refused but changed the mount: {diff(before, after)}"
    return reply


def file_sha(path: Path) -> str:
    """SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def mount_state(mnt: Path) -> dict[str, tuple]:
    """Every volume, snapshot and clone status file: path -> (size, mode,
    sha256 of the content).  Used to prove that nothing changed."""
    out: dict[str, tuple] = {}
    for entry in sorted(os.listdir(mnt)):
        p = mnt / entry
        st = os.stat(p)
        out[entry] = (st.st_size, st.st_mode, file_sha(p))
    for vol in sorted(os.listdir(mnt / SNAPS)):
        if vol == "ctl":
            continue
        for snap in sorted(os.listdir(mnt / SNAPS / vol)):
            p = mnt / SNAPS / vol / snap
            st = os.stat(p)
            out[f"{SNAPS}/{vol}/{snap}"] = (st.st_size, st.st_mode, st.st_mtime_ns, file_sha(p))
    for name in sorted(os.listdir(mnt / CLONES)):
        if name != "ctl":
            out[f"{CLONES}/{name}"] = (read_file(mnt / CLONES / name),)
    return out


def diff(before: dict, after: dict) -> str:
    """The keys whose values differ between two :func:`mount_state` results."""
    keys = sorted(set(before) | set(after))
    return ", ".join(f"{k}: {before.get(k, '<absent>')!s:.80} -> {after.get(k, '<absent>')!s:.80}"
                     for k in keys if before.get(k) != after.get(k)) or "nothing"


def snapshot_names(mnt: Path, vol: str) -> list[str]:
    """Names in ``MOUNT/.snapshots/VOL`` as ``ls -A`` lists them."""
    proc = run(["ls", "-A", mnt / SNAPS / vol], check=True)
    return sorted(proc.stdout.split("\n")[:-1])


def xattrs(path: Path) -> dict[str, str]:
    """``getfattr -d -m - PATH`` parsed into name -> value."""
    proc = run(["getfattr", "-d", "-m", "-", "--absolute-names", path], check=True)
    out = {}
    for line in proc.stdout.splitlines():
        if "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            out[name] = value.strip('"')
    return out


def fill(path: Path, size: int, seed: int, *, at: int = 0) -> bytes:
    """Write ``size`` random bytes at ``at`` of ``path`` (created if missing),
    fsync, and return them."""
    data = random.Random(seed).randbytes(size)
    write_file(path, data, at, fsync=True)
    return data


def assert_content(path: Path, want: bytes, what: str) -> None:
    """``path`` holds exactly ``want``."""
    got = read_file(path)
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise AssertionError(f"{what}: {path} differs from the expected content at byte "
                             f"{first} (size {len(got)}, expected {len(want)})")


def assert_shell_fails(script: str, *mentions: str) -> subprocess.CompletedProcess[str]:
    """Run ``script``: it must fail with stderr mentioning each of ``mentions``."""
    proc = sh(script)
    assert proc.returncode != 0, f"{script!r} succeeded; stdout {proc.stdout!r}"
    for word in mentions:
        assert word in proc.stderr, f"{script!r}: stderr {proc.stderr!r} lacks {word!r}"
    return proc


def volume_with_data(mnt: Path, name: str, size: int, seed: int) -> bytes:
    """Create volume ``name`` of ``size`` bytes (``truncate -s``) holding
    random data in its second MiB; return its whole expected content."""
    run(["truncate", "-s", str(size), mnt / name], check=True)
    data = fill(mnt / name, MIB, seed, at=MIB)
    image = bytearray(size)
    image[MIB:2 * MIB] = data
    return bytes(image)


# ----------------------------------------------------------------------------
# touch, ls -l, cp, losetup -r, rm, mv


def test_snapshot_files_with_shell_tools(mounted: CowfsMount, tmp_path: Path, loop_devices: None) -> None:
    """Proves the contract rows for one volume: ``touch`` takes a snapshot;
    ``ls -l`` lists it read-only with the volume's size at that moment and
    the time it was taken; it keeps the old bytes while the volume changes
    (``cp --sparse=always`` + ``cmp``, ``losetup -r`` + read); writes,
    truncate, chmod and chown fail with EROFS but ``touch`` on it succeeds
    without changing it; ``mv`` renames (EEXIST onto another snapshot, EPERM
    across directories); ``rm`` deletes; an unknown volume's directory is
    ENOENT; mkdir/rmdir in .snapshots are EPERM; the snapshot has the
    volume's owner and its mode minus write bits; all of it (inode number
    included) survives a remount."""
    mnt = mounted.mnt
    snapdir = mnt / SNAPS / "vm1.img"
    old = volume_with_data(mnt, "vm1.img", 16 * MIB, 1)
    os.chown(mnt / "vm1.img", 1234, 5678)
    os.chmod(mnt / "vm1.img", 0o664)
    before = time.time()
    r = sh(f"touch {q(snapdir / 'before-upgrade')}")
    assert r.returncode == 0, f"touch of a new snapshot failed: {r.stderr}"
    assert sorted(os.listdir(mnt)) == ["vm1.img"], "the root must list volumes only"
    ls = run(["ls", "-l", "--time-style=+%s", snapdir], check=True).stdout.splitlines()
    assert len(ls) == 2, ls
    mode, _, _, _, size, mtime, name = ls[1].split(None, 6)
    assert (name, int(size)) == ("before-upgrade", 16 * MIB), ls
    assert mode.startswith("-") and "w" not in mode, f"snapshot is not read-only: {ls[1]}"
    assert before - 2 <= int(mtime) <= time.time() + 2, f"mtime {mtime} is not when it was taken"
    snap = snapdir / "before-upgrade"
    st = os.stat(snap)
    assert 0 < st.st_blocks * 512 <= 2 * MIB, f"st_blocks {st.st_blocks} does not count 1 MiB of data"
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o444), (
        "a snapshot has the volume's owner and mode minus the write bits", st)

    # The volume changes (and grows); the snapshot does not.
    fill(mnt / "vm1.img", 3 * MIB, 2, at=0)
    run(["truncate", "-s", str(20 * MIB), mnt / "vm1.img"], check=True)
    expected = tmp_path / "expected.img"
    expected.write_bytes(old)
    copy = tmp_path / "copy.img"
    assert sh(f"cp --sparse=always {q(snap)} {q(copy)}").returncode == 0
    assert sh(f"cmp {q(copy)} {q(expected)}").returncode == 0, "cp of the snapshot differs"
    assert os.stat(copy).st_blocks * 512 < 4 * MIB, "cp --sparse=always did not keep the holes"
    dev = run(["losetup", "-r", "-f", "--show", snap], check=True).stdout.strip()
    try:
        assert run(["blockdev", "--getro", dev], check=True).stdout.strip() == "1"
        assert sh(f"cmp {q(dev)} {q(expected)}").returncode == 0, "losetup -r read differs"
    finally:
        loop_detach(dev)

    # Read-only, except for touch.
    assert_shell_fails(f"echo x >> {q(snap)}", "Read-only file system")
    assert_shell_fails(f"truncate -s 0 {q(snap)}", "Read-only file system")
    assert_shell_fails(f"chmod 666 {q(snap)}", "Read-only file system")
    assert_shell_fails(f"chown 1:1 {q(snap)}", "Read-only file system")
    assert sh(f"touch {q(snap)}").returncode == 0, "touch on an existing snapshot must succeed"
    assert os.stat(snap).st_mtime_ns == st.st_mtime_ns, "touch changed the snapshot's time"
    assert os.stat(snap).st_size == 16 * MIB

    # mv renames within the directory only.
    assert sh(f"touch {q(snapdir / 'second')}").returncode == 0
    assert sh(f"mv {q(snap)} {q(snapdir / 'renamed')}").returncode == 0
    assert snapshot_names(mnt, "vm1.img") == ["renamed", "second"]
    assert sh(f"cmp {q(snapdir / 'renamed')} {q(expected)}").returncode == 0
    assert_shell_fails(f"mv -T {q(snapdir / 'renamed')} {q(snapdir / 'second')}", "File exists")
    run(["truncate", "-s", "1M", mnt / "vm2.img"], check=True)
    assert_shell_fails(f"mv {q(snapdir / 'renamed')} {q(mnt / SNAPS / 'vm2.img' / 'renamed')}",
                       "Operation not permitted")
    assert_shell_fails(f"mv {q(snapdir / 'renamed')} {q(mnt / 'stolen.img')}",
                       "Operation not permitted")
    assert snapshot_names(mnt, "vm1.img") == ["renamed", "second"]

    # rm deletes; what cannot be done fails with the fitting error.
    assert sh(f"rm {q(snapdir / 'second')}").returncode == 0
    assert snapshot_names(mnt, "vm1.img") == ["renamed"]
    assert not (snapdir / "second").exists()
    assert_shell_fails(f"touch {q(mnt / SNAPS / 'nope.img' / 'x')}", "No such file or directory")
    assert_shell_fails(f"mkdir {q(mnt / SNAPS / 'newdir')}", "Operation not permitted")
    assert_shell_fails(f"rmdir {q(snapdir)}", "Operation not permitted")
    assert_shell_fails(f"touch {q(snapdir / 'bad@name')}", "Invalid argument")

    ino = os.stat(snapdir / "renamed").st_ino
    mounted.remount()
    assert snapshot_names(mnt, "vm1.img") == ["renamed"]
    assert sh(f"cmp {q(snapdir / 'renamed')} {q(expected)}").returncode == 0
    st2 = os.stat(snapdir / "renamed")
    assert (st2.st_mtime_ns, st2.st_ino) == (st.st_mtime_ns, ino), "time or inode changed on remount"


def test_qemu_img_convert_reads_snapshot(mounted: CowfsMount, tmp_path: Path) -> None:
    """Proves the contract's ``qemu-img convert`` form: converting a snapshot
    file to qcow2 and back yields the snapshot's bytes."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (Debian: qemu-utils)")
    mnt = mounted.mnt
    old = volume_with_data(mnt, "vm1.img", 8 * MIB, 3)
    assert sh(f"touch {q(mnt / SNAPS / 'vm1.img' / 's')}").returncode == 0
    fill(mnt / "vm1.img", MIB, 4, at=MIB)
    qcow = tmp_path / "s.qcow2"
    raw = tmp_path / "s.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", mnt / SNAPS / "vm1.img" / "s", qcow],
        check=True, timeout=120)
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow, raw], check=True, timeout=120)
    assert read_file(raw) == old, "qemu-img convert of the snapshot lost its content"


# ----------------------------------------------------------------------------
# snapshot / restore through .snapshots/ctl


def test_group_and_all_volume_snapshots(mounted: CowfsMount) -> None:
    """Proves: ``echo "snapshot NAME vm1.img vm2.img" > ctl`` snapshots just
    those two at one instant (same time on both), no volume named means all
    volumes, quoting works, the read-back is ``ok {...}``, and ``--dry-run``
    reports without creating anything."""
    mnt = mounted.mnt
    data = {f"vm{i}.img": volume_with_data(mnt, f"vm{i}.img", 4 * MIB, 10 + i) for i in (1, 2, 3)}
    r = echo_ctl(mnt, SNAPS, "snapshot before-upgrade vm1.img vm2.img")
    assert r.returncode == 0, r.stderr
    for i in (1, 2, 3):
        write_file(mnt / f"vm{i}.img", b"changed afterwards", MIB, fsync=True)
    assert snapshot_names(mnt, "vm1.img") == ["before-upgrade"]
    assert snapshot_names(mnt, "vm2.img") == ["before-upgrade"]
    assert not (mnt / SNAPS / "vm3.img" / "before-upgrade").exists()
    t1 = os.stat(mnt / SNAPS / "vm1.img" / "before-upgrade").st_mtime_ns
    t2 = os.stat(mnt / SNAPS / "vm2.img" / "before-upgrade").st_mtime_ns
    assert t1 == t2, "a group snapshot was not taken at one instant"
    for vol in ("vm1.img", "vm2.img"):
        assert_content(mnt / SNAPS / vol / "before-upgrade", data[vol], f"{vol}@before-upgrade")

    reply = ctl_ok(mnt, SNAPS, "snapshot nightly")
    assert reply == {"snapshot": "nightly", "volumes": ["vm1.img", "vm2.img", "vm3.img"],
                     "dry_run": False}, reply
    for vol in data:
        assert "nightly" in snapshot_names(mnt, vol)
    assert echo_ctl(mnt, SNAPS, "snapshot 'with space' vm3.img").returncode == 0
    assert "with space" in snapshot_names(mnt, "vm3.img")

    before = mount_state(mnt)
    reply = ctl_ok(mnt, SNAPS, "snapshot --dry-run planned vm1.img vm3.img")
    assert reply == {"snapshot": "planned", "volumes": ["vm1.img", "vm3.img"], "dry_run": True}
    assert mount_state(mnt) == before, "snapshot --dry-run changed something"


def test_restore(mounted: CowfsMount) -> None:
    """Proves the restore row and its semantics: the volume gets the
    snapshot's bytes and size; a reader that has the volume open sees the
    restored bytes at once; the replaced state is kept as ``undo-...``
    (restoring it undoes the restore); later snapshots are kept; no volume
    named restores every volume that has the snapshot, at one instant;
    ``--dry-run`` reports the plan and changes nothing."""
    mnt = mounted.mnt
    vol = mnt / "vm1.img"
    old = volume_with_data(mnt, "vm1.img", 8 * MIB, 20)
    assert sh(f"touch {q(mnt / SNAPS / 'vm1.img' / 'before-upgrade')}").returncode == 0
    new = bytearray(old) + bytes(4 * MIB)
    new[0:3 * MIB] = fill(vol, 3 * MIB, 21)
    run(["truncate", "-s", str(12 * MIB), vol], check=True)
    assert echo_ctl(mnt, SNAPS, "snapshot later vm1.img").returncode == 0

    before = mount_state(mnt)
    reply = ctl_ok(mnt, SNAPS, "restore before-upgrade vm1.img --dry-run")
    assert reply["dry_run"] is True
    [plan] = reply["restored"]
    assert (plan["volume"], plan["snapshot"], plan["size"]) == ("vm1.img", "before-upgrade", 8 * MIB)
    assert plan["undo"].startswith("undo-")
    assert mount_state(mnt) == before, "restore --dry-run changed something"

    with open(vol, "rb") as reader:
        assert os.pread(reader.fileno(), MIB, 0) == bytes(new[:MIB])   # now in the page cache
        r = echo_ctl(mnt, SNAPS, "restore before-upgrade vm1.img")
        assert r.returncode == 0, f"restore refused: {r.stderr}"
        assert os.pread(reader.fileno(), MIB, 0) == old[:MIB], \
            "a process with the volume open still reads the replaced bytes"
        assert os.fstat(reader.fileno()).st_size == 8 * MIB
    assert os.stat(vol).st_size == 8 * MIB, "the volume did not take the snapshot's size"
    assert_content(vol, old, "restored volume")
    names = snapshot_names(mnt, "vm1.img")
    undo = [n for n in names if n.startswith("undo-")]
    assert len(undo) == 1 and set(names) == {"before-upgrade", "later", undo[0]}, names
    assert_content(mnt / SNAPS / "vm1.img" / undo[0], bytes(new), "undo snapshot")
    assert_content(mnt / SNAPS / "vm1.img" / "later", bytes(new), "later snapshot")

    # Undo the restore.
    assert echo_ctl(mnt, SNAPS, f"restore {undo[0]} vm1.img").returncode == 0
    assert_content(vol, bytes(new), "volume after undoing the restore")

    # No volume named: every volume having the snapshot, one instant.
    data2 = volume_with_data(mnt, "vm2.img", 2 * MIB, 22)
    volume_with_data(mnt, "vm3.img", 2 * MIB, 23)
    assert echo_ctl(mnt, SNAPS, "snapshot gold vm1.img vm2.img").returncode == 0
    fill(mnt / "vm2.img", MIB, 24)
    fill(vol, MIB, 25)
    vm3 = read_file(mnt / "vm3.img")
    reply = ctl_ok(mnt, SNAPS, "restore gold")
    assert [p["volume"] for p in reply["restored"]] == ["vm1.img", "vm2.img"], reply
    assert_content(vol, bytes(new), "vm1.img after restoring gold")
    assert_content(mnt / "vm2.img", data2, "vm2.img after restoring gold")
    assert read_file(mnt / "vm3.img") == vm3, "a volume without the snapshot was touched"
    undos = {p["volume"]: p["undo"] for p in reply["restored"]}
    t1 = os.stat(mnt / SNAPS / "vm1.img" / undos["vm1.img"]).st_mtime_ns
    t2 = os.stat(mnt / SNAPS / "vm2.img" / undos["vm2.img"]).st_mtime_ns
    assert t1 == t2, "a group restore was not one instant"


def test_restore_busy_and_force(mounted: CowfsMount, loop_devices: None) -> None:
    """Proves: a restore of a volume attached read-write to a loop device is
    refused with EBUSY (nothing changed; the read-back names the volume and
    --force; --dry-run reports the conflict too); so is one held open for
    writing by a process; ``--force`` restores anyway and the volume serves
    the snapshot's bytes at once; the undo snapshot holds what was written
    through the loop device."""
    mnt = mounted.mnt
    vol = mnt / "vm1.img"
    old = bytearray(volume_with_data(mnt, "vm1.img", 4 * MIB, 30))
    old[:4096] = fill(vol, 4096, 31)
    assert echo_ctl(mnt, SNAPS, "snapshot s vm1.img").returncode == 0
    dev = loop_attach(vol)
    try:
        r = echo_ctl(mnt, SNAPS, "restore s vm1.img")
        assert r.returncode != 0 and "Device or resource busy" in r.stderr, (r.returncode, r.stderr)
        ctl_refused(mnt, SNAPS, "restore s vm1.img", errno.EBUSY, "vm1.img", "--force")
        ctl_refused(mnt, SNAPS, "restore s", errno.EBUSY, "vm1.img")
        ctl_refused(mnt, SNAPS, "restore s vm1.img --dry-run", errno.EBUSY, "vm1.img")
        marker = b"written through the loop device" * 100
        r = sh(f"printf %s {shlex.quote(marker.decode())} | "
               f"dd of={q(dev)} bs=4096 conv=fsync,sync status=none")
        assert r.returncode == 0, r.stderr
        with open(vol, "rb") as reader:
            assert os.pread(reader.fileno(), len(marker), 0) == marker
            reply = ctl_ok(mnt, SNAPS, "restore s vm1.img --force")
            assert os.pread(reader.fileno(), 4096, 0) == old[:4096], \
                "after a forced restore an open handle still reads the old bytes"
        assert_content(vol, bytes(old), "volume after a forced restore")
        undo = mnt / SNAPS / "vm1.img" / reply["restored"][0]["undo"]
        assert read_file(undo, 0, len(marker)) == marker, "the undo snapshot lost the loop write"
    finally:
        loop_detach(dev)

    fd = os.open(vol, os.O_WRONLY)
    try:
        ctl_refused(mnt, SNAPS, "restore s vm1.img", errno.EBUSY, "vm1.img")
    finally:
        os.close(fd)
    # Read-only handles do not block a restore.
    with open(vol, "rb"):
        ctl_ok(mnt, SNAPS, "restore s vm1.img")


def test_ctl_delete_and_rename(mounted: CowfsMount) -> None:
    """Proves the ctl forms ``delete VOL@NAME`` and ``rename VOL@OLD NEW``
    (also for a volume name holding '@': split at the last one), with
    ENOENT/EEXIST refusals changing nothing."""
    mnt = mounted.mnt
    volume_with_data(mnt, "a@b.img", 2 * MIB, 40)
    assert echo_ctl(mnt, SNAPS, "snapshot s1 a@b.img").returncode == 0
    assert echo_ctl(mnt, SNAPS, "snapshot s2 a@b.img").returncode == 0
    ctl_refused(mnt, SNAPS, "rename a@b.img@s1 s2", errno.EEXIST, "s2")
    ctl_refused(mnt, SNAPS, "rename a@b.img@zz s3", errno.ENOENT, "zz")
    ctl_refused(mnt, SNAPS, "delete a@b.img@zz", errno.ENOENT, "zz")
    ctl_refused(mnt, SNAPS, "delete nope.img@s1", errno.ENOENT, "nope.img")
    ctl_ok(mnt, SNAPS, "rename a@b.img@s1 first")
    assert snapshot_names(mnt, "a@b.img") == ["first", "s2"]
    ctl_ok(mnt, SNAPS, "delete a@b.img@s2")
    assert snapshot_names(mnt, "a@b.img") == ["first"]


# ----------------------------------------------------------------------------
# Space


def space(path: Path) -> tuple[int, int]:
    """(referenced, exclusive) from the ``user.cowfs.*`` attributes."""
    attrs = xattrs(path)
    return int(attrs["user.cowfs.referenced"]), int(attrs["user.cowfs.exclusive"])


def df_used_avail(mnt: Path) -> tuple[int, int]:
    """Used and available bytes as ``df -B1`` prints them."""
    out = run(["df", "-B1", "--output=used,avail", mnt], check=True).stdout.split()
    return int(out[-2]), int(out[-1])


def test_space_attributes_and_df(make_cowfs: Callable[..., CowfsMount]) -> None:
    """Proves: ``getfattr -d`` shows referenced and exclusive bytes on
    volumes and snapshots (and the creation time on snapshots); a fresh
    snapshot's exclusive is 0; after the volume is overwritten the
    snapshot's exclusive equals its referenced; ``rm`` of the snapshot frees
    that at once in ``df``; the attributes cannot be set or removed and an
    unknown one is ENODATA."""
    m = make_cowfs(mkfs_args=("--no-compression",))
    mnt = m.mnt
    vol = mnt / "vm1.img"
    run(["truncate", "-s", str(32 * MIB), vol], check=True)
    fill(vol, 8 * MIB, 50)
    assert space(vol) == (8 * MIB, 8 * MIB)
    assert sh(f"touch {q(mnt / SNAPS / 'vm1.img' / 's')}").returncode == 0
    snap = mnt / SNAPS / "vm1.img" / "s"
    attrs = xattrs(snap)
    created = calendar.timegm(time.strptime(attrs["user.cowfs.created"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(created - time.time()) < 10, attrs
    assert space(snap) == (8 * MIB, 0)
    assert space(vol) == (8 * MIB, 0)
    fill(vol, 8 * MIB, 51)
    assert space(snap) == (8 * MIB, 8 * MIB)
    assert space(vol) == (8 * MIB, 8 * MIB)
    used, avail = df_used_avail(mnt)
    assert sh(f"rm {q(snap)}").returncode == 0
    used2, avail2 = df_used_avail(mnt)
    # Used counts the pool's data alone (exact up to rounding); available
    # also follows the host file system, which other processes share.
    assert abs(used - used2 - 8 * MIB) <= 4096, f"df used shrank by {used - used2}, not 8 MiB"
    assert avail2 - avail >= 7 * MIB, f"df avail grew by {avail2 - avail} after freeing 8 MiB"
    assert_shell_fails(f"setfattr -n user.cowfs.referenced -v 1 {q(vol)}")
    assert_shell_fails(f"setfattr -n user.other -v 1 {q(vol)}")
    assert_shell_fails(f"setfattr -x user.cowfs.exclusive {q(vol)}")
    assert_shell_fails(f"getfattr -n user.cowfs.nothing {q(vol)}", "No such attribute")
