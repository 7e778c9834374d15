"""RefTable's kept count of free units against a plain count.

``free_units`` answers from a count that every method changing the table
keeps up to date, instead of counting the table on every write and every
``df``; the pool relies on it for its metadata reserve and ``statfs``.  A
random sequence of every operation that changes the table checks that the
answer always equals a full count.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cowfs.spacemap import MAX_DIRECT, PAGE_UNITS, PENDING, RESERVED, SYSTEM, RefTable

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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2, 7, PAGE_UNITS + 3, 2 * PAGE_UNITS]), max_size=60),
       st.lists(st.sampled_from([0, 1, MAX_DIRECT - 1, MAX_DIRECT, RESERVED]), min_size=4,
                max_size=4))
def test_incref_many_is_incref_in_turn(units: list[int], starts: list[int]) -> None:
    """Proves: incref_many leaves counts, overflow, free count and dirty
    pages exactly as incref of each unit in turn, from every kind of start
    (free, reserved, small, about to overflow, overflowing)."""
    tables = []
    for _ in range(2):
        t = RefTable(2 * PAGE_UNITS + 1)
        for u, v in zip((0, 1, 7, PAGE_UNITS + 3), starts):
            if v == RESERVED:
                t.set_marker(u, RESERVED)
            for _ in range(v if v != RESERVED else 0):
                t.incref(u)
        t.dirty_pages.clear()
        tables.append(t)
    one, many = tables
    for u in units:
        one.incref(u)
    many.incref_many(units)
    assert (many.rc, many.overflow, many.free_units(), many.dirty_pages) == \
        (one.rc, one.overflow, one.free_units(), one.dirty_pages)
