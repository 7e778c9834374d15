"""Formatting for the ``cowfs`` command's human output: sizes, times, tables."""

from __future__ import annotations

import time
from collections.abc import Sequence

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: int) -> str:
    """``n`` bytes in binary units with three significant figures at most:
    ``0 B``, ``512 B``, ``4.00 KiB``, ``20.0 GiB``, ``1.23 TiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    unit = 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if value >= 100:
        return f"{value:.0f} {_UNITS[unit]}"
    if value >= 10:
        return f"{value:.1f} {_UNITS[unit]}"
    return f"{value:.2f} {_UNITS[unit]}"


def local_time(ns: int) -> str:
    """A time in nanoseconds since the epoch as local ``YYYY-MM-DD HH:MM:SS``
    (what an operator compares with the clock on the wall)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def iso_utc(ns: int) -> str:
    """A time in nanoseconds since the epoch as ISO-8601 UTC, seconds precision."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                 right: Sequence[int] = ()) -> str:
    """``rows`` under ``header`` as aligned columns separated by two spaces;
    the columns whose indexes are in ``right`` (sizes, counts) are
    right-aligned.  Trailing blanks are stripped from every line."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in (header, *rows):
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                 for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
