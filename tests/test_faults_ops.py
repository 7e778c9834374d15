"""EIO and ENOSPC at every I/O point of every pool operation.

``test_crash_faults.py`` fails one random I/O call in the middle of a random
write/truncate/create workload.  This module is exhaustive instead, and covers
the operations that workload lacks: for each operation (write, write that
grows the data file, fsync, fsync that checkpoints, snapshot, group
snapshot, restore, group restore, clone of a snapshot and of a live volume,
clone-group, delete of a volume and of a snapshot, rename of a volume and of
a snapshot, checkpoint) the I/O calls it makes on the :class:`SimStorage`
are recorded once; then, from the same starting pool, the operation is run
again with call ``k`` failing, for every ``k``, in these variants:

* ``EIO`` and ``ENOSPC``, once (the next call works again);
* ``EIO`` or ``ENOSPC`` that lasts for the rest of the operation (every
  later call of it fails too, as when a disk drops out or stays full), the
  disk back afterwards;
* at a sync, ``EIO`` with the pages lost, as Linux does: a failed
  ``fdatasync`` marks the dirty pages clean, so what they held never reaches
  the disk even if a later sync of the file succeeds (the kernel keeps
  serving them from its cache until then).  A power cut after that must
  still show exactly what was acknowledged.

Each time, the operation must succeed (the engine found another way) or
raise :class:`PoolError` with the injected errno -- or EIO when the failure
left the pool needing a reload or read-only -- and nothing else.  The disk is
then back, and the live pool must be in one of the states the engine
documents:

* *refused*: nothing changed and the pool keeps serving (after reloading its
  durable state, if the failure came half way through a change);
* *failed after the change*: the change is in place in memory and will be
  committed by the next sync (only allowed when the failing call belongs to
  the journal commit that makes the change durable: the fsync after a
  delete or rename);
* *absorbed*: the operation succeeded in spite of the fault;
* *read-only*: a data sync (or the superblock switch of a checkpoint)
  failed, so unsynced changes were given up: the pool serves its durable
  state, refuses writes with EROFS and every fsync with EIO.

A pool that keeps serving must accept a follow-up write and fsync.  Then a
power cut at the current end of the log (unsynced writes lost) and a plain
close and reopen must both open, pass ``check()`` and ``fsck``, and show
either the state before the operation or the state after it, whole (every
member of a group operation or none), with everything acknowledged before
read back exactly -- and, after a follow-up fsync, exactly the live state.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from cowfs.blockio import SimStorage
from cowfs.errors import PoolError
from cowfs.integrity import fsck
from cowfs.pool import BLOCK, Pool

from engine_model import durable_copy, make_payload
from test_crash_snapshots import Fingerprint, pool_fingerprint

log = logging.getLogger(__name__)

JOURNAL_SIZE = 64 * 1024
VOLUMES = ("vm1.img", "vm2.img", "vm3.img")
# Two blocks at every 3rd block of the first 1.5 MiB: a few hundred entries
# per volume, more than one leaf holds, so each tree has an internal root.
SPREAD = range(0, 384, 3)
UNDO = re.compile(r"^undo-\d{8}T\d{6}Z(-\d+)?$")
Call = tuple[str, str, int, int]


# ----------------------------------------------------------------------------
# The starting pool and the operations


@functools.lru_cache(maxsize=None)
def base_pool() -> SimStorage:
    """A closed pool with three volumes, snapshot ``s1`` of vm1 and vm2 (both
    changed since), and a clone ``c1.img`` of vm1@s1; everything synced."""
    storage = SimStorage(label="sim-faults-ops")
    Pool.mkfs(storage, compression=True, journal_size=JOURNAL_SIZE)
    pool = Pool.open(storage)
    rng = random.Random(5)
    for name in VOLUMES:
        vid = pool.create_volume(name, 2 << 20).id
        for b in SPREAD:
            pool.write(vid, b * BLOCK, make_payload(rng, 2 * BLOCK, f"{name}-{b}"))
        pool.sync()
    pool.snapshot(["vm1.img", "vm2.img"], "s1")
    for name in ("vm1.img", "vm2.img"):
        vid = pool.lookup(name).id
        for b in SPREAD[::7]:
            pool.write(vid, b * BLOCK + 100, make_payload(rng, 3 * BLOCK, f"{name}-new{b}"))
    pool.clone([("vm1.img", "s1", "c1.img")])
    pool.sync()
    pool.close()
    return storage


def vid(pool: Pool, name: str) -> int:
    """Id of volume ``name``."""
    return pool.lookup(name).id


def snap_id(pool: Pool, volume: str, name: str) -> int:
    """Id of snapshot ``volume@name``."""
    return pool.snapshot_lookup(volume, name).id


def nothing(pool: Pool) -> None:
    """No preparation."""


def pending_changes(pool: Pool) -> None:
    """Unsynced writes to two volumes and a truncate of the third."""
    pool.write(vid(pool, "vm1.img"), 5000, make_payload_fixed(30000, "pending-vm1"))
    pool.write(vid(pool, "vm2.img"), 3 * BLOCK, make_payload_fixed(2 * BLOCK, "pending-vm2"))
    pool.truncate(vid(pool, "vm3.img"), (1 << 20) + 1234)


def journal_nearly_full(pool: Pool) -> None:
    """Unsynced one-block writes until the journal is past the 3/4 mark at
    which an fsync also checkpoints."""
    v = vid(pool, "vm2.img")
    n = 0
    while pool.journal.used() <= pool.journal.size * 3 // 4 + BLOCK:
        pool.write(v, (n % 500) * BLOCK, make_payload_fixed(BLOCK, f"fill-{n}"))
        n += 1


@functools.lru_cache(maxsize=None)
def full_pool() -> SimStorage:
    """The starting pool plus a volume that takes every free unit of the
    data file, so that the next write must grow the file."""
    storage = durable_copy(base_pool())
    pool = Pool.open(storage)
    scratch = pool.create_volume("scratch.img").id
    pos = 0
    while pool.drc.free_units() > 2:
        n = 16 if pool.drc.free_units() > 32 else 1
        pool.write(scratch, pos, make_payload_fixed(n * BLOCK, f"scratch-{pos}", True))
        pos += n * BLOCK
    pool.sync()
    pool.close()
    return storage


def dirty_tree(pool: Pool) -> None:
    """Synced writes and a snapshot since the last checkpoint."""
    pool.write(vid(pool, "vm3.img"), 7 * BLOCK, make_payload_fixed(20 * BLOCK, "dirty-vm3"))
    pool.write(vid(pool, "c1.img"), 0, make_payload_fixed(BLOCK + 7, "dirty-c1"))
    pool.snapshot(["vm3.img"], "s-dirty")
    pool.sync()


@functools.lru_cache(maxsize=None)
def make_payload_fixed(length: int, tag: str, incompressible: bool = False) -> bytes:
    """Deterministic content for the operations (same bytes on every run)."""
    return make_payload(random.Random(tag), length, tag,
                        "random" if incompressible else "mixed")


@dataclass
class Scenario:
    """One operation under test and the unfaulted preparation before it."""

    name: str
    op: Callable[[Pool], object]
    prepare: Callable[[Pool], None] = nothing
    base: Callable[[], SimStorage] = base_pool


def _synced(fn: Callable[[Pool], object]) -> Callable[[Pool], None]:
    # Operations that are durable only after an fsync: the fsync is part of
    # what is tested (it is what a user does: rm, then fsync of the directory).
    def both(pool: Pool) -> None:
        fn(pool)
        pool.sync()
    return both


SCENARIOS = [
    # Blocks 34 and 40 of vm1 hold data: the write reads both to merge them.
    Scenario("write", lambda p: p.write(vid(p, "vm1.img"), 34 * BLOCK + 100,
                                        make_payload_fixed(24 * 1024, "op-write"))),
    Scenario("write-grow", lambda p: p.write(vid(p, "vm1.img"), 11 * BLOCK,
                                             make_payload_fixed(16 * BLOCK, "op-grow", True)),
             base=full_pool),
    Scenario("sync", lambda p: p.sync(), pending_changes),
    Scenario("sync-checkpoint", lambda p: p.sync(), journal_nearly_full),
    Scenario("snapshot", lambda p: p.snapshot(["vm1.img"], "s2")),
    Scenario("group-snapshot", lambda p: p.snapshot(None, "g")),
    Scenario("snapshot-pending", lambda p: p.snapshot(["vm1.img", "vm3.img"], "s3"),
             pending_changes),
    Scenario("restore", lambda p: p.restore("s1", ["vm1.img"])),
    Scenario("group-restore", lambda p: p.restore("s1")),
    Scenario("clone", lambda p: p.clone([("vm1.img", "s1", "c2.img")])),
    Scenario("clone-live", lambda p: p.clone([("vm2.img", None, "c3.img")])),
    Scenario("clone-group", lambda p: p.clone([("vm1.img", "s1", "g-vm1.img"),
                                               ("vm2.img", "s1", "g-vm2.img")])),
    Scenario("delete-volume", _synced(lambda p: p.delete_volume(vid(p, "vm3.img")))),
    Scenario("delete-volume-shared", _synced(lambda p: p.delete_volume(vid(p, "c1.img")))),
    Scenario("delete-snapshot", lambda p: p.delete_snapshot(snap_id(p, "vm2.img", "s1"))),
    # vm1@s1 shares its root with the clone c1.img.
    Scenario("delete-snapshot-shared",
             lambda p: p.delete_snapshot(snap_id(p, "vm1.img", "s1"))),
    Scenario("rename-volume", _synced(lambda p: p.rename_volume(vid(p, "vm2.img"), "vm9.img"))),
    Scenario("rename-volume-replace",
             _synced(lambda p: p.rename_volume(vid(p, "c1.img"), "vm3.img"))),
    Scenario("rename-snapshot", lambda p: p.rename_snapshot(snap_id(p, "vm2.img", "s1"), "s1b")),
    Scenario("checkpoint", lambda p: p.checkpoint(), dirty_tree),
]


# ----------------------------------------------------------------------------
# Fault hooks and states


class Recorder:
    """A SimStorage hook that records every I/O call."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def __call__(self, op: str, name: str, offset: int, length: int) -> None:
        self.calls.append((op, name, offset, length))


class Injector:
    """A SimStorage hook failing I/O call number ``k`` (from 0) with ``err``;
    with ``sticky`` every later call fails too, until the hook is removed."""

    def __init__(self, storage: SimStorage, k: int, err: int, sticky: bool) -> None:
        self.storage, self.k, self.err, self.sticky = storage, k, err, sticky
        self.seen = 0
        self.fired: Call | None = None
        self.fired_at_log = -1   # storage log length when the fault fired

    def __call__(self, op: str, name: str, offset: int, length: int) -> None:
        n = self.seen
        self.seen += 1
        if n == self.k:
            self.fired = (op, name, offset, length)
            self.fired_at_log = len(self.storage.log)
        elif not (self.sticky and n > self.k):
            return
        raise OSError(self.err, f"injected {errno.errorcode[self.err]} on {op} of {name}")


def fingerprint(pool: Pool) -> Fingerprint:
    """What the pool serves (volumes, snapshots, bytes, clone sources), with
    restore's time-stamped undo snapshot names made comparable across runs."""
    vols, snaps = pool_fingerprint(pool)
    snaps = tuple(sorted((i, v, "undo-*" if UNDO.match(n) else n, *rest)
                         for i, v, n, *rest in snaps))
    return vols, snaps


def recover(image: SimStorage, where: str) -> Fingerprint:
    """fsck ``image`` (must be clean), open it (must pass check()), and
    return what it serves."""
    report = fsck(image)
    assert report.findings == [], (
        f"{where}: fsck found {len(report.findings)} problems: "
        f"{[f.message for f in report.findings[:4]]}")
    pool = Pool.open(image)
    try:
        problems = pool.check()
        assert problems == [], f"{where}: check(): {problems}"
        return fingerprint(pool)
    finally:
        pool.close()


def power_cut(storage: SimStorage, lost: tuple[str, int] | None = None) -> SimStorage:
    """The pool as a power cut now would leave it (unsynced writes lost).
    ``lost = (file, log index)``: a sync of that file failed at that point
    of the log, so the writes to it since its previous sync never reach the
    disk, whatever later syncs say."""
    log_ = storage.log
    if lost is not None:
        name, at = lost
        prev = max((i for i in range(at) if log_[i][:2] == ("sync", name)), default=-1)
        dropped = {i for i in range(prev + 1, at) if log_[i][:2] == ("write", name)}
        view = SimStorage(storage.capacity, storage.label)
        view.log = [e for i, e in enumerate(log_) if i not in dropped]
        return view.crash(len(view.log), "lose")
    return storage.crash(len(log_), "lose")


def diff(got: Fingerprint, want: Fingerprint) -> str:
    """The volumes and snapshots in which two fingerprints differ."""
    parts = []
    for what, g, w in (("volumes", got[0], want[0]), ("snapshots", got[1], want[1])):
        gs, ws = set(g), set(w)
        if gs != ws:
            parts.append(f"{what} only in the pool: {sorted(x[:3] for x in gs - ws)}; "
                         f"only expected: {sorted(x[:3] for x in ws - gs)}")
    return "; ".join(parts) or "same"


@dataclass
class Reference:
    """The unfaulted run of one scenario."""

    calls: list[Call]
    live_before: Fingerprint
    live_after: Fingerprint
    durable_before: Fingerprint
    durable_after: Fingerprint


@functools.lru_cache(maxsize=None)
def reference(name: str) -> Reference:
    """Run scenario ``name`` without a fault, recording its I/O calls and the
    states before and after (live and as a power cut would leave them)."""
    scn = SCENARIO_BY_NAME[name]
    storage, pool = start(scn)
    live_before = fingerprint(pool)
    durable_before = recover(power_cut(storage), f"{name}: before, power cut")
    pool.close()
    # Reading everything warmed the node cache: start over, so that the
    # recorded calls are those of the operation on a freshly opened pool.
    storage, pool = start(scn)
    rec = Recorder()
    storage.fault = rec
    scn.op(pool)
    storage.fault = None
    live_after = fingerprint(pool)
    durable_after = recover(power_cut(storage), f"{name}: after, power cut")
    pool.close()
    return Reference(rec.calls, live_before, live_after, durable_before, durable_after)


SCENARIO_BY_NAME = {s.name: s for s in SCENARIOS}


def start(scn: Scenario) -> tuple[SimStorage, Pool]:
    """A fresh copy of the starting pool, opened and prepared for ``scn``."""
    storage = durable_copy(scn.base())
    pool = Pool.open(storage)
    scn.prepare(pool)
    return storage, pool


# ----------------------------------------------------------------------------
# One injected fault


@dataclass
class Outcome:
    """What one injected fault led to."""

    call: Call
    variant: str
    result: str          # 'refused', 'failed-after-change', 'absorbed', 'read-only' (+reload)
    errname: str         # errno the operation raised ('' if it succeeded)
    notes: list[str] = field(default_factory=list)


# The calls of a journal commit (Pool.sync): a failure there leaves the
# change in memory, committed by the next sync.
COMMIT_CALLS = {("sync", "data"), ("write", "journal"), ("sync", "journal")}

VARIANTS = {
    "EIO": (errno.EIO, False),
    "ENOSPC": (errno.ENOSPC, False),
    "EIO-sticky": (errno.EIO, True),
    "ENOSPC-sticky": (errno.ENOSPC, True),
    "EIO-pages-lost": (errno.EIO, False),
}


def inject(name: str, k: int, variant: str) -> Outcome:
    """Run scenario ``name`` with I/O call ``k`` failing as ``variant`` and
    assert everything the module docstring promises."""
    ref = reference(name)
    scn = SCENARIO_BY_NAME[name]
    err, sticky = VARIANTS[variant]
    storage, pool = start(scn)
    injector = Injector(storage, k, err, sticky)
    storage.fault = injector
    where = f"scenario {name}, {variant} at I/O call {k} {ref.calls[k][:2]}"
    failure: PoolError | None = None
    try:
        scn.op(pool)
    except PoolError as e:
        failure = e
    # Any other exception propagates and fails the test with its traceback.
    storage.fault = None
    assert injector.fired is not None, (
        f"{where}: the operation made only {injector.seen} I/O calls this time "
        f"(the reference run made {len(ref.calls)})")
    assert injector.fired[:2] == ref.calls[k][:2], (
        f"{where}: call {k} was {injector.fired[:2]} this time: the I/O sequence is not "
        "deterministic")
    where = f"scenario {name}, {variant} at I/O call {k} {injector.fired[:2]}"
    lost = (injector.fired[1], injector.fired_at_log) if variant == "EIO-pages-lost" else None
    reloaded = pool.stale is not None
    read_only = pool.degraded is not None

    if failure is not None:
        allowed = {errno.errorcode[err]} | ({"EIO"} if reloaded or read_only else set())
        assert failure.errname in allowed, (
            f"{where}: raised {failure.errname} ({failure}); expected one of {sorted(allowed)}")
    # The disk is back: the next request reloads the pool if it must, and works.
    live = fingerprint(pool)
    assert pool.stale is None, f"{where}: still waiting to reload once the disk is back"
    if read_only:
        result = "read-only"
        assert live in (ref.durable_before, ref.durable_after), (
            f"{where}: read-only, but serves neither the durable state before "
            f"({diff(live, ref.durable_before)}) nor after ({diff(live, ref.durable_after)})")
        for what, call, want in (
                ("write", lambda: pool.write(vid(pool, "vm1.img"), 0, b"x"), errno.EROFS),
                ("sync", pool.sync, errno.EIO)):
            with pytest.raises(PoolError) as refused:
                call()
            assert refused.value.errno == want, (
                f"{where}: a read-only pool refuses {what} with {refused.value.errname}, "
                f"not {errno.errorcode[want]}")
    elif failure is None:
        result = "absorbed"
        assert live == ref.live_after, (
            f"{where}: succeeded but serves another state: {diff(live, ref.live_after)}")
    elif live == ref.live_before:
        result = "refused"
    elif live == ref.live_after:
        result = "failed-after-change"
        assert injector.fired[:2] in COMMIT_CALLS and not reloaded, (
            f"{where}: raised {failure.errname} but the change stays in place, although "
            "the failing call was not part of the commit that makes it durable")
    else:
        raise AssertionError(
            f"{where}: raised {failure.errname}, keeps serving, and serves neither the "
            f"state before ({diff(live, ref.live_before)}) nor after "
            f"({diff(live, ref.live_after)})")
    if reloaded:
        result += "+reload"

    durable = (ref.durable_before, ref.durable_after)
    # A reload commits what was acknowledged before the operation.
    after_fault = durable + ((ref.live_before,) if reloaded else ())
    got = recover(power_cut(storage, lost), f"{where}: power cut right after the fault")
    assert got in after_fault, (
        f"{where}: a power cut right after the fault leaves neither the state before "
        f"({diff(got, ref.durable_before)}) nor after ({diff(got, ref.durable_after)})")

    expect_reopen: Fingerprint | None = None
    if not read_only:
        # The pool keeps serving: a follow-up write and fsync must work, and
        # from then on everything it serves is acknowledged.
        pool.write(vid(pool, "vm1.img"), 3, b"follow-up write after the fault")
        pool.sync()
        expect_reopen = fingerprint(pool)
        got = recover(power_cut(storage, lost), f"{where}: power cut after a follow-up fsync")
        assert got == expect_reopen, (
            f"{where}: after a follow-up fsync a power cut loses acknowledged state: "
            f"{diff(got, expect_reopen)}")
    pool.close()
    got = recover(storage, f"{where}: reopened")
    if expect_reopen is not None:
        assert got == expect_reopen, f"{where}: reopened: {diff(got, expect_reopen)}"
    else:
        assert got in durable, (
            f"{where}: reopened, neither the state before ({diff(got, ref.durable_before)}) "
            f"nor after ({diff(got, ref.durable_after)})")
    return Outcome(injector.fired, variant, result, failure.errname if failure else "")


def summary(name: str, outcomes: list[tuple[int, Outcome]]) -> str:
    """One line per I/O call: the call and what each variant led to."""
    lines = [f"scenario {name}: {len(reference(name).calls)} I/O calls"]
    by_call: dict[int, list[str]] = {}
    for k, o in outcomes:
        by_call.setdefault(k, []).append(f"{o.variant}->{o.result}"
                                         + (f"({o.errname})" if o.errname else ""))
    for k, items in sorted(by_call.items()):
        op, fname, off, length = reference(name).calls[k]
        lines.append(f"  {k:3d} {op:8s} {fname:10s} @{off}+{length}: " + ", ".join(items))
    return "\n".join(lines)


def run_points(name: str, variants: tuple[str, ...], ops: tuple[str, ...]) -> None:
    """Inject each of ``variants`` at every I/O call of scenario ``name``
    whose kind is in ``ops``; log what each led to and fail listing every
    point where a promise was broken."""
    ref = reference(name)
    points = [k for k, call in enumerate(ref.calls) if call[0] in ops]
    assert points, f"scenario {name} makes no {'/'.join(ops)} call: nothing to inject"
    outcomes: list[tuple[int, Outcome]] = []
    broken: list[str] = []
    for k in points:
        for variant in variants:
            try:
                outcomes.append((k, inject(name, k, variant)))
            except AssertionError as e:
                broken.append(str(e).splitlines()[0])
    log.info("%s", summary(name, outcomes))
    assert not broken, f"{len(broken)} fault points broke a promise:\n" + "\n".join(broken)


ALL_OPS = ("read", "write", "sync", "allocate")


@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_fault_at_every_io_point(name: str) -> None:
    """Proves, for one operation: EIO or ENOSPC (once, or for the rest of the
    operation) at each of its I/O calls makes it fail cleanly with that
    errno, leaves the pool serving or read-only as documented, and a power cut
    or a reopen afterwards shows a consistent, fsck-clean pool holding
    everything acknowledged and the operation wholly done or not at all."""
    ref = reference(name)
    changes = ref.live_before != ref.live_after or ref.durable_before != ref.durable_after
    assert changes or name == "checkpoint", f"scenario {name} changes nothing"
    run_points(name, ("EIO", "ENOSPC", "EIO-sticky", "ENOSPC-sticky"), ALL_OPS)


@pytest.mark.parametrize("name", [s.name for s in SCENARIOS if not s.name.startswith("write")])
def test_failed_sync_loses_pages(name: str) -> None:
    """Proves, for one operation: when one of its syncs fails with EIO and
    the kernel drops the pages it could not write (Linux marks them clean),
    nothing acknowledged afterwards depends on those pages: a power cut after
    a later successful fsync still shows exactly what was acknowledged."""
    run_points(name, ("EIO-pages-lost",), ("sync",))
