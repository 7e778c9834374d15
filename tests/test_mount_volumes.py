"""Volumes as files through a real FUSE mount: creation, sizes, sparse
allocation, byte-exact I/O at any offset, truncation, rename, removal, capacity
figures, and persistence of all of it across umount/mount."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path
from typing import Callable

import pytest

from helpers_mount import (
    GIB,
    MIB,
    CowfsMount,
    drop_page_cache,
    first_difference,
    read_file,
    run,
    wait_until,
    write_file,
)

pytestmark = pytest.mark.mount


def allocated(path: Path) -> int:
    """Bytes allocated to ``path`` as st_blocks reports them."""
    return os.stat(path).st_blocks * 512


def settled_allocated(path: Path, pred: Callable[[int], bool]) -> int:
    """st_blocks in bytes once ``pred`` accepts it, or after 3 s: the kernel
    may serve attributes from its cache for up to the daemon's attr timeout."""
    wait_until(lambda: pred(allocated(path)), 3.0, 0.1)
    return allocated(path)


def assert_zeros(path: Path, start: int, end: int) -> None:
    """Bytes ``start``..``end`` of ``path`` read as zeros."""
    with open(path, "rb") as fh:
        fh.seek(start)
        pos = start
        while pos < end:
            chunk = fh.read(min(4 * MIB, end - pos))
            assert chunk, f"{path.name}: unexpected EOF at {pos}, expected zeros up to {end}"
            if chunk.count(0) != len(chunk):
                bad = pos + next(i for i, b in enumerate(chunk) if b)
                raise AssertionError(f"{path.name}: byte {bad} is not zero (range {start}..{end})")
            pos += len(chunk)


def ls_sizes(directory: Path) -> dict[str, int]:
    """Name -> size as ``ls -l`` prints them."""
    out = run(["ls", "-l", directory], check=True).stdout
    sizes = {}
    for line in out.splitlines()[1:]:  # the first line is "total N"
        fields = line.split(None, 8)
        sizes[fields[8]] = int(fields[4])
    return sizes


def test_truncate_makes_sparse_20g_volume(mounted: CowfsMount) -> None:
    """``truncate -s 20G`` makes a 20 GiB regular file that occupies almost
    nothing (st_blocks, du) and reads zeros; writing 8 MiB grows st_blocks by
    those 8 MiB; size, content and allocation survive a remount."""
    vol = mounted.mnt / "vm1.img"
    run(["truncate", "-s", "20G", vol], check=True)
    st = os.stat(vol)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == 20 * GIB
    assert st.st_blocks * 512 <= MIB, f"a fresh sparse volume has st_blocks={st.st_blocks}"
    assert ls_sizes(mounted.mnt) == {"vm1.img": 20 * GIB}
    du = int(run(["du", "-B1", vol], check=True).stdout.split()[0])
    assert du <= MIB, f"du says {du} bytes for an empty sparse volume"
    assert read_file(vol, 10 * GIB, MIB) == bytes(MIB)
    assert read_file(vol, 20 * GIB - 4096, 8192) == bytes(4096), "reading across the end"
    assert read_file(vol, 20 * GIB, 4096) == b""

    before = allocated(vol)
    data = os.urandom(8 * MIB)
    write_file(vol, data, offset=5 * GIB, fsync=True)
    after = settled_allocated(vol, lambda a: a - before >= 8 * MIB)
    grown = after - before
    assert 8 * MIB <= grown <= 8 * MIB + 8 * MIB // 10, f"8 MiB written, st_blocks grew by {grown} bytes"
    du = int(run(["du", "-B1", vol], check=True).stdout.split()[0])
    assert 8 * MIB <= du <= 9 * MIB, f"du says {du} bytes after writing 8 MiB"
    assert os.stat(vol).st_size == 20 * GIB, "writing inside the volume changed its size"

    mounted.remount()
    assert os.stat(vol).st_size == 20 * GIB
    assert read_file(vol, 5 * GIB, 8 * MIB) == data
    assert read_file(vol, 5 * GIB - 4096, 4096) == bytes(4096)
    assert allocated(vol) == after, "allocation changed across a remount"


def test_create_and_ftruncate(mounted: CowfsMount) -> None:
    """open(O_CREAT|O_EXCL) makes a volume with the requested mode, a second
    O_EXCL fails with EEXIST, ftruncate sets the size, O_TRUNC empties it."""
    path = mounted.mnt / "new.img"
    old_umask = os.umask(0o022)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
    finally:
        os.umask(old_umask)
    try:
        st = os.fstat(fd)
        assert (stat.S_ISREG(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size) == (True, 0o640, 0)
        os.ftruncate(fd, 3 * MIB + 5)
        assert os.fstat(fd).st_size == 3 * MIB + 5
        data = os.urandom(10_000)
        assert os.pwrite(fd, data, MIB - 7) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
    assert os.stat(path).st_size == 3 * MIB + 5

    mounted.remount()
    st = os.stat(path)
    assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o640, 3 * MIB + 5)
    assert read_file(path, MIB - 7, len(data)) == data
    assert read_file(path, 0, MIB - 7) == bytes(MIB - 7)

    os.close(os.open(path, os.O_RDWR | os.O_TRUNC))
    assert os.stat(path).st_size == 0
    assert read_file(path) == b""
    mounted.remount()
    assert os.stat(path).st_size == 0


def random_payload(rng: random.Random, length: int) -> bytes:
    """``length`` bytes that are random, or compressible (a repeated motif,
    or mostly zeros with a few random bytes), so both paths of a compressing
    store get exercised."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randbytes(length)
    if kind == 1:
        motif = rng.randbytes(rng.randint(1, 100))
        return (motif * (length // len(motif) + 1))[:length]
    data = bytearray(length)
    for _ in range(max(1, length // 1000)):
        data[rng.randrange(length)] = rng.randrange(1, 256)
    return bytes(data)


@pytest.mark.parametrize("compression", [True, False], ids=["lz4", "no-compression"])
def test_random_io_matches_model(make_cowfs: Callable[..., CowfsMount], compression: bool) -> None:
    """400 random reads and writes at aligned and unaligned offsets and
    lengths (some extending the file), of random and compressible data, agree
    byte for byte with an in-memory model, also with the page cache dropped
    and after a remount."""
    mounted = make_cowfs(mkfs_args=() if compression else ("--no-compression",))
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    path = mounted.mnt / "model.img"
    size = 16 * MIB
    model = bytearray(size)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.ftruncate(fd, size)
        for step in range(400):
            aligned = rng.random() < 0.5
            length = rng.choice([rng.randint(1, 600), 4096 * rng.randint(1, 8),
                                 rng.randint(1, 300_000)])
            if aligned:
                length = max(4096, length // 4096 * 4096)
                offset = 4096 * rng.randrange((len(model) + 65536) // 4096)
            else:
                offset = rng.randrange(len(model) + 65536)
            if rng.random() < 0.6:
                data = random_payload(rng, length)
                assert os.pwrite(fd, data, offset) == length
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset:offset + length] = data
            else:
                got = os.pread(fd, length, offset)
                want = bytes(model[offset:offset + length])
                assert got == want, (
                    f"seed {seed} step {step}: read {length}@{offset} differs at "
                    f"+{first_difference(got, want)}")
            if step % 100 == 99:
                drop_page_cache(path)
                assert os.fstat(fd).st_size == len(model)
                got = os.pread(fd, len(model), 0)
                assert got == model, f"seed {seed}: content differs at {first_difference(got, model)}"
    finally:
        os.close(fd)
    mounted.remount()
    assert os.stat(path).st_size == len(model)
    got = read_file(path)
    assert got == model, f"seed {seed}: after remount content differs at {first_difference(got, model)}"


def test_grow_reads_zeros(mounted: CowfsMount) -> None:
    """Growing a volume with truncate adds zeros after the old end, which is
    unaligned; old content stays; the same after dropping caches and remount."""
    path = mounted.mnt / "grow.img"
    data = os.urandom(MIB + 77)
    write_file(path, data, fsync=True)
    os.truncate(path, 64 * MIB)
    for phase in ("live", "remounted"):
        if phase == "remounted":
            mounted.remount()
        assert os.stat(path).st_size == 64 * MIB, phase
        assert read_file(path, 0, len(data)) == data, phase
        assert_zeros(path, len(data), 64 * MIB)


@pytest.mark.parametrize("cut", [MIB + 1000, 2 * MIB, 0])
def test_shrink_then_grow_reads_zeros(mounted: CowfsMount, cut: int) -> None:
    """Shrinking to ``cut`` (mid-block, block-aligned, empty) then growing
    again reads zeros past ``cut``: the old bytes there are gone for good,
    including the tail of a partly cut block."""
    path = mounted.mnt / "shrink.img"
    data = os.urandom(4 * MIB)
    write_file(path, data, fsync=True)
    os.truncate(path, cut)
    assert os.stat(path).st_size == cut
    os.truncate(path, 8 * MIB)
    drop_page_cache(path)
    for phase in ("live", "remounted"):
        if phase == "remounted":
            mounted.remount()
        assert os.stat(path).st_size == 8 * MIB, phase
        assert read_file(path, 0, cut) == data[:cut], phase
        assert_zeros(path, cut, 8 * MIB)


def test_rm_mv_ls(mounted: CowfsMount) -> None:
    """rename, mv over an existing volume, rm, and ls -l sizes behave like
    a plain directory of files, and the result persists."""
    a, b = os.urandom(100_000), os.urandom(5000)
    write_file(mounted.mnt / "a.img", a)
    write_file(mounted.mnt / "b.img", b)
    run(["truncate", "-s", "1G", mounted.mnt / "c.img"], check=True)
    assert ls_sizes(mounted.mnt) == {"a.img": 100_000, "b.img": 5000, "c.img": GIB}

    os.rename(mounted.mnt / "a.img", mounted.mnt / "d.img")
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.mnt / "a.img")
    assert read_file(mounted.mnt / "d.img") == a

    run(["mv", mounted.mnt / "d.img", mounted.mnt / "b.img"], check=True)
    assert sorted(os.listdir(mounted.mnt)) == ["b.img", "c.img"]
    assert read_file(mounted.mnt / "b.img") == a, "mv over an existing volume kept the old content"

    run(["rm", mounted.mnt / "c.img"], check=True)
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.mnt / "c.img")
    assert ls_sizes(mounted.mnt) == {"b.img": 100_000}

    mounted.remount()
    assert ls_sizes(mounted.mnt) == {"b.img": 100_000}
    assert read_file(mounted.mnt / "b.img") == a


def test_zero_blocks_take_no_space(mounted: CowfsMount) -> None:
    """Whole blocks written as zeros allocate nothing (st_blocks does not
    grow) and read back as zeros; random data does allocate (the control)."""
    path = mounted.mnt / "zeros.img"
    run(["truncate", "-s", "64M", path], check=True)
    base = allocated(path)
    fd = os.open(path, os.O_RDWR)
    try:
        for off in range(0, 16 * MIB, MIB):
            os.pwrite(fd, bytes(MIB), off)
        os.fsync(fd)
        after_zeros = settled_allocated(path, lambda a: a > base + 64 * 1024)
        assert after_zeros <= base + 64 * 1024, (
            f"16 MiB of zeros grew st_blocks by {after_zeros - base} bytes")

        noise = os.urandom(4 * MIB)
        os.pwrite(fd, noise, 32 * MIB)
        os.fsync(fd)
        after_noise = settled_allocated(path, lambda a: a >= after_zeros + 4 * MIB)
        assert after_noise >= after_zeros + 4 * MIB, "st_blocks does not count written data"

        os.pwrite(fd, bytes(4 * MIB), 32 * MIB)
        os.fsync(fd)
        after_rezero = settled_allocated(path, lambda a: a < after_noise)
        assert after_rezero <= after_noise, "overwriting data with zeros grew st_blocks"
    finally:
        os.close(fd)
    mounted.remount()
    assert_zeros(path, 0, 64 * MIB)
    assert allocated(path) <= after_noise


def test_metadata_persists(mounted: CowfsMount) -> None:
    """Size, mode, owner, mtime and content of several volumes are the same
    after umount/mount."""
    vols = {f"v{i}.img": os.urandom(random.randint(1, 2 * MIB)) for i in range(4)}
    for name, data in vols.items():
        write_file(mounted.mnt / name, data)
    os.chmod(mounted.mnt / "v0.img", 0o600)
    os.chown(mounted.mnt / "v1.img", 1234, 5678)
    mtime_ns = 1_600_000_000_123_456_789
    os.utime(mounted.mnt / "v2.img", ns=(mtime_ns, mtime_ns))
    run(["truncate", "-s", "5G", mounted.mnt / "v3.img"], check=True)
    before = {name: os.stat(mounted.mnt / name) for name in vols}

    mounted.remount()
    assert sorted(os.listdir(mounted.mnt)) == sorted(vols)
    for name, data in vols.items():
        st, old = os.stat(mounted.mnt / name), before[name]
        assert (st.st_size, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) == (
            old.st_size, old.st_mode, old.st_uid, old.st_gid, old.st_mtime_ns), name
        assert read_file(mounted.mnt / name, 0, len(data)) == data, name
    assert stat.S_IMODE(os.stat(mounted.mnt / "v0.img").st_mode) == 0o600
    assert (os.stat(mounted.mnt / "v1.img").st_uid, os.stat(mounted.mnt / "v1.img").st_gid) == (1234, 5678)
    assert os.stat(mounted.mnt / "v2.img").st_mtime_ns == mtime_ns
    assert os.stat(mounted.mnt / "v3.img").st_size == 5 * GIB


def test_statvfs_and_df(make_cowfs: Callable[..., CowfsMount],
                        make_small_fs: Callable[[int], Path]) -> None:
    """statvfs/df on the mount are sane (total >= free > 0, total not above
    the file system underneath) and free space shrinks by about what was
    written when the data is incompressible.  The pool sits on a private
    256 MiB file system so that other activity on the host cannot move the
    figures."""
    fs = make_small_fs(256 * MIB)
    cm = make_cowfs(pool=fs / "pool")
    st = os.statvfs(cm.mnt)
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    assert st.f_frsize > 0 and st.f_bsize > 0
    assert total >= free > 0, f"statvfs: total {total}, free {free}"
    host = os.statvfs(fs)
    assert total <= host.f_blocks * host.f_frsize, "the pool claims more space than its file system has"
    assert free >= 128 * MIB, f"a fresh pool on a 256 MiB file system has only {free} bytes free"

    df = run(["df", "-B1", "--output=size,avail,target", cm.mnt], check=True).stdout.splitlines()
    size_s, avail_s, target = df[-1].split()
    assert target == str(cm.mnt)
    assert int(size_s) == total

    data = os.urandom(48 * MIB)
    write_file(cm.mnt / "fill.img", data, fsync=True)
    later = os.statvfs(cm.mnt)
    free_after = later.f_bavail * later.f_frsize
    assert free_after <= free - 40 * MIB, (
        f"free went from {free} to {free_after} after writing 48 MiB of random data")
    assert later.f_blocks * later.f_frsize >= free_after > 0


def test_many_volumes_listing(mounted: CowfsMount) -> None:
    """600 volumes with names of 1-200 bytes list completely and exactly
    (readdir continues across many reply buffers), also after deleting every
    other one while a directory listing is being read, and after a remount."""
    rng = random.Random(600)
    names: set[str] = set()
    while len(names) < 600:
        names.add("v" + "".join(rng.choice("abcdefghij-_0123456789") for _ in range(rng.randint(0, 199))))
    for i, name in enumerate(sorted(names)):
        write_file(mounted.mnt / name, i.to_bytes(4, "big"))
    assert set(os.listdir(mounted.mnt)) == names
    assert len(run(["ls", "-1", mounted.mnt], check=True).stdout.splitlines()) == 600

    doomed = set(sorted(names)[::2])
    with os.scandir(mounted.mnt) as it:
        first = next(it).name
        for name in doomed:
            os.unlink(mounted.mnt / name)
        seen = {first} | {entry.name for entry in it}
    # Entries removed during the listing may or may not show up; the others must.
    assert names - doomed <= seen <= names
    kept = names - doomed
    assert set(os.listdir(mounted.mnt)) == kept
    mounted.remount()
    assert set(os.listdir(mounted.mnt)) == kept
    for i, name in enumerate(sorted(names)):
        if name in kept:
            assert read_file(mounted.mnt / name) == i.to_bytes(4, "big"), name
