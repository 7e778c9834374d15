"""What ``cowfs fsck``, ``cowfs scrub`` and ``cowfs status`` need besides the
engine: the ``.pool/status`` file of a mount, the mount serving a pool
directory, and the human wording of findings and scrub reports.
"""

from __future__ import annotations

import errno
import json
import os

from cowfs.pool import BLOCK
from cowfs_daemon.server import FSTYPE, fsname, unescape_mountinfo
from cowfs_tools.display import human_bytes, local_time, render_table
from cowfs_tools.mountctl import Mount, MountCtlError

POOL_DIR = ".pool"
STATUS = "status"


def pool_status(mount: Mount) -> dict:
    """The JSON of ``MOUNT/.pool/status``: error counters and the current or
    last scrub.  MountCtlError (ENOTSUP) if the daemon has no ``.pool``
    directory, with the errno of the failed read otherwise."""
    path = os.path.join(mount.path, POOL_DIR, STATUS)
    obj = f"{mount.given}/{POOL_DIR}/{STATUS}"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise MountCtlError(errno.ENOTSUP, mount.given, f"this cowfs mount has no {POOL_DIR}/"
                            "; its daemon predates scrubs: unmount and mount it again with "
                            "this version") from None
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            raise MountCtlError(err.errno, mount.given, "the daemon serving it is gone; unmount "
                                f"it with `fusermount3 -u {mount.given}` and mount the pool "
                                "again") from None
        raise MountCtlError(err.errno or errno.EIO, obj, err.strerror or str(err)) from None
    try:
        return json.loads(raw)
    except ValueError:
        raise MountCtlError(errno.EIO, obj, "status file is not valid JSON") from None


def mountpoints_of(pool_dir: str) -> list[str]:
    """Where the pool in ``pool_dir`` is mounted (by its mount source, which
    names the pool directory), from /proc/self/mountinfo."""
    source = os.fsencode(fsname(pool_dir))
    found = []
    with open("/proc/self/mountinfo", "rb") as table:
        for line in table:
            fields = line.split()
            sep = fields.index(b"-", 6)
            if (fields[sep + 1].decode(errors="replace") == FSTYPE
                    and unescape_mountinfo(fields[sep + 2]) == source):
                found.append(os.fsdecode(unescape_mountinfo(fields[4])))
    return found


def where(finding: dict) -> str:
    """The place a finding names: ``vm1.img at offset 409600 (block 100)``,
    or its object alone when it has no offset."""
    offset = finding.get("offset")
    if offset is None:
        return finding["object"]
    return f"{finding['object']} at offset {offset} (block {offset // BLOCK})"


def findings_table(findings: list[dict], repair: bool = False) -> str:
    """Findings as a table: the kind of problem, where it is, with ``repair``
    whether it was fixed, and the detail (the message without the object it
    starts with, which the WHERE column already names)."""
    header = ["PROBLEM", "WHERE"] + (["REPAIRED"] if repair else []) + ["DETAIL"]
    rows = []
    for f in findings:
        detail = f["message"].removeprefix(f"{f['object']}: ")
        fixed = ["yes" if f.get("fixed") else "no"] if repair else []
        rows.append([f["kind"], where(f), *fixed, detail])
    return render_table(header, rows)


def scrub_summary(scrub: dict | None) -> str:
    """One line on a scrub's state and result, as ``cowfs status`` shows it."""
    if scrub is None:
        return "none since the pool was mounted; start one with `cowfs scrub MOUNT`"
    done, total = scrub["blocks_checked"], scrub["blocks_total"]
    bad = len(scrub["bad_blocks"])
    started = local_time(scrub["started_ns"])
    rate = f", rate limit {human_bytes(scrub['rate'])}/s" if scrub.get("rate") else ""
    if scrub["state"] == "running":
        percent = done * 100 // total if total else 100
        return (f"in progress since {started}: {done} of {total} blocks checked ({percent}%), "
                f"{bad} bad so far{rate}")
    seconds = (scrub["finished_ns"] - scrub["started_ns"]) / 1e9
    result = f"{bad} bad block{'s' if bad != 1 else ''}" if bad else "no errors"
    if scrub["state"] == "finished":
        return (f"finished {local_time(scrub['finished_ns'])} after {seconds:.1f} s: {done} "
                f"blocks ({human_bytes(done * BLOCK)}) checked, {result}")
    if scrub["state"] == "failed":
        return (f"failed {local_time(scrub['finished_ns'])} after {done} of {total} blocks: "
                f"{scrub.get('error')}; {result} until then")
    return (f"cancelled {local_time(scrub['finished_ns'])} after {done} of {total} blocks "
            f"({seconds:.1f} s), {result} until then")
