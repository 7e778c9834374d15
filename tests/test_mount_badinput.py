"""Bad input through a real FUSE mount and to ``cowfs mount``: invalid names,
non-file objects, hostile requests, and pools that are not pools.  Each must
be refused with the fitting errno or a clear message, leave nothing behind,
and never take the daemon down.

Names holding NUL or '/' cannot reach the daemon at all: the kernel API ends a
name at NUL and splits paths at '/'.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import stat
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
    wait_until,
    write_file,
)

pytestmark = pytest.mark.mount
log = logging.getLogger(__name__)

# The errnos the engine documents for an invalid volume name (EINVAL) and
# what a FUSE layer could reasonably answer instead (EPERM, EACCES).
BAD_NAME_ERRNOS = {errno.EINVAL, errno.EPERM, errno.EACCES}


def oserror(fn: Callable[..., object], *args: object) -> int:
    """Call ``fn(*args)``, which must fail, and return its errno."""
    try:
        fn(*args)
    except OSError as exc:
        assert exc.errno is not None
        return exc.errno
    raise AssertionError(f"{fn.__name__}{args} succeeded but should have failed")


def create(path: Path | bytes) -> None:
    """Create a volume with open(O_CREAT|O_EXCL)."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644))


def test_name_length_limit(mounted: CowfsMount) -> None:
    """Names of 255 bytes (ASCII or multi-byte UTF-8) work and persist; 256
    bytes fail with ENAMETOOLONG for create and rename and create nothing."""
    ok_ascii, ok_utf8 = "a" * 255, "é" * 127 + "z"          # 255 bytes each
    long_ascii, long_utf8 = "b" * 256, "é" * 128              # 256 bytes each
    for name in (ok_ascii, ok_utf8):
        write_file(mounted.mnt / name, name.encode(), fsync=True)
    for name in (long_ascii, long_utf8):
        assert oserror(create, mounted.mnt / name) == errno.ENAMETOOLONG, name
        assert oserror(os.stat, mounted.mnt / name) in (errno.ENAMETOOLONG, errno.ENOENT)
    proc = run(["truncate", "-s", "1M", mounted.mnt / long_ascii])
    assert proc.returncode != 0
    assert oserror(os.rename, mounted.mnt / ok_ascii, mounted.mnt / long_ascii) \
        == errno.ENAMETOOLONG
    assert sorted(os.listdir(mounted.mnt)) == sorted([ok_ascii, ok_utf8])

    mounted.remount()
    assert sorted(os.listdir(mounted.mnt)) == sorted([ok_ascii, ok_utf8])
    for name in (ok_ascii, ok_utf8):
        assert read_file(mounted.mnt / name) == name.encode()


def test_dot_names_refused(mounted: CowfsMount) -> None:
    """Names starting with '.' are refused for create, truncate and rename
    with an errno in BAD_NAME_ERRNOS, and nothing is created or moved."""
    write_file(mounted.mnt / "vol", b"payload", fsync=True)
    for name in (".hidden", "..x", ".fuse_hidden000001"):
        assert oserror(create, mounted.mnt / name) in BAD_NAME_ERRNOS, name
        assert run(["truncate", "-s", "1M", mounted.mnt / name]).returncode != 0
        assert oserror(os.rename, mounted.mnt / "vol", mounted.mnt / name) \
            in BAD_NAME_ERRNOS, name
        assert os.listdir(mounted.mnt) == ["vol"], f"after trying {name!r}"
    assert read_file(mounted.mnt / "vol") == b"payload"


def test_non_utf8_name(mounted: CowfsMount) -> None:
    """A name that is not UTF-8 is either refused with EINVAL/EILSEQ and
    nothing is created, or kept byte-exact across a remount."""
    name = b"raw-\xff\xfe.img"
    path = os.fsencode(mounted.mnt) + b"/" + name
    try:
        create(path)
    except OSError as exc:
        assert exc.errno in (errno.EINVAL, errno.EILSEQ), str(exc)
        assert os.listdir(os.fsencode(mounted.mnt)) == []
        return
    assert os.listdir(os.fsencode(mounted.mnt)) == [name]
    mounted.remount()
    assert os.listdir(os.fsencode(mounted.mnt)) == [name]


def test_non_files_refused_in_root(mounted: CowfsMount) -> None:
    """mkdir, symlink, hard link, mkfifo and mknod in the mount root fail
    with EPERM and create nothing; rmdir on a volume fails with ENOTDIR."""
    vol = mounted.mnt / "vol"
    write_file(vol, b"x" * 4096, fsync=True)
    assert oserror(os.mkdir, mounted.mnt / "dir") == errno.EPERM
    assert oserror(os.symlink, "vol", mounted.mnt / "sym") == errno.EPERM
    assert oserror(os.link, vol, mounted.mnt / "hard") == errno.EPERM
    assert oserror(os.mkfifo, mounted.mnt / "fifo") == errno.EPERM
    assert oserror(os.mknod, mounted.mnt / "chr", stat.S_IFCHR | 0o600,
                   os.makedev(1, 3)) == errno.EPERM
    assert oserror(os.rmdir, vol) == errno.ENOTDIR
    assert os.listdir(mounted.mnt) == ["vol"]
    assert os.stat(vol).st_nlink == 1


def test_daemon_survives_bad_requests(mounted: CowfsMount) -> None:
    """A run of invalid or hostile requests gets errnos, not a dead daemon:
    afterwards the same daemon serves reads and writes and unmounts cleanly."""
    pid = mounted.daemon_pid()
    mnt = mounted.mnt
    vol = mnt / "vol"
    data = os.urandom(MIB)
    write_file(vol, data, fsync=True)

    assert oserror(os.open, mnt / "missing", os.O_RDONLY) == errno.ENOENT
    assert oserror(os.unlink, mnt / "missing") == errno.ENOENT
    assert oserror(os.rename, mnt / "missing", mnt / "other") == errno.ENOENT
    assert oserror(os.truncate, vol, -1) == errno.EINVAL
    assert oserror(os.open, mnt, os.O_WRONLY) == errno.EISDIR
    assert oserror(os.rmdir, mnt / "missing") == errno.ENOENT

    # Absurd sizes and offsets: refusing (EFBIG/EINVAL/ENOSPC) or honouring them
    # are both fine, provided the answer is consistent.
    huge = mnt / "huge"
    write_file(huge, b"")
    try:
        os.truncate(huge, (1 << 63) - 1)
        assert os.stat(huge).st_size == (1 << 63) - 1
    except OSError as exc:
        assert exc.errno in (errno.EFBIG, errno.EINVAL, errno.ENOSPC), str(exc)
    fd = os.open(huge, os.O_RDWR)
    try:
        try:
            os.pwrite(fd, b"far", 1 << 60)
            assert os.pread(fd, 3, 1 << 60) == b"far"
        except OSError as exc:
            assert exc.errno in (errno.EFBIG, errno.EINVAL, errno.ENOSPC), str(exc)
    finally:
        os.close(fd)

    # Extended attributes are not part of a volume; whatever the answer, the
    # daemon must stay up.
    try:
        os.setxattr(vol, "user.test", b"value")
        assert os.getxattr(vol, "user.test") == b"value"
    except OSError as exc:
        assert exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM), str(exc)

    # Unlink while open: the open descriptor keeps working or fails cleanly.
    victim = mnt / "victim"
    write_file(victim, data, fsync=True)
    fd = os.open(victim, os.O_RDWR)
    try:
        os.unlink(victim)
        assert victim.name not in os.listdir(mnt)
        try:
            assert os.pread(fd, 4096, 0) == data[:4096]
            os.pwrite(fd, b"late", 0)
        except OSError as exc:
            assert exc.errno in (errno.ENOENT, errno.ESTALE, errno.EBADF), str(exc)
    finally:
        os.close(fd)

    assert mounted.daemon_pid() == pid, "the daemon died or was replaced"
    assert read_file(vol) == data
    fresh = os.urandom(100_000)
    write_file(mnt / "after", fresh, fsync=True)
    assert read_file(mnt / "after") == fresh
    mounted.remount()
    assert read_file(vol) == data
    assert read_file(mnt / "after") == fresh
    assert "victim" not in os.listdir(mnt)


def assert_mount_refused(cm: CowfsMount, *mentions: str) -> str:
    """``cowfs mount`` fails cleanly: non-zero exit, a message naming the
    pool (and ``mentions``), no traceback, no mount and no daemon left."""
    rc, output = cm.try_mount()
    assert_clean_refusal(rc, output, str(cm.pool), *mentions)
    assert not is_mounted(cm.mnt), "a refused mount is in the mount table"
    assert wait_until(lambda: not daemons_for(cm.mnt), 10), "a refused mount left a daemon running"
    return output


def corrupt(path: Path, how: str, rng: random.Random) -> None:
    """Damage one pool file: ``garble`` overwrites its first 4 KiB and the
    4 KiB block in its middle with random bytes (the whole file if smaller),
    ``truncate`` cuts it to half its size."""
    size = path.stat().st_size
    if how == "garble":
        with open(path, "r+b") as fh:
            fh.write(rng.randbytes(min(size, 4096) or 4096))
            middle = size // 2 // 4096 * 4096
            if middle >= 4096:
                fh.seek(middle)
                fh.write(rng.randbytes(min(4096, size - middle)))
    else:
        os.truncate(path, size // 2)


def pool_files(pool: Path) -> list[Path]:
    """The pool's own files (everything but the lock)."""
    return sorted(p for p in pool.iterdir() if p.is_file() and p.name != "lock")


@pytest.mark.parametrize("kind", ["empty-dir", "missing-dir", "random-files",
                                  "garbled-all", "truncated-all", "emptied-all"])
def test_mount_refuses_non_pool(make_cowfs: Callable[..., CowfsMount], kind: str) -> None:
    """A directory that holds no pool (empty, missing, random files) or a
    pool whose every file is garbled, halved or emptied is refused cleanly."""
    rng = random.Random(kind)
    cm = make_cowfs(mkfs=kind.endswith("-all"), mount=False)
    if kind == "missing-dir":
        cm.pool.rmdir()
    elif kind == "random-files":
        for name in ("superblock", "journal", "data.0", "meta", "x"):
            (cm.pool / name).write_bytes(rng.randbytes(rng.randint(1, 300_000)))
    elif kind.endswith("-all"):
        # Give the pool some content first so every structure exists on disk.
        cm.mount()
        write_file(cm.mnt / "vol", rng.randbytes(2 * MIB), fsync=True)
        cm.umount()
        files = pool_files(cm.pool)
        assert files, "mkfs made no files in the pool directory"
        for path in files:
            if kind == "garbled-all":
                path.write_bytes(rng.randbytes(path.stat().st_size or 4096))
            elif kind == "truncated-all":
                corrupt(path, "truncate", rng)
            else:
                os.truncate(path, 0)
    assert_mount_refused(cm)


@pytest.mark.parametrize("how", ["garble", "truncate"])
def test_mount_with_one_damaged_file(make_cowfs: Callable[..., CowfsMount],
                                     tmp_path: Path, how: str) -> None:
    """Damage one pool file at a time (first 4 KiB garbled, or cut in half).
    Mounting then either fails cleanly, or succeeds and every read returns the
    true data or EIO, never wrong bytes."""
    rng = random.Random(how)
    cm = make_cowfs()
    vols = {f"v{i}": rng.randbytes(rng.randint(100_000, 3 * MIB)) for i in range(3)}
    for name, data in vols.items():
        write_file(cm.mnt / name, data, fsync=True)
    cm.umount()
    pristine = tmp_path / "pristine"
    shutil.copytree(cm.pool, pristine)
    outcomes = []
    for victim in pool_files(pristine):
        shutil.rmtree(cm.pool)
        shutil.copytree(pristine, cm.pool)
        corrupt(cm.pool / victim.name, how, rng)
        rc, output = cm.try_mount()
        if rc != 0:
            assert_clean_refusal(rc, output, str(cm.pool))
            assert not is_mounted(cm.mnt)
            outcomes.append(f"{victim.name}: refused")
            continue
        assert is_mounted(cm.mnt), f"mount exited 0 without a mount:\n{output}"
        cm.last_pid = cm.daemon_pid()
        try:
            listing = sorted(os.listdir(cm.mnt))
        except OSError as exc:
            assert exc.errno == errno.EIO, f"{victim.name} damaged: listing failed with {exc}"
            listing = sorted(vols)
        assert listing == sorted(vols), f"{victim.name} damaged ({how}): volumes silently lost"
        eio = 0
        for name, data in vols.items():
            try:
                got = read_file(cm.mnt / name)
            except OSError as exc:
                assert exc.errno == errno.EIO, (
                    f"{victim.name} damaged: reading {name} failed with {exc}")
                eio += 1
                continue
            assert got == data, f"{victim.name} damaged ({how}): {name} reads wrong bytes, not EIO"
        cm.umount()
        outcomes.append(f"{victim.name}: mounted, {eio} of {len(vols)} volumes read EIO")
    log.info("damaged pool files (%s): %s", how, "; ".join(outcomes))
