"""The C one-block write and read against the engine's general Python path.

``Pool.write`` hands every 4 KiB write to ``cowfs._oneblock.write_block``,
which does the whole write when the case is the common one and must
otherwise change nothing and answer -1.  Two pools run the same random
sequence of writes, snapshots, clones, checkpoints, truncates and deletes;
in the second, ``write_block`` always answers -1, so every write is Python (``Pool._write_block``, ``RefTable``,
``Tree.replace``, ``Journal.append``).  After every step both pools must hold
the same trees, node for node, the same reference tables, pending lists and
dirty pages, the same data file and the same journal records.  A wrong edit,
a change made before a refusal, or a count, page, record or time left out
shows up as a difference.  The one-block read (``read_block``) is checked
the same way: after every step of such a run, against ``Pool.read``'s Python
path on the same pool.
"""

from __future__ import annotations

import errno
import random
import time
from collections import OrderedDict

import pytest

from cowfs import pool as pool_module
from cowfs._oneblock import OWN_PATH_FIRST, read_block, write_block
from cowfs.blockio import SimStorage
from cowfs.errors import ChecksumError, PoolError
from cowfs.format import DATA_FILE, SECTOR, checksum
from cowfs.journal import _HDR, ATTR, HDR_SIZE, R_ATTR, R_PAD, R_WRITE, WRITE_ONE
from cowfs.pool import BLOCK, Pool
from cowfs.spacemap import PENDING, RESERVED

SPAN = 400          # blocks of each volume: enough that leaves fill up and split
HOT = 64            # half the 4 KiB writes land in the first HOT blocks: overwrites
# Written after the first volumes' data and before the random steps, so that
# new data units lie in another reference-count page than the old ones.
FILLER_BLOCKS = 4400


def state(pool: Pool) -> dict:
    """Everything the in-place edit may touch, in comparable form."""
    nodes = {}
    for addr, node in pool.store.dirty.items():
        if node.leaf:
            nodes[addr] = (list(node.keys), list(node.addrs), list(node.csums), list(node.slens))
        else:
            nodes[addr] = (list(node.keys), list(node.children))
    return {
        "drc": bytes(pool.drc.rc), "drc_pending": list(pool.drc.pending),
        "drc_pages": set(pool.drc.dirty_pages), "drc_free": pool.drc.free_units(),
        "mrc": bytes(pool.mrc.rc), "mrc_pages": set(pool.mrc.dirty_pages),
        "datasets": {d.id: (d.name, d.owner, d.root, d.mapped, d.size)
                     for d in pool.datasets.values()},
        "nodes": nodes,
        "drc_cursor": pool.drc._cursor,
        "data": checksum(pool.data._data),   # the whole data file
        "journal": journal_records(pool), "journal_at": (pool.journal.pos, pool.journal.seq),
        "times_dirty": sorted(pool.times_dirty),
        "unflushed": (pool._unflushed, pool._data_dirty),
    }


def journal_records(pool: Pool) -> list[tuple[int, int, bytes]]:
    """The records buffered in the journal, each checked against its own
    checksum; the times in attribute records (the clock's) left out."""
    buf, pos, out = bytes(pool.journal.buf), 0, []
    while pos < len(buf):
        magic, gen, seq, rtype, flags, length, csum = _HDR.unpack_from(buf, pos)
        body = buf[pos + HDR_SIZE:pos + HDR_SIZE + length]
        hdr = _HDR.pack(magic, gen, seq, rtype, flags, length, 0)
        assert checksum(hdr + body) == csum, f"record {seq}: bad checksum"
        if rtype == R_ATTR:
            body = body[:ATTR.size - 24]
        out.append((seq, rtype, body))
        pos += HDR_SIZE + length
    return out


def step(pool: Pool, rng: random.Random, n: int) -> None:
    """One random operation (the same for both pools given the same rng state)."""
    vols = sorted(v.name for v in pool.volumes() if v.name != "filler")
    name = rng.choice(vols)
    vid = pool.lookup(name).id
    r = rng.random()
    if r < 0.70:
        block = rng.randrange(HOT if rng.random() < 0.5 else SPAN)
        pool.write(vid, block * BLOCK, rng.randbytes(BLOCK))
    elif r < 0.78:
        # Compressible multi-block writes leave compressed pointers, which
        # the in-place edit must leave to the general path.
        nb = rng.randrange(2, 9)
        kind = rng.random()
        data = (b"cowfs" * (nb * BLOCK // 5 + 1))[:nb * BLOCK] if kind < 0.5 \
            else rng.randbytes(nb * BLOCK)
        pool.write(vid, rng.randrange(SPAN - nb) * BLOCK, data)
    elif r < 0.83:
        pool.snapshot([name], f"s{n}")
    elif r < 0.86 and len(vols) < 4:
        pool.clone([(name, None, f"c{n}")])
    elif r < 0.91:
        pool.checkpoint()
    elif r < 0.94:
        pool.sync()
    elif r < 0.97:
        pool.truncate(vid, rng.randrange(SPAN // 2, SPAN) * BLOCK)
    elif len(vols) > 1:
        pool.delete_volume(vid)


def open_pool(label: str) -> Pool:
    storage = SimStorage(label=label)
    Pool.mkfs(storage)
    pool = Pool.open(storage)
    rng = random.Random(0)
    for name in ("v0", "v1"):
        vid = pool.create_volume(name, SPAN * BLOCK).id
        pool.write(vid, 0, rng.randbytes(HOT * BLOCK))
    filler = pool.create_volume("filler", FILLER_BLOCKS * BLOCK).id
    for off in range(0, FILLER_BLOCKS * BLOCK, 1 << 20):
        pool.write(filler, off, rng.randbytes(min(1 << 20, FILLER_BLOCKS * BLOCK - off)))
    pool.checkpoint()
    return pool


@pytest.mark.parametrize("seed", range(6))
def test_c_write_matches_the_general_path(monkeypatch: pytest.MonkeyPatch, seed: int,
                                         checksum_path: str) -> None:
    fast, general = open_pool("oneblock-fast"), open_pool("oneblock-general")
    writes = {"refused": 0, "own path first": 0, "then in C": 0, "overwrite": 0, "insert": 0}
    last: list = [None]

    def write_by_pool(pool, vid, offset, data):
        if pool is general:
            return -1
        mapped = pool.datasets[vid].mapped if vid in pool.datasets else 0
        answer = write_block(pool, vid, offset, data)
        if answer == OWN_PATH_FIRST:
            writes["own path first"] += 1
        elif answer < 0:
            writes["refused"] += 1
        else:
            writes["insert" if pool.datasets[vid].mapped > mapped else "overwrite"] += 1
            if last[0] == (vid, offset, OWN_PATH_FIRST):    # Pool.write's second call
                writes["then in C"] += 1
        last[0] = (vid, offset, answer)
        return answer

    monkeypatch.setattr(pool_module, "write_block", write_by_pool)
    rng_fast, rng_general = random.Random(seed), random.Random(seed)
    for n in range(600):
        step(fast, rng_fast, n)
        step(general, rng_general, n)
        assert state(fast) == state(general), f"seed {seed}: pools differ after step {n}"
    # Every kind of answer happened: C writes that overwrite and insert,
    # paths to make the volume's first (shared or clean since the checkpoint)
    # and refusals (compressed old pointers, full leaves, snapshots).
    assert min(writes.values()) > 5, writes
    assert min(n for kind, n in writes.items() if kind != "refused") > 20, writes
    for pool in (fast, general):
        pool.sync()
        assert pool.check() == []
    # What the C writes journaled replays to the same pool.
    before = state(fast)
    storage = fast.storage
    fast.close()
    again = Pool.open(storage)
    after = state(again)
    for key in ("drc", "datasets", "data"):
        assert after[key] == before[key], key
    assert again.check() == []
    again.close()
    general.close()


def dirty_again(pool: Pool, name: str = "v0") -> int:
    """A volume whose first leaf's path is dirty (written since the last
    checkpoint), so that the next write into it is the C path's."""
    vid = pool.lookup(name).id
    with_general_path(pool.write, vid, 0, random.Random(1).randbytes(BLOCK))
    return vid


def with_general_path(fn, *args):
    """Call ``fn`` with the C write switched off (the Python path runs)."""
    saved = pool_module.write_block
    pool_module.write_block = lambda *a: -1
    try:
        return fn(*args)
    finally:
        pool_module.write_block = saved


def test_refusals_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case the C write leaves alone: the answer is -1 and nothing
    changed (the general path then does the write); a tree path that is
    shared or clean since the checkpoint: OWN_PATH_FIRST and nothing changed,
    and once Pool._own_path made it the volume's, the C write does it."""
    pool = open_pool("oneblock-refuse")
    vid = dirty_again(pool)
    data = random.Random(2).randbytes(BLOCK)
    pool.snapshot(["v1"], "s")
    # A snapshot whose path is dirty and no longer shared (the volume copied
    # its own on the next write): only being a snapshot forbids the write.
    pool.snapshot(["v0"], "t")
    pool.write(vid, 0, data)
    snap = pool.snaps[("v0", "t")].id
    assert pool.mrc.count(pool.snaps[("v0", "t")].root) == 1
    before = state(pool)

    def refused(*args, answer: int = -1) -> None:
        assert write_block(*args) == answer, args
        assert state(pool) == before

    refused(pool, vid, 1 * BLOCK, bytes(BLOCK))             # zeros: a hole
    refused(pool, vid, 1 * BLOCK + 512, data)               # not block-aligned
    refused(pool, vid, -BLOCK, data)                        # negative
    refused(pool, vid, 1 << 50, data)                       # past the size limit
    refused(pool, vid, BLOCK, data[:512])                   # not one block
    refused(pool, vid, BLOCK, data + data)
    refused(pool, 999, BLOCK, data)                         # no such volume
    refused(pool, snap, 0, data)                            # a snapshot
    for name in ("v1", "filler"):       # shared with the snapshot; clean since the checkpoint
        refused(pool, pool.lookup(name).id, BLOCK, data, answer=OWN_PATH_FIRST)
    for attr, value in (("readonly", True), ("closed", True), ("_replaying", True),
                        ("stale", "x"), ("degraded", "x")):
        monkeypatch.setattr(pool, attr, value)
        refused(pool, vid, BLOCK, data)
        monkeypatch.undo()
    # Short of the metadata reserve: the general path grows the meta file.
    monkeypatch.setattr(pool.mrc, "_free", 10)
    before = state(pool)
    refused(pool, vid, BLOCK, data)
    monkeypatch.undo()
    # The record does not fit the journal: the general path checkpoints.
    monkeypatch.setattr(pool.journal, "size", pool.journal.used() + 200)
    refused(pool, vid, BLOCK, data)
    monkeypatch.undo()
    # No free data unit: the general path syncs or grows the pool.
    rc = pool.drc.rc
    free = [u for u in range(len(rc)) if rc[u] == 0]
    for u in free:
        rc[u] = RESERVED
    before = state(pool)
    refused(pool, vid, BLOCK, data)
    for u in free:
        rc[u] = 0
    before = state(pool)
    assert write_block(pool, vid, BLOCK, data) >= 0          # and now it is the common case
    assert state(pool) != before
    snap_v1 = pool.snaps[("v1", "s")].id
    kept = pool.read(snap_v1, BLOCK, BLOCK)
    for name in ("v1", "filler"):
        other = pool.lookup(name).id
        old_root = pool.datasets[other].root
        pool._own_path(other, 1)
        assert pool.datasets[other].root != old_root            # copied / moved
        assert write_block(pool, other, BLOCK, data) >= 0
        assert pool.read(other, BLOCK, BLOCK) == data
    assert pool.read(snap_v1, BLOCK, BLOCK) == kept != data    # the snapshot keeps its block
    assert pool.check() == []
    pool.close()


def pointer(pool: Pool, root: int, block: int) -> tuple[int, int, int]:
    """The pointer (sector, checksum, stored length) of a mapped block."""
    leaf, i, _ = next(pool.tree.leaf_spans(root, block, 1))
    return leaf.addrs[i], leaf.csums[i], leaf.slens[i]


def test_counts_pages_times_and_record() -> None:
    """An overwrite: the new unit gets 1, the old one its count less one
    (PENDING at zero, in the pending list), both pages are dirty, the volume's
    times are now, one R_WRITE record names the new block; an insert: the
    new unit's page, one more mapped block, the size grows.  An old unit
    whose count overflows its byte is left to the general path."""
    pool = open_pool("oneblock-counts")
    vid = dirty_again(pool)
    v = pool.datasets[vid]
    drc = pool.drc
    old_unit = pointer(pool, v.root, 0)[0] // 8
    drc.grow(4 * 4096)
    drc._cursor = far = 2 * 4096 + 5                          # another page
    drc.dirty_pages.clear()
    drc.incref(old_unit)                                      # a second reference
    drc.dirty_pages.clear()
    pool.sync()
    data = random.Random(3).randbytes(BLOCK)
    t0 = time.time_ns()
    mono0 = time.monotonic()
    assert write_block(pool, vid, 0, data) == 0
    assert mono0 <= pool._first_unsynced <= time.monotonic()
    assert t0 <= v.mtime == v.ctime <= time.time_ns()
    assert drc.count(far) == 1 and drc.count(old_unit) == 1 and drc._cursor == far + 1
    assert old_unit >> 12 < 2 and drc.dirty_pages == {old_unit >> 12, 2}
    assert pointer(pool, v.root, 0) == (far * 8, checksum(data), BLOCK)
    assert pool.data.pread(BLOCK, far * BLOCK) == data
    assert vid in pool.times_dirty and pool._data_dirty
    [(seq, rtype, body)] = journal_records(pool)
    assert rtype == R_WRITE
    assert WRITE_ONE.unpack(body) == (vid, 0, 1, v.size, far * 8, checksum(data),
                                                  BLOCK)
    # The last reference: PENDING, and in the pending list.
    assert write_block(pool, vid, 0, data) == 0
    assert drc.rc[far] == PENDING and far in drc.pending
    # An insert past the end: the size grows, one more block mapped.
    drc.dirty_pages.clear()
    size, mapped = v.size, v.mapped
    assert write_block(pool, vid, (SPAN + 3) * BLOCK, data) == 0
    assert (v.size, v.mapped) == ((SPAN + 4) * BLOCK, mapped + 1) and size < v.size
    assert drc.dirty_pages == {(far + 2) >> 12}
    # 251 references no longer fit the byte: refused, nothing changed.
    cur = pointer(pool, v.root, 0)[0] // 8
    for _ in range(250):
        drc.incref(cur)
    before = state(pool)
    assert write_block(pool, vid, 0, data) == -1
    assert state(pool) == before
    pool.close()


def test_what_the_caller_still_owes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flag 2 every WRITEBACK_BYTES of data (the writeback hint, with the
    count started over); flag 1 once the journal buffer or the dirty nodes
    pass their limit, and Pool.write then commits."""
    pool = open_pool("oneblock-owed")
    vid = dirty_again(pool)
    data = random.Random(4).randbytes(BLOCK)
    pool._unflushed = pool_module.WRITEBACK_BYTES - 2 * BLOCK
    assert write_block(pool, vid, 0, data) == 0
    assert pool._unflushed == pool_module.WRITEBACK_BYTES - BLOCK
    assert write_block(pool, vid, 0, data) == 2
    assert pool._unflushed == 0
    hints = []
    monkeypatch.setattr(pool.data, "start_writeback", lambda: hints.append(1))
    pool._unflushed = pool_module.WRITEBACK_BYTES - BLOCK
    assert pool.write(vid, 0, data) == BLOCK and hints == [1]
    # A full journal buffer (a padding record stands in for 4 MiB of records).
    pool.journal.append(R_PAD, bytes(pool_module.JOURNAL_BUFFER_LIMIT))
    assert write_block(pool, vid, 0, data) == 1
    pos = pool.journal.pos
    assert pool.write(vid, 0, data) == BLOCK
    assert pool.journal.pos > pos and not pool.journal.buf       # committed
    pool.close()


def test_a_failed_data_write_changes_nothing() -> None:
    """EIO from the data file: the write fails with EIO naming the pool, and
    the pool is as before (the unit it would have used is still free)."""
    pool = open_pool("oneblock-eio")
    vid = dirty_again(pool)
    data = random.Random(5).randbytes(BLOCK)
    before = state(pool)

    def fail(op: str, name: str, offset: int, length: int) -> None:
        if op == "write" and name == "data":
            raise OSError(errno.EIO, "injected")

    pool.storage.fault = fail
    with pytest.raises(PoolError) as err:
        pool.write(vid, 0, data)
    assert err.value.errno == errno.EIO and "oneblock-eio" in str(err.value)
    assert state(pool) == before
    pool.storage.fault = None
    assert pool.write(vid, 0, data) == BLOCK
    assert pool.read(vid, 0, BLOCK) == data
    pool.close()


# -- the one-block read ---------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_c_read_matches_the_general_path(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Proves: after every step of a random run (writes raw and compressed,
    snapshots, clones, checkpoints, truncates, deletes), a 4 KiB read by
    read_block returns what Pool.read's Python path returns for the same
    volume or snapshot and offset (data, holes, the end of a volume), leaves
    the node cache in the same LRU order, and reads nothing when it answers
    False (unaligned, past the end, compressed, a node not in memory), after
    which Pool.read's answer is still the Python path's."""
    pool = open_pool("oneblock-read")
    rng = random.Random(seed)
    answers = {"data": 0, "hole": 0, "left": 0}
    store = pool.store
    for n in range(300):
        step(pool, rng, n)
        if n % 50 == 49:
            store.cache.clear()         # a cold cache: nodes read from disk again
        ids = sorted(pool.datasets)
        for _ in range(6):
            vid = rng.choice(ids)
            offset = rng.randrange(SPAN + 2) * BLOCK
            if rng.random() < 0.1:
                offset += rng.randrange(1, BLOCK)
            order = list(store.cache)
            reads: list[str] = []
            pool.storage.fault = lambda op, name, *_: reads.append(name) if op == "read" else None
            fast = read_block(pool, vid, offset, True)
            pool.storage.fault = None
            if fast is False:
                answers["left"] += 1
                assert reads == []
                fast = pool.read(vid, offset, BLOCK)    # as Pool.read goes on
            else:
                answers["hole" if fast == bytes(BLOCK) else "data"] += 1
            fast_order = list(store.cache)
            # The Python path alone, from the same cache.
            store.cache = OrderedDict((addr, store.cache[addr]) for addr in order)
            monkeypatch.setattr(pool_module, "read_block", lambda *args: False)
            general = pool.read(vid, offset, BLOCK)
            monkeypatch.undo()
            assert fast == general, f"seed {seed} step {n}: dataset {vid} offset {offset}"
            assert list(store.cache) == fast_order
    assert min(answers.values()) > 20, answers
    pool.close()


def test_c_read_errors_are_the_pools(checksum_path: str) -> None:
    """Proves: through read_block, a flipped byte fails the read with EIO
    naming the block's offset (counted), an I/O error of the host file
    system is the pool's EIO, and a block not in the page cache is None
    when not waited for, the block when waited for."""
    storage = SimStorage(label="oneblock-read-errors")
    Pool.mkfs(storage, compression=False)
    pool = Pool.open(storage)
    vid = pool.create_volume("v", 16 * BLOCK).id
    data = random.Random(4).randbytes(16 * BLOCK)
    pool.write(vid, 0, data)
    pool.sync()
    assert read_block(pool, vid, 3 * BLOCK, True) == data[3 * BLOCK:4 * BLOCK]
    leaf, _ = pool.tree.find_leaf(pool.datasets[vid].root, 5)
    sector = leaf.addrs[list(leaf.keys).index(5)]
    storage.files[DATA_FILE].data[sector * SECTOR + 9] ^= 1
    with pytest.raises(ChecksumError) as info:
        read_block(pool, vid, 5 * BLOCK, True)
    assert info.value.errno == errno.EIO and f"offset {5 * BLOCK} " in str(info.value)
    assert pool.checksum_errors == 1

    def fail(op: str, name: str, offset: int, length: int) -> None:
        if op == "read" and name == DATA_FILE:
            raise OSError(errno.EIO, "injected")

    storage.fault = fail
    with pytest.raises(PoolError) as info:
        read_block(pool, vid, 2 * BLOCK, True)
    assert info.value.errno == errno.EIO and "oneblock-read-errors" in str(info.value)
    storage.fault = None
    storage.uncached = 1
    assert read_block(pool, vid, 7 * BLOCK, False) is None
    storage.uncached = 1
    assert read_block(pool, vid, 7 * BLOCK, lambda: True) == data[7 * BLOCK:8 * BLOCK]
    assert pool.uncached_reads == 2
    pool.stale = "a test"           # memory half changed: Pool.read reloads first
    assert read_block(pool, vid, 0, True) is False
    assert pool.read(vid, 0, BLOCK) == data[:BLOCK] and pool.stale is None
    pool.close()
    assert read_block(pool, vid, 0, True) is False     # closed: Pool.read refuses it
