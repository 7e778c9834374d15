"""Clones through a real mount, with plain shell tools.

The contract rows ``echo "clone vm1.img@snap vm3.img" > MOUNT/.clones/ctl``
(and from the live volume), ``clone-group`` with ``--prefix``/``--suffix``,
``cat MOUNT/.clones/vm3.img``; clones as volumes with their own life
(deleting the source volume or snapshot never breaks them), clones of clones
many levels deep, and snapshots of a deleted volume cloned into a new disk.
"""

from __future__ import annotations

import calendar
import json
import os
import time
from pathlib import Path

import pytest

from helpers_mount import MIB, CowfsMount, read_file, run, write_file
from test_mount_snapshots import (CLONES, SNAPS, assert_content, ctl_ok, echo_ctl, fill,
                                  mount_state, q, sh, snapshot_names, volume_with_data, xattrs)

pytestmark = pytest.mark.mount


def clone_status(mnt: Path, name: str) -> dict:
    """``cat MOUNT/.clones/NAME`` parsed; its size as stat reports it must be
    the length of what cat prints."""
    out = run(["cat", mnt / CLONES / name], check=True).stdout
    assert out.endswith("\n") and out.count("\n") == 1, f".clones/{name}: {out!r}"
    assert os.stat(mnt / CLONES / name).st_size == len(out.encode()), (
        f".clones/{name}: stat size {os.stat(mnt / CLONES / name).st_size}, content {len(out)} bytes")
    return json.loads(out)


def test_clone_from_snapshot_and_live_volume(mounted: CowfsMount) -> None:
    """Proves: ``clone vm1.img@snap vm3.img`` makes ``MOUNT/vm3.img`` with the
    snapshot's bytes, ``clone vm1.img vm4.img`` one with the live bytes;
    both are writable without touching their sources; ``cat .clones/X``
    prints the status JSON (source, created, state, size, space figures
    that add up) and ``.clones`` lists clones only; ``user.cowfs.origin``
    names the source; ``--dry-run`` creates nothing."""
    mnt = mounted.mnt
    old = volume_with_data(mnt, "vm1.img", 8 * MIB, 1)
    assert echo_ctl(mnt, SNAPS, "snapshot before-upgrade vm1.img").returncode == 0
    live = bytearray(old)
    live[:MIB] = fill(mnt / "vm1.img", MIB, 2)

    r = echo_ctl(mnt, CLONES, "clone vm1.img@before-upgrade vm3.img")
    assert r.returncode == 0, r.stderr
    assert "vm3.img" in run(["ls", mnt], check=True).stdout.split()
    assert_content(mnt / "vm3.img", old, "clone of the snapshot")
    reply = ctl_ok(mnt, CLONES, "clone vm1.img vm4.img")
    assert reply == {"clones": [{"volume": "vm4.img", "source": "vm1.img"}], "dry_run": False}
    assert_content(mnt / "vm4.img", bytes(live), "clone of the live volume")

    write_file(mnt / "vm3.img", b"clone's own data", 0, fsync=True)
    write_file(mnt / "vm4.img", b"other clone's data", 5 * MIB, fsync=True)
    assert_content(mnt / "vm1.img", bytes(live), "source volume after writing its clones")
    assert_content(mnt / SNAPS / "vm1.img" / "before-upgrade", old, "source snapshot")
    assert read_file(mnt / "vm3.img", 0, 16) == b"clone's own data"

    status = clone_status(mnt, "vm3.img")
    assert set(status) == {"volume", "source", "created", "state", "size", "referenced_bytes",
                           "shared_bytes", "exclusive_bytes"}, status
    assert (status["volume"], status["source"], status["state"], status["size"]) == (
        "vm3.img", "vm1.img@before-upgrade", "ready", 8 * MIB)
    created = calendar.timegm(time.strptime(status["created"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(created - time.time()) < 30, status
    assert status["referenced_bytes"] == status["shared_bytes"] + status["exclusive_bytes"]
    assert 0 < status["exclusive_bytes"] <= 2 * 128 * 1024, status   # one rewritten block or so
    assert status["shared_bytes"] >= MIB - 128 * 1024, status
    assert clone_status(mnt, "vm4.img")["source"] == "vm1.img"
    assert sorted(os.listdir(mnt / CLONES)) == ["ctl", "vm3.img", "vm4.img"]
    assert xattrs(mnt / "vm3.img")["user.cowfs.origin"] == "vm1.img@before-upgrade"
    assert "user.cowfs.origin" not in xattrs(mnt / "vm1.img")

    before = mount_state(mnt)
    reply = ctl_ok(mnt, CLONES, "clone --dry-run vm1.img@before-upgrade vm5.img")
    assert reply == {"clones": [{"volume": "vm5.img", "source": "vm1.img@before-upgrade"}],
                     "dry_run": True}, reply
    assert mount_state(mnt) == before, "clone --dry-run changed something"

    mounted.remount()
    assert clone_status(mnt, "vm3.img")["source"] == "vm1.img@before-upgrade"
    assert read_file(mnt / "vm3.img", 0, 16) == b"clone's own data"


def test_clone_group(mounted: CowfsMount) -> None:
    """Proves: ``clone-group SNAP --prefix clone- vm1.img vm2.img`` makes
    ``clone-vm1.img`` and ``clone-vm2.img`` from that snapshot at one
    instant; ``--suffix`` and both together work; ``--dry-run`` creates
    nothing."""
    mnt = mounted.mnt
    data = {v: volume_with_data(mnt, v, 4 * MIB, i) for i, v in enumerate(("vm1.img", "vm2.img"))}
    assert echo_ctl(mnt, SNAPS, "snapshot before-upgrade vm1.img vm2.img").returncode == 0
    for v in data:
        fill(mnt / v, MIB, 99)
    r = echo_ctl(mnt, CLONES, "clone-group before-upgrade --prefix clone- vm1.img vm2.img")
    assert r.returncode == 0, r.stderr
    for v in data:
        assert_content(mnt / f"clone-{v}", data[v], f"clone-{v}")
    s1, s2 = clone_status(mnt, "clone-vm1.img"), clone_status(mnt, "clone-vm2.img")
    assert (s1["source"], s2["source"]) == ("vm1.img@before-upgrade", "vm2.img@before-upgrade")
    assert s1["created"] == s2["created"]
    reply = ctl_ok(mnt, CLONES, "clone-group before-upgrade vm1.img --suffix .test vm2.img")
    assert [c["volume"] for c in reply["clones"]] == ["vm1.img.test", "vm2.img.test"], reply
    assert_content(mnt / "vm2.img.test", data["vm2.img"], "suffix clone")
    ctl_ok(mnt, CLONES, "clone-group before-upgrade --prefix a- --suffix .b vm1.img")
    assert_content(mnt / "a-vm1.img.b", data["vm1.img"], "prefix+suffix clone")
    before = mount_state(mnt)
    reply = ctl_ok(mnt, CLONES, "clone-group before-upgrade --prefix dry- vm1.img vm2.img --dry-run")
    assert reply["dry_run"] is True and len(reply["clones"]) == 2
    assert mount_state(mnt) == before, "clone-group --dry-run changed something"


def test_clones_outlive_their_sources(mounted: CowfsMount) -> None:
    """Proves: deleting the source volume and then its snapshot never breaks
    a clone of either; the snapshot directory of the deleted volume goes
    away with its last snapshot; all of it holds after a remount, and the
    clones' space figures count what they share with each other."""
    mnt = mounted.mnt
    old = volume_with_data(mnt, "vm1.img", 8 * MIB, 5)
    assert sh(f"touch {q(mnt / SNAPS / 'vm1.img' / 'gold')}").returncode == 0
    live = bytearray(old)
    live[2 * MIB:3 * MIB] = fill(mnt / "vm1.img", MIB, 6, at=2 * MIB)
    assert echo_ctl(mnt, CLONES, "clone vm1.img@gold from-snap.img").returncode == 0
    assert echo_ctl(mnt, CLONES, "clone vm1.img from-live.img").returncode == 0
    assert sh(f"rm {q(mnt / 'vm1.img')}").returncode == 0
    assert_content(mnt / "from-snap.img", old, "clone of a snapshot after rm of its volume")
    assert snapshot_names(mnt, "vm1.img") == ["gold"], "snapshots of a deleted volume must stay"
    assert sh(f"rm {q(mnt / SNAPS / 'vm1.img' / 'gold')}").returncode == 0
    assert "vm1.img" not in os.listdir(mnt / SNAPS)
    assert_content(mnt / "from-snap.img", old, "clone after rm of its snapshot")
    assert_content(mnt / "from-live.img", bytes(live), "live clone after rm of its source")
    mounted.remount()
    assert_content(mnt / "from-snap.img", old, "clone after remount")
    assert_content(mnt / "from-live.img", bytes(live), "live clone after remount")
    # What only the live clone holds is its own; the rest the two share.
    snap_status, live_status = clone_status(mnt, "from-snap.img"), clone_status(mnt, "from-live.img")
    assert (snap_status["referenced_bytes"], snap_status["exclusive_bytes"]) == (MIB, 0), snap_status
    assert (live_status["referenced_bytes"], live_status["exclusive_bytes"]) == (2 * MIB, MIB), live_status


def _timed_read(path: Path) -> float:
    """Seconds to read ``path`` once from the daemon (page cache dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.monotonic()
        while os.read(fd, 1 << 20):
            pass
        return time.monotonic() - start
    finally:
        os.close(fd)


def test_clones_of_clones_deep(mounted: CowfsMount) -> None:
    """Proves: clones of clones 16 levels deep (each from the live previous
    one, each then written) read exactly their own generation's bytes, also
    after some ancestors are deleted and after a remount, and the deepest
    reads about as fast as the original (within 3x plus 0.5 s)."""
    mnt = mounted.mnt
    size = 16 * MIB
    run(["truncate", "-s", str(size), mnt / "gen0.img"], check=True)
    expect = {"gen0.img": bytearray(size)}
    expect["gen0.img"][:] = fill(mnt / "gen0.img", size, 7)
    for g in range(1, 17):
        parent, name = f"gen{g - 1}.img", f"gen{g}.img"
        assert echo_ctl(mnt, CLONES, f"clone {parent} {name}").returncode == 0
        mark = f"generation {g} ".encode() * 300
        write_file(mnt / name, mark, g * 65536 + g, fsync=True)
        buf = bytearray(expect[parent])
        buf[g * 65536 + g:g * 65536 + g + len(mark)] = mark
        expect[name] = buf
    for g in (0, 3, 8, 15):
        assert sh(f"rm {q(mnt / f'gen{g}.img')}").returncode == 0
        del expect[f"gen{g}.img"]
    mounted.remount()
    for name, want in expect.items():
        assert_content(mnt / name, bytes(want), f"clone {name}")
    assert clone_status(mnt, "gen16.img")["source"] == "gen15.img"
    base = min(_timed_read(mnt / "gen1.img") for _ in range(2))
    deep = min(_timed_read(mnt / "gen16.img") for _ in range(2))
    assert deep <= 3 * base + 0.5, f"16-deep clone read in {deep:.2f}s, first clone {base:.2f}s"


def test_snapshots_of_deleted_volume_restore_into_new_disk(mounted: CowfsMount) -> None:
    """Proves: after ``rm`` of a volume its snapshots stay in
    ``.snapshots/<name>/``, readable; ``clone vm1.img@s1 back.img`` brings
    one back as a new volume; a new volume of the old name sees the old
    snapshots and can be restored from them."""
    mnt = mounted.mnt
    first = volume_with_data(mnt, "vm1.img", 4 * MIB, 8)
    assert echo_ctl(mnt, SNAPS, "snapshot s1 vm1.img").returncode == 0
    second = bytearray(first)
    second[:MIB] = fill(mnt / "vm1.img", MIB, 9)
    assert echo_ctl(mnt, SNAPS, "snapshot s2 vm1.img").returncode == 0
    assert sh(f"rm {q(mnt / 'vm1.img')}").returncode == 0
    assert "vm1.img" not in os.listdir(mnt)
    assert "vm1.img" in os.listdir(mnt / SNAPS)
    assert snapshot_names(mnt, "vm1.img") == ["s1", "s2"]
    assert_content(mnt / SNAPS / "vm1.img" / "s1", first, "snapshot of a deleted volume")
    assert echo_ctl(mnt, CLONES, "clone vm1.img@s1 back.img").returncode == 0
    assert_content(mnt / "back.img", first, "volume cloned from a deleted volume's snapshot")
    run(["truncate", "-s", "1M", mnt / "vm1.img"], check=True)
    assert snapshot_names(mnt, "vm1.img") == ["s1", "s2"]
    assert echo_ctl(mnt, SNAPS, "restore s2 vm1.img").returncode == 0
    assert_content(mnt / "vm1.img", bytes(second), "new volume restored from an old snapshot")
