"""Snapshots, restore and clones at the engine API (no FUSE).

A seeded random driver runs writes, truncates, creates, single and group
snapshots, restores (one volume, several, all that have the snapshot), clones
(from a snapshot, from a live volume, several at one instant), deletes and
renames of volumes and snapshots, syncs and remounts against a naive model
(:class:`SnapPoolModel`): every volume and snapshot is a map of block contents,
keyed by name, with undo snapshots, snapshots that outlive their volume and
follow its renames.  After every few steps the pool must list exactly the
model's volumes and snapshots (ids, names, sizes, clone origins), serve their
exact bytes, report the referenced bytes the model predicts and the exclusive
bytes (exactly, with compression off: the model also tracks which stored copy
each block is), and pass ``check()``.

The model and the driver are also used by ``test_crash_snapshots.py``.

Unit tests below pin the space figures, the refusals (errno, nothing written)
and ``dry_run``.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cowfs.blockio import OsStorage, SimStorage, Storage
from cowfs.errors import PoolError
from cowfs.pool import BLOCK, Pool

from engine_model import VolModel, describe, make_payload, random_extent, read_all
from test_engine_model import durable_copy

MAX_SIZE = 256 * 1024
VOLUME_NAMES = ("vm1.img", "vm2.img", "db.img", "web.img", "ünï.img")
SNAP_NAMES = ("s1", "s2", "before-upgrade", "nightly", "x y")
MAX_VOLUMES = 7
MAX_SNAPSHOTS = 30


# ----------------------------------------------------------------------------
# The model


@dataclass
class Image:
    """Expected content of one volume or snapshot: the bytes of each block
    (``data``) and, for each stored block, a token naming its stored copy.
    A write stores new copies; a snapshot, clone or restore shares them."""

    data: VolModel
    tokens: dict[int, int] = field(default_factory=dict)

    def copy(self) -> "Image":
        """An independent image sharing the same stored copies."""
        return Image(self.data.copy(), dict(self.tokens))

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.data.size

    def write(self, offset: int, payload: bytes, fresh: Callable[[], int]) -> None:
        """Apply a write: every touched block is a new copy (or a hole if it
        is all zeros, which the engine does not store)."""
        for b in self.data.write(offset, payload):
            if b in self.data.blocks:
                self.tokens[b] = fresh()
            else:
                self.tokens.pop(b, None)

    def truncate(self, size: int, fresh: Callable[[], int]) -> None:
        """Apply a truncate: blocks past the end go; a last block whose cut
        tail held data is stored anew."""
        before = dict(self.data.blocks)
        self.data.truncate(size)
        for b in list(self.tokens):
            if b not in self.data.blocks:
                del self.tokens[b]
            elif self.data.blocks[b] != before[b]:
                self.tokens[b] = fresh()

    def sha(self) -> str:
        """SHA-256 of the whole content."""
        return hashlib.sha256(self.data.read(0, self.size)).hexdigest()


@dataclass
class VolEntry:
    """A volume of the model."""

    id: int
    image: Image
    origin: str | None = None     # clones: "vol" or "vol@snap"


@dataclass
class SnapEntry:
    """A snapshot of the model."""

    id: int
    image: Image


class SnapPoolModel:
    """Volumes by name and snapshots by (owner volume name, snapshot name)."""

    def __init__(self) -> None:
        self.vols: dict[str, VolEntry] = {}
        self.snaps: dict[tuple[str, str], SnapEntry] = {}
        self.ids: set[int] = set()
        self._tokens = itertools.count(1)

    def fresh(self) -> int:
        """A token for a newly stored block copy."""
        return next(self._tokens)

    def copy(self) -> "SnapPoolModel":
        """An independent copy (block contents are shared, immutable bytes)."""
        out = SnapPoolModel()
        out.vols = {n: VolEntry(v.id, v.image.copy(), v.origin) for n, v in self.vols.items()}
        out.snaps = {k: SnapEntry(s.id, s.image.copy()) for k, s in self.snaps.items()}
        out.ids = set(self.ids)
        out._tokens = self._tokens
        return out

    def new_id(self, ds_id: int, what: str) -> int:
        """Record an id the engine just handed out; ids are never reused."""
        assert ds_id not in self.ids, f"engine reused id {ds_id} for {what}"
        self.ids.add(ds_id)
        return ds_id

    def images(self) -> Iterator[tuple[int, str, Image]]:
        """Every dataset as ``(id, label, image)``."""
        for name, v in self.vols.items():
            yield v.id, name, v.image
        for (owner, name), s in self.snaps.items():
            yield s.id, f"{owner}@{name}", s.image

    def exclusive(self) -> dict[int, int]:
        """Bytes each dataset holds that no other one shares (by stored copy)."""
        users: dict[int, int] = {}
        for _, _, img in self.images():
            for t in img.tokens.values():
                users[t] = users.get(t, 0) + 1
        return {ds_id: BLOCK * sum(1 for t in img.tokens.values() if users[t] == 1)
                for ds_id, _, img in self.images()}

    def owners(self) -> list[str]:
        """Volume names that have snapshots."""
        return sorted({o for o, _ in self.snaps})

    def fingerprint(self) -> tuple[tuple, tuple]:
        """Everything the crash judge compares: volumes ``(id, name, size,
        sha, origin)`` and snapshots ``(id, owner, name, size, sha)``."""
        vols = tuple(sorted((v.id, n, v.image.size, v.image.sha(), v.origin)
                            for n, v in self.vols.items()))
        snaps = tuple(sorted((s.id, o, n, s.image.size, s.image.sha())
                             for (o, n), s in self.snaps.items()))
        return vols, snaps

    # -- operations, mirrored after the engine did them ------------------------

    def create(self, ds_id: int, name: str, size: int) -> None:
        """A new empty volume."""
        self.vols[name] = VolEntry(self.new_id(ds_id, name), Image(VolModel(ds_id, name, size)))

    def snapshot(self, volumes: list[str], name: str, ids: list[int]) -> None:
        """Snapshots ``name`` of ``volumes`` with the ids the engine gave."""
        for vol, sid in zip(volumes, ids, strict=True):
            self.snaps[(vol, name)] = SnapEntry(self.new_id(sid, f"{vol}@{name}"),
                                                self.vols[vol].image.copy())

    def restore(self, plan: list[dict], undo_ids: list[int]) -> None:
        """Each volume of the plan takes its snapshot's content; what it held
        becomes its undo snapshot."""
        for item, uid in zip(plan, undo_ids, strict=True):
            vol, snap, undo = item["volume"], item["snapshot"], item["undo"]
            v = self.vols[vol]
            self.snaps[(vol, undo)] = SnapEntry(self.new_id(uid, f"{vol}@{undo}"), v.image)
            v.image = self.snaps[(vol, snap)].image.copy()

    def clone(self, items: list[tuple[str, str | None, str]], ids: list[int]) -> None:
        """New volumes sharing their sources' content."""
        for (vol, snap, new), cid in zip(items, ids, strict=True):
            src = self.vols[vol].image if snap is None else self.snaps[(vol, snap)].image
            self.vols[new] = VolEntry(self.new_id(cid, new), src.copy(),
                                      vol if snap is None else f"{vol}@{snap}")

    def rename_volume(self, old: str, new: str) -> None:
        """Rename (replacing a volume called ``new``); snapshots follow."""
        if old == new:
            return
        self.vols[new] = self.vols.pop(old)
        for (o, n) in [k for k in self.snaps if k[0] == old]:
            self.snaps[(new, n)] = self.snaps.pop((o, n))

    def rename_clash(self, old: str, new: str) -> bool:
        """Whether renaming volume ``old`` to ``new`` must be refused because
        both names own a snapshot of the same name."""
        return old != new and any((new, n) in self.snaps for (o, n) in self.snaps if o == old)


def compare(pool: Pool, model: SnapPoolModel, *, exact_exclusive: bool) -> list[str]:
    """Every difference between ``pool`` and ``model`` ([] = none): volume
    and snapshot lists, origins, bytes, referenced and exclusive space,
    and ``check()``."""
    problems: list[str] = []
    vols = {i.name: i for i in pool.volumes()}
    want_vols = {n: (v.id, v.image.size, v.origin) for n, v in model.vols.items()}
    got_vols = {n: (i.id, i.size, (i.origin or {}).get("source")) for n, i in vols.items()}
    if got_vols != want_vols:
        problems.append(f"volumes (id, size, origin): pool {got_vols}, model {want_vols}")
    snaps = {(s.volume, s.name): s for s in pool.snapshots()}
    got_snaps = {k: (s.id, s.size) for k, s in snaps.items()}
    want_snaps = {k: (s.id, s.image.size) for k, s in model.snaps.items()}
    if got_snaps != want_snaps:
        problems.append(f"snapshots (id, size): pool {got_snaps}, model {want_snaps}")
    if pool.snapshot_owners() != model.owners():
        problems.append(f"snapshot owners: pool {pool.snapshot_owners()}, model {model.owners()}")
    if problems:
        return problems
    exclusive = model.exclusive()
    for ds_id, label, img in model.images():
        data = read_all(pool, ds_id, img.size)
        for b in range(img.data.nblocks()):
            got = data[b * BLOCK:(b + 1) * BLOCK]
            want = img.data.block(b)[:len(got)]
            if got != want:
                problems.append(f"{label} (id {ds_id}) block {b}: read {describe(got)}, "
                                f"model {describe(want)}")
                break
        ref, excl = pool.space(ds_id)
        if ref != BLOCK * len(img.data.blocks):
            problems.append(f"{label}: referenced {ref}, model maps "
                            f"{len(img.data.blocks)} blocks")
        want_excl = exclusive[ds_id]
        # Compressed blocks share stored units and may straddle two, so with
        # compression the figure is only bounded: nothing exclusive in the
        # model means nothing exclusive, and a block frees at most two units.
        if exact_exclusive and excl != want_excl or not 0 <= excl <= 2 * want_excl:
            problems.append(f"{label}: exclusive {excl}, model {want_excl}")
    problems += pool.check()
    return problems


# ----------------------------------------------------------------------------
# The random driver (engine and model side by side)


def _pick_new_volume_name(rng: random.Random, model: SnapPoolModel) -> str:
    # Sometimes a name whose deleted volume left snapshots behind.
    orphans = [o for o in model.owners() if o not in model.vols]
    if orphans and rng.random() < 0.3:
        return rng.choice(orphans)
    free = [n for n in VOLUME_NAMES if n not in model.vols]
    if free and rng.random() < 0.8:
        return rng.choice(free)
    while True:
        name = f"clone-{rng.randint(0, 99)}.img"
        if name not in model.vols:
            return name


def _expect_refusal(pool: Pool, call: Callable[[], object],
                    errnos: tuple[int, ...], what: str) -> str:
    """Run a call that must be refused; the listings must not change."""
    before = (pool.volumes(), pool.snapshots())
    try:
        call()
    except PoolError as e:
        assert e.errno in errnos, f"{what}: refused with {e.errname} ({e}), wanted " \
                                  f"{[errno.errorcode[x] for x in errnos]}"
        assert (pool.volumes(), pool.snapshots()) == before, f"{what}: refused but changed the pool"
        return f"refused {what}: {e.errname}"
    raise AssertionError(f"{what}: accepted, the model says it must be refused")


STEP_WEIGHTS = {"write": 30, "truncate": 5, "create": 4, "snapshot": 9, "group_snapshot": 6,
                "restore": 5, "group_restore": 3, "clone": 4, "clone_live": 3, "clone_group": 3,
                "delete_snapshot": 6, "delete_volume": 3, "rename_volume": 3,
                "rename_snapshot": 4, "refuse": 5}


def random_step(rng: random.Random, pool: Pool, model: SnapPoolModel, tag: str,
                weights: dict[str, int] | None = None) -> tuple[str, list[int]]:
    """One random model-changing operation on ``pool`` and ``model`` (or an
    operation that must be refused), chosen with ``weights`` (default
    :data:`STEP_WEIGHTS`).  Returns a label and, for group operations, the
    ids of everything the one operation created (the crash judge checks
    these appear all together or not at all)."""
    kinds = weights or STEP_WEIGHTS
    kind = rng.choices(list(kinds), list(kinds.values()))[0]
    if not model.vols or len(model.vols) < 2 and rng.random() < 0.5:
        kind = "create"
    if kind == "create" and len(model.vols) >= MAX_VOLUMES:
        kind = "delete_volume"
    if len(model.snaps) >= MAX_SNAPSHOTS and kind in ("snapshot", "group_snapshot"):
        kind = "delete_snapshot"
    if not model.snaps and kind in ("restore", "group_restore", "clone", "clone_group",
                                    "delete_snapshot", "rename_snapshot"):
        kind = "snapshot"
    if kind == "create":
        name = _pick_new_volume_name(rng, model)
        size = rng.choice((0, rng.randint(0, MAX_SIZE)))
        info = pool.create_volume(name, size)
        model.create(info.id, name, size)
        return f"create({name},{size})", []
    vol = rng.choice(sorted(model.vols))
    v = model.vols[vol]

    if kind == "write":
        offset, length = random_extent(rng, v.image.size, MAX_SIZE, 48 * 1024)
        payload = make_payload(rng, length, f"{tag}/{vol}@{offset}")
        assert pool.write(v.id, offset, payload) == length
        v.image.write(offset, payload, model.fresh)
        return f"write({vol},{offset},{length})", []
    if kind == "truncate":
        size = rng.choice((0, rng.randint(0, MAX_SIZE), rng.randint(0, 64) * BLOCK,
                           max(0, v.image.size - rng.randint(1, 5000))))
        pool.truncate(v.id, size)
        v.image.truncate(size, model.fresh)
        return f"truncate({vol},{size})", []
    if kind in ("snapshot", "group_snapshot"):
        name = rng.choice(SNAP_NAMES)
        if kind == "snapshot":
            targets: list[str] | None = [vol]
        elif rng.random() < 0.3:
            targets = None
        else:
            targets = rng.sample(sorted(model.vols), rng.randint(1, len(model.vols)))
        names = sorted(model.vols) if targets is None else targets
        if any((n, name) in model.snaps for n in names):
            return _expect_refusal(pool, lambda: pool.snapshot(targets, name),
                                   (errno.EEXIST,), f"snapshot {name} of {names}"), []
        infos = pool.snapshot(targets, name)
        got = [(i.volume, i.name, i.size) for i in infos]
        assert got == [(n, name, model.vols[n].image.size) for n in names], got
        assert len({i.created_ns for i in infos}) == 1, "group snapshot not at one instant"
        model.snapshot(names, name, [i.id for i in infos])
        return f"snapshot({name},{targets})", [i.id for i in infos]
    if kind in ("restore", "group_restore"):
        name = rng.choice(sorted({n for _, n in model.snaps}))
        having = sorted(o for (o, n) in model.snaps if n == name and o in model.vols)
        if not having:
            return _expect_refusal(pool, lambda: pool.restore(name), (errno.ENOENT,),
                                   f"restore {name} (no live volume has it)"), []
        if kind == "restore":
            targets = [rng.choice(having)]
        elif rng.random() < 0.4:
            targets = None
        else:
            targets = rng.sample(having, rng.randint(1, len(having)))
        plan = pool.restore(name, targets)
        names = having if targets is None else targets
        assert [p["volume"] for p in plan] == names, plan
        for p in plan:
            assert p["snapshot"] == name and p["size"] == model.snaps[(p["volume"], name)].image.size, p
            assert p["undo"].startswith("undo-") and (p["volume"], p["undo"]) not in model.snaps, p
        undo_ids = [pool.snapshot_lookup(p["volume"], p["undo"]).id for p in plan]
        model.restore(plan, undo_ids)
        return f"restore({name},{targets})", undo_ids
    if kind in ("clone", "clone_live", "clone_group"):
        if kind == "clone_group":
            name = rng.choice(sorted({n for _, n in model.snaps}))
            owners = sorted(o for (o, n) in model.snaps if n == name)
            sources = rng.sample(owners, rng.randint(1, len(owners)))
            prefix = rng.choice(("c-", "copy-", ""))
            suffix = rng.choice((".b", "") if prefix else (".b",))
            items = [(o, name, prefix + o + suffix) for o in sources]
        elif kind == "clone":
            owner, name = rng.choice(sorted(model.snaps))
            items = [(owner, name, _pick_new_volume_name(rng, model))]
        else:
            items = [(vol, None, _pick_new_volume_name(rng, model))]
        news = [n for _, _, n in items]
        if any(len(n.encode()) > 255 for n in news):
            return "skip clone (name too long)", []
        if any(n in model.vols for n in news):
            return _expect_refusal(pool, lambda: pool.clone(items), (errno.EEXIST,),
                                   f"clone {items}"), []
        if len(model.vols) + len(news) > MAX_VOLUMES + 3:
            return "skip clone (enough volumes)", []
        infos = pool.clone(items)
        assert [i.name for i in infos] == news
        model.clone(items, [i.id for i in infos])
        return f"clone({items})", [i.id for i in infos]
    if kind == "delete_snapshot":
        key = rng.choice(sorted(model.snaps))
        s = model.snaps.pop(key)
        pool.delete_snapshot(s.id)
        return f"delete_snapshot({key[0]}@{key[1]})", []
    if kind == "delete_volume":
        pool.delete_volume(v.id)
        del model.vols[vol]
        return f"delete_volume({vol})", []
    if kind == "rename_volume":
        new = rng.choice(sorted(set(model.vols) | set(model.owners()) | set(VOLUME_NAMES)))
        if model.rename_clash(vol, new):
            return _expect_refusal(pool, lambda: pool.rename_volume(v.id, new),
                                   (errno.EEXIST,), f"rename {vol} -> {new}"), []
        pool.rename_volume(v.id, new)
        model.rename_volume(vol, new)
        return f"rename_volume({vol},{new})", []
    if kind == "rename_snapshot":
        owner, name = rng.choice(sorted(model.snaps))
        new = rng.choice(SNAP_NAMES)
        s = model.snaps[(owner, name)]
        if new != name and (owner, new) in model.snaps:
            return _expect_refusal(pool, lambda: pool.rename_snapshot(s.id, new),
                                   (errno.EEXIST,), f"rename {owner}@{name} -> {new}"), []
        pool.rename_snapshot(s.id, new)
        model.snaps[(owner, new)] = model.snaps.pop((owner, name))
        return f"rename_snapshot({owner}@{name},{new})", []
    assert kind == "refuse", kind
    return _random_refusal(rng, pool, model, vol), []


def _random_refusal(rng: random.Random, pool: Pool, model: SnapPoolModel, vol: str) -> str:
    v = model.vols[vol]
    missing = "no-such.img"
    choices: list[tuple[Callable[[], object], tuple[int, ...], str]] = [
        (lambda: pool.snapshot([vol], "a@b"), (errno.EINVAL,), "snapshot name with @"),
        (lambda: pool.snapshot([vol], "a/b"), (errno.EINVAL,), "snapshot name with /"),
        (lambda: pool.snapshot([vol], ".hidden"), (errno.EINVAL,), "snapshot name with leading ."),
        (lambda: pool.snapshot([vol, missing], "fresh"), (errno.ENOENT,), "snapshot of unknown volume"),
        (lambda: pool.snapshot([vol, vol], "fresh"), (errno.EINVAL,), "volume named twice"),
        (lambda: pool.restore("never-taken", [vol]), (errno.ENOENT,), "restore unknown snapshot"),
        (lambda: pool.restore("never-taken"), (errno.ENOENT,), "restore unknown snapshot, all"),
        (lambda: pool.clone([(vol, "never-taken", "new.img")]), (errno.ENOENT,), "clone unknown snapshot"),
        (lambda: pool.clone([(missing, None, "new.img")]), (errno.ENOENT,), "clone unknown volume"),
        (lambda: pool.clone([(vol, None, vol)]), (errno.EEXIST,), "clone onto itself"),
        (lambda: pool.clone([(vol, None, "dup.img"), (vol, None, "dup.img")]), (errno.EEXIST,),
         "clone group naming one new volume twice"),
        (lambda: pool.clone([]), (errno.EINVAL,), "empty clone group"),
        (lambda: pool.clone([(vol, None, "bad/name")]), (errno.EINVAL,), "clone to a name with /"),
        (lambda: pool.delete_snapshot(v.id), (errno.EINVAL,), "delete_snapshot of a volume"),
    ]
    if model.snaps:
        (owner, name), s = rng.choice(sorted(model.snaps.items()))
        choices += [
            (lambda: pool.write(s.id, 0, b"x"), (errno.EROFS,), f"write to snapshot {owner}@{name}"),
            (lambda: pool.truncate(s.id, 0), (errno.EROFS,), f"truncate snapshot {owner}@{name}"),
            (lambda: pool.set_attrs(s.id, mode=0o600), (errno.EROFS,), f"chmod snapshot {owner}@{name}"),
            (lambda: pool.rename_snapshot(s.id, "with@at"), (errno.EINVAL,), "rename snapshot to @"),
            (lambda: pool.delete_volume(s.id), (errno.EROFS, errno.EINVAL, errno.ENOENT),
             "delete_volume of a snapshot id"),
        ]
    call, errnos, what = rng.choice(choices)
    return _expect_refusal(pool, call, errnos, what)


# ----------------------------------------------------------------------------
# Seeded runs


class Harness:
    """A pool on some storage plus how to remount it."""

    def __init__(self, storage: Storage, *, compression: bool) -> None:
        self.storage = storage
        self.compression = compression
        Pool.mkfs(storage, compression=compression)
        self.pool = Pool.open(storage)

    def remount(self) -> None:
        """Clean close and open again."""
        self.pool.close()
        self.pool = Pool.open(self.storage)

    def crash_after_sync(self, rng: random.Random) -> None:
        """Sync, then a power cut (simulator only): nothing may be lost."""
        self.pool.sync()
        assert isinstance(self.storage, SimStorage)
        mode = rng.choice(("lose", "keep", "random"))
        self.storage = durable_copy(self.storage.crash(len(self.storage.log), mode, rng))
        self.pool = Pool.open(self.storage)


def drive(h: Harness, seed: int, steps: int) -> list[str]:
    """``steps`` random operations, compared with the model every few steps
    and at the end (also after a final remount).  Returns the labels."""
    rng = random.Random(seed)
    model = SnapPoolModel()
    labels: list[str] = []
    exact = not h.compression
    for i in range(steps):
        roll = rng.random()
        if roll < 0.04:
            h.pool.sync()
            labels.append("sync")
        elif roll < 0.07:
            h.remount()
            labels.append("remount")
        elif roll < 0.09 and isinstance(h.storage, SimStorage):
            h.crash_after_sync(rng)
            labels.append("crash-after-sync")
        else:
            labels.append(random_step(rng, h.pool, model, f"s{seed}o{i}")[0])
        if i % 7 == 6 or labels[-1] in ("remount", "crash-after-sync"):
            problems = compare(h.pool, model, exact_exclusive=exact)
            assert problems == [], f"seed {seed} step {i}, last ops {labels[-8:]}:\n" + "\n".join(problems)
    h.remount()
    problems = compare(h.pool, model, exact_exclusive=exact)
    assert problems == [], f"seed {seed} after the final remount:\n" + "\n".join(problems)
    h.pool.close()
    return labels


@pytest.mark.parametrize("seed", range(5))
def test_random_sequences_sim_plain(seed: int) -> None:
    """Proves: 250 random snapshot/restore/clone/delete/rename/write steps on
    the simulator without compression match the model byte for byte, with
    exact referenced and exclusive space, across remounts and power cuts
    right after a sync."""
    labels = drive(Harness(SimStorage(label=f"sim-snap-{seed}"), compression=False), seed, 250)
    # The run must really have exercised the snapshot operations.
    for op in ("snapshot(", "restore(", "clone(", "delete_snapshot(", "rename_snapshot(",
               "rename_volume(", "delete_volume("):
        assert any(lbl.startswith(op) for lbl in labels), f"seed {seed} never ran {op}"


@pytest.mark.parametrize("seed", range(100, 103))
def test_random_sequences_sim_compressed(seed: int) -> None:
    """Proves the same with compression on (exclusive space then only
    bounded by the model: compressed blocks share and straddle stored units)."""
    drive(Harness(SimStorage(label=f"sim-snapz-{seed}"), compression=True), seed, 250)


@pytest.mark.parametrize("seed", [200, 201])
def test_random_sequences_os(seed: int, tmp_path: Path) -> None:
    """Proves the same on real files (OsStorage), compression on."""
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    try:
        drive(Harness(OsStorage(str(pool_dir)), compression=True), seed, 200)
    finally:
        shutil.rmtree(pool_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1000, 1020))
def test_random_sequences_slow(seed: int) -> None:
    """Proves the same over many longer runs."""
    drive(Harness(SimStorage(label=f"sim-snap-{seed}"), compression=seed % 2 == 0), seed, 1500)


# ----------------------------------------------------------------------------
# Unit checks


@pytest.fixture
def plain() -> Iterator[tuple[Pool, SimStorage]]:
    """An open simulator pool without compression (exact space figures)."""
    storage = SimStorage(label="sim-units")
    Pool.mkfs(storage, compression=False)
    pool = Pool.open(storage)
    yield pool, storage
    pool.close()


def _fill(pool: Pool, vid: int, nblocks: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(nblocks * BLOCK)
    pool.write(vid, 0, data)
    return data


def test_space_referenced_and_exclusive(plain: tuple[Pool, SimStorage]) -> None:
    """Proves: a fresh snapshot has exclusive 0 and shares everything with
    its volume; overwriting 10 of 64 blocks makes those 10 exclusive on both
    sides; overwriting all makes the snapshot's exclusive equal its
    referenced; deleting it frees exactly that (statfs free grows, used
    shrinks by it) and the volume keeps its own data."""
    pool, _ = plain
    v = pool.create_volume("vm1.img")
    _fill(pool, v.id, 64, 1)
    assert pool.space(v.id) == (64 * BLOCK, 64 * BLOCK)
    s = pool.snapshot(["vm1.img"], "s1")[0]
    assert pool.space(s.id) == (64 * BLOCK, 0)
    assert pool.space(v.id) == (64 * BLOCK, 0)
    assert s.allocated == 64 * BLOCK and s.size == 64 * BLOCK
    pool.write(v.id, 0, random.Random(2).randbytes(10 * BLOCK))
    assert pool.space(s.id) == (64 * BLOCK, 10 * BLOCK)
    assert pool.space(v.id) == (64 * BLOCK, 10 * BLOCK)
    new = _fill(pool, v.id, 64, 3)
    assert pool.space(s.id) == (64 * BLOCK, 64 * BLOCK)
    pool.sync()
    before = pool.statfs()
    pool.delete_snapshot(s.id)
    after = pool.statfs()
    assert after.free - before.free == 64 * BLOCK, (before, after)
    assert before.used - after.used == 64 * BLOCK, (before, after)
    assert read_all(pool, v.id, 64 * BLOCK) == new
    assert pool.check() == []


def test_space_clone_and_holes(plain: tuple[Pool, SimStorage]) -> None:
    """Proves: a clone shares everything (exclusive 0 on clone, snapshot and
    volume); holes are not referenced; deleting the source volume and the
    snapshot leaves the clone the sole owner (exclusive == referenced)."""
    pool, _ = plain
    v = pool.create_volume("vm1.img", 1 << 20)
    pool.write(v.id, 512 * 1024, random.Random(4).randbytes(8 * BLOCK))
    assert pool.space(v.id) == (8 * BLOCK, 8 * BLOCK)
    s = pool.snapshot(["vm1.img"], "gold")[0]
    c = pool.clone([("vm1.img", "gold", "c1.img")])[0]
    assert c.origin is not None and c.origin["source"] == "vm1.img@gold"
    for ds in (v.id, s.id, c.id):
        assert pool.space(ds) == (8 * BLOCK, 0)
    pool.delete_volume(v.id)
    pool.delete_snapshot(s.id)
    assert pool.space(c.id) == (8 * BLOCK, 8 * BLOCK)
    assert pool.check() == []


def _state(pool: Pool) -> tuple:
    return (pool.volumes(), pool.snapshots(), pool.snapshot_owners(),
            [read_all(pool, i.id, i.size) for i in pool.volumes()])


def _refused(pool: Pool, storage: SimStorage, call: Callable[[], object], err: int,
             *mentions: str) -> None:
    before = _state(pool)
    log_len = len(storage.log)
    with pytest.raises(PoolError) as info:
        call()
    assert info.value.errno == err, f"{info.value.errname} ({info.value}), wanted {errno.errorcode[err]}"
    for word in mentions:
        assert word in str(info.value), f"message {info.value} does not name {word!r}"
    assert _state(pool) == before, f"refused call changed the pool: {info.value}"
    assert len(storage.log) == log_len, f"refused call wrote to the pool files: {info.value}"


def test_refusals(plain: tuple[Pool, SimStorage]) -> None:
    """Proves: each refusal has the fitting errno, names the object, and
    neither changes the pool nor writes to its files."""
    pool, storage = plain
    a = pool.create_volume("a.img")
    _fill(pool, a.id, 4, 5)
    pool.create_volume("b.img")
    s = pool.snapshot(["a.img"], "s1")[0]
    pool.snapshot(["a.img"], "s2")
    pool.sync()
    _refused(pool, storage, lambda: pool.snapshot(["a.img"], "s1"), errno.EEXIST, "a.img", "s1")
    _refused(pool, storage, lambda: pool.snapshot(["b.img", "a.img"], "s1"), errno.EEXIST, "a.img")
    _refused(pool, storage, lambda: pool.snapshot(["zz.img"], "s3"), errno.ENOENT, "zz.img")
    _refused(pool, storage, lambda: pool.snapshot(["a.img"], "x@y"), errno.EINVAL, "x@y")
    _refused(pool, storage, lambda: pool.snapshot(["a.img"], "x/y"), errno.EINVAL, "x/y")
    _refused(pool, storage, lambda: pool.snapshot(["a.img"], ""), errno.EINVAL)
    _refused(pool, storage, lambda: pool.snapshot(["a.img"], ".."), errno.EINVAL)
    _refused(pool, storage, lambda: pool.snapshot(["a.img"], "n" * 256), errno.ENAMETOOLONG)
    _refused(pool, storage, lambda: pool.write(s.id, 0, b"x"), errno.EROFS, "a.img@s1")
    _refused(pool, storage, lambda: pool.truncate(s.id, 0), errno.EROFS, "a.img@s1")
    _refused(pool, storage, lambda: pool.set_attrs(s.id, mode=0o777), errno.EROFS)
    _refused(pool, storage, lambda: pool.rename_snapshot(s.id, "s2"), errno.EEXIST, "s2")
    _refused(pool, storage, lambda: pool.rename_snapshot(s.id, "q@r"), errno.EINVAL, "q@r")
    _refused(pool, storage, lambda: pool.restore("nope", ["a.img"]), errno.ENOENT, "nope")
    _refused(pool, storage, lambda: pool.restore("nope"), errno.ENOENT, "nope")
    _refused(pool, storage, lambda: pool.restore("s1", ["b.img"]), errno.ENOENT, "b.img")
    _refused(pool, storage, lambda: pool.clone([("a.img", "s1", "b.img")]), errno.EEXIST, "b.img")
    _refused(pool, storage, lambda: pool.clone([("a.img", "nope", "c.img")]), errno.ENOENT, "nope")
    _refused(pool, storage, lambda: pool.clone([("a.img", "s1", "c.img"),
                                                ("a.img", "zz", "d.img")]), errno.ENOENT, "zz")
    _refused(pool, storage, lambda: pool.clone([("a.img", "s1", "c@d/e")]), errno.EINVAL)
    _refused(pool, storage, lambda: pool.delete_snapshot(a.id), errno.EINVAL, "a.img")
    pool.delete_snapshot(s.id)
    pool.sync()
    _refused(pool, storage, lambda: pool.delete_snapshot(s.id), errno.ENOENT)
    _refused(pool, storage, lambda: pool.snapshot_lookup("a.img", "s1"), errno.ENOENT, "a.img@s1")
    # Both volumes own a snapshot "s2": the rename would merge two directories.
    pool.snapshot(["b.img"], "s2")
    pool.sync()
    _refused(pool, storage, lambda: pool.rename_volume(a.id, "b.img"), errno.EEXIST, "s2")
    assert pool.check() == []


def test_dry_run_changes_nothing(plain: tuple[Pool, SimStorage]) -> None:
    """Proves: dry_run snapshot, restore and clone report the plan (the same
    plan the real call then carries out) and neither change the pool nor
    write to its files; a dry run still refuses what the real call would."""
    pool, storage = plain
    a = pool.create_volume("a.img")
    _fill(pool, a.id, 4, 6)
    pool.create_volume("b.img", 3 * BLOCK)
    pool.snapshot(None, "s1")
    pool.write(a.id, 0, b"changed")
    pool.sync()
    before, log_len = _state(pool), len(storage.log)
    snaps = pool.snapshot(None, "s2", dry_run=True)
    assert [(s.volume, s.name, s.size) for s in snaps] == [("a.img", "s2", 4 * BLOCK),
                                                            ("b.img", "s2", 3 * BLOCK)]
    plan = pool.restore("s1", dry_run=True)
    assert [(p["volume"], p["snapshot"], p["size"]) for p in plan] == [
        ("a.img", "s1", 4 * BLOCK), ("b.img", "s1", 3 * BLOCK)]
    assert all(p["undo"].startswith("undo-") for p in plan)
    clones = pool.clone([("a.img", "s1", "c.img"), ("b.img", None, "d.img")], dry_run=True)
    assert [(c.name, c.size, c.origin["source"]) for c in clones] == [
        ("c.img", 4 * BLOCK, "a.img@s1"), ("d.img", 3 * BLOCK, "b.img")]
    with pytest.raises(PoolError) as info:
        pool.snapshot(None, "s1", dry_run=True)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(PoolError) as info:
        pool.clone([("a.img", None, "b.img")], dry_run=True)
    assert info.value.errno == errno.EEXIST
    assert _state(pool) == before, "a dry run changed the pool"
    assert len(storage.log) == log_len, "a dry run wrote to the pool files"
    real = pool.restore("s1")
    assert [(p["volume"], p["size"]) for p in real] == [(p["volume"], p["size"]) for p in plan]
    assert pool.read(a.id, 0, 7) != b"changed"


def test_restore_semantics(plain: tuple[Pool, SimStorage]) -> None:
    """Proves: restore gives the volume the snapshot's bytes and size, keeps
    the replaced state as an undo snapshot (restoring which undoes), keeps
    later snapshots, keeps the volume's id, and a group restore (no volume
    named) restores every live volume having that snapshot at one instant."""
    pool, _ = plain
    a = pool.create_volume("a.img")
    b = pool.create_volume("b.img")
    old_a = _fill(pool, a.id, 8, 7)
    old_b = _fill(pool, b.id, 2, 8)
    pool.snapshot(None, "before")
    new_a = random.Random(9).randbytes(20 * BLOCK + 17)
    pool.write(a.id, 0, new_a)
    pool.truncate(b.id, 0)
    pool.snapshot(["a.img"], "later")
    plan = pool.restore("before")
    assert [p["volume"] for p in plan] == ["a.img", "b.img"]
    assert pool.lookup("a.img").id == a.id
    assert pool.lookup("a.img").size == 8 * BLOCK
    assert read_all(pool, a.id, 8 * BLOCK) == old_a
    assert read_all(pool, b.id, 2 * BLOCK) == old_b
    names = {s.name for s in pool.snapshots("a.img")}
    undo = plan[0]["undo"]
    assert names == {"before", "later", undo}, names
    u1, u2 = (pool.snapshot_lookup(p["volume"], p["undo"]) for p in plan)
    assert u1.created_ns == u2.created_ns, "group restore's undo snapshots not from one instant"
    assert u1.size == len(new_a) and u2.size == 0
    # Undo the restore of a.img alone.
    plan2 = pool.restore(undo, ["a.img"])
    assert plan2[0]["undo"] != undo
    assert pool.lookup("a.img").size == len(new_a)
    assert read_all(pool, a.id, len(new_a)) == new_a
    assert read_all(pool, b.id, 2 * BLOCK) == old_b


def test_snapshots_outlive_volume_and_follow_rename(plain: tuple[Pool, SimStorage]) -> None:
    """Proves: renaming a volume moves its snapshots; deleting it keeps them
    (listed under the old name) and they can be cloned into a new volume;
    a new volume of that name sees them and can be restored from them."""
    pool, storage = plain
    a = pool.create_volume("a.img")
    data = _fill(pool, a.id, 6, 10)
    pool.snapshot(["a.img"], "s1")
    pool.rename_volume(a.id, "renamed.img")
    assert [s.volume for s in pool.snapshots()] == ["renamed.img"]
    pool.delete_volume(a.id)
    assert pool.snapshot_owners() == ["renamed.img"]
    c = pool.clone([("renamed.img", "s1", "restored.img")])[0]
    assert read_all(pool, c.id, c.size) == data
    n = pool.create_volume("renamed.img", 10)
    pool.restore("s1", ["renamed.img"])
    assert read_all(pool, n.id, 6 * BLOCK) == data
    pool.sync()
    pool.close()
    pool = Pool.open(storage)
    assert read_all(pool, c.id, c.size) == data
    assert {s.name for s in pool.snapshots("renamed.img")} >= {"s1"}
    assert pool.check() == []
    pool.close()


def test_deep_clone_chain(plain: tuple[Pool, SimStorage]) -> None:
    """Proves: clones of clones 40 deep each read their own generation's
    bytes, survive deleting every ancestor, and the pool stays consistent."""
    pool, _ = plain
    cur = pool.create_volume("gen0.img")
    expect = {"gen0.img": bytearray(_fill(pool, cur.id, 16, 11))}
    for g in range(1, 41):
        c = pool.clone([(cur.name, None, f"gen{g}.img")])[0]
        mark = f"generation {g}".encode()
        pool.write(c.id, g * 97, mark)
        buf = bytearray(expect[cur.name])
        buf[g * 97:g * 97 + len(mark)] = mark
        expect[c.name] = buf
        cur = c
    for g in range(0, 40, 3):
        pool.delete_volume(pool.lookup(f"gen{g}.img").id)
        del expect[f"gen{g}.img"]
    for name, want in expect.items():
        info = pool.lookup(name)
        assert read_all(pool, info.id, info.size) == bytes(want), name
    assert pool.check() == []
