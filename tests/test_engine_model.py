"""Model-based tests of the engine API (no FUSE).

A hypothesis state machine drives a :class:`cowfs.pool.Pool` and the naive
:class:`engine_model.PoolModel` side by side: create, write (aligned and
unaligned, random/text/zero/mixed content), read-and-compare, truncate,
rename (to a fresh name, over another volume, onto itself), delete,
set_attrs, sync, tick, clean remount, and a crash right after a sync.  After
every step ``check()`` must report no problem and every byte and attribute
must match.  One variant runs on real files (:class:`OsStorage` in a
temporary directory; a "crash" there abandons the open pool without closing
it, as a killed process would), the others on :class:`SimStorage` (a crash is
a power cut that keeps only synced writes, keeps everything, or keeps a
random subset of 4 KiB pieces), with compression on and off.

Short hypothesis examples rarely pile up the overlapping operations that
expose read-modify-write and truncate bugs, so the same rules also run in
long seeded sequences (:func:`drive`).  Two more tests cover trees several
levels deep and offsets up to 2**44.
"""

from __future__ import annotations

import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cowfs.blockio import OsStorage, SimStorage, Storage
from cowfs.pool import BLOCK, Pool

from engine_model import CONTENT_KINDS, PoolModel, VolModel, compare_exact, durable_copy, make_payload, volume_name

MAX_SIZE = 256 * 1024
# Offsets cluster in a few blocks so that writes, truncates and reads overlap.
offsets = st.one_of(
    st.integers(0, 12 * BLOCK),
    st.integers(0, 12).map(lambda b: b * BLOCK),
    st.tuples(st.integers(1, 12), st.integers(-3, 3)).map(lambda t: t[0] * BLOCK + t[1]),
    st.integers(0, MAX_SIZE),
)
lengths = st.one_of(
    st.integers(1, 3 * BLOCK),
    st.sampled_from([1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 16 * BLOCK]),
    st.integers(1, 70_000),
)
picks = st.integers(0, 1 << 16)


class PoolMachine(RuleBasedStateMachine):
    """Engine vs. model; subclasses choose the storage."""

    compression = True

    def __init__(self) -> None:
        super().__init__()
        self.storage = self.new_storage()
        Pool.mkfs(self.storage, compression=self.compression)
        self.pool = Pool.open(self.storage)
        self.model = PoolModel()

    # -- storage flavours ---------------------------------------------------

    def new_storage(self) -> Storage:
        """A fresh, empty pool storage."""
        raise NotImplementedError

    def crash_storage(self, mode: str, seed: int) -> Storage:
        """The storage as a crash right now would leave it (all synced)."""
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------

    def pick(self, n: int) -> VolModel:
        """The ``n``-th existing volume (modulo their number), by id."""
        ids = sorted(self.model.vols)
        return self.model.vols[ids[n % len(ids)]]

    def has_volumes(self) -> bool:
        """Whether any volume exists (precondition of per-volume rules)."""
        return bool(self.model.vols)

    # -- rules ------------------------------------------------------------------

    @precondition(lambda self: len(self.model.vols) < 6)
    @rule(seed=picks, size=st.one_of(st.just(0), st.integers(0, MAX_SIZE), st.integers(0, 64).map(lambda b: b * BLOCK)))
    def create(self, seed: int, size: int) -> None:
        """A new volume has the requested name, size and attributes and a new id."""
        name = volume_name(random.Random(seed), {v.name for v in self.model.vols.values()})
        info = self.pool.create_volume(name, size, mode=0o640, uid=seed % 7, gid=seed % 5)
        assert (info.name, info.size, info.mode, info.uid, info.gid) == (name, size, 0o640, seed % 7, seed % 5)
        assert info.id not in self.model.vols
        self.model.create(info.id, name, size, 0o640, seed % 7, seed % 5)

    @precondition(has_volumes)
    @rule(n=picks, offset=offsets, length=lengths, kind=st.sampled_from(CONTENT_KINDS), seed=picks)
    def write(self, n: int, offset: int, length: int, kind: str, seed: int) -> None:
        """A write is accepted whole (the invariants then compare every byte)."""
        v = self.pick(n)
        data = make_payload(random.Random(seed), length, f"v{v.id}s{seed}", kind)
        assert self.pool.write(v.id, offset, data) == length
        v.write(offset, data)

    @precondition(has_volumes)
    @rule(n=picks, offset=offsets, length=lengths)
    def read(self, n: int, offset: int, length: int) -> None:
        """Any read, also unaligned, across EOF or past it, returns what the
        model says (short at EOF, zeros in holes)."""
        v = self.pick(n)
        got = self.pool.read(v.id, offset, length)
        want = v.read(offset, length)
        assert got == want, f"read({v.id}, {offset}, {length}): {len(got)} bytes differ from model ({len(want)})"

    @precondition(has_volumes)
    @rule(n=picks, size=st.one_of(offsets, st.just(0)))
    def truncate(self, n: int, size: int) -> None:
        """Truncate sets the size; a shrunk-then-grown tail reads as zeros."""
        v = self.pick(n)
        self.pool.truncate(v.id, size)
        v.truncate(size)
        assert self.pool.get(v.id).size == size

    @precondition(has_volumes)
    @rule(n=picks, other=picks, how=st.sampled_from(["fresh", "existing", "self"]))
    def rename(self, n: int, other: int, how: str) -> None:
        """Rename to a fresh name, over another volume (replacing it) or onto
        itself (no-op) keeps the id and the data."""
        v = self.pick(n)
        if how == "fresh":
            new = volume_name(random.Random(other), {x.name for x in self.model.vols.values()})
        elif how == "existing":
            new = self.pick(other).name
        else:
            new = v.name
        self.pool.rename_volume(v.id, new)
        self.model.rename(v.id, new)
        assert self.pool.lookup(new).id == v.id

    @precondition(has_volumes)
    @rule(n=picks)
    def delete(self, n: int) -> None:
        """Delete removes the volume; check() proves its blocks were released."""
        v = self.pick(n)
        self.pool.delete_volume(v.id)
        self.model.delete(v.id)

    @precondition(has_volumes)
    @rule(n=picks, mode=st.integers(0, 0o777), uid=st.integers(0, 70000), gid=st.integers(0, 70000))
    def set_attrs(self, n: int, mode: int, uid: int, gid: int) -> None:
        """Mode, uid and gid are stored and survive remounts and crashes."""
        v = self.pick(n)
        info = self.pool.set_attrs(v.id, mode=mode, uid=uid, gid=gid)
        assert (info.mode, info.uid, info.gid) == (mode, uid, gid)
        v.mode, v.uid, v.gid = mode, uid, gid

    @rule()
    def sync(self) -> None:
        """sync() changes nothing visible."""
        self.pool.sync()

    @rule()
    def tick(self) -> None:
        """Housekeeping changes nothing visible."""
        self.pool.tick()

    @rule()
    def remount(self) -> None:
        """close() + open() serves exactly the same pool."""
        self.pool.close()
        self.pool = Pool.open(self.storage)

    @rule(mode=st.sampled_from(["lose", "keep", "random"]), seed=picks)
    def crash_after_sync(self, mode: str, seed: int) -> None:
        """A crash right after sync() loses nothing and leaves it consistent."""
        self.pool.sync()
        self.storage = self.crash_storage(mode, seed)
        self.pool = Pool.open(self.storage)

    # -- invariants -------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        """check() finds no problem; volume list and count match the model."""
        problems = self.pool.check()
        assert problems == [], problems
        listed = sorted((i.id, i.name, i.size) for i in self.pool.volumes())
        assert listed == sorted((v.id, v.name, v.size) for v in self.model.vols.values())
        assert self.pool.statfs().volumes == len(self.model.vols)

    @invariant()
    def contents(self) -> None:
        """Every byte and attribute of every volume matches the model."""
        problems = compare_exact(self.pool, self.model)
        assert problems == [], problems

    def teardown(self) -> None:
        """A last exact comparison, also after a final remount."""
        try:
            problems = compare_exact(self.pool, self.model)
            assert problems == [], problems
            self.pool.close()
            self.pool = Pool.open(self.storage)
            problems = compare_exact(self.pool, self.model) + self.pool.check()
            assert problems == [], f"after final remount: {problems}"
        finally:
            self.pool.close()
            self.cleanup()

    def cleanup(self) -> None:
        """Remove whatever the storage left behind."""


class SimPoolMachine(PoolMachine):
    """The machine on the in-memory crash simulator."""

    def new_storage(self) -> Storage:
        return SimStorage(label="sim-model")

    def crash_storage(self, mode: str, seed: int) -> Storage:
        assert isinstance(self.storage, SimStorage)
        return durable_copy(self.storage.crash(len(self.storage.log), mode, random.Random(seed)))


class SimPlainPoolMachine(SimPoolMachine):
    """The simulator machine with compression off (data stored verbatim)."""

    compression = False


class OsPoolMachine(PoolMachine):
    """The machine on real files in a temporary directory."""

    def new_storage(self) -> Storage:
        self.tmpdir = tempfile.mkdtemp(prefix="cowfs-model-")
        return OsStorage(self.tmpdir)

    def crash_storage(self, mode: str, seed: int) -> Storage:
        # A killed process: the kernel closes its descriptors (dropping the
        # lock) without any close() logic running.  What it wrote stays.
        self.pool._close_files()
        self.storage.unlock()
        return OsStorage(self.tmpdir)

    def cleanup(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


MACHINE_SETTINGS = settings(
    max_examples=30,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TestSimPool = SimPoolMachine.TestCase
TestSimPool.settings = MACHINE_SETTINGS
TestSimPlainPool = SimPlainPoolMachine.TestCase
TestSimPlainPool.settings = settings(MACHINE_SETTINGS, max_examples=8)
TestOsPool = OsPoolMachine.TestCase
TestOsPool.settings = MACHINE_SETTINGS


def random_offset(rng: random.Random) -> int:
    """Mirror of the ``offsets`` strategy for the seeded driver."""
    pick = rng.randrange(4)
    if pick == 0:
        return rng.randint(0, 12 * BLOCK)
    if pick == 1:
        return rng.randint(0, 12) * BLOCK
    if pick == 2:
        return rng.randint(1, 12) * BLOCK + rng.randint(-3, 3)
    return rng.randint(0, MAX_SIZE)


def random_length(rng: random.Random) -> int:
    """Mirror of the ``lengths`` strategy for the seeded driver."""
    pick = rng.randrange(3)
    if pick == 0:
        return rng.randint(1, 3 * BLOCK)
    if pick == 1:
        return rng.choice([1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 16 * BLOCK])
    return rng.randint(1, 70_000)


def drive(machine: PoolMachine, seed: int, steps: int) -> None:
    """Run ``steps`` random rules of ``machine`` chosen by a seeded RNG,
    checking the invariants after each; long runs find bugs that need many
    overlapping operations, which short hypothesis examples rarely build."""
    rng = random.Random(seed)
    m = machine
    n = lambda: rng.randrange(1 << 16)  # noqa: E731 - a volume pick
    actions = [
        (30, lambda: m.write(n(), random_offset(rng), random_length(rng), rng.choice(CONTENT_KINDS), n())),
        (15, lambda: m.read(n(), random_offset(rng), random_length(rng))),
        (10, lambda: m.truncate(n(), random_offset(rng) if rng.random() < 0.9 else 0)),
        (8, lambda: m.create(n(), rng.choice((0, rng.randint(0, MAX_SIZE), rng.randint(0, 64) * BLOCK)))),
        (5, lambda: m.rename(n(), n(), rng.choice(["fresh", "existing", "self"]))),
        (3, lambda: m.delete(n())),
        (3, lambda: m.set_attrs(n(), rng.randint(0, 0o777), rng.randint(0, 70000), rng.randint(0, 70000))),
        (8, m.sync),
        (2, m.tick),
        (3, m.remount),
        (3, lambda: m.crash_after_sync(rng.choice(["lose", "keep", "random"]), n())),
    ]
    needs_volume = {0, 1, 2, 4, 5, 6}
    weights = [w for w, _ in actions]
    try:
        for _ in range(steps):
            i = rng.choices(range(len(actions)), weights)[0]
            if i in needs_volume and not m.model.vols or i == 3 and len(m.model.vols) >= 6:
                i = 3 if not m.model.vols else 0
            actions[i][1]()
            m.consistent()
            m.contents()
    finally:
        m.teardown()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("machine", [SimPoolMachine, SimPlainPoolMachine, OsPoolMachine], ids=["sim", "sim-plain", "os"])
def test_seeded_long_run(machine: type[PoolMachine], seed: int) -> None:
    """Proves: 300 random operations in a row, on real files and on the
    simulator, keep the engine equal to the model and consistent."""
    drive(machine(), seed, 300)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 120))
@pytest.mark.parametrize("machine", [SimPoolMachine, SimPlainPoolMachine, OsPoolMachine], ids=["sim", "sim-plain", "os"])
def test_seeded_long_run_slow(machine: type[PoolMachine], seed: int) -> None:
    """Proves the same over many more and longer runs."""
    drive(machine(), seed, 1000)


@pytest.mark.parametrize("seed", range(3))
def test_many_blocks(seed: int) -> None:
    """Proves: thousands of scattered block writes to one 48 MiB volume (a
    tree several levels deep, leaves splitting and emptying), with
    truncates, a remount and a crash right after sync, match the model."""
    rng = random.Random(seed)
    storage = SimStorage(label="sim-many")
    Pool.mkfs(storage, compression=seed != 1)
    pool = Pool.open(storage)
    model = PoolModel()
    v = model.create(pool.create_volume("big", 0).id, "big", 0)
    nblocks = 12_000
    for i in range(5000):
        off = rng.randrange(nblocks) * BLOCK + rng.choice((0, 0, 17))
        data = make_payload(rng, rng.choice((BLOCK, 100, 3 * BLOCK)), f"m{i}")
        pool.write(v.id, off, data)
        v.write(off, data)
        if i % 1000 == 999:
            size = rng.randrange(nblocks * BLOCK)
            pool.truncate(v.id, size)
            v.truncate(size)
            pool.sync()
    assert pool.check() + compare_exact(pool, model) == []
    image = durable_copy(storage.crash(len(storage.log), "random", rng))
    recovered = Pool.open(image)
    assert recovered.check() + compare_exact(recovered, model) == []
    recovered.close()
    pool.close()
    pool = Pool.open(storage)
    assert pool.check() + compare_exact(pool, model) == []
    pool.truncate(v.id, 0)
    assert pool.check() == [] and pool.statfs().used == 0
    pool.close()


def test_far_offsets() -> None:
    """Proves: blocks at very large offsets (up to 2**44) of a huge sparse
    volume are stored and read back, holes between them read as zeros, and
    shrinking past them frees them."""
    storage = SimStorage(label="sim-far")
    Pool.mkfs(storage)
    pool = Pool.open(storage)
    vid = pool.create_volume("huge", 1 << 44).id
    spots = [0, BLOCK * 7 + 5, 1 << 30, (1 << 40) - 3, (1 << 44) - BLOCK]
    for n, off in enumerate(spots):
        pool.write(vid, off, f"spot {n} ".encode() * 100)
    pool.sync()
    pool.close()
    pool = Pool.open(storage)
    for n, off in enumerate(spots):
        want = f"spot {n} ".encode() * 100
        assert pool.read(vid, off, len(want)) == want, off
        assert pool.read(vid, off + 2 * BLOCK, BLOCK) == bytes(BLOCK) or off + 2 * BLOCK >= 1 << 44
    assert pool.get(vid).size == 1 << 44
    assert pool.get(vid).allocated <= len(spots) * 2 * BLOCK
    pool.truncate(vid, 1 << 30)
    assert pool.check() == []
    assert pool.get(vid).allocated <= 3 * 2 * BLOCK
    pool.close()


def test_write_times_are_journaled_by_the_next_sync() -> None:
    """Proves: the mtime a write sets is journaled by the next sync, so a
    power cut right after keeps it, with snapshots of the volume present;
    and a volume deleted after its write but before that sync is left out
    (the sync succeeds and the crash image replays)."""
    storage = SimStorage(label="sim-times")
    Pool.mkfs(storage)
    pool = Pool.open(storage)
    keep = pool.create_volume("keep", 1 << 20).id
    gone = pool.create_volume("gone", 1 << 20).id
    for n in range(3):
        pool.snapshot(None, f"s{n}")
    pool.write(keep, 0, b"a" * BLOCK)
    pool.write(gone, 0, b"b" * BLOCK)
    pool.delete_volume(gone)
    pool.sync()
    want = pool.get(keep).mtime_ns
    assert want > pool.snapshot_lookup("keep", "s2").created_ns
    image = durable_copy(storage.crash(len(storage.log), "lose"))
    recovered = Pool.open(image)
    assert recovered.get(keep).mtime_ns == want
    assert [v.name for v in recovered.volumes()] == ["keep"]
    assert recovered.check() == []
    recovered.close()
    pool.close()
