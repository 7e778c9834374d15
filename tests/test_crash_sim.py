"""Crash simulation: power cuts at any point of a random workload.

A seeded workload (creates, unaligned and aligned writes of random, text, zero
and mixed content, growing and shrinking truncates, renames incl. over another
volume, deletes, ``tick()``, clean remounts, and a ``sync()`` every few
operations) runs over :class:`SimStorage`, which logs every write and sync.
:class:`engine_model.CrashHistory` records the model at every acknowledged
sync and the effect of every operation (see its docstring for the exact
possible-state rule).  Then, for many crash points ``p`` and each mode of
:meth:`SimStorage.crash` ("lose": unsynced writes vanish, "keep": all land,
"random": each 4 KiB piece lands or not, in any order), the image is mounted
and must (a) open, (b) pass ``check()``, (c)+(d) show only states the model
allows, with everything acknowledged present.  Every few points the recovered
pool is also worked on, synced, closed and reopened, and must match exactly.
Some workloads use small journals (the engine then checkpoints on its own,
also mid-operation) or 16 MiB volumes (multi-level trees).  Power cuts during
``mkfs`` and during recovery itself are covered too.

The default run checks about 2,500 crash images; ``make test-slow`` (or
``pytest -m slow``) runs the variant with about 9,000 more.
"""

from __future__ import annotations

import random

import pytest

from cowfs.blockio import SimStorage
from cowfs.errors import PoolError
from cowfs.pool import Pool

from engine_model import MAX_SIZE, PoolModel, Workload, compare_exact, durable_copy, random_mutation, run_workload

MODES = ("lose", "keep", "random")


def crash_points(w: Workload, count: int) -> list[int]:
    """``count`` crash points after mkfs: every sync boundary first (just
    before and at each acknowledgement), then uniformly random ones."""
    rng = random.Random(w.seed * 7919 + count)
    end = len(w.storage.log)
    special: set[int] = set()
    for e in w.history.epochs[1:]:
        special.update((e.ack - 1, e.ack))
    special = {p for p in special if w.mkfs_end <= p <= end}
    points = sorted(special)
    rng.shuffle(points)
    points = points[: count // 3]
    while len(points) < count:
        points.append(rng.randint(w.mkfs_end, end))
    return sorted(points)


def near_ops(w: Workload, point: int) -> list[str]:
    """Labels of the operations just before (and a few after) a crash point,
    for failure messages."""
    before = [f"{label}@{start}" for start, label in w.labels if start < point]
    after = [f"{label}@{start}" for start, label in w.labels if start >= point]
    return before[-10:] + ["<crash>"] + after[:3]


def recover_and_judge(w: Workload, point: int, mode: str, *, keep_working: bool) -> None:
    """Crash at ``point`` in ``mode``, mount, and assert (a)-(d) of the module
    docstring; with ``keep_working`` also use the recovered pool."""
    rng = random.Random(w.seed * 1_000_003 + point * 7 + MODES.index(mode))
    image = w.storage.crash(point, mode, rng)
    where = f"seed={w.seed} point={point}/{len(w.storage.log)} mode={mode} near {near_ops(w, point)}"
    try:
        pool = Pool.open(image)
    except PoolError as err:
        raise AssertionError(f"{where}: recovered pool does not open: {err}") from err
    problems = pool.check()
    assert problems == [], f"{where}: check() after recovery: {problems}"
    problems = w.history.judge(pool, point)
    assert problems == [], f"{where}: " + "\n".join(problems)
    if keep_working:
        keep_working_after_recovery(pool, image, rng, where)
    else:
        pool.close()


def keep_working_after_recovery(pool: Pool, image: SimStorage, rng: random.Random, where: str) -> None:
    """Write, truncate, rename and delete on a recovered pool, sync, close,
    reopen: the result must match a model exactly and pass check()."""
    model = PoolModel.from_pool(pool)
    for i in range(12):
        random_mutation(rng, pool, model, f"after-{i}", max_size=MAX_SIZE)
    pool.sync()
    pool.close()
    pool = Pool.open(image)
    problems = pool.check() + compare_exact(pool, model, attrs=False)
    pool.close()
    assert problems == [], f"{where}: after recovery, more work, remount: {problems}"


def run_points(seed: int, count: int | None, max_size: int = MAX_SIZE) -> int:
    """Judge ``count`` crash points of workload ``seed``, cycling the modes,
    or (``None``) every point in every mode; return how many were checked."""
    w = run_workload(seed, max_size=max_size)
    if count is None:
        cases = [(p, m) for p in range(w.mkfs_end, len(w.storage.log) + 1) for m in MODES]
    else:
        cases = [(p, MODES[n % len(MODES)]) for n, p in enumerate(crash_points(w, count))]
    for n, (point, mode) in enumerate(cases):
        recover_and_judge(w, point, mode, keep_working=n % 10 == 0)
    return len(cases)


@pytest.mark.parametrize("seed", [15, 17])
def test_every_crash_point(seed: int) -> None:
    """Proves the same at every point of one workload's log, in every mode."""
    assert run_points(seed, None) > 500


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_crash_points(seed: int) -> None:
    """Proves: at 150 crash points per workload, in all three modes, the
    recovered pool opens, is consistent, has lost nothing acknowledged, shows
    no byte that was not written there, and keeps working."""
    assert run_points(seed, 150) == 150


@pytest.mark.parametrize("seed", [18, 19])
def test_crash_points_big_volumes(seed: int) -> None:
    """Proves the same for volumes of up to 16 MiB, whose trees have several
    leaves and an internal level that splits between checkpoints."""
    assert run_points(seed, 60, max_size=16 << 20) == 60


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 112))
def test_crash_points_slow(seed: int) -> None:
    """Proves the same as :func:`test_every_crash_point` over more workloads."""
    assert run_points(seed, None) > 500


@pytest.mark.parametrize("seed", [11, 12])
def test_every_mode_at_every_sync(seed: int) -> None:
    """Proves: a crash right after any acknowledged sync, with the unsynced
    tail lost, kept or shuffled, recovers exactly the acknowledged state."""
    w = run_workload(seed)
    for e in w.history.epochs[1:]:
        for mode in MODES:
            image = w.storage.crash(e.ack, mode, random.Random(e.ack))
            pool = Pool.open(image)
            problems = pool.check() + compare_exact(pool, e.model, attrs=False)
            pool.close()
            assert problems == [], f"seed={seed} ack={e.ack} mode={mode}: {problems}"


@pytest.mark.parametrize("seed", [11, 12, 15])
def test_crash_during_recovery(seed: int) -> None:
    """Proves: a power cut while a mount replays the journal and writes its
    checkpoint (or while the recovered pool closes) loses nothing: mounting
    again, in any crash mode, serves exactly the acknowledged state."""
    w = run_workload(seed)
    acks = [e for e in w.history.epochs[1:] if e.model.vols]
    for e in random.Random(seed).sample(acks, min(6, len(acks))):
        image = durable_copy(w.storage.crash(e.ack, "lose"))
        base = len(image.log)
        Pool.open(image).close()
        for point in range(base, len(image.log) + 1):
            for mode in MODES:
                pool = Pool.open(image.crash(point, mode, random.Random(point)))
                problems = pool.check() + compare_exact(pool, e.model, attrs=False)
                pool.close()
                assert problems == [], f"seed={seed} ack={e.ack} recovery log point {point}/{len(image.log)} {mode}: {problems}"


def test_crash_during_mkfs() -> None:
    """Proves: a power cut while ``mkfs`` runs leaves either a pool that opens
    empty and consistent or one that ``open`` refuses with a PoolError naming
    the pool -- never another exception."""
    storage = SimStorage(label="sim-mkfs")
    Pool.mkfs(storage)
    for point in range(len(storage.log) + 1):
        for mode in MODES:
            image = storage.crash(point, mode, random.Random(point))
            try:
                pool = Pool.open(image)
            except PoolError as err:
                assert "sim-mkfs" in str(err), f"point {point} {mode}: message does not name the pool: {err}"
                continue
            problems = pool.check()
            vols = pool.volumes()
            pool.close()
            assert problems == [] and vols == [], f"point {point} {mode}: {problems} {vols}"
