"""I/O faults in the middle of a workload.

The :class:`SimStorage` fault hook makes one I/O call fail -- a write, sync
or read of any pool file with EIO, or a file growth with ENOSPC -- at a
random moment of a seeded workload.  The engine must turn it into a
:class:`PoolError` (never a raw ``OSError`` or anything else), and
afterwards, whether it kept working or stopped itself, the pool must recover
as after a power cut: a crash image taken right after the fault, and the same
storage closed and reopened, both open, pass ``check()`` and show only states
the :class:`engine_model.CrashHistory` model allows, where the failed
operation counts as one that may or may not have happened.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from cowfs.blockio import SimStorage
from cowfs.errors import PoolError
from cowfs.pool import Pool

from engine_model import MAX_SIZE, CrashHistory, PoolModel, random_mutation

FAULTS = [
    ("write", "data", errno.EIO),
    ("write", "journal", errno.EIO),
    ("write", "meta", errno.EIO),
    ("write", "superblock", errno.EIO),
    ("sync", "data", errno.EIO),
    ("sync", "journal", errno.EIO),
    ("sync", "meta", errno.EIO),
    ("read", "data", errno.EIO),
    ("allocate", "data", errno.ENOSPC),
    ("allocate", "meta", errno.ENOSPC),
]


class Injector:
    """A SimStorage fault hook failing the ``nth`` matching I/O call once."""

    def __init__(self, op: str, name: str, err: int, nth: int) -> None:
        self.op, self.name, self.err, self.left = op, name, err, nth
        self.fired = False

    def __call__(self, op: str, name: str, offset: int, length: int) -> None:
        if self.fired or op != self.op or name != self.name:
            return
        self.left -= 1
        if self.left <= 0:
            self.fired = True
            raise OSError(self.err, f"injected {errno.errorcode[self.err]} on {op} of {name}")


@dataclass
class _Info:
    id: int
    name: str
    size: int


class ModelOnly:
    """Stands in for the pool to learn what a failed operation would have
    done: accepts every call, assigns the id the engine would have."""

    def __init__(self, next_id: int) -> None:
        self.next_id = next_id

    def create_volume(self, name: str, size: int = 0) -> _Info:
        """Pretend to create; the id is the next the engine hands out."""
        return _Info(self.next_id, name, size)

    def write(self, vol_id: int, offset: int, data: bytes) -> int:
        """Pretend to write everything."""
        return len(data)

    def truncate(self, vol_id: int, size: int) -> None:
        """Pretend to truncate."""

    def rename_volume(self, vol_id: int, new_name: str) -> None:
        """Pretend to rename."""

    def delete_volume(self, vol_id: int) -> None:
        """Pretend to delete."""


class Counter:
    """A SimStorage hook that only counts the I/O calls of one kind."""

    def __init__(self, op: str, name: str) -> None:
        self.op, self.name, self.count = op, name, 0

    def __call__(self, op: str, name: str, offset: int, length: int) -> None:
        if (op, name) == (self.op, self.name):
            self.count += 1


def workload(
    seed: int, hook: Callable[[str, str, int, int], None]
) -> tuple[SimStorage, CrashHistory, Pool | None, str | None]:
    """Run the seeded workload with ``hook`` installed after mkfs until the
    first PoolError.  Returns the storage, the history (where an operation
    that failed is recorded as one that may or may not have happened), the
    last pool object and the failure's description (None: no failure)."""
    rng = random.Random(seed)
    storage = SimStorage(label=f"sim-fault-{seed}")
    journal = {"journal_size": 16 * 1024} if seed % 3 == 0 else {}
    Pool.mkfs(storage, compression=seed % 2 == 0, **journal)
    history = CrashHistory(storage.log)
    model = PoolModel()
    history.acknowledge(model)
    storage.fault = hook
    try:
        pool = Pool.open(storage)
    except PoolError as e:
        return storage, history, None, f"open: {e.errname}: {e}"
    next_id = 1
    for i in range(120):
        start = len(storage.log)
        state = rng.getstate()
        roll = rng.random()
        try:
            if roll < 0.15:
                pool.sync()
                history.acknowledge(model)
            elif roll < 0.2:
                pool.sync()
                history.acknowledge(model)
                pool.close()
                pool = Pool.open(storage)
            elif roll < 0.23:
                pool.tick()
            else:
                label, touched = random_mutation(rng, pool, model, f"f{seed}o{i}", max_size=MAX_SIZE // 4)
                next_id = max([next_id, *(vid + 1 for vid in touched)])
                history.record(start, label, model, touched)
        except PoolError as e:
            if roll >= 0.23:
                # Replay the same random choices against a stand-in to learn
                # what the failed operation would have changed.
                rng.setstate(state)
                rng.random()
                maybe = model.copy()
                label, touched = random_mutation(rng, ModelOnly(next_id), maybe, f"f{seed}o{i}", max_size=MAX_SIZE // 4)
                history.record(start, "failed " + label, maybe, touched)
            return storage, history, pool, f"{e.errname}: {e}"
    return storage, history, pool, None


def run_with_fault(seed: int) -> None:
    """One seeded workload with one injected fault, then the recovery checks."""
    op, name, err = FAULTS[seed % len(FAULTS)]
    counter = Counter(op, name)
    storage, _, _, failure = workload(seed, counter)
    assert failure is None, f"seed {seed}: the workload fails without a fault: {failure}"
    if not counter.count:
        pytest.skip(f"seed {seed}: the workload makes no {op} of {name}")
    nth = random.Random(seed).randint(1, counter.count)
    injector = Injector(op, name, err, nth)
    storage, history, pool, failure = workload(seed, injector)
    where = f"seed={seed} fault={op}/{name}/{errno.errorcode[err]} at call {nth} of {counter.count}"
    if not injector.fired:
        pytest.skip(f"{where}: the workload took another path and the fault never fired")
    if failure is not None:
        assert failure.startswith((errno.errorcode[err] + ":", "EIO:")), f"{where}: surfaced as {failure}"
    storage.fault = None
    point = len(storage.log)

    for mode in ("lose", "keep", "random"):
        recovered = Pool.open(storage.crash(point, mode, random.Random(seed)))
        problems = recovered.check() + history.judge(recovered, point)
        recovered.close()
        assert problems == [], f"{where} crash image {mode}: {problems}"

    try:
        if pool is not None:
            pool.close()
    except PoolError as e:
        assert e.errno == errno.EIO, f"{where}: close after the fault: {e.errname} {e}"
    pool = Pool.open(storage)
    problems = pool.check() + history.judge(pool, len(storage.log))
    pool.close()
    assert problems == [], f"{where} reopened: {problems}"


@pytest.mark.parametrize("seed", range(40))
def test_fault_then_recover(seed: int) -> None:
    """Proves: an I/O error or ENOSPC from the file system at a random moment
    becomes a PoolError (EIO or the fault's errno), and the pool afterwards
    recovers like after a power cut: consistent, nothing acknowledged lost,
    nothing never-written shown."""
    run_with_fault(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1000, 1400))
def test_fault_then_recover_slow(seed: int) -> None:
    """Proves the same for many more fault positions."""
    run_with_fault(seed)
