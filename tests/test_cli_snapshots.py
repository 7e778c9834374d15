"""The snapshot, restore and clone rows of the contract through the ``cowfs``
CLI on a real mount: human output, ``--json``, exit codes, messages that name
the object, the cause and what to do (a restore refused because of a loop
device names the device and ``--force``), the loop-device flush before a
snapshot or clone of a live volume, and export/import round trips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers_mount import (MIB, CowfsMount, assert_clean_refusal, loop_attach, loop_detach,
                           read_file, run)
from test_mount_snapshots import (CLONES, SNAPS, assert_content, ctl_ok, fill, mount_state,
                                  snapshot_names, volume_with_data)

pytestmark = pytest.mark.mount


def cli_ok(m: CowfsMount, *args: str) -> str:
    """``cowfs ARGS`` must exit 0; returns stdout."""
    proc = m.cli(*args)
    assert proc.returncode == 0, (f"cowfs {' '.join(args)} exited {proc.returncode}:\n"
                                  f"{proc.stdout}{proc.stderr}")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def cli_json(m: CowfsMount, *args: str) -> dict:
    """``cowfs ARGS --json`` must exit 0 and print one JSON document."""
    return json.loads(cli_ok(m, *args, "--json"))


def cli_refused(m: CowfsMount, *args: str, mentions: tuple[str, ...] = (),
                code: int = 1) -> str:
    """``cowfs ARGS`` must exit ``code`` with a message naming ``mentions``
    and change nothing in the mount; returns the message."""
    before = mount_state(m.mnt)
    proc = m.cli(*args)
    out = proc.stdout + proc.stderr
    assert_clean_refusal(proc.returncode, out, *mentions)
    assert proc.returncode == code, f"cowfs {' '.join(args)}: exit {proc.returncode}, wanted {code}: {out}"
    assert mount_state(m.mnt) == before, f"cowfs {' '.join(args)} was refused but changed the mount"
    return out


def test_snapshot_list_delete_rename(mounted: CowfsMount) -> None:
    """Proves: ``cowfs snapshot`` of one volume, several and all (human and
    JSON output, one instant), ``--dry-run``; ``cowfs list`` (human table
    and JSON with space figures, per volume); ``delete`` and ``rename``;
    refusals exit 1 naming the object and what to do, bad names included."""
    m, mnt = mounted, mounted.mnt
    for i in (1, 2, 3):
        volume_with_data(mnt, f"vm{i}.img", 4 * MIB, i)
    out = cli_ok(m, "snapshot", str(mnt), "before-upgrade", "vm1.img")
    assert "before-upgrade" in out and "vm1.img" in out, out
    assert snapshot_names(mnt, "vm1.img") == ["before-upgrade"]
    doc = cli_json(m, "snapshot", str(mnt), "pair", "vm1.img", "vm2.img")
    assert (doc["snapshot"], doc["volumes"], doc["dry_run"]) == ("pair", ["vm1.img", "vm2.img"], False)
    doc = cli_json(m, "snapshot", str(mnt), "all")
    assert doc["volumes"] == ["vm1.img", "vm2.img", "vm3.img"], doc
    before = mount_state(mnt)
    doc = cli_json(m, "snapshot", str(mnt), "planned", "--dry-run")
    assert doc["dry_run"] is True and doc["volumes"] == ["vm1.img", "vm2.img", "vm3.img"]
    assert mount_state(mnt) == before, "snapshot --dry-run changed something"

    listed = cli_json(m, "list", str(mnt))["snapshots"]
    got = sorted((s["volume"], s["snapshot"]) for s in listed)
    assert got == sorted([("vm1.img", "before-upgrade"), ("vm1.img", "pair"), ("vm2.img", "pair"),
                          ("vm1.img", "all"), ("vm2.img", "all"), ("vm3.img", "all")]), got
    pair = [s for s in listed if s["snapshot"] == "pair"]
    assert pair[0]["created_ns"] == pair[1]["created_ns"], "group snapshot not at one instant"
    for s in listed:
        assert (s["size"], s["referenced"], s["exclusive"]) == (4 * MIB, MIB, 0), s
    table = cli_ok(m, "list", str(mnt), "vm1.img")
    assert "before-upgrade" in table and "vm2.img" not in table, table

    out = cli_ok(m, "rename", str(mnt), "vm1.img@before-upgrade", "old")
    assert "vm1.img@old" in out
    assert snapshot_names(mnt, "vm1.img") == ["all", "old", "pair"]
    out = cli_ok(m, "delete", str(mnt), "vm1.img@old")
    assert "vm1.img@old" in out
    assert snapshot_names(mnt, "vm1.img") == ["all", "pair"]

    cli_refused(m, "snapshot", str(mnt), "pair", "vm1.img", mentions=("pair", "vm1.img", "cowfs delete"))
    cli_refused(m, "snapshot", str(mnt), "x", "nope.img", mentions=("nope.img",))
    cli_refused(m, "snapshot", str(mnt), "a@b", "vm1.img", mentions=("a@b", "@"))
    cli_refused(m, "snapshot", str(mnt), "a/b", "vm1.img", mentions=("a/b",))
    cli_refused(m, "delete", str(mnt), "vm1.img@nope", mentions=("vm1.img@nope", "cowfs list"))
    cli_refused(m, "rename", str(mnt), "vm1.img@pair", "all", mentions=("all",))
    cli_refused(m, "list", str(mnt), "nope.img", mentions=("nope.img",))
    proc = m.cli("list", "/tmp")
    assert_clean_refusal(proc.returncode, proc.stdout + proc.stderr, "/tmp")


def test_restore_through_cli(mounted: CowfsMount, loop_devices: None) -> None:
    """Proves: ``cowfs restore`` restores and prints a working undo command;
    with a loop device attached it exits 1 naming the volume, the device and
    ``--force`` and changes nothing; ``--dry-run`` and ``--force`` work;
    ``--json`` reports the plan."""
    m, mnt = mounted, mounted.mnt
    old = volume_with_data(mnt, "vm1.img", 4 * MIB, 11)
    cli_ok(m, "snapshot", str(mnt), "s", "vm1.img")
    new = bytearray(old)
    new[:MIB] = fill(mnt / "vm1.img", MIB, 12)
    before = mount_state(mnt)
    doc = cli_json(m, "restore", str(mnt), "s", "vm1.img", "--dry-run")
    assert doc["dry_run"] is True and [r["volume"] for r in doc["restored"]] == ["vm1.img"]
    assert mount_state(mnt) == before, "restore --dry-run changed something"
    out = cli_ok(m, "restore", str(mnt), "s", "vm1.img")
    assert_content(mnt / "vm1.img", old, "volume restored by the CLI")
    undo_line = [line for line in out.splitlines() if line.startswith("to undo: ")]
    assert undo_line, f"no undo command printed:\n{out}"
    undo = run(["bash", "-c", undo_line[0][len("to undo: "):].replace("cowfs ", f"{m.bin} ", 1)])
    assert undo.returncode == 0, undo.stderr
    assert_content(mnt / "vm1.img", bytes(new), "volume after the printed undo command")

    dev = loop_attach(mnt / "vm1.img")
    try:
        msg = cli_refused(m, "restore", str(mnt), "s", "vm1.img",
                          mentions=("vm1.img", dev, "--force"))
        assert "Traceback" not in msg
        cli_refused(m, "restore", str(mnt), "s", mentions=(dev, "--force"))
        doc = cli_json(m, "restore", str(mnt), "s", "vm1.img", "--force")
        assert [r["volume"] for r in doc["restored"]] == ["vm1.img"]
        assert_content(mnt / "vm1.img", old, "volume after a forced restore")
        # The device does not serve stale bytes from its own cache either.
        assert run(["cmp", "-n", str(2 * MIB), dev, mnt / "vm1.img"]).returncode == 0
    finally:
        loop_detach(dev)
    cli_refused(m, "restore", str(mnt), "nope", mentions=("nope", "cowfs list"))


def test_clones_status_df(mounted: CowfsMount) -> None:
    """Proves: ``cowfs clone`` from a snapshot and from a live volume,
    ``clone-group`` with --prefix and --suffix (and a usage error without
    either), ``--dry-run``; ``cowfs status`` shows the lineage of a clone of
    a clone; ``cowfs df`` shows each volume's and snapshot's space and the
    freed space after a delete."""
    m, mnt = mounted, mounted.mnt
    data = {v: volume_with_data(mnt, v, 4 * MIB, i) for i, v in enumerate(("vm1.img", "vm2.img"))}
    cli_ok(m, "snapshot", str(mnt), "gold")
    out = cli_ok(m, "clone", str(mnt), "vm1.img@gold", "c1.img")
    assert "c1.img" in out
    assert_content(mnt / "c1.img", data["vm1.img"], "clone made by the CLI")
    doc = cli_json(m, "clone", str(mnt), "c1.img", "c2.img")
    assert doc["clones"] == [{"volume": "c2.img", "source": "c1.img"}], doc
    doc = cli_json(m, "clone-group", str(mnt), "gold", "vm1.img", "vm2.img", "--prefix", "p-")
    assert [c["volume"] for c in doc["clones"]] == ["p-vm1.img", "p-vm2.img"]
    cli_ok(m, "clone-group", str(mnt), "gold", "vm2.img", "--suffix", ".s")
    assert_content(mnt / "vm2.img.s", data["vm2.img"], "suffix clone by the CLI")
    cli_refused(m, "clone-group", str(mnt), "gold", "vm1.img", mentions=("--prefix",), code=2)
    cli_refused(m, "clone", str(mnt), "vm1.img@gold", "c1.img", mentions=("c1.img",))
    cli_refused(m, "clone", str(mnt), "vm1.img@nope", "c9.img", mentions=("nope",))
    before = mount_state(mnt)
    doc = cli_json(m, "clone", str(mnt), "vm1.img@gold", "dry.img", "--dry-run")
    assert doc["dry_run"] is True
    assert mount_state(mnt) == before, "clone --dry-run changed something"

    status = cli_json(m, "status", str(mnt), "c2.img")
    assert status["origin"] == "c1.img" and status["lineage"] == ["c1.img", "vm1.img@gold"], status
    table = cli_ok(m, "status", str(mnt))
    for name in ("c1.img", "c2.img", "p-vm1.img", "vm1.img@gold"):
        assert name in table, f"status does not show {name}:\n{table}"

    # vm1.img's rewritten MiB is its own; its snapshot shares the old one with the clones.
    fill(mnt / "vm1.img", MIB, 40, at=MIB)
    df = cli_json(m, "df", str(mnt))
    rows = {d["name"]: d for d in df["datasets"]}
    assert {"vm1.img", "vm1.img@gold", "c1.img", "vm2.img@gold"} <= set(rows), sorted(rows)
    assert rows["vm1.img"]["exclusive"] == MIB, rows["vm1.img"]
    assert (rows["vm1.img@gold"]["referenced"], rows["vm1.img@gold"]["exclusive"]) == (MIB, 0)
    human = cli_ok(m, "df", str(mnt))
    assert "EXCLUSIVE" in human and "vm1.img@gold" in human
    # Delete a snapshot that owns data alone: df shows it freed at once.
    volume_with_data(mnt, "solo.img", 4 * MIB, 41)
    cli_ok(m, "snapshot", str(mnt), "only", "solo.img")
    fill(mnt / "solo.img", MIB, 42, at=MIB)
    used = cli_json(m, "df", str(mnt))["pool"]["used"]
    out = cli_ok(m, "delete", str(mnt), "solo.img@only")
    assert "freed 1.00 MiB" in out, out
    freed = used - cli_json(m, "df", str(mnt))["pool"]["used"]
    assert abs(freed - MIB) <= 4096, f"df used shrank by {freed} after deleting 1 MiB of exclusive data"


def test_loop_devices_flushed_before_snapshot_and_clone(mounted: CowfsMount,
                                                        loop_devices: None) -> None:
    """Proves: ``cowfs snapshot`` and ``cowfs clone`` of a live volume flush
    the loop device attached to it first: bytes written to /dev/loopN and
    not fsynced (still dirty in the device's page cache, the device held
    open so that no last close flushes them) are in the snapshot and in the
    clone.  Control: a snapshot through the ctl file alone misses them."""
    m, mnt = mounted, mounted.mnt
    run(["truncate", "-s", str(8 * MIB), mnt / "vm1.img"], check=True)
    dev = loop_attach(mnt / "vm1.img")
    try:
        with open(dev, "r+b", buffering=0) as holder:
            pending = os.urandom(MIB)
            os.pwrite(holder.fileno(), pending, MIB)
            ctl_ok(mnt, SNAPS, "snapshot unflushed vm1.img")
            control = read_file(mnt / SNAPS / "vm1.img" / "unflushed", MIB, MIB) == pending
            first = os.urandom(MIB)
            os.pwrite(holder.fileno(), first, 2 * MIB)
            cli_ok(m, "snapshot", str(mnt), "s", "vm1.img")
            assert read_file(mnt / SNAPS / "vm1.img" / "s", 2 * MIB, MIB) == first, \
                "the snapshot lacks what was written to the loop device"
            second = os.urandom(MIB)
            os.pwrite(holder.fileno(), second, 4 * MIB)
            cli_ok(m, "clone", str(mnt), "vm1.img", "copy.img")
            assert read_file(mnt / "copy.img", 4 * MIB, MIB) == second, \
                "the clone lacks what was written to the loop device"
    finally:
        loop_detach(dev)
    if control:
        pytest.skip("inconclusive: the kernel wrote the loop device's dirty pages back "
                    "before the unflushed control snapshot")


def test_export_import_round_trip(mounted: CowfsMount, tmp_path: Path) -> None:
    """Proves: ``cowfs export VOL@SNAP FILE`` writes a sparse raw image with
    the snapshot's bytes, ``cowfs import FILE VOL`` makes a volume of it
    (holes stay holes); refusals: existing FILE without --force, existing
    volume name."""
    m, mnt = mounted, mounted.mnt
    old = volume_with_data(mnt, "vm1.img", 64 * MIB, 50)
    cli_ok(m, "snapshot", str(mnt), "s", "vm1.img")
    fill(mnt / "vm1.img", MIB, 51)
    image = tmp_path / "vm1-s.raw"
    cli_ok(m, "export", str(mnt), "vm1.img@s", str(image))
    assert image.stat().st_size == 64 * MIB
    assert image.stat().st_blocks * 512 <= 2 * MIB, "export did not keep the holes"
    assert read_file(image) == old
    doc = cli_json(m, "import", str(mnt), str(image), "imported.img")
    assert doc["volume"] == "imported.img"
    assert_content(mnt / "imported.img", old, "imported volume")
    assert os.stat(mnt / "imported.img").st_blocks * 512 <= 2 * MIB, "import filled the holes"
    live = tmp_path / "live.raw"
    cli_ok(m, "export", str(mnt), "vm1.img", str(live))
    assert read_file(live) == read_file(mnt / "vm1.img")
    proc = m.cli("export", str(mnt), "vm1.img@s", str(image))
    assert_clean_refusal(proc.returncode, proc.stdout + proc.stderr, str(image), "--force")
    cli_ok(m, "export", str(mnt), "vm1.img@s", str(image), "--force")
    cli_refused(m, "import", str(mnt), str(image), "imported.img", mentions=("imported.img",))
    cli_refused(m, "export", str(mnt), "vm1.img@nope", str(tmp_path / "x.raw"), mentions=("nope",))
    assert not (tmp_path / "x.raw").exists()
    assert sorted(os.listdir(mnt / CLONES)) == ["ctl"]
