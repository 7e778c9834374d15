"""A one-line progress bar for long copies (``cowfs export`` / ``import``).

It draws only when its stream is a terminal, so scripts and logs never see
carriage-return noise; elsewhere every method is a cheap no-op.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from cowfs_tools.display import human_bytes

_REDRAW_EVERY = 0.2   # seconds; redrawing on every chunk would cost more than the copy
_BAR_WIDTH = 30


class Progress:
    """Shows ``label [#####.....]  42%  1.2 GiB / 2.9 GiB  310 MiB/s  ETA 0:05``
    on ``stream`` (stderr by default) while :meth:`advance` is called, and
    clears the line on :meth:`close`.  Draws nothing unless ``stream`` is a
    terminal and ``enabled`` is true.  Usable as a context manager."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.active = enabled and self.stream.isatty()
        self._start = time.monotonic()
        self._last_draw = 0.0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more as done and redraw if it is time to."""
        self.done += nbytes
        if not self.active:
            return
        now = time.monotonic()
        if now - self._last_draw >= _REDRAW_EVERY or self.done >= self.total:
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        fraction = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = int(fraction * _BAR_WIDTH)
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        if rate > 0 and self.done < self.total:
            left = int((self.total - self.done) / rate)
            eta = f"ETA {left // 60}:{left % 60:02d}"
        else:
            eta = ""
        line = (f"{self.label} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] "
                f"{fraction * 100:3.0f}%  {human_bytes(self.done)} / {human_bytes(self.total)}  "
                f"{human_bytes(int(rate))}/s  {eta}")
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        """Erase the bar (the caller prints the outcome on its own line)."""
        if self.active:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.active = False
