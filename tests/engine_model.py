"""Shared in-memory model of a pool and workload helpers for the engine tests.

The model is deliberately naive: a volume is a name, a size and a sparse map
from block index to the 4096 bytes of that block (absent = zeros).  Bytes past
a volume's size are always zero in the model; a shrinking truncate zeroes the
tail of the partial last block, so a later grow exposes zeros, as POSIX asks.

Because unchanged blocks are shared ``bytes`` objects, :meth:`PoolModel.copy`
is cheap (a shallow copy of each block map), which lets the crash tests keep a
snapshot of the model at every acknowledged sync.

Nothing here knows how the engine lays data out; it only talks to the public
API of :class:`cowfs.pool.Pool`.
"""

from __future__ import annotations

import errno
import functools
import random
from dataclasses import dataclass, field

from cowfs.blockio import SimStorage
from cowfs.errors import PoolError
from cowfs.pool import BLOCK, Pool

ZERO_BLOCK = bytes(BLOCK)
READ_CHUNK = 256 * 1024

CONTENT_KINDS = ("random", "text", "zeros", "mixed")
MAX_SIZE = 1 << 20  # largest volume size in the crash workloads


@dataclass
class VolModel:
    """Expected state of one volume."""

    id: int
    name: str
    size: int = 0
    blocks: dict[int, bytes] = field(default_factory=dict)
    mode: int = 0o644
    uid: int = 0
    gid: int = 0

    def copy(self) -> "VolModel":
        """An independent copy sharing the immutable block contents."""
        return VolModel(self.id, self.name, self.size, dict(self.blocks), self.mode, self.uid, self.gid)

    def block(self, index: int) -> bytes:
        """The 4096 bytes of block ``index`` (zeros past the size)."""
        return self.blocks.get(index, ZERO_BLOCK)

    def nblocks(self) -> int:
        """Number of blocks covering the size."""
        return -(-self.size // BLOCK)

    def read(self, offset: int, length: int) -> bytes:
        """What a read of ``length`` bytes at ``offset`` returns (short at EOF)."""
        end = min(self.size, offset + length)
        if end <= offset:
            return b""
        out = bytearray()
        for b in range(offset // BLOCK, -(-end // BLOCK)):
            out += self.block(b)
        start = offset - (offset // BLOCK) * BLOCK
        return bytes(out[start : start + end - offset])

    def write(self, offset: int, data: bytes) -> range:
        """Apply a write (growing the size if it ends past it); return the
        range of block indexes it touched."""
        end = offset + len(data)
        touched = range(offset // BLOCK, -(-end // BLOCK))
        for b in touched:
            lo = max(offset, b * BLOCK)
            hi = min(end, (b + 1) * BLOCK)
            buf = bytearray(self.block(b))
            buf[lo - b * BLOCK : hi - b * BLOCK] = data[lo - offset : hi - offset]
            self._store(b, bytes(buf))
        self.size = max(self.size, end)
        return touched

    def truncate(self, size: int) -> range:
        """Set the size; return the range of block indexes whose content
        changed or may have changed."""
        old = self.size
        if size < old:
            for b in [b for b in self.blocks if b * BLOCK >= size]:
                del self.blocks[b]
            if size % BLOCK:
                b = size // BLOCK
                buf = bytearray(self.block(b))
                buf[size % BLOCK :] = bytes(BLOCK - size % BLOCK)
                self._store(b, bytes(buf))
        self.size = size
        return range(min(old, size) // BLOCK, -(-max(old, size) // BLOCK))

    def _store(self, index: int, data: bytes) -> None:
        """Set block ``index`` (a zero block is kept implicitly)."""
        if data == ZERO_BLOCK:
            self.blocks.pop(index, None)
        else:
            self.blocks[index] = data


class PoolModel:
    """Expected state of a whole pool: volumes by id, with unique names."""

    def __init__(self) -> None:
        self.vols: dict[int, VolModel] = {}

    def copy(self) -> "PoolModel":
        """An independent copy (cheap: block contents are shared)."""
        out = PoolModel()
        out.vols = {vid: v.copy() for vid, v in self.vols.items()}
        return out

    def by_name(self, name: str) -> VolModel | None:
        """The volume called ``name``, if any."""
        for v in self.vols.values():
            if v.name == name:
                return v
        return None

    def create(self, vid: int, name: str, size: int = 0, mode: int = 0o644, uid: int = 0, gid: int = 0) -> VolModel:
        """Record a new volume."""
        assert vid not in self.vols, f"engine reused volume id {vid}"
        v = VolModel(vid, name, size, mode=mode, uid=uid, gid=gid)
        self.vols[vid] = v
        return v

    def rename(self, vid: int, new_name: str) -> int | None:
        """Rename; a different volume already called ``new_name`` is replaced
        (deleted).  Return the id of the replaced volume, if any."""
        target = self.by_name(new_name)
        replaced = None
        if target is not None and target.id != vid:
            del self.vols[target.id]
            replaced = target.id
        self.vols[vid].name = new_name
        return replaced

    def delete(self, vid: int) -> None:
        """Forget a volume."""
        del self.vols[vid]

    @classmethod
    def from_pool(cls, pool: Pool) -> "PoolModel":
        """Build a model by reading everything the pool holds (used after a
        crash recovery, once the recovered state has been judged)."""
        out = cls()
        for info in pool.volumes():
            v = out.create(info.id, info.name, 0, info.mode, info.uid, info.gid)
            v.write(0, read_all(pool, info.id, info.size))
            v.truncate(info.size)
        return out


def read_all(pool: Pool, vid: int, size: int) -> bytes:
    """Read bytes ``[0, size)`` of volume ``vid`` in moderate chunks."""
    out = bytearray()
    for off in range(0, size, READ_CHUNK):
        want = min(READ_CHUNK, size - off)
        got = pool.read(vid, off, want)
        if len(got) != want:
            raise AssertionError(f"volume {vid}: read({off}, {want}) returned {len(got)} bytes")
        out += got
    return bytes(out)


def describe(data: bytes) -> str:
    """A short human description of a block's content for failure messages."""
    if not data.strip(b"\0"):
        return f"<{len(data)} zero bytes>"
    head = data[:48]
    return f"<{len(data)} bytes: {head!r}...>"


def compare_exact(pool: Pool, model: PoolModel, *, attrs: bool = True) -> list[str]:
    """Every difference between what ``pool`` serves and ``model`` ([] = same):
    the set of volumes (ids, names, sizes, optionally mode/uid/gid) and every
    byte of every volume."""
    problems: list[str] = []
    infos = {i.id: i for i in pool.volumes()}
    if set(infos) != set(model.vols):
        problems.append(f"volume ids: pool has {sorted(infos)}, model has {sorted(model.vols)}")
    for vid in sorted(set(infos) & set(model.vols)):
        info, v = infos[vid], model.vols[vid]
        if (info.name, info.size) != (v.name, v.size):
            problems.append(f"volume {vid}: pool has ({info.name!r}, {info.size}), model ({v.name!r}, {v.size})")
            continue
        if attrs and (info.mode, info.uid, info.gid) != (v.mode, v.uid, v.gid):
            problems.append(
                f"volume {vid} {v.name!r}: attrs pool {(oct(info.mode), info.uid, info.gid)}, "
                f"model {(oct(v.mode), v.uid, v.gid)}"
            )
        data = read_all(pool, vid, v.size)
        for b in range(v.nblocks()):
            got = data[b * BLOCK : (b + 1) * BLOCK]
            want = v.block(b)[: len(got)]
            if got != want:
                problems.append(f"volume {vid} {v.name!r} block {b}: got {describe(got)}, want {describe(want)}")
                if len(problems) > 20:
                    return problems
    return problems


def make_payload(rng: random.Random, length: int, tag: str, kind: str | None = None) -> bytes:
    """``length`` bytes of test content.

    ``kind`` is one of :data:`CONTENT_KINDS` (random if None): incompressible
    random bytes, compressible text stamped with ``tag`` (so content is
    distinctive per volume and operation), all zeros, or a mix of the three
    that includes whole zero blocks.
    """
    kind = kind or rng.choice(CONTENT_KINDS)
    if kind == "random":
        return rng.randbytes(length)
    if kind == "zeros":
        return bytes(length)
    if kind == "text":
        unit = f"[{tag} the quick cow jumps over the lazy extent] ".encode()
        return (unit * (length // len(unit) + 1))[:length]
    out = bytearray()
    while len(out) < length:
        part = rng.choice(("random", "text", "zeros"))
        n = rng.choice((1, 100, BLOCK, 2 * BLOCK, rng.randint(1, 3 * BLOCK)))
        out += make_payload(rng, n, tag, part)
    return bytes(out[:length])


HOT = 32 * BLOCK  # half of all writes land here, so blocks get overwritten often


def random_extent(rng: random.Random, size: int, max_size: int, max_len: int = 64 * 1024) -> tuple[int, int]:
    """An (offset, length) for a write: often block-aligned, often not, half
    the time in the first 128 KiB (so that writes overlap), otherwise
    anywhere up to the current size, sometimes extending it (never past
    ``max_size``); now and then four times ``max_len`` long."""
    length = rng.choice((rng.randint(1, max_len), BLOCK, rng.randint(1, 3) * BLOCK, rng.randint(1, 200)))
    if rng.random() < 0.04:
        length = rng.randint(max_len, 4 * max_len)
    length = max(1, min(length, max_size))
    span = HOT if rng.random() < 0.5 else max(size, BLOCK)
    offset = rng.randint(0, max(0, min(span, max_size - length)))
    if rng.random() < 0.4:
        offset -= offset % BLOCK
    return offset, length


def volume_name(rng: random.Random, taken: set[str]) -> str:
    """A fresh valid volume name not in ``taken`` (some non-ASCII, some long)."""
    while True:
        base = rng.choice(("vm", "disk", "img", "vol", "ünïcode-vol", "x" * 200))
        name = f"{base}-{rng.randint(0, 999)}.img"
        if name not in taken and len(name.encode()) <= 255:
            return name


def durable_copy(image: SimStorage) -> SimStorage:
    """A SimStorage holding ``image``'s files with a log that records them as
    created, written and synced, so that it can itself be crashed later (a
    crash image starts with an empty log, and crashing it again would
    otherwise lose the files it started with)."""
    out = SimStorage(image.capacity, image.label)
    for name, state in image.files.items():
        f = out.open(name, create=True)
        if state.data:
            f.pwrite(bytes(state.data), 0)
        f.sync()
    return out


# ----------------------------------------------------------------------------
# Possible states after a power cut


@dataclass
class VolEffect:
    """A volume's state right after one operation: whether it exists, its
    name and size, and the content of the blocks the operation touched."""

    exists: bool
    name: str
    size: int
    blocks: dict[int, bytes]


@dataclass
class OpRecord:
    """One operation of a workload: where its I/O began in the storage log,
    and the state of every volume it changed."""

    start: int
    label: str
    effects: dict[int, VolEffect]


@dataclass
class Epoch:
    """An acknowledged sync (``ack`` = log length when it returned), the model
    at that moment, and the operations begun after it."""

    ack: int
    model: PoolModel
    ops: list[OpRecord] = field(default_factory=list)


@dataclass
class VolCandidates:
    """What one volume may look like after a crash (see :class:`CrashHistory`)."""

    must_exist: bool
    names: set[str]
    sizes: set[int]
    base: VolModel | None
    extra: dict[int, list[bytes]]

    def block_states(self, index: int) -> list[bytes]:
        """Every content block ``index`` may show."""
        first = self.base.block(index) if self.base is not None else ZERO_BLOCK
        return [first, *self.extra.get(index, ())]


class CrashHistory:
    """Records a workload so that any crash point can be judged.

    The possible-state model (simple on purpose; per block, not per pool):

    * A crash point ``p`` means the storage kept ``log[:p]`` (in the way
      :meth:`SimStorage.crash` decides).  The *acknowledged* sync is the last
      ``sync()`` whose call returned when ``len(log) <= p``; the model as it
      was at that moment is the ack state.
    * An operation begun after the ack sync whose first I/O came before ``p``
      (its log start ``< p``) may or may not have reached the disk, wholly or
      in part.  Operations begun at or after ``p`` cannot be visible: none of
      their bytes are in ``log[:p]``.
    * So, for each volume id, independently per attribute and per block:
      its name must be one it had at the ack or after one of those
      operations; likewise its size; the visible bytes of each block must
      equal (a prefix of) the block's content at the ack or after one of
      those operations.  A volume must exist if it existed at the ack and
      none of those operations deleted it (or renamed another volume over
      it); it may exist if it existed at the ack or one of them created it.
      No other volume may appear, and names must be unique.
    * Everything else (bytes never written to that volume at that block,
      content from other volumes, freed space) is a failure.

    This accepts some states a strictly ordered engine would never produce
    (e.g. one block from operation 3 and another from before operation 2),
    but it never rejects a correct engine and it catches lost acknowledged
    data, resurrected old data and leaks between volumes.
    """

    def __init__(self, log: list) -> None:
        self._log = log
        self.epochs: list[Epoch] = []

    def acknowledge(self, model: PoolModel) -> None:
        """Call right after ``sync()`` (or ``mkfs``) returned."""
        self.epochs.append(Epoch(len(self._log), model.copy()))

    def record(self, start: int, label: str, model: PoolModel, touched: dict[int, range | None]) -> None:
        """Call right after an operation that began at log index ``start``
        changed ``model``.  ``touched`` maps each affected volume id to the
        block indexes whose content may have changed (None: none did)."""
        effects: dict[int, VolEffect] = {}
        for vid, blocks in touched.items():
            v = model.vols.get(vid)
            if v is None:
                effects[vid] = VolEffect(False, "", 0, {})
            else:
                effects[vid] = VolEffect(True, v.name, v.size, {b: v.block(b) for b in blocks or ()})
        self.epochs[-1].ops.append(OpRecord(start, label, effects))

    def epoch_at(self, point: int) -> Epoch | None:
        """The epoch acknowledged at crash point ``point`` (None: before the
        first acknowledgement)."""
        found = None
        for e in self.epochs:
            if e.ack <= point:
                found = e
        return found

    def candidates(self, point: int) -> tuple[Epoch, dict[int, VolCandidates]]:
        """The ack epoch and the possible state of every volume at ``point``."""
        epoch = self.epoch_at(point)
        assert epoch is not None, f"crash point {point} is before the first acknowledgement"
        cands: dict[int, VolCandidates] = {
            vid: VolCandidates(True, {v.name}, {v.size}, v, {}) for vid, v in epoch.model.vols.items()
        }
        for op in epoch.ops:
            if op.start >= point:
                break
            for vid, eff in op.effects.items():
                c = cands.setdefault(vid, VolCandidates(False, set(), set(), None, {}))
                if not eff.exists:
                    c.must_exist = False
                    continue
                c.names.add(eff.name)
                c.sizes.add(eff.size)
                for b, data in eff.blocks.items():
                    c.extra.setdefault(b, []).append(data)
        return epoch, cands

    def states(self) -> list[PoolModel]:
        """The model at every operation boundary of the workload, in order
        (rebuilt from the acknowledged snapshots and the recorded effects)."""
        out: list[PoolModel] = []
        for epoch in self.epochs:
            model = epoch.model.copy()
            out.append(model.copy())
            for op in epoch.ops:
                for vid, eff in op.effects.items():
                    if not eff.exists:
                        model.vols.pop(vid, None)
                        continue
                    v = model.vols.setdefault(vid, VolModel(vid, eff.name))
                    v.name, v.size = eff.name, eff.size
                    for b, data in eff.blocks.items():
                        v._store(b, data)
                out.append(model.copy())
        return out

    def judge(self, pool: Pool, point: int) -> list[str]:
        """Every way the recovered ``pool`` breaks the possible-state model
        for crash point ``point`` ([] = acceptable)."""
        epoch, cands = self.candidates(point)
        problems: list[str] = []
        infos = pool.volumes()
        names = [i.name for i in infos]
        if len(set(names)) != len(names):
            problems.append(f"duplicate volume names: {sorted(names)}")
        seen = {i.id for i in infos}
        for vid, c in sorted(cands.items()):
            if c.must_exist and vid not in seen:
                problems.append(f"acknowledged volume {vid} {sorted(c.names)} is missing")
        for info in infos:
            c = cands.get(info.id)
            if c is None:
                problems.append(f"volume {info.id} {info.name!r} never existed in this window")
                continue
            if info.name not in c.names:
                problems.append(f"volume {info.id}: name {info.name!r} not in {sorted(c.names)}")
            if info.size not in c.sizes:
                problems.append(f"volume {info.id} {info.name!r}: size {info.size} not in {sorted(c.sizes)}")
            data = read_all(pool, info.id, info.size)
            for b in range(-(-info.size // BLOCK)):
                got = data[b * BLOCK : (b + 1) * BLOCK]
                states = c.block_states(b)
                if not any(got == s[: len(got)] for s in states):
                    problems.append(
                        f"volume {info.id} {info.name!r} block {b}: got {describe(got)}; "
                        f"acknowledged {describe(states[0][: len(got)])}, {len(states) - 1} later states"
                    )
                    if len(problems) > 20:
                        return problems
        if problems:
            ops = [f"{op.label}@{op.start}" for op in epoch.ops if op.start < point]
            problems.append(f"ack sync at log {epoch.ack}; operations since, begun before {point}: {ops}")
        return problems


# ----------------------------------------------------------------------------
# Random operations applied to the engine and the model alike

MUTATIONS = ("create",) + ("write",) * 8 + ("truncate", "truncate", "rename", "delete")


def random_mutation(
    rng: random.Random,
    pool: Pool,
    model: PoolModel,
    tag: str,
    *,
    max_volumes: int = 4,
    max_size: int = 1 << 20,
    max_len: int = 64 * 1024,
    kind: str | None = None,
) -> tuple[str, dict[int, range | None]]:
    """Apply one random model-changing operation to ``pool`` and ``model``.

    ``kind`` forces one of :data:`MUTATIONS`; impossible choices (write with
    no volume, create at ``max_volumes``) fall back to something possible.
    Returns a label for failure messages and, for :meth:`CrashHistory.record`,
    the touched volumes and blocks.
    """
    kind = kind or rng.choice(MUTATIONS)
    if len(model.vols) < 2 and kind != "write" or not model.vols:
        kind = "create"  # keep a couple of volumes around to write to
    if kind == "create" and len(model.vols) >= max_volumes:
        kind = "write"
    taken = {v.name for v in model.vols.values()}
    if kind == "create":
        name = volume_name(rng, taken)
        size = rng.choice((0, rng.randint(1, max_size), rng.randint(1, 64) * BLOCK))
        info = pool.create_volume(name, size)
        assert (info.name, info.size) == (name, size), info
        model.create(info.id, name, size)
        return f"create({info.id},{name!r},{size})", {info.id: None}
    v = model.vols[rng.choice(sorted(model.vols))]
    if kind == "write":
        offset, length = random_extent(rng, v.size, max_size, max_len)
        data = make_payload(rng, length, f"{tag}/v{v.id}@{offset}")
        n = pool.write(v.id, offset, data)
        assert n == length, f"write of {length} bytes to volume {v.id} returned {n}"
        return f"write({v.id},{offset},{length})", {v.id: v.write(offset, data)}
    if kind == "truncate":
        size = rng.choice((0, rng.randint(0, max_size), rng.randint(0, max_size // BLOCK) * BLOCK, max(0, v.size - 1)))
        pool.truncate(v.id, size)
        return f"truncate({v.id},{size})", {v.id: v.truncate(size)}
    if kind == "rename":
        others = sorted(taken - {v.name})
        new = rng.choice(others) if others and rng.random() < 0.3 else volume_name(rng, taken)
        pool.rename_volume(v.id, new)
        replaced = model.rename(v.id, new)
        touched: dict[int, range | None] = {v.id: None}
        if replaced is not None:
            touched[replaced] = None
        return f"rename({v.id},{new!r})", touched
    assert kind == "delete", kind
    pool.delete_volume(v.id)
    model.delete(v.id)
    return f"delete({v.id})", {v.id: None}


# ----------------------------------------------------------------------------
# The crash workload


@dataclass
class Workload:
    """A finished workload: the storage with its full log, the history to
    judge crash points with, and where ``mkfs`` ended in the log."""

    seed: int
    storage: SimStorage
    history: CrashHistory
    mkfs_end: int
    labels: list[tuple[int, str]]


# Journal sizes by seed % 4 (None: the engine's default).  Small journals make
# the engine checkpoint on its own, often, and even in the middle of an
# operation when a record no longer fits.
JOURNAL_SIZES = (None, 64 * 1024, None, 12 * 1024)


@functools.lru_cache(maxsize=None)
def run_workload(seed: int, n_ops: int = 250, max_size: int = MAX_SIZE) -> Workload:
    """Run the seeded crash workload once (cached: several tests judge it):
    creates, writes, truncates, renames, deletes, ``tick()``, clean remounts,
    exact comparisons of the live pool with the model, and a ``sync()``
    every 1-20 operations, on a fresh SimStorage, with volumes of up to
    ``max_size`` bytes (and writes of up to a 32nd of that, at least 64 KiB).  Odd seeds
    use a small journal, so the engine also checkpoints on its own in the
    middle of the workload (see :data:`JOURNAL_SIZES`).  It ends with a sync
    (acknowledged) and a close."""
    rng = random.Random(seed)
    storage = SimStorage(label=f"sim-crash-{seed}")
    journal = JOURNAL_SIZES[seed % 4]
    extra = {"journal_size": journal} if journal else {}
    Pool.mkfs(storage, compression=seed % 3 != 2, **extra)
    history = CrashHistory(storage.log)
    model = PoolModel()
    mkfs_end = len(storage.log)
    history.acknowledge(model)
    labels: list[tuple[int, str]] = []
    pool = Pool.open(storage)
    since_sync, sync_every = 0, 4
    for i in range(n_ops):
        start = len(storage.log)
        roll = rng.random()
        if roll < 0.05 or since_sync >= sync_every:
            pool.sync()
            history.acknowledge(model)
            labels.append((start, "sync"))
            since_sync, sync_every = 0, rng.choice((1, 2, 4, 6, 12, 20))
            continue
        if roll < 0.08:
            pool.tick()
            labels.append((start, "tick"))
            continue
        if roll < 0.13:
            problems = compare_exact(pool, model, attrs=False)
            assert problems == [], f"seed {seed} op {i}: live pool differs from model: {problems}"
            continue
        if roll < 0.15:
            # A clean remount: close must checkpoint, open must find it.
            pool.sync()
            history.acknowledge(model)
            pool.close()
            pool = Pool.open(storage)
            labels.append((start, "remount"))
            since_sync = 0
            continue
        # Big volumes get mostly long writes, so that their trees grow deep.
        kind = None if max_size <= MAX_SIZE else rng.choice(("write",) * 12 + MUTATIONS)
        label, touched = random_mutation(rng, pool, model, f"s{seed}o{i}", max_size=max_size,
                                         max_len=max(64 * 1024, max_size // 32), kind=kind)
        history.record(start, label, model, touched)
        labels.append((start, label))
        since_sync += 1
    pool.sync()
    history.acknowledge(model)
    problems = compare_exact(pool, model, attrs=False)
    assert problems == [], f"seed {seed}: live pool differs from model before any crash: {problems}"
    assert pool.check() == []
    pool.close()
    return Workload(seed, storage, history, mkfs_end, labels)


# ----------------------------------------------------------------------------
# Judging pools opened from damaged images


def judge_damaged(pool: Pool, allowed: list[PoolModel]) -> list[str]:
    """How a pool opened from a damaged image breaks the rule "it serves one
    of the ``allowed`` states, except that a read may fail with a PoolError
    of errno EIO" ([] = it does not).  Any other exception propagates."""
    infos = sorted(pool.volumes(), key=lambda i: i.id)
    listing = [(i.id, i.name, i.size) for i in infos]
    fits = [m for m in allowed if sorted((v.id, v.name, v.size) for v in m.vols.values()) == listing]
    if not fits:
        return [f"volume list {listing} matches no allowed state"]
    # Read every block once; None marks a block whose read failed with EIO.
    served: dict[tuple[int, int], bytes | None] = {}
    for i in infos:
        for b in range(-(-i.size // BLOCK)):
            try:
                served[i.id, b] = pool.read(i.id, b * BLOCK, min(BLOCK, i.size - b * BLOCK))
            except PoolError as err:
                if err.errno != errno.EIO:
                    return [f"volume {i.id} block {b}: read failed with {err.errname}: {err}"]
                served[i.id, b] = None
    for m in fits:
        if all(got is None or got == m.vols[vid].read(b * BLOCK, len(got)) for (vid, b), got in served.items()):
            return []
    newest = fits[-1]
    bad = [key for key, got in served.items()
           if got is not None and got != newest.vols[key[0]].read(key[1] * BLOCK, len(got))]
    return [f"{len(fits)} allowed states have this volume list, none has its content; "
            f"(volume, block) differing from the newest of them: {bad[:10]}"]
