"""Power cuts in the middle of snapshot, group snapshot, restore, clone,
clone-group, delete and rename (the engine's crash simulator).

A seeded workload mixes writes and truncates with every snapshot operation
(the random driver of ``test_engine_snapshots.py``) on a :class:`SimStorage`
that logs every write and sync, syncing every few operations; some seeds use
a tiny journal so that checkpoints happen on their own in the middle of it.
The model's state is recorded after every operation.  Then, at every point
``p`` of the log (about 1600 over the default workloads, 20000 in the slow
variant) and in each mode of :meth:`SimStorage.crash` ("lose" the unsynced
writes, "keep" them, or keep a "random" subset of their 4 KiB pieces in any
order), the image is opened and must:

* open, and pass ``check()``;
* show exactly the state after the last acknowledged sync or after one of
  the operations begun since (before ``p``) -- the journal replays a prefix of
  whole records, so every volume's and snapshot's name, id, size, bytes and
  clone origin match one of those states;
* in particular, every group operation (snapshots, restores or clones of
  several volumes at one instant) is wholly there or not at all.

Every tenth recovered pool must also report the space figures of that state
(exactly, without compression), and is then worked on, synced, closed and
reopened, and must match the model exactly.
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass, field

import pytest

from cowfs.blockio import SimStorage
from cowfs.errors import PoolError
from cowfs.pool import Pool

from engine_model import read_all
from test_engine_snapshots import STEP_WEIGHTS, SnapPoolModel, compare, random_step

MODES = ("lose", "keep", "random")
# Journal size by seed % 3.  Small journals make the engine checkpoint by
# itself, also in the middle of a group operation; 1 MiB never fills here
# (and, unlike the 16 MiB default, is cheap to copy at every crash point).
JOURNAL_SIZES = (1 << 20, 24 * 1024, 64 * 1024)

# Group operations are what can be torn in half: make them frequent.
WEIGHTS = {**STEP_WEIGHTS, "group_snapshot": 14, "group_restore": 8, "clone_group": 8}

Fingerprint = tuple[tuple, tuple]

SEEDS = (1, 2, 3, 4)
N_OPS = 250


@dataclass
class State:
    """The model after one operation (or at an acknowledged sync)."""

    label: str
    start: int                 # log length before the operation began
    model: SnapPoolModel
    fp: Fingerprint
    group: list[int] = field(default_factory=list)   # ids one group operation created


@dataclass
class Epoch:
    """An acknowledged sync and the operations begun after it."""

    ack: int
    state: State
    ops: list[State] = field(default_factory=list)


@dataclass
class SnapWorkload:
    """A finished workload: its storage with the full log and its history."""

    seed: int
    storage: SimStorage
    epochs: list[Epoch]
    mkfs_end: int
    compression: bool

    def epoch_at(self, point: int) -> Epoch:
        """The epoch acknowledged at ``point``."""
        found = [e for e in self.epochs if e.ack <= point]
        assert found, f"crash point {point} lies before the first acknowledgement"
        return found[-1]

    def allowed(self, point: int) -> tuple[Epoch, list[State]]:
        """The states a crash at ``point`` may leave: the acknowledged one and
        the one after each operation begun before ``point``."""
        e = self.epoch_at(point)
        return e, [e.state] + [op for op in e.ops if op.start < point]


def pool_fingerprint(pool: Pool) -> Fingerprint:
    """What the pool serves, in the form of :meth:`SnapPoolModel.fingerprint`."""
    def sha(ds_id: int, size: int) -> str:
        return hashlib.sha256(read_all(pool, ds_id, size)).hexdigest()
    vols = tuple(sorted((i.id, i.name, i.size, sha(i.id, i.size), (i.origin or {}).get("source"))
                        for i in pool.volumes()))
    snaps = tuple(sorted((s.id, s.volume, s.name, s.size, sha(s.id, s.size))
                         for s in pool.snapshots()))
    return vols, snaps


def fp_ids(fp: Fingerprint) -> set[int]:
    """Ids of every volume and snapshot in a fingerprint."""
    return {x[0] for x in fp[0]} | {x[0] for x in fp[1]}


def fp_diff(got: Fingerprint, want: Fingerprint) -> str:
    """The volumes and snapshots in which two fingerprints differ."""
    out = []
    for what, g, w in (("volumes", got[0], want[0]), ("snapshots", got[1], want[1])):
        gs, ws = set(g), set(w)
        if gs != ws:
            out.append(f"{what} only in the pool: {sorted(gs - ws)}; only in the model: "
                       f"{sorted(ws - gs)}")
    return "; ".join(out) or "no difference"


@functools.lru_cache(maxsize=None)
def run_snap_workload(seed: int, n_ops: int) -> SnapWorkload:
    """Run the seeded workload once (cached: several tests judge it)."""
    rng = random.Random(seed)
    storage = SimStorage(label=f"sim-snapcrash-{seed}")
    compression = seed % 2 == 0
    Pool.mkfs(storage, compression=compression, journal_size=JOURNAL_SIZES[seed % 3])
    mkfs_end = len(storage.log)
    model = SnapPoolModel()
    epochs = [Epoch(mkfs_end, State("mkfs", mkfs_end, model.copy(), model.fingerprint()))]
    pool = Pool.open(storage)

    def acknowledge(label: str) -> None:
        epochs.append(Epoch(len(storage.log), State(label, len(storage.log), model.copy(),
                                                    model.fingerprint())))

    since, every = 0, 3
    for i in range(n_ops):
        start = len(storage.log)
        roll = rng.random()
        if since >= every or roll < 0.04:
            pool.sync()
            acknowledge("sync")
            since, every = 0, rng.choice((1, 2, 3, 5, 8))
            continue
        if roll < 0.07:
            pool.close()
            acknowledge("close")
            pool = Pool.open(storage)
            continue
        label, group = random_step(rng, pool, model, f"c{seed}o{i}", WEIGHTS)
        epochs[-1].ops.append(State(label, start, model.copy(), model.fingerprint(), group))
        since += 1
    pool.sync()
    acknowledge("final sync")
    problems = compare(pool, model, exact_exclusive=not compression)
    assert problems == [], f"seed {seed}: live pool differs from the model: {problems}"
    pool.close()
    return SnapWorkload(seed, storage, epochs, mkfs_end, compression)


def near(w: SnapWorkload, point: int) -> str:
    """The operations around a crash point, for failure messages."""
    seq = [(s.start, s.label) for e in w.epochs for s in [e.state, *e.ops]]
    before = [f"{lbl}@{st}" for st, lbl in seq if st < point][-8:]
    after = [f"{lbl}@{st}" for st, lbl in seq if st >= point][:3]
    return ", ".join(before + ["<crash>"] + after)


def judge(w: SnapWorkload, point: int, mode: str, *, keep_working: bool) -> None:
    """Crash ``w`` at ``point`` in ``mode`` and assert the module's rules."""
    rng = random.Random(w.seed * 1_000_003 + point * 3 + MODES.index(mode))
    image = w.storage.crash(point, mode, rng)
    where = f"seed={w.seed} point={point}/{len(w.storage.log)} mode={mode} near [{near(w, point)}]"
    try:
        pool = Pool.open(image)
    except PoolError as err:
        raise AssertionError(f"{where}: the recovered pool does not open: {err}") from err
    try:
        problems = pool.check()
        assert problems == [], f"{where}: check() after recovery: {problems}"
        epoch, allowed = w.allowed(point)
        got = pool_fingerprint(pool)
        present = fp_ids(got)
        for k, op in enumerate(allowed[1:], 1):
            # Only judged while no later operation deleted a member (the
            # state match below covers the rest).
            if not all(set(op.group) <= fp_ids(s.fp) for s in allowed[k:]):
                continue
            found = [i for i in op.group if i in present]
            assert not found or len(found) == len(op.group), (
                f"{where}: group operation {op.label} is half done: ids {found} of "
                f"{op.group} exist")
        match = [s for s in allowed if s.fp == got]
        assert match, (f"{where}: the recovered pool matches none of the {len(allowed)} allowed "
                       f"states; versus the acknowledged one: {fp_diff(got, epoch.state.fp)}; "
                       f"versus the newest: {fp_diff(got, allowed[-1].fp)}")
        if keep_working:
            # States with equal bytes may differ in what they share (a write
            # of the bytes already there stores a new copy): take one whose
            # space figures match too, the earliest (a dataset made and
            # deleted since then may have been lost, and its id reused).
            fits = [s for s in match
                    if not compare(pool, s.model, exact_exclusive=not w.compression)]
            assert fits, (f"{where}: the recovered pool's bytes match an allowed state but not "
                          f"its space figures: "
                          f"{compare(pool, match[-1].model, exact_exclusive=not w.compression)}")
            model = fits[0].model.copy()
            for i in range(8):
                random_step(rng, pool, model, f"after{point}-{i}")
            pool.sync()
            pool.close()
            pool = Pool.open(image)
            problems = compare(pool, model, exact_exclusive=not w.compression)
            assert problems == [], f"{where}: after recovery, more work, remount: {problems}"
    finally:
        pool.close()


def run_points(seed: int, n_ops: int) -> int:
    """Judge every crash point of workload ``seed`` in every mode; return
    how many cases were judged."""
    w = run_snap_workload(seed, n_ops)
    cases = [(p, m) for p in range(w.mkfs_end, len(w.storage.log) + 1) for m in MODES]
    for n, (point, mode) in enumerate(cases):
        judge(w, point, mode, keep_working=n % 10 == 0)
    return len(cases)


def test_workload_exercises_snapshot_operations() -> None:
    """Proves the crash workloads below really contain group snapshots,
    restores and clones (else the crash tests would prove little)."""
    labels = [op.label for seed in SEEDS for e in run_snap_workload(seed, N_OPS).epochs
              for op in e.ops]
    for what in ("snapshot(", "restore(", "clone(", "delete_snapshot(", "rename_snapshot(",
                 "rename_volume(", "delete_volume(", "write("):
        assert any(lbl.startswith(what) for lbl in labels), f"no {what} in the workloads"
    groups = [op for seed in SEEDS for e in run_snap_workload(seed, N_OPS).epochs
              for op in e.ops if len(op.group) > 1]
    assert len(groups) >= 30, f"only {len(groups)} group operations in the workloads"


@pytest.mark.parametrize("seed", SEEDS)
def test_every_crash_point(seed: int) -> None:
    """Proves: at every point of the workload's log, in all three modes, the
    recovered pool opens, is consistent, holds everything acknowledged, and
    shows one of the states the operations since allow; no group operation
    is half done."""
    assert run_points(seed, N_OPS) > 400


@pytest.mark.parametrize("seed", SEEDS)
def test_every_mode_at_every_sync(seed: int) -> None:
    """Proves: right after any acknowledged sync, with the unsynced tail lost,
    kept or shuffled, the pool is exactly the acknowledged state."""
    w = run_snap_workload(seed, N_OPS)
    for e in w.epochs[1:]:
        for mode in MODES:
            pool = Pool.open(w.storage.crash(e.ack, mode, random.Random(e.ack)))
            try:
                problems = pool.check()
                got = pool_fingerprint(pool)
            finally:
                pool.close()
            assert problems == [] and got == e.state.fp, (
                f"seed={seed} ack={e.ack} ({e.state.label}) mode={mode}: {problems} "
                f"{fp_diff(got, e.state.fp)}")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 30))
def test_every_crash_point_slow(seed: int) -> None:
    """Proves the same at every point of more and longer workloads."""
    assert run_points(seed, 600) > 1500
