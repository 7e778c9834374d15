"""The C in-place edit of a one-block write against the general tree path.

``Tree.set_one`` hands a random 4 KiB write to ``cowfs._inplace.map_raw_block``,
which edits the leaf and both data units' counts in place when the path allows
and must otherwise change nothing and answer -1.  Two pools run the same random
sequence of writes, snapshots, clones, checkpoints, truncates and deletes; in
the second, ``map_raw_block`` always answers -1, so every write takes the
Python path (``RefTable.incref`` and ``Tree.replace``).  After every step both
pools must hold the same trees, node for node, and the same reference tables,
pending lists and dirty pages.  A wrong edit, a change made before a refusal,
or a count or page left out shows up as a difference.
"""

from __future__ import annotations

import random

import pytest

from cowfs import btree
from cowfs._inplace import map_raw_block
from cowfs.blockio import SimStorage
from cowfs.pool import BLOCK, Pool
from cowfs.spacemap import RESERVED

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
    }


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
def test_in_place_edit_matches_the_general_path(monkeypatch: pytest.MonkeyPatch,
                                                seed: int) -> None:
    fast, general = open_pool("inplace-fast"), open_pool("inplace-general")
    answers = {-1: 0, 0: 0, 1: 0}

    def by_pool(dirty, *rest):
        if dirty is general.store.dirty:
            return -1
        answer = map_raw_block(dirty, *rest)
        answers[answer] += 1
        return answer

    monkeypatch.setattr(btree, "map_raw_block", by_pool)
    rng_fast, rng_general = random.Random(seed), random.Random(seed)
    for n in range(600):
        step(fast, rng_fast, n)
        step(general, rng_general, n)
        assert state(fast) == state(general), f"seed {seed}: pools differ after step {n}"
    # Every kind of answer happened: overwrites and inserts in place, and
    # refusals (shared or clean paths, compressed old pointers).
    assert min(answers.values()) > 20, answers
    for pool in (fast, general):
        assert pool.check() == []
        pool.close()


def test_refusals_change_nothing() -> None:
    """Cases the edit leaves alone: the answer is -1 and nothing changed."""
    pool = open_pool("inplace-refuse")
    vid = pool.lookup("v0").id
    pool.write(vid, 0, random.Random(1).randbytes(BLOCK))
    v = pool.datasets[vid]
    drc = pool.drc
    unit = drc.find_free(1)

    def call(root: int, key: int, sector: int) -> int:
        return map_raw_block(pool.store.dirty, pool.mrc.rc, root, key, drc.rc, drc.pending,
                             drc.dirty_pages, sector, 7)

    before = state(pool)
    assert call(v.root, 1, unit * 8) == -1          # the new unit is not RESERVED
    assert state(pool) == before
    drc.set_marker(unit, RESERVED)
    before = state(pool)
    assert call(v.root, 1, unit * 8 + 1) == -1      # not a unit-aligned sector
    assert call(0, 1, unit * 8) == -1               # an empty tree
    assert state(pool) == before
    pool.checkpoint()                               # the path is clean now
    before = state(pool)
    assert call(v.root, 0, unit * 8) == -1
    assert call(v.root, 1, unit * 8) == -1
    assert state(pool) == before
    with pytest.raises(TypeError):
        map_raw_block(pool.store.dirty, bytes(pool.mrc.rc), v.root, 1, drc.rc, drc.pending,
                      drc.dirty_pages, unit * 8, 7)
    with pytest.raises(OverflowError):
        call(v.root, -1, unit * 8)
    assert state(pool) == before
    pool.close()


def test_counts_and_pages_of_both_units() -> None:
    """An overwrite in place: the new unit gets 1, the old one its count less
    one (PENDING at zero), both pages are marked dirty; an old unit whose
    count overflows its byte is left to the general path."""
    pool = open_pool("inplace-counts")
    vid = pool.lookup("v0").id
    pool.write(vid, 0, random.Random(2).randbytes(BLOCK))     # the path is dirty again
    v = pool.datasets[vid]
    drc = pool.drc
    old_unit = pool.tree.lookup_range(v.root, 0, 1)[0][0] // 8
    drc.grow(4 * 4096)
    far = 2 * 4096 + 5                                        # another page
    assert drc.rc[far] == 0
    drc.set_marker(far, RESERVED)
    drc.dirty_pages.clear()
    drc.incref(old_unit)                                      # a second reference
    drc.dirty_pages.clear()
    args = (pool.store.dirty, pool.mrc.rc, v.root, 0, drc.rc, drc.pending, drc.dirty_pages)
    assert map_raw_block(*args, far * 8, 9) == 0
    assert drc.count(far) == 1 and drc.count(old_unit) == 1
    assert old_unit >> 12 < 2 and drc.dirty_pages == {old_unit >> 12, 2}
    assert pool.tree.lookup_range(v.root, 0, 1)[0] == (far * 8, 9, BLOCK)
    # An insert: the new unit's page alone.
    drc.dirty_pages.clear()
    new = far + 4096
    drc.set_marker(new, RESERVED)
    assert map_raw_block(*args[:3], SPAN - 1, *args[4:], new * 8, 10) == 1
    assert drc.dirty_pages == {3} and drc.count(new) == 1
    # 251 references no longer fit the byte: refused, nothing changed.
    for _ in range(250):
        drc.incref(far)
    other = new + 1
    drc.set_marker(other, RESERVED)
    before = state(pool)
    assert map_raw_block(*args, other * 8, 11) == -1
    assert state(pool) == before
