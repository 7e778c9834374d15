"""The metadata journal: logical records since the last checkpoint.

Records are buffered in memory and written as a *group* on :meth:`Journal.commit`
(fsync of a volume, the commit interval, or a full buffer).  A group starts on
a 4 KiB boundary and ends with a PAD record that reaches the next boundary, so
no later write ever touches a page of an acknowledged group.

Each record: header ``<I Q Q H H I Q>`` = magic, checkpoint generation,
sequence number, type, flags, payload length, xxh3 of header and payload;
then the payload.  Replay starts at offset 0 and takes records while the
magic, generation, consecutive sequence number and checksum all hold: a torn
or stale tail simply ends the journal.  After every checkpoint the generation
changes, so records of older generations are never replayed.
"""

from __future__ import annotations

import errno
import logging
import struct
from typing import TYPE_CHECKING, Iterator

from .errors import PoolError
from .format import BLOCK, checksum

if TYPE_CHECKING:       # blockio imports _oneblock, which imports this module
    from .blockio import PoolFile

log = logging.getLogger(__name__)

_HDR = struct.Struct("<IQQHHIQ")
HDR_SIZE = _HDR.size
MAGIC = 0x4C4E524A  # "JRNL"

R_PAD = 0
R_CREATE = 1     # vol_id, size, mode, uid, gid, time_ns, name
R_DELETE = 2     # vol_id
R_RENAME = 3     # vol_id, replaced vol_id (0: none), new name
R_ATTR = 4       # vol_id, mode, uid, gid, atime, mtime, ctime
R_TRUNCATE = 5   # vol_id, size, has_tail, tail block pointer (sector, csum, slen)
R_SNAPOP = 7     # JSON: snapshot, delete, rename, restore or clone (cowfs.snapshots)
R_WRITE = 6      # vol_id, first block, count, size after, then sector/csum/slen arrays (slen 0: hole)

CREATE = struct.Struct("<QQIIIQ")
ONE_ID = struct.Struct("<Q")
RENAME = struct.Struct("<QQ")
ATTR = struct.Struct("<QIIIQQQ")
TRUNCATE = struct.Struct("<QQBQQH")
WRITE = struct.Struct("<QQI")
# An R_WRITE record of one block: WRITE, size after, then one sector, csum, slen.
WRITE_ONE = struct.Struct("<QQIQQQH")


class Journal:
    """Writer for one pool's journal file of fixed, preallocated size."""

    def __init__(self, file: PoolFile, size: int, gen: int, label: str) -> None:
        self.file = file
        self.size = size
        self.gen = gen
        self.label = label
        self.seq = 0
        self.pos = 0                  # where the next group starts
        self.buf = bytearray()
        # End of what failed commits may have left past ``pos``: records that
        # must not replay once the ones they hold were given up (rewind).
        self.torn_end = 0

    def fits(self, payload_len: int) -> bool:
        """Whether one more record of this size, plus a PAD, still fits."""
        need = self.pos + len(self.buf) + 2 * HDR_SIZE + payload_len + BLOCK
        return need <= self.size

    def used(self) -> int:
        """Bytes of the journal taken, committed or buffered."""
        return self.pos + len(self.buf)

    def append(self, rtype: int, payload: bytes) -> None:
        """Buffer one record (durable only after :meth:`commit`)."""
        hdr = _HDR.pack(MAGIC, self.gen, self.seq, rtype, 0, len(payload), 0)
        csum = checksum(hdr + payload)
        self.buf += _HDR.pack(MAGIC, self.gen, self.seq, rtype, 0, len(payload), csum)
        self.buf += payload
        self.seq += 1

    def mark(self) -> tuple[int, int, int, int]:
        """Where the buffer ends now, for :meth:`rewind`."""
        return (self.gen, self.pos, len(self.buf), self.seq)

    def rewind(self, mark: tuple[int, int, int, int]) -> None:
        """Drop the records buffered since ``mark`` (nothing if they were
        committed or the journal started over since)."""
        gen, pos, length, seq = mark
        if (gen, pos) == (self.gen, self.pos) and length <= len(self.buf):
            del self.buf[length:]
            self.seq = seq

    def commit(self) -> bool:
        """Write the buffered group and make it durable.  Returns False when
        there was nothing to write.  On an I/O error the buffer is kept (the
        records stay pending) and the error propagates."""
        if not self.buf:
            return False
        end = self.pos + len(self.buf)
        pad = (-(end + HDR_SIZE)) % BLOCK
        seq_before = self.seq
        self.append(R_PAD, bytes(pad))
        try:
            if self.pos + len(self.buf) > self.size:
                raise PoolError(errno.ENOSPC, f"pool {self.label}: journal full")
            self.file.pwrite(self.buf, self.pos)
            self.file.sync()
        except BaseException:
            self.torn_end = max(self.torn_end, min(self.pos + len(self.buf), self.size))
            # Forget the PAD so a retry appends to the same group.
            del self.buf[len(self.buf) - HDR_SIZE - pad:]
            self.seq = seq_before
            raise
        self.pos += len(self.buf)
        self.buf.clear()
        return True

    def clear_torn_tail(self) -> None:
        """Zero (durably) what failed commits left past the committed end, so
        that records given up since can never replay."""
        if self.torn_end > self.pos:
            self.file.pwrite(bytes(self.torn_end - self.pos), self.pos)
            self.file.sync()
        self.torn_end = 0

    def reset(self, gen: int) -> None:
        """Start an empty journal for checkpoint generation ``gen``."""
        self.gen = gen
        self.seq = 0
        self.pos = 0
        self.buf.clear()
        self.torn_end = 0


def replay(file: PoolFile, size: int, gen: int) -> Iterator[tuple[int, bytes]]:
    """Yield ``(type, payload)`` of every valid record of generation ``gen``."""
    raw = file.pread(size, 0)
    pos = 0
    seq = 0
    while pos + HDR_SIZE <= size:
        magic, rgen, rseq, rtype, flags, length, csum = _HDR.unpack_from(raw, pos)
        if magic != MAGIC or rgen != gen or rseq != seq or pos + HDR_SIZE + length > size:
            break
        body = raw[pos + HDR_SIZE:pos + HDR_SIZE + length]
        hdr = _HDR.pack(magic, rgen, rseq, rtype, flags, length, 0)
        if checksum(hdr + body) != csum:
            log.info("journal ends at offset %d: checksum mismatch (torn write)", pos)
            break
        if rtype != R_PAD:
            yield rtype, body
        pos += HDR_SIZE + length
        seq += 1
