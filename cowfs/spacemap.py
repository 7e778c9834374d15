"""Reference counts of pool units: who may be freed, what is free to allocate.

One byte per 4 KiB unit (of the ``data`` or ``meta`` file), so the table of a
pool with 1 TiB of data costs 256 MiB of memory: see README "Limits".  Counts
up to ``MAX_DIRECT`` live in the byte; larger ones in an overflow dict.

Besides counts, a byte can hold a state marker that reads as "not free, no
references":

``PENDING``
    The last reference went away, but a durable structure may still point at
    the unit (the last checkpoint, or a journal record not yet synced).  It
    becomes free only when :meth:`RefTable.release_pending` is called at the
    point where that stops being true.
``RESERVED``
    Allocated for a write that has not been applied to the tree yet.
``SYSTEM``
    Holds a reference-count page or a checkpoint blob: owned by the checkpoint,
    not by any tree.

Only counts are persisted: markers are written as 0 (see :meth:`page_image`).
"""

from __future__ import annotations

MAX_DIRECT = 250
OVERFLOW = 251
PENDING = 252
RESERVED = 253
SYSTEM = 254
_MARKERS = (PENDING, RESERVED, SYSTEM)
PAGE_SHIFT = 12            # 4096 units per persisted page
PAGE_UNITS = 1 << PAGE_SHIFT
_ZERO_PAGE = bytes(PAGE_UNITS)

_RESERVED_RUN = bytes((RESERVED,))

# Translation that reads RESERVED as free (0) and everything else as 1.
_RESERVED_AS_FREE = bytes(0 if i in (0, RESERVED) else 1 for i in range(256))

# Translation that persists markers as free and keeps counts.
_PERSIST = bytes(0 if i in _MARKERS else i for i in range(256))


class RefTable:
    """Reference counts of one pool file's units, with allocation search."""

    def __init__(self, units: int = 0) -> None:
        self.rc = bytearray(units)
        self.overflow: dict[int, int] = {}
        self.dirty_pages: set[int] = set()
        self.pending: list[int] = []
        self._cursor = 0
        # The number of free units, kept by every method that frees or takes
        # one, so that neither the per-write metadata-reserve check nor df
        # counts the table (0.4 ms per million units).
        self._free = units

    def __len__(self) -> int:
        return len(self.rc)

    # -- counts -------------------------------------------------------------

    def count(self, unit: int) -> int:
        """References held on ``unit`` (markers count as 0)."""
        v = self.rc[unit]
        if v <= MAX_DIRECT:
            return v
        if v == OVERFLOW:
            return self.overflow[unit]
        return 0

    def incref(self, unit: int) -> None:
        """Take one more reference on ``unit`` (a free or reserved unit gets 1)."""
        rc = self.rc
        v = rc[unit]
        if v < MAX_DIRECT:
            rc[unit] = v + 1
            if not v:
                self._free -= 1
        elif v == RESERVED:
            rc[unit] = 1
        elif v == MAX_DIRECT:
            rc[unit] = OVERFLOW
            self.overflow[unit] = MAX_DIRECT + 1
        elif v == OVERFLOW:
            self.overflow[unit] += 1
        else:
            raise AssertionError(f"incref of unit {unit} in state {v}")
        self.dirty_pages.add(unit >> PAGE_SHIFT)

    def take_run(self, start: int, n: int) -> bool:
        """Give each of the ``n`` units from ``start`` its first reference
        if every one of them is free or reserved (True); else change nothing
        (False) and let the caller take them one by one."""
        rc = self.rc
        run = rc[start:start + n]
        free = run.count(0)
        if free != n and run.translate(_RESERVED_AS_FREE).count(0) != n:
            return False
        self._free -= free
        rc[start:start + n] = b"\x01" * n
        self.dirty_pages.update(range(start >> PAGE_SHIFT, ((start + n - 1) >> PAGE_SHIFT) + 1))
        return True

    def decref(self, unit: int) -> int:
        """Drop one reference; at zero the unit becomes PENDING.  Returns the new count."""
        rc = self.rc
        v = rc[unit]
        if v == OVERFLOW:
            n = self.overflow[unit] - 1
            if n <= MAX_DIRECT:
                del self.overflow[unit]
                rc[unit] = n
            else:
                self.overflow[unit] = n
        elif 1 <= v <= MAX_DIRECT:
            n = v - 1
            if n == 0:
                rc[unit] = PENDING
                self.pending.append(unit)
            else:
                rc[unit] = n
        else:
            raise AssertionError(f"decref of unit {unit} in state {v}")
        self.dirty_pages.add(unit >> PAGE_SHIFT)
        return n

    def set_marker(self, unit: int, marker: int) -> None:
        """Put a marker on a free unit (or move between markers); not persisted."""
        if not self.rc[unit]:
            self._free -= 1
        self.rc[unit] = marker

    def reserve_run(self, start: int, n: int) -> None:
        """Mark ``n`` free units from ``start`` RESERVED (see :meth:`find_free`)."""
        self._free -= n
        if n == 1:
            self.rc[start] = RESERVED   # a 4 KiB write: no slice, no new bytes
        else:
            self.rc[start:start + n] = _RESERVED_RUN * n

    def free_marked(self, unit: int) -> None:
        """Return a marked (reserved/system) unit to free space at once."""
        if self.rc[unit]:
            self._free += 1
        self.rc[unit] = 0

    def release_pending(self) -> None:
        """Make every PENDING unit free: call once nothing durable refers to them."""
        # Imported here: cowfs._oneblock reads this module's constants as it
        # loads.  The loop is in C: in Python it took 36 ns a unit in order
        # and 162-229 ns at random places, and every overwrite frees units
        # (2-3.5% of the request thread's samples).
        from ._oneblock import release_pending
        self._free += release_pending(self.rc, self.pending)
        self.pending.clear()

    # -- allocation -----------------------------------------------------------

    def find_free(self, n: int) -> int:
        """Start of ``n`` consecutive free units, next-fit from the last
        allocation, or -1.  Does not mark them."""
        rc = self.rc
        pattern = 0 if n == 1 else b"\x00" * n
        i = rc.find(pattern, self._cursor)
        if i < 0 and self._cursor:
            i = rc.find(pattern, 0)
        if i >= 0:
            self._cursor = i + n
        return i

    def free_units(self) -> int:
        """How many units are free now (kept, not counted)."""
        return self._free

    def recount_free(self) -> None:
        """Count the free units again: call after changing ``rc`` directly."""
        self._free = self.rc.count(0)

    def grow(self, units: int) -> None:
        """Track ``units`` units in all (new ones free)."""
        if units > len(self.rc):
            self._free += units - len(self.rc)
            self.rc.extend(bytes(units - len(self.rc)))

    # -- persistence ----------------------------------------------------------

    def pages(self) -> int:
        """Number of persisted pages covering the table."""
        return (len(self.rc) + PAGE_UNITS - 1) >> PAGE_SHIFT

    def page_image(self, page: int) -> bytes:
        """Persisted bytes of page ``page`` (markers as 0), padded to a full page."""
        chunk = bytes(self.rc[page << PAGE_SHIFT:(page + 1) << PAGE_SHIFT]).translate(_PERSIST)
        return chunk + bytes(PAGE_UNITS - len(chunk))

    @staticmethod
    def is_zero_page(image: bytes) -> bool:
        """Whether a page image holds no references (it needs no storage)."""
        return image == _ZERO_PAGE

    def load_page(self, page: int, image: bytes) -> None:
        """Install a persisted page image read at mount."""
        start = page << PAGE_SHIFT
        end = min(len(self.rc), start + PAGE_UNITS)
        self._free += image[: end - start].count(0) - self.rc[start:end].count(0)
        self.rc[start:end] = image[: end - start]

    def overflow_items(self) -> list[list[int]]:
        """Overflow counts to persist, as ``[unit, count]`` pairs."""
        return [[u, c] for u, c in sorted(self.overflow.items())]
