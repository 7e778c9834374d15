"""Damaged and foreign pools: ``Pool.open`` must refuse them with a
:class:`PoolError` (usually :class:`FormatError`) whose message names the
pool, or serve data it can vouch for -- never raise another exception type
and never return wrong bytes.

"Data it can vouch for": the pool serves one state the workload actually had
at an operation boundary (exactly the newest one when only data or tree
nodes were damaged, since nothing there is redundant), and a read of a block
it cannot vouch for fails with EIO.  Layout knowledge (two superblock slots,
the journal's record groups) comes from ``cowfs/format.py`` and
``cowfs/journal.py``.
"""

from __future__ import annotations

import errno
import os
import random
import struct
from pathlib import Path

import pytest

from cowfs import format as fmt
from cowfs.blockio import OsStorage, SimStorage, Storage
from cowfs.errors import FormatError, PoolError
from cowfs.pool import Pool

from engine_model import CrashHistory, PoolModel, compare_exact, judge_damaged, random_mutation, run_workload

SEEDS = (21, 22)


def closed_image(seed: int) -> tuple[SimStorage, list[PoolModel], PoolModel]:
    """A copy of a cleanly closed workload pool, every state it had at an
    operation boundary, and its final state."""
    w = run_workload(seed, 80)
    return w.storage.crash(len(w.storage.log), "keep"), w.history.states(), w.history.epochs[-1].model


def crashed_image(seed: int) -> tuple[SimStorage, list[PoolModel], PoolModel]:
    """Like :func:`closed_image` but cut right after the final sync, before
    close: the newest state lives in the journal."""
    w = run_workload(seed, 80)
    last = w.history.epochs[-1]
    return w.storage.crash(last.ack, "lose"), w.history.states(), last.model


def open_or_refuse(storage: Storage, what: str) -> Pool | None:
    """Open ``storage``; a refusal must be a PoolError naming the pool."""
    try:
        return Pool.open(storage)
    except PoolError as err:
        assert storage.label in str(err), f"{what}: refusal does not name the pool: {err}"
        return None


def assert_vouched(storage: Storage, allowed: list[PoolModel], what: str) -> None:
    """Open a damaged pool: it must refuse, or serve one of ``allowed`` (EIO
    allowed per block); check() and close() may only fail with PoolError."""
    pool = open_or_refuse(storage, what)
    if pool is None:
        return
    try:
        problems = judge_damaged(pool, allowed)
        assert problems == [], f"{what}: " + "; ".join(problems)
        try:
            pool.check()
        except PoolError:
            pass
    finally:
        try:
            pool.close()
        except PoolError:
            pass


def slot(storage: SimStorage, index: int) -> bytearray:
    """A copy of the bytes of superblock slot ``index``."""
    data = storage.files[fmt.SUPERBLOCK_FILE].data
    return data[index * fmt.BLOCK : (index + 1) * fmt.BLOCK]


def put_slot(storage: SimStorage, index: int, raw: bytes) -> None:
    """Overwrite superblock slot ``index``."""
    storage.files[fmt.SUPERBLOCK_FILE].data[index * fmt.BLOCK : (index + 1) * fmt.BLOCK] = raw


def newest_slot(storage: SimStorage) -> int:
    """Index of the valid slot with the higher generation."""
    gens = []
    for i in (0, 1):
        sb = fmt.Superblock.decode(bytes(slot(storage, i)), "test")
        gens.append(-1 if sb is None else sb.gen)
    assert max(gens) >= 0, "no valid superblock slot in a healthy pool"
    return gens.index(max(gens))


def with_version(raw: bytes, version: int) -> bytes:
    """A superblock slot re-sealed with another format version number."""
    body = bytearray(raw[: fmt.BLOCK - 8])
    struct.pack_into("<I", body, 8, version)
    return bytes(body) + struct.pack("<Q", fmt.checksum(body))


def test_healthy_images_open() -> None:
    """Proves the fixtures are sound: undamaged closed and crashed images
    open and serve exactly the final state."""
    for seed in SEEDS:
        for image, _, final in (closed_image(seed), crashed_image(seed)):
            pool = Pool.open(image)
            assert pool.check() + compare_exact(pool, final, attrs=False) == []
            pool.close()


@pytest.mark.parametrize("which", ["both", "newest"])
def test_unknown_format_version(which: str) -> None:
    """Proves: a superblock of an unknown format version (intact checksum) is
    refused with FormatError naming the pool and the version -- also when
    only the newest slot has it (falling back would roll back silently)."""
    image, _, _ = closed_image(SEEDS[0])
    targets = (0, 1) if which == "both" else (newest_slot(image),)
    for i in targets:
        put_slot(image, i, with_version(bytes(slot(image, i)), 77))
    with pytest.raises(FormatError) as info:
        Pool.open(image)
    assert image.label in str(info.value) and "77" in str(info.value), info.value


def test_unknown_version_in_older_slot() -> None:
    """Proves: an unknown version in the older slot alone either is refused
    with FormatError or is ignored and the newest state served exactly."""
    image, _, final = closed_image(SEEDS[0])
    old = 1 - newest_slot(image)
    put_slot(image, old, with_version(bytes(slot(image, old)), 77))
    try:
        pool = Pool.open(image)
    except FormatError as err:
        assert image.label in str(err)
        return
    assert compare_exact(pool, final, attrs=False) == []
    pool.close()


@pytest.mark.parametrize("damage", ["random", "zeros", "bitflip", "truncate0", "missing"])
def test_both_superblocks_damaged(damage: str) -> None:
    """Proves: with no valid superblock slot, open refuses with FormatError
    (or PoolError for a missing file) naming the pool."""
    rng = random.Random(damage)
    image, _, _ = closed_image(SEEDS[1])
    sb = image.files[fmt.SUPERBLOCK_FILE].data
    if damage == "random":
        sb[:] = rng.randbytes(len(sb))
    elif damage == "zeros":
        sb[:] = bytes(len(sb))
    elif damage == "bitflip":
        for i in (0, 1):
            sb[i * fmt.BLOCK + rng.randrange(fmt.BLOCK)] ^= 1 << rng.randrange(8)
    elif damage == "truncate0":
        del sb[:]
    else:
        del image.files[fmt.SUPERBLOCK_FILE]
    with pytest.raises(PoolError) as info:
        Pool.open(image)
    assert image.label in str(info.value), info.value
    if damage != "missing":
        assert isinstance(info.value, FormatError), repr(info.value)


def test_one_superblock_damaged() -> None:
    """Proves: damage to the older slot changes nothing; damage to the
    newest slot is refused or falls back to a state the pool really had."""
    for seed in SEEDS:
        for maker in (closed_image, crashed_image):
            image, states, final = maker(seed)
            old = 1 - newest_slot(image)
            put_slot(image, old, random.Random(seed).randbytes(fmt.BLOCK))
            pool = Pool.open(image)
            assert pool.check() + compare_exact(pool, final, attrs=False) == []
            pool.close()

            image, states, final = maker(seed)
            new = newest_slot(image)
            put_slot(image, new, bytes(fmt.BLOCK))
            assert_vouched(image, states, f"seed {seed} {maker.__name__}: newest slot zeroed")


def journal_workload(seed: int) -> tuple[SimStorage, CrashHistory, list[list[tuple[int, int]]]]:
    """A pool with several synced batches in its journal and no checkpoint
    since the first batch; returns the storage (never closed), the history,
    and per acknowledged sync the (offset, length) of journal writes that
    batch caused."""
    rng = random.Random(seed)
    storage = SimStorage(label=f"sim-journal-{seed}")
    Pool.mkfs(storage)
    pool = Pool.open(storage)
    history = CrashHistory(storage.log)
    model = PoolModel()
    history.acknowledge(model)
    groups: list[list[tuple[int, int]]] = [[]]
    for batch in range(6):
        begin = len(storage.log)
        for i in range(rng.randint(1, 4)):
            start = len(storage.log)
            label, touched = random_mutation(rng, pool, model, f"j{seed}b{batch}o{i}", max_size=256 * 1024)
            history.record(start, label, model, touched)
        pool.sync()
        history.acknowledge(model)
        groups.append([(off, len(data)) for op, name, off, data in storage.log[begin:]
                       if op == "write" and name == fmt.JOURNAL_FILE])
        assert groups[-1], f"batch {batch}: sync wrote nothing to the journal"
    return storage, history, groups


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_garbled_journal_group(seed: int) -> None:
    """Proves: when the first record of batch k's journal group is garbled,
    mount recovers exactly the state acknowledged before batch k (replay
    stops at the damage and later groups are ignored), consistently."""
    storage, history, groups = journal_workload(seed)
    for k in range(1, len(groups)):
        image = storage.crash(len(storage.log), "keep")
        off, _ = groups[k][0]
        journal = image.files[fmt.JOURNAL_FILE].data
        journal[off : off + 8] = bytes(b ^ 0xA5 for b in journal[off : off + 8])
        pool = Pool.open(image)
        problems = pool.check() + compare_exact(pool, history.epochs[k - 1].model, attrs=False)
        pool.close()
        assert problems == [], f"seed {seed}: garbled group of batch {k}: {problems}"


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_garbled_journal_inside_group(seed: int) -> None:
    """Proves: a byte flipped anywhere inside a journal group makes mount
    recover some operation-boundary state at or after the previous
    acknowledged one (never junk, never an exception)."""
    storage, history, groups = journal_workload(seed)
    states = history.states()
    rng = random.Random(seed)
    for k in range(1, len(groups)):
        for _ in range(4):
            image = storage.crash(len(storage.log), "keep")
            off, length = rng.choice(groups[k])
            image.files[fmt.JOURNAL_FILE].data[off + rng.randrange(length)] ^= 1 << rng.randrange(8)
            pool = Pool.open(image)
            problems = pool.check() + judge_damaged(pool, states)
            pool.close()
            assert problems == [], f"seed {seed}: flip in group of batch {k}: {problems}"


def test_journal_tail_torn_by_crash() -> None:
    """Proves: a power cut in the middle of the journal write of a sync
    recovers the previous acknowledged state or a later operation boundary
    of that batch, in every crash mode."""
    storage, history, groups = journal_workload(34)
    states = history.states()
    for k in range(1, len(groups)):
        for point in range(history.epochs[k - 1].ack, history.epochs[k].ack + 1):
            for mode in ("lose", "keep", "random"):
                pool = Pool.open(storage.crash(point, mode, random.Random(point)))
                problems = pool.check() + judge_damaged(pool, states)
                pool.close()
                assert problems == [], f"batch {k} point {point} {mode}: {problems}"


@pytest.mark.parametrize("name", fmt.POOL_FILES)
@pytest.mark.parametrize("state", ["closed", "crashed"])
def test_truncated_pool_file(name: str, state: str) -> None:
    """Proves: a pool file cut short (to 0, 1, 4095 bytes, half, or one byte
    less) is refused or served with EIO where data is missing -- never
    wrong data, never another exception."""
    maker = closed_image if state == "closed" else crashed_image
    _, states, final = maker(SEEDS[0])
    allowed = [final] if name in (fmt.META_FILE, fmt.DATA_FILE) else states
    size = len(maker(SEEDS[0])[0].files[name].data)
    for cut in sorted({0, 1, 4095, size // 2, max(0, size - 1)}):
        if cut >= size:
            continue
        image, _, _ = maker(SEEDS[0])
        del image.files[name].data[cut:]
        assert_vouched(image, allowed, f"{state} pool, {name} cut to {cut} of {size}")


@pytest.mark.parametrize("name", fmt.POOL_FILES)
@pytest.mark.parametrize("state", ["closed", "crashed"])
def test_bit_flips(name: str, state: str) -> None:
    """Proves: random byte damage anywhere in a pool file is refused, ignored
    (unused space), or turns into EIO on the affected reads -- checksums
    guard every structure, so wrong bytes are never served."""
    maker = closed_image if state == "closed" else crashed_image
    rng = random.Random(f"{name}{state}")
    for trial in range(12):
        image, states, final = maker(SEEDS[trial % 2])
        allowed = [final] if name in (fmt.META_FILE, fmt.DATA_FILE) else states
        data = image.files[name].data
        # Aim at the written part of the file most of the time.
        used = len(data.rstrip(b"\0")) or len(data)
        for _ in range(rng.choice((1, 1, 4, 32))):
            data[rng.randrange(used if rng.random() < 0.8 else len(data))] ^= 1 << rng.randrange(8)
        assert_vouched(image, allowed, f"{state} pool, {name}, trial {trial}")


def test_missing_files() -> None:
    """Proves: a pool with any one of its files missing is refused with a
    PoolError naming the pool (not FileNotFoundError)."""
    for name in fmt.POOL_FILES:
        image, _, _ = closed_image(SEEDS[0])
        del image.files[name]
        with pytest.raises(PoolError) as info:
            Pool.open(image)
        assert image.label in str(info.value) and name in str(info.value), info.value


def test_empty_directory(tmp_path: Path) -> None:
    """Proves: opening an empty directory as a pool is a PoolError naming it."""
    with pytest.raises(PoolError) as info:
        Pool.open(OsStorage(str(tmp_path)))
    assert str(tmp_path) in str(info.value), info.value


@pytest.mark.parametrize("seed", range(6))
def test_garbage_directory(tmp_path: Path, seed: int) -> None:
    """Proves: a directory of random files -- some with the pool's own file
    names and random or zero content of random length -- is refused with a
    PoolError naming it, never another exception."""
    rng = random.Random(seed)
    names = [f"junk{i}.bin" for i in range(rng.randint(0, 3))]
    names += [n for n in fmt.POOL_FILES if rng.random() < 0.7 or seed == 0]
    for n in names:
        size = rng.choice((0, 1, 100, 4096, 8192, 65536, rng.randint(1, 300_000)))
        content = rng.randbytes(size) if rng.random() < 0.7 else bytes(size)
        if n == fmt.SUPERBLOCK_FILE and size >= 8 and rng.random() < 0.5:
            content = fmt.SB_MAGIC + content[8:]  # looks like a pool at first glance
        (tmp_path / n).write_bytes(content)
    with pytest.raises(PoolError) as info:
        Pool.open(OsStorage(str(tmp_path)))
    assert str(tmp_path) in str(info.value), info.value


def test_mkfs_refuses_used_directory(tmp_path: Path) -> None:
    """Proves: mkfs refuses (EEXIST) a directory holding a pool or any other
    file and leaves it untouched; with force it makes a fresh empty pool."""
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(PoolError) as info:
        Pool.mkfs(OsStorage(str(tmp_path)))
    assert info.value.errno == errno.EEXIST and str(tmp_path) in str(info.value)
    assert os.listdir(tmp_path) == ["notes.txt"]
    os.unlink(tmp_path / "notes.txt")

    Pool.mkfs(OsStorage(str(tmp_path)))
    pool = Pool.open(OsStorage(str(tmp_path)))
    pool.create_volume("v", 4096)
    pool.close()
    with pytest.raises(PoolError) as info:
        Pool.mkfs(OsStorage(str(tmp_path)))
    assert info.value.errno == errno.EEXIST
    pool = Pool.open(OsStorage(str(tmp_path)))
    assert [i.name for i in pool.volumes()] == ["v"]
    pool.close()

    Pool.mkfs(OsStorage(str(tmp_path)), force=True)
    pool = Pool.open(OsStorage(str(tmp_path)))
    assert pool.volumes() == [] and pool.check() == []
    pool.close()


def test_open_while_open_is_ebusy(tmp_path: Path) -> None:
    """Proves: a second open of a pool that is open is refused with EBUSY
    naming the pool, and works once the first is closed."""
    Pool.mkfs(OsStorage(str(tmp_path)))
    first = Pool.open(OsStorage(str(tmp_path)))
    with pytest.raises(PoolError) as info:
        Pool.open(OsStorage(str(tmp_path)))
    assert info.value.errno == errno.EBUSY and str(tmp_path) in str(info.value)
    first.close()
    Pool.open(OsStorage(str(tmp_path))).close()


@pytest.mark.parametrize("name", fmt.POOL_FILES)
def test_pool_file_is_a_directory(tmp_path: Path, name: str) -> None:
    """Proves: a pool whose file is replaced by a directory is refused with a
    PoolError naming the pool, not a raw OSError."""
    Pool.mkfs(OsStorage(str(tmp_path)))
    os.unlink(tmp_path / name)
    os.mkdir(tmp_path / name)
    with pytest.raises(PoolError) as info:
        Pool.open(OsStorage(str(tmp_path)))
    assert str(tmp_path) in str(info.value), info.value


def test_missing_directory(tmp_path: Path) -> None:
    """Proves: opening a pool directory that does not exist is a PoolError
    (ENOENT) naming it, not a raw FileNotFoundError."""
    gone = tmp_path / "no-such-pool"
    with pytest.raises(PoolError) as info:
        Pool.open(OsStorage(str(gone)))
    assert info.value.errno == errno.ENOENT and str(gone) in str(info.value), info.value
