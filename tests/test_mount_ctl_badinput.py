"""Bad input on both ``ctl`` files of a real mount.

Unknown commands and flags, missing and extra words, names with '/' or
'..', quoting errors, a 1 MiB line, binary garbage, several lines in one
write, commands sent to the wrong ctl file, and several processes writing
at once.  Every refusal must fail the write with the fitting errno, leave
the mount exactly as it was (listings and contents compared before and
after), read back ``error: <message>`` on the same handle, and leave the
daemon serving; afterwards the unmounted pool must pass ``check()``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cowfs.blockio import OsStorage
from cowfs.pool import Pool

from helpers_mount import MIB, CowfsMount, run, wait_until
from test_mount_snapshots import (CLONES, SNAPS, ctl_ok, ctl_refused, ctl_rw, echo_ctl,
                                  mount_state, snapshot_names, volume_with_data)

pytestmark = pytest.mark.mount

EINVAL, ENOENT, EEXIST = errno.EINVAL, errno.ENOENT, errno.EEXIST

# (ctl directory, what is written, errno, words the read-back must contain)
BAD_COMMANDS: list[tuple[str, bytes | str, int, tuple[str, ...]]] = [
    (SNAPS, "frobnicate vm1.img", EINVAL, ("frobnicate",)),
    (SNAPS, "SNAPSHOT s vm1.img", EINVAL, ("SNAPSHOT",)),
    (SNAPS, "snapshot", EINVAL, ("snapshot",)),
    (SNAPS, "restore", EINVAL, ("restore",)),
    (SNAPS, "delete", EINVAL, ()),
    (SNAPS, "delete vm1.img@s1 extra", EINVAL, ("extra",)),
    (SNAPS, "rename vm1.img@s1", EINVAL, ()),
    (SNAPS, "rename vm1.img@s1 s9 extra", EINVAL, ("extra",)),
    (SNAPS, "delete vm1.img", EINVAL, ("vm1.img",)),
    (SNAPS, "snapshot s2 vm1.img --bogus", EINVAL, ("--bogus",)),
    (SNAPS, "delete vm1.img@s1 --force", EINVAL, ()),
    (SNAPS, "snapshot a/b vm1.img", EINVAL, ("a/b",)),
    (SNAPS, "snapshot .. vm1.img", EINVAL, ()),
    (SNAPS, "snapshot s2 ../vm1.img", EINVAL, ()),
    (SNAPS, "snapshot s2 vm1.img/..", EINVAL, ()),
    (SNAPS, "snapshot s2 ..", EINVAL, ()),
    (SNAPS, "snapshot a@b vm1.img", EINVAL, ("a@b",)),
    (SNAPS, "snapshot .hidden vm1.img", EINVAL, (".hidden",)),
    (SNAPS, "snapshot s2 vm1.img vm1.img", EINVAL, ()),
    (SNAPS, "rename vm1.img@s1 ../escape", EINVAL, ()),
    (SNAPS, "rename vm1.img@s1 x/y", EINVAL, ()),
    (SNAPS, "delete vm1.img@..", EINVAL, ()),
    (SNAPS, "delete ../vm1.img@s1", EINVAL, ()),
    (SNAPS, "restore s1 ../vm1.img", EINVAL, ()),
    (SNAPS, "snapshot 'unbalanced vm1.img", EINVAL, ()),
    (SNAPS, "snapshot s2 vm1.img\nsnapshot s3 vm1.img\n", EINVAL, ()),
    (SNAPS, "clone vm1.img@s1 new.img", EINVAL, ("clone",)),
    (SNAPS, "\n\n", EINVAL, ()),
    (SNAPS, "   ", EINVAL, ()),
    (SNAPS, "snapshot s2 nope.img", ENOENT, ("nope.img",)),
    (SNAPS, "snapshot s2 vm1.img nope.img", ENOENT, ("nope.img",)),
    (SNAPS, "restore nothere vm1.img", ENOENT, ("nothere",)),
    (SNAPS, "restore nothere", ENOENT, ("nothere",)),
    (SNAPS, "restore s1 vm2.img", ENOENT, ("vm2.img",)),
    (SNAPS, "delete vm1.img@nothere", ENOENT, ("nothere",)),
    (SNAPS, "rename vm1.img@nothere x", ENOENT, ("nothere",)),
    (SNAPS, "snapshot s1 vm1.img", EEXIST, ("s1", "vm1.img")),
    (SNAPS, "snapshot s1", EEXIST, ("s1",)),
    (SNAPS, "rename vm1.img@s1 s1b", EEXIST, ("s1b",)),
    (CLONES, "clone", EINVAL, ()),
    (CLONES, "clone vm1.img", EINVAL, ()),
    (CLONES, "clone vm1.img@s1 a.img b.img", EINVAL, ("b.img",)),
    (CLONES, "clone vm1.img@s1 ../escape.img", EINVAL, ()),
    (CLONES, "clone vm1.img@s1 sub/dir.img", EINVAL, ()),
    (CLONES, "clone vm1.img@s1 ..", EINVAL, ()),
    (CLONES, "clone ../vm1.img new.img", EINVAL, ()),
    (CLONES, "clone vm1.img@s1 .hidden.img", EINVAL, ()),
    (CLONES, "clone vm1.img@s1 new.img --prefix x", EINVAL, ()),
    (CLONES, "clone-group s1 vm1.img", EINVAL, ("--prefix",)),
    (CLONES, "clone-group s1 --prefix c-", EINVAL, ()),
    (CLONES, "clone-group s1 --prefix", EINVAL, ("--prefix",)),
    (CLONES, "clone-group s1 --prefix ../ vm1.img", EINVAL, ()),
    (CLONES, "clone-group s1 --suffix /x vm1.img", EINVAL, ()),
    (CLONES, "clone-group s1 --prefix . vm1.img", EINVAL, ()),
    (CLONES, "clone-group s1 --prefix a --prefix b vm1.img", EINVAL, ()),
    (CLONES, "snapshot s9 vm1.img", EINVAL, ("snapshot",)),
    (CLONES, "restore s1", EINVAL, ()),
    (CLONES, "clone nope.img new.img", ENOENT, ("nope.img",)),
    (CLONES, "clone vm1.img@nothere new.img", ENOENT, ("nothere",)),
    (CLONES, "clone-group nothere --prefix c- vm1.img", ENOENT, ("nothere",)),
    (CLONES, "clone-group s1 --prefix c- vm1.img vm2.img", ENOENT, ("vm2.img",)),
    (CLONES, "clone vm1.img@s1 vm2.img", EEXIST, ("vm2.img",)),
    (CLONES, "clone vm1.img vm1.img", EEXIST, ("vm1.img",)),
]

GARBAGE: list[tuple[str, bytes]] = [
    ("1 MiB line", b"snapshot " + b"x" * MIB + b" vm1.img"),
    ("5000-byte line", b"snapshot " + b"y" * 5000 + b" vm1.img"),
    ("NUL byte", b"snapshot s2\0 vm1.img"),
    ("invalid UTF-8", b"snapshot s\xff\xfe2 vm1.img"),
    ("random bytes", random.Random(7).randbytes(3000)),
    ("random bytes, short", bytes(range(256))),
]


@pytest.fixture
def prepared(mounted: CowfsMount) -> Path:
    """A mount with vm1.img (data; snapshots s1 and s1b) and an empty vm2.img."""
    mnt = mounted.mnt
    volume_with_data(mnt, "vm1.img", 4 * MIB, 1)
    run(["truncate", "-s", "1M", mnt / "vm2.img"], check=True)
    ctl_ok(mnt, SNAPS, "snapshot s1 vm1.img")
    ctl_ok(mnt, SNAPS, "snapshot s1b vm1.img")
    return mnt


def pool_check(m: CowfsMount) -> list[str]:
    """Unmount, open the pool with the engine, return ``check()``, mount again."""
    m.umount()
    pool = Pool.open(OsStorage(str(m.pool)))
    try:
        return pool.check()
    finally:
        pool.close()
        m.mount()


def test_bad_commands(prepared: Path, mounted: CowfsMount) -> None:
    """Proves: each bad command (syntax, names, unknown objects, names
    taken, wrong ctl file) fails its write with the fitting errno, reads
    back ``error: ...`` naming the culprit, changes nothing, is logged once
    by the daemon with its cause, and the daemon keeps serving; the pool is
    consistent afterwards."""
    mnt = prepared
    for which, command, err, mentions in BAD_COMMANDS:
        ctl_refused(mnt, which, command, err, *mentions)
    # Each refusal is logged once, naming the command and the cause.
    daemon_log = mounted.logdir / "daemon.log"

    def logged(text: str) -> list[str]:
        return [line for line in daemon_log.read_text(errors="replace").splitlines() if text in line]
    assert wait_until(lambda: len(logged("frobnicate vm1.img")) == 1, 5), logged("frobnicate")
    assert "unknown command" in logged("frobnicate vm1.img")[0]
    assert wait_until(lambda: len(logged("snapshot s2 nope.img")) == 1, 5), logged("nope.img")
    assert "nope.img" in logged("snapshot s2 nope.img")[0].split("snapshot s2 nope.img", 1)[1]
    # The daemon still serves, and good commands still work.
    ctl_ok(mnt, SNAPS, "snapshot after-the-storm vm1.img")
    ctl_ok(mnt, CLONES, "clone vm1.img@after-the-storm c.img")
    assert pool_check(mounted) == []


def test_garbage(prepared: Path, mounted: CowfsMount) -> None:
    """Proves: a 1 MiB line, an over-long line, NUL bytes, invalid UTF-8 and
    random binary are refused with EINVAL on both ctl files, change nothing
    and the daemon keeps serving."""
    mnt = prepared
    for which in (SNAPS, CLONES):
        for what, data in GARBAGE:
            try:
                ctl_refused(mnt, which, data, errno.EINVAL)
            except AssertionError as exc:
                raise AssertionError(f"{which}/ctl, {what}: {exc}") from None
    assert sorted(os.listdir(mnt)) == ["vm1.img", "vm2.img"]
    assert snapshot_names(mnt, "vm1.img") == ["s1", "s1b"]
    ctl_ok(mnt, SNAPS, "snapshot still-serving")
    assert pool_check(mounted) == []


def test_shell_refusals(prepared: Path) -> None:
    """Proves: the same refusals as seen from a shell: ``echo ... > ctl``
    exits non-zero with the errno's text, and a 1 MiB line from ``head -c``
    is refused too."""
    mnt = prepared
    before = mount_state(mnt)
    for command, text in (("bogus", "Invalid argument"),
                          ("snapshot s1 vm1.img", "File exists"),
                          ("clone nope.img@s1 x.img", "No such file or directory")):
        which = CLONES if command.startswith("clone") else SNAPS
        r = echo_ctl(mnt, which, command)
        assert r.returncode != 0 and text in r.stderr, (command, r.returncode, r.stderr)
    r = run(["bash", "-c", f"head -c {MIB} /dev/zero | tr '\\0' x > {mnt / SNAPS / 'ctl'}"])
    assert r.returncode != 0 and "Invalid argument" in r.stderr, r.stderr
    assert mount_state(mnt) == before


def test_ctl_file_attributes(prepared: Path) -> None:
    """Proves: each ctl file is a root-only 0600 regular file of size 0; a
    fresh handle that wrote nothing reads nothing, and another handle's
    result is not read back on it."""
    mnt = prepared
    for which in (SNAPS, CLONES):
        st = os.stat(mnt / which / "ctl")
        assert stat.S_ISREG(st.st_mode), st
        assert (st.st_mode & 0o7777, st.st_uid, st.st_size) == (0o600, 0, 0), st
        err, _ = ctl_rw(mnt, which, "bogus")
        assert err == errno.EINVAL
        assert (mnt / which / "ctl").read_bytes() == b""


# A process writing ``count`` commands through its own handles, checking that
# each handle reads back its own result.
WRITER = r"""
import json, os, sys
ctl, tag, count, same = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
results = {"ok": 0, "EEXIST": 0, "EINVAL": 0, "other": []}
for k in range(count):
    for command, expect in ((f"snapshot {tag}-{k} vm1.img", "ok"),
                            (f"snapshot {tag}-{k}/bad vm1.img", "EINVAL"),
                            (f"snapshot {same} vm1.img", None)):
        if expect is None and k:
            continue
        fd = os.open(ctl, os.O_RDWR)
        try:
            try:
                os.write(fd, command.encode())
                got = "ok"
            except OSError as e:
                got = {17: "EEXIST", 22: "EINVAL"}.get(e.errno, str(e.errno))
            reply = os.pread(fd, 65536, 0).decode()
        finally:
            os.close(fd)
        if got == "ok":
            name = command.split()[1]
            if not reply.startswith("ok ") or json.loads(reply[3:])["snapshot"] != name:
                results["other"].append(f"{command}: read back {reply!r}")
        elif not reply.startswith("error: "):
            results["other"].append(f"{command}: {got} but read back {reply!r}")
        if expect is not None and got != expect:
            results["other"].append(f"{command}: {got}, expected {expect}")
        if got in ("ok", "EEXIST", "EINVAL"):
            results[got] += 1
        else:
            results["other"].append(f"{command}: unexpected errno {got}")
print(json.dumps(results))
"""


def test_several_writers_at_once(prepared: Path, mounted: CowfsMount) -> None:
    """Proves: 4 processes writing commands to ``.snapshots/ctl`` at the
    same time each get their own results (read back on their own handles),
    good commands all take effect, bad ones none, and of 4 racing
    ``snapshot same`` exactly one succeeds and 3 get EEXIST."""
    mnt = prepared
    count = 25
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(mnt / SNAPS / "ctl"), f"p{i}",
                               str(count), "same"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    results = []
    for p in procs:
        out, errout = p.communicate(timeout=120)
        assert p.returncode == 0, errout
        results.append(json.loads(out))
    problems = [line for r in results for line in r["other"]]
    assert not problems, problems
    assert sum(r["ok"] for r in results) == 4 * count + 1, results
    assert sum(r["EEXIST"] for r in results) == 3, results
    assert sum(r["EINVAL"] for r in results) == 4 * count, results
    names = snapshot_names(mnt, "vm1.img")
    want = {"s1", "s1b", "same"} | {f"p{i}-{k}" for i in range(4) for k in range(count)}
    assert set(names) == want, sorted(set(names) ^ want)
    assert pool_check(mounted) == []
