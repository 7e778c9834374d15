"""RefTable's kept count of free units against a plain count, and its
batch increments against one increment at a time.

``free_units`` answers from a count that every method changing the table
keeps up to date, instead of counting the table on every write and every
``df``; the pool relies on it for its metadata reserve and ``statfs``.  A
random sequence of every operation that changes the table checks that the
answer always equals a full count.  The C ``incref_blocks`` (the references
of a copied leaf) must leave the table as ``incref`` of each unit in turn
would, or unchanged; so must ``decref_blocks`` (the old pointers a write
replaces) against ``decref`` of each unit in turn.  The C
``release_pending`` must free exactly the listed units that are PENDING.
"""

from __future__ import annotations

from array import array

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cowfs._oneblock import decref_blocks, incref_blocks, release_pending
from cowfs.format import BLOCK, SECTOR, SECTORS_PER_BLOCK, units_of
from cowfs.spacemap import MAX_DIRECT, PAGE_SHIFT, PAGE_UNITS, PENDING, RESERVED, SYSTEM, RefTable

UNITS = 64

_op = st.one_of(
    st.tuples(st.just("incref"), st.integers(0, UNITS - 1)),
    st.tuples(st.just("decref"), st.integers(0, UNITS - 1)),
    st.tuples(st.just("marker"), st.integers(0, UNITS - 1), st.sampled_from([RESERVED, SYSTEM])),
    st.tuples(st.just("free_marked"), st.integers(0, UNITS - 1)),
    st.tuples(st.just("reserve_run"), st.integers(1, 8)),
    st.tuples(st.just("take_run"), st.integers(0, UNITS - 8), st.integers(1, 8)),
    st.tuples(st.just("release"),),
    st.tuples(st.just("grow"), st.integers(1, 16)),
    st.tuples(st.just("load_page"), st.binary(min_size=1, max_size=4)),
)


def _apply(t: RefTable, op: tuple) -> None:
    kind = op[0]
    if kind == "incref":
        if t.rc[op[1]] not in (PENDING, SYSTEM) and t.count(op[1]) < MAX_DIRECT + 3:
            t.incref(op[1])
    elif kind == "decref":
        if t.count(op[1]) > 0:
            t.decref(op[1])
    elif kind == "marker":
        if t.rc[op[1]] in (0, RESERVED, SYSTEM):
            t.set_marker(op[1], op[2])
    elif kind == "free_marked":
        if t.rc[op[1]] in (RESERVED, SYSTEM):
            t.free_marked(op[1])
    elif kind == "reserve_run":
        start = t.find_free(op[1])
        if start >= 0:
            t.reserve_run(start, op[1])
    elif kind == "take_run":
        t.take_run(op[1], op[2])
    elif kind == "release":
        t.release_pending()
    elif kind == "grow":
        t.grow(len(t) + op[1])
    else:  # load_page: a persisted image, counts only, no markers
        image = bytes(b % 4 for b in op[1]) + bytes(PAGE_UNITS)
        t.load_page(0, image[:PAGE_UNITS])
        t.pending.clear()
        t.overflow.clear()


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=120))
def test_free_units_matches_a_full_count(ops: list[tuple]) -> None:
    t = RefTable(UNITS)
    for op in ops:
        _apply(t, op)
        assert t.free_units() == t.rc.count(0), op


def test_free_units_counts_again_after_a_direct_change() -> None:
    t = RefTable(1000)
    assert t.free_units() == 1000
    # Units taken behind the table's back are not seen until a recount:
    # that is why every change goes through RefTable's methods.
    t.rc[0:995] = bytes([SYSTEM]) * 995
    assert t.free_units() == 1000
    t.recount_free()
    assert t.free_units() == 5


_RAW = BLOCK  # the stored length of a raw block
_UNITS_SEEN = (0, 1, 7, PAGE_UNITS + 3)


def _table(starts: list[int]) -> RefTable:
    """A table whose units _UNITS_SEEN hold counts (or markers) ``starts``."""
    t = RefTable(2 * PAGE_UNITS + 1)
    for u, v in zip(_UNITS_SEEN, starts):
        if v in (RESERVED, PENDING):
            t.set_marker(u, v)
        for _ in range(v if v not in (RESERVED, PENDING) else 0):
            t.incref(u)
    t.dirty_pages.clear()
    t.pending.clear()
    return t


# Leaves of raw blocks (the usual leaf), and leaves with anything in them:
# compressed blocks packed anywhere in a unit or across two, empty or too
# long lengths, units beyond the table.
_usual_pointer = st.tuples(st.sampled_from(_UNITS_SEEN), st.just(_RAW), st.just(0))
_any_pointer = st.tuples(st.sampled_from(_UNITS_SEEN + (2 * PAGE_UNITS,)),
                         st.sampled_from([_RAW, _RAW, 2 * SECTOR, _RAW - SECTOR, 1, 0,
                                          _RAW + SECTOR]),
                         st.sampled_from([0, 0, 1, SECTORS_PER_BLOCK - 1]))


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.lists(_usual_pointer, max_size=40), st.lists(_any_pointer, max_size=40)),
       st.lists(st.sampled_from([0, 1, 2, MAX_DIRECT - 2, MAX_DIRECT - 1, MAX_DIRECT, RESERVED,
                                 PENDING]), min_size=4, max_size=4))
@example([(1, _RAW, 1)], [0, 1, 1, 0])                                  # spans units 1 and 2
@example([(1, _RAW, 0)], [0, MAX_DIRECT, 0, 0])                         # would overflow
@example([(7, _RAW, 0), (1, _RAW, 0), (1, _RAW, 0)], [0, MAX_DIRECT - 1, 3, 0])  # twice
@example([(2 * PAGE_UNITS, _RAW, 1)], [1, 1, 1, 1])                     # runs off the table
@example([(1, 0, 0)], [0, 1, 0, 0])                                     # empty
@example([(0, _RAW + SECTOR, 0)], [1, 1, 0, 0])                         # too long
def test_incref_blocks_is_take_in_turn_or_nothing(
        pointers: list[tuple[int, int, int]], starts: list[int]) -> None:
    """Proves: the C incref_blocks either takes exactly the references that
    RefTable.incref of each unit of each pointer in turn would (units_of:
    what Pool.take does), counts, overflow, free count and dirty pages alike,
    and answers True; or changes no count and answers False.  It answers True
    exactly when every length is 1 to BLOCK bytes, every unit is in the table
    and no count leaves 1..MAX_DIRECT (a unit met twice included), and marks
    no page outside the leaf's."""
    python, c = _table(starts), _table(starts)
    # Pointers: a unit's first sector plus an offset in sectors, a length.
    sectors = array("Q", [u * SECTORS_PER_BLOCK + off for u, _, off in pointers])
    slens = array("H", [n for _, n, _ in pointers])
    units = [u for a, n in zip(sectors, slens) for u in units_of(a, n)]
    expect = all(1 <= n <= BLOCK for n in slens) and all(u < len(python) for u in units)
    if expect:
        seen: dict[int, int] = {}
        for u in units:
            seen[u] = seen.get(u, python.rc[u]) + 1
            expect = expect and 1 < seen[u] <= MAX_DIRECT
    before = bytes(c.rc)
    answer = incref_blocks(c.rc, c.dirty_pages, sectors, slens)
    assert answer == expect
    if answer:
        for u in units:
            python.incref(u)
        assert (c.rc, c.overflow, c.free_units(), c.dirty_pages) == \
            (python.rc, python.overflow, python.free_units(), python.dirty_pages)
    else:
        assert bytes(c.rc) == before and c.free_units() == python.free_units()
        assert c.dirty_pages <= {u >> PAGE_SHIFT for u in units}


def test_incref_blocks_refuses_mismatched_or_wrong_arrays() -> None:
    """Proves: arrays of different lengths are left to Python (False, no
    change); arrays of the wrong item size and a pages argument that is not
    a set are refused with TypeError before anything changes."""
    t = RefTable(8)
    t.incref(3)
    before = bytes(t.rc)
    one = array("Q", [3 * SECTORS_PER_BLOCK])
    assert incref_blocks(t.rc, t.dirty_pages, one, array("H", [])) is False
    assert incref_blocks(t.rc, t.dirty_pages, one, array("H", [BLOCK, BLOCK])) is False
    for bad in ((t.rc, t.dirty_pages, array("I", [3]), array("H", [BLOCK])),
                (t.rc, t.dirty_pages, one, array("Q", [BLOCK])),
                (t.rc, list(t.dirty_pages), one, array("H", [BLOCK]))):
        with pytest.raises(TypeError):
            incref_blocks(*bad)
    assert bytes(t.rc) == before
    assert incref_blocks(t.rc, t.dirty_pages, one, array("H", [BLOCK])) is True
    assert t.count(3) == 2


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.lists(_usual_pointer, max_size=40), st.lists(_any_pointer, max_size=40)),
       st.lists(st.sampled_from([0, 1, 1, 2, 3, MAX_DIRECT - 1, MAX_DIRECT, MAX_DIRECT + 10,
                                 RESERVED, PENDING]), min_size=4, max_size=4),
       st.integers(0, 40), st.integers(0, 44))
@example([(1, _RAW, 1)], [0, 1, 1, 0], 0, 1)                              # spans units 1 and 2
@example([(1, _RAW, 0)], [0, MAX_DIRECT + 10, 0, 0], 0, 1)                # in overflow
@example([(7, _RAW, 0), (1, _RAW, 0), (1, _RAW, 0)], [0, 2, 3, 0], 0, 3)  # twice, to 0
@example([(7, _RAW, 0), (1, _RAW, 0), (1, _RAW, 0)], [0, 1, 3, 0], 0, 3)  # twice, past 0
@example([(2 * PAGE_UNITS, _RAW, 1)], [1, 1, 1, 1], 0, 1)                 # runs off the table
@example([(1, 0, 0)], [0, 1, 0, 0], 0, 1)                                 # empty
@example([(0, _RAW + SECTOR, 0)], [1, 1, 0, 0], 0, 1)                     # too long
@example([(0, _RAW, 0), (1, _RAW, 0)], [1, 1, 0, 0], 1, 42)               # end past the leaf
@example([(7, _RAW, 0), (0, _RAW, 0), (1, _RAW, 0)], [1, 1, 0, 1], 1, 2)  # two reach 0
def test_decref_blocks_is_drop_in_turn_or_nothing(
        pointers: list[tuple[int, int, int]], starts: list[int], start: int, end: int) -> None:
    """Proves: the C decref_blocks of pointers start..end-1 either drops
    exactly the references that RefTable.decref of each unit of each of them
    in turn would (units_of: what Pool.drop does) -- counts, PENDING units
    and the pending list in the same order, free count and dirty pages
    alike -- and answers True; or changes no count and no pending list and
    answers False.  True exactly when start <= end <= the leaf's length,
    every length is 1 to BLOCK bytes, every unit is in the table and every
    count is 1 to MAX_DIRECT when dropped (a unit met twice included); it
    marks no page outside the pointers'."""
    if end <= 40:
        # Mostly a range inside the leaf (end 41 and over: past it).
        start = start % (len(pointers) + 1)
        end = start + end % (len(pointers) + 1 - start)
    python, c = _table(starts), _table(starts)
    sectors = array("Q", [u * SECTORS_PER_BLOCK + off for u, _, off in pointers])
    slens = array("H", [n for _, n, _ in pointers])
    span = range(start, min(end, len(pointers)))
    units = [u for i in span for u in units_of(sectors[i], slens[i])]
    expect = (start <= end <= len(pointers) and all(1 <= slens[i] <= BLOCK for i in span)
              and all(u < len(python) for u in units))
    if expect:
        left: dict[int, int] = {}
        for u in units:
            left[u] = left.get(u, python.rc[u])
            expect = expect and 1 <= left[u] <= MAX_DIRECT
            left[u] -= 1
    before = (bytes(c.rc), dict(c.overflow))
    answer = decref_blocks(c.rc, c.dirty_pages, c.pending, sectors, slens, start, end)
    assert answer == expect
    if answer:
        for u in units:
            python.decref(u)
        assert (c.rc, c.overflow, c.pending, c.free_units(), c.dirty_pages) == \
            (python.rc, python.overflow, python.pending, python.free_units(), python.dirty_pages)
    else:
        assert (bytes(c.rc), dict(c.overflow)) == before and c.pending == []
        assert c.free_units() == python.free_units()
        assert c.dirty_pages <= {u >> PAGE_SHIFT for u in units}


def test_decref_blocks_refuses_wrong_arguments() -> None:
    """Proves: arrays of different lengths and start/end outside the leaf
    are left to Python (False, no change); arrays of the wrong item size, a
    pages argument that is not a set and a pending one that is not a list
    are refused with TypeError before anything changes."""
    t = RefTable(8)
    t.incref(3)
    t.incref(3)
    before = bytes(t.rc)
    one = array("Q", [3 * SECTORS_PER_BLOCK])
    raw = array("H", [BLOCK])
    for args in ((one, array("H", [])), (one, array("H", [BLOCK, BLOCK]))):
        assert decref_blocks(t.rc, t.dirty_pages, t.pending, *args, 0, 1) is False
    for start, end in ((-1, 1), (1, 0), (0, 2)):
        assert decref_blocks(t.rc, t.dirty_pages, t.pending, one, raw, start, end) is False
    for bad in ((t.rc, t.dirty_pages, t.pending, array("I", [3]), raw, 0, 1),
                (t.rc, t.dirty_pages, t.pending, one, array("Q", [BLOCK]), 0, 1),
                (t.rc, list(t.dirty_pages), t.pending, one, raw, 0, 1),
                (t.rc, t.dirty_pages, tuple(t.pending), one, raw, 0, 1),
                (t.rc, t.dirty_pages, t.pending, one, raw, 0)):
        with pytest.raises(TypeError):
            decref_blocks(*bad)
    assert bytes(t.rc) == before and t.pending == []
    assert decref_blocks(t.rc, t.dirty_pages, t.pending, one, raw, 0, 1) is True
    assert t.count(3) == 1 and t.pending == []
    assert decref_blocks(t.rc, t.dirty_pages, t.pending, one, raw, 0, 1) is True
    assert t.rc[3] == PENDING and t.pending == [3]
    assert decref_blocks(t.rc, t.dirty_pages, t.pending, one, raw, 0, 1) is False


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=3 * UNITS), st.data())
@example(bytes([PENDING, 1, PENDING, RESERVED]), None)
def test_release_pending_frees_the_listed_pending_units(table: bytes, data) -> None:
    """Proves: every listed unit whose byte is PENDING, and no other byte,
    becomes 0, a unit listed twice is counted once, and the answer is the
    number freed (what RefTable.release_pending adds to its free count)."""
    if data is None:
        units = [0, 2, 2, 1, 3]
    else:
        units = data.draw(st.lists(st.integers(0, len(table) - 1), max_size=2 * len(table)))
    rc = bytearray(table)
    listed = list(units)
    freed = release_pending(rc, listed)
    want = bytearray(table)
    for u in units:
        if want[u] == PENDING:
            want[u] = 0
    assert rc == want
    assert freed == sum(1 for u in set(units) if table[u] == PENDING)
    assert listed == units      # the list is the caller's to clear


def test_release_pending_refuses_bad_items_before_changing_anything() -> None:
    """Proves: an item that is not an int or not a unit of the table is
    refused (TypeError, IndexError) with no byte freed, even those listed
    before it; a table that is not a writable byte array and a pending
    argument that is not a list are refused too."""
    t = RefTable(8)
    for u in (1, 2):
        t.incref(u)
        t.decref(u)
    before = bytes(t.rc)
    for items, error in (([1, 8], IndexError), ([1, -1], IndexError), ([2, 1 << 70], IndexError),
                         ([1, "2"], TypeError), ([1, 2.0], TypeError)):
        with pytest.raises(error):
            release_pending(t.rc, items)
        assert bytes(t.rc) == before
    with pytest.raises(BufferError):
        release_pending(bytes(t.rc), [1])
    for args in ((array("H", [PENDING]), [0]), (t.rc, (1, 2)), (t.rc,)):
        with pytest.raises(TypeError):
            release_pending(*args)
    assert bytes(t.rc) == before
    free = t.free_units()
    t.release_pending()
    assert t.rc[1] == t.rc[2] == 0 and t.pending == [] and t.free_units() == free + 2
