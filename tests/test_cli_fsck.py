"""``cowfs fsck POOL_DIR [--repair] [--json]`` on real pools made and used
through a real mount: e2fsck's exit codes (0 clean, 1 all fixed, 4 problems
left, 8 operational error), human and JSON reports naming what is wrong.

Damage is made while the pool is unmounted: a bit flipped in a stored data
block (as in ``test_mount_scrub.py``), reference counts changed through the
engine in this process and written with a checkpoint (a leaked used unit, a
leaked free unit, an under-counted unit), both superblock slots damaged.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from cowfs.blockio import OsStorage
from cowfs.pool import Pool
from helpers_mount import MIB, CowfsMount, read_file, write_file
from test_mount_scrub import (BLOCK, TARGET_OFFSET, flip_bit_in_stored_target,
                              volume_with_target)
from test_mount_snapshots import CLONES, SNAPS, ctl_ok

pytestmark = pytest.mark.mount


def fsck(m: CowfsMount, *args: str, pool: Path | None = None,
         code: int) -> subprocess.CompletedProcess[str]:
    """``cowfs fsck POOL ARGS``: must exit ``code``, never with a traceback."""
    proc = m.cli("fsck", str(pool or m.pool), *args, timeout=300)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert proc.returncode == code, f"cowfs fsck {' '.join(args)}: exit {proc.returncode}, " \
                                    f"wanted {code}:\n{out}"
    return proc


def fsck_json(m: CowfsMount, *args: str, pool: Path | None = None, code: int) -> dict:
    """``cowfs fsck POOL ARGS --json``: must exit ``code``; its JSON report."""
    doc = json.loads(fsck(m, *args, "--json", pool=pool, code=code).stdout)
    assert doc["exit_code"] == code, doc
    return doc


def used_pool(make_cowfs: Callable[..., CowfsMount]) -> tuple[CowfsMount, dict[str, bytes]]:
    """A pool with compressed and incompressible volumes, overwritten data,
    a snapshot and a clone; unmounted.  Returns it and each volume's content."""
    m = make_cowfs()
    rng = random.Random(11)
    data = {"vm1.img": rng.randbytes(4 * MIB),
            "text.img": b"".join(b"line %08d of a compressible volume\n" % i
                                 for i in range(100_000))}
    for name, content in data.items():
        write_file(m.mnt / name, content, fsync=True)
    (m.mnt / SNAPS / "vm1.img" / "before").touch()
    patch = rng.randbytes(MIB)
    write_file(m.mnt / "vm1.img", patch, offset=MIB, fsync=True)
    data["vm1.img"] = data["vm1.img"][:MIB] + patch + data["vm1.img"][2 * MIB:]
    ctl_ok(m.mnt, CLONES, "clone vm1.img@before vm3.img")
    write_file(m.mnt / "vm3.img", b"x" * 10_000, offset=3 * MIB, fsync=True)
    m.umount()
    return m, data


def test_clean_pool(make_cowfs: Callable[..., CowfsMount]) -> None:
    """Proves: a used pool (volumes, overwrites, snapshot, clone) is clean:
    exit 0, the human report says so, ``--json`` parses and lists no
    finding; ``--repair`` on a clean pool changes nothing and exits 0."""
    m, data = used_pool(make_cowfs)
    proc = fsck(m, code=0)
    assert "is clean" in proc.stdout and str(m.pool) in proc.stdout, proc.stdout
    doc = fsck_json(m, code=0)
    assert doc["clean"] is True and doc["findings"] == [], doc
    assert doc["blocks_checked"] > 0 and doc["nodes_checked"] > 0, doc
    fsck(m, "--repair", code=0)
    m.mount()
    for name, content in data.items():
        assert read_file(m.mnt / name) == content, f"{name} changed by fsck --repair"


def test_operational_errors(make_cowfs: Callable[..., CowfsMount], tmp_path: Path) -> None:
    """Proves: exit 8, with a message naming the pool and the cause, for a
    mounted pool (EBUSY, where it is mounted, how to unmount or scrub), a
    missing directory and a file given as the pool; ``--json`` still
    prints a report with the error."""
    m = make_cowfs()
    proc = fsck(m, code=8)
    for word in ("EBUSY", "mounted", str(m.mnt), "umount", "cowfs scrub"):
        assert word in proc.stderr, f"{word!r} missing from: {proc.stderr}"
    doc = fsck_json(m, code=8)
    assert "EBUSY" in doc["error"] and doc["pool"] == str(m.pool), doc
    missing = tmp_path / "no-such-pool"
    proc = fsck(m, pool=missing, code=8)
    assert str(missing) in proc.stderr and "does not exist" in proc.stderr, proc.stderr
    assert not missing.exists(), "fsck created the directory it was asked to check"
    a_file = tmp_path / "plain-file"
    a_file.write_bytes(b"not a pool")
    proc = fsck(m, pool=a_file, code=8)
    assert "not a directory" in proc.stderr, proc.stderr


def test_bit_flip_named_and_not_repairable(make_cowfs: Callable[..., CowfsMount]) -> None:
    """Proves: a bit flipped in a stored data block shared by a volume and
    its snapshot makes fsck exit 4 naming both, with the byte offset, in
    the human and JSON reports; ``--repair`` cannot fix it (exit 4 again)
    and leaves the other volume's data intact."""
    m = make_cowfs(mkfs_args=("--no-compression",))
    volume_with_target(m.mnt, "vm1.img", 4 * MIB, seed=21)
    other = random.Random(22).randbytes(MIB)
    write_file(m.mnt / "vm2.img", other, fsync=True)
    (m.mnt / SNAPS / "vm1.img" / "before").touch()
    m.umount()
    flip_bit_in_stored_target(m.pool)

    proc = fsck(m, code=4)
    for word in ("vm1.img", "vm1.img@before", str(TARGET_OFFSET), "bad-block"):
        assert word in proc.stdout, f"{word!r} missing from:\n{proc.stdout}"
    assert "vm2.img" not in proc.stdout
    doc = fsck_json(m, code=4)
    bad = {(f["object"], f["offset"]) for f in doc["findings"] if f["kind"] == "bad-block"}
    assert bad == {("vm1.img", TARGET_OFFSET), ("vm1.img@before", TARGET_OFFSET)}, doc
    assert all(f["kind"] == "bad-block" for f in doc["findings"]), doc
    doc = fsck_json(m, "--repair", code=4)
    assert not any(f["fixed"] for f in doc["findings"]), doc
    m.mount()
    assert read_file(m.mnt / "vm2.img") == other


def tamper_counts(pool_dir: Path) -> dict[str, int]:
    """Through the engine: count one reference too many on a used data unit
    and on a free one (leaks) and one too few on another used unit, then
    checkpoint.  Returns the units changed."""
    pool = Pool.open(OsStorage(str(pool_dir)))
    try:
        table = pool.drc
        used = [u for u in range(len(table)) if table.count(u) == 1]
        free = [u for u in range(len(table)) if table.rc[u] == 0]
        assert len(used) >= 2 and free, "the pool has no used and free data units to tamper with"
        units = {"overcounted": used[0], "undercounted": used[-1], "free": free[0]}
        table.incref(units["overcounted"])
        table.incref(units["free"])
        table.decref(units["undercounted"])
        pool.checkpoint()
    finally:
        pool.close()
    return units


def test_wrong_counts_repaired(make_cowfs: Callable[..., CowfsMount]) -> None:
    """Proves: leaked data units and an under-counted one (made by editing
    the pool's reference counts through the engine) make fsck exit 4 naming
    each unit; ``--repair`` exits 1 reporting them fixed; a second fsck
    exits 0; every volume still reads back as written."""
    m, data = used_pool(make_cowfs)
    units = tamper_counts(m.pool)

    proc = fsck(m, code=4)
    for unit in units.values():
        assert f"data unit {unit}" in proc.stdout, f"data unit {unit} not named:\n{proc.stdout}"
    assert "--repair" in proc.stdout, proc.stdout
    doc = fsck_json(m, code=4)
    found = {f["object"]: f["kind"] for f in doc["findings"]}
    assert found == {f"data unit {units['overcounted']}": "leak",
                     f"data unit {units['free']}": "leak",
                     f"data unit {units['undercounted']}": "refcount"}, doc
    doc = fsck_json(m, "--repair", code=1)
    assert doc["findings"] and all(f["fixed"] for f in doc["findings"]), doc
    proc = fsck(m, code=0)
    assert "is clean" in proc.stdout
    m.mount()
    for name, content in data.items():
        assert read_file(m.mnt / name) == content, f"{name} differs after fsck --repair"
    assert read_file(m.mnt / SNAPS / "vm1.img" / "before", 0, MIB) == data["vm1.img"][:MIB]


def test_damaged_superblock(make_cowfs: Callable[..., CowfsMount]) -> None:
    """Proves: with both superblock slots damaged fsck exits 4 with a
    message saying the superblock copies are damaged (human and JSON), and
    ``--repair`` does not pretend to fix it."""
    m = make_cowfs()
    write_file(m.mnt / "vm1.img", b"data" * 4096, fsync=True)
    m.umount()
    fd = os.open(m.pool / "superblock", os.O_RDWR)
    try:
        for slot in (0, 1):
            at = slot * BLOCK + 40
            os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0xFF]), at)
    finally:
        os.close(fd)
    proc = fsck(m, code=4)
    assert "superblock" in proc.stdout and str(m.pool) in proc.stdout, proc.stdout
    doc = fsck_json(m, code=4)
    assert len(doc["findings"]) == 1 and "superblock" in doc["findings"][0]["message"], doc
    doc = fsck_json(m, "--repair", code=4)
    assert not doc["findings"][0]["fixed"]


def test_damaged_lineage_named_and_not_repaired(make_cowfs: Callable[..., CowfsMount]) -> None:
    """Proves: a clone whose record of its source is damaged and a snapshot
    with an invalid name (written into a checkpoint through the engine) make
    fsck exit 4 with one ``lineage`` finding for each, naming the clone and
    the snapshot; ``--repair`` leaves them (exit 4: nothing it may fix)."""
    m, _ = used_pool(make_cowfs)
    pool = Pool.open(OsStorage(str(m.pool)))
    try:
        pool.by_name["vm3.img"].origin = {"source": 42, "created": "yesterday"}
        snap = pool.snaps.pop(("vm1.img", "before"))
        snap.name = "bad@name"
        pool.snaps[("vm1.img", snap.name)] = snap
        pool.checkpoint()
    finally:
        pool.close()
    doc = fsck_json(m, code=4)
    lineage = sorted(f["object"] for f in doc["findings"] if f["kind"] == "lineage")
    assert lineage == ["vm1.img@bad@name", "vm3.img"], doc
    assert all(f["kind"] == "lineage" for f in doc["findings"]), doc
    doc = fsck_json(m, "--repair", code=4)
    assert not any(f["fixed"] for f in doc["findings"]), doc
