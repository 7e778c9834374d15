"""On-disk format of a cowfs pool: constants, superblock, tree nodes, checkpoint blob.

A pool directory holds four files (plus ``lock``):

``superblock``
    Two 4 KiB slots.  A checkpoint commit writes the slot ``gen % 2``; mount
    uses the valid slot with the highest generation.  A slot names the
    checkpoint blob (location, length, checksum) and the journal size.
``meta``
    4 KiB units: extent-tree nodes, reference-count pages and checkpoint blobs.
    Never overwritten while the last committed checkpoint refers to them.
``data``
    Volume data in 4 KiB units; block pointers address it in 512-byte sectors
    so that compressed blocks of one write can share units.
``journal``
    A preallocated log of logical records since the last checkpoint.

Every structure carries an xxh3-64 checksum and is refused when it does not
match.  Integers are little-endian.
"""

from __future__ import annotations

import json
import struct
import uuid as _uuid
from array import array
from dataclasses import dataclass

import xxhash

from .errors import FormatError

FORMAT_VERSION = 1
BLOCK = 4096                # volume block and pool unit size
SECTOR = 512                # block pointers address data in sectors
SECTORS_PER_BLOCK = BLOCK // SECTOR
NULL = 0                    # meta unit 0 is never a node: 0 means "no node"

SUPERBLOCK_FILE = "superblock"
META_FILE = "meta"
DATA_FILE = "data"
JOURNAL_FILE = "journal"
POOL_FILES = (SUPERBLOCK_FILE, META_FILE, DATA_FILE, JOURNAL_FILE)

FLAG_COMPRESSION = 1


def unpack_array(typecode: str, raw: bytes | memoryview) -> array:
    """An array of machine integers read from their little-endian bytes."""
    a = array(typecode)
    a.frombytes(raw)
    return a


def units_of(sector: int, slen: int) -> range:
    """Data units touched by a block stored at ``sector`` with ``slen`` bytes."""
    start = sector * SECTOR
    return range(start // BLOCK, (start + slen - 1) // BLOCK + 1)


def checksum(data: bytes | memoryview) -> int:
    """The checksum used everywhere in the format (xxh3, 64 bits)."""
    return xxhash.xxh3_64_intdigest(data)


# ----------------------------------------------------------------------------
# Superblock

_SB = struct.Struct("<8sII16sQQIQQQI")
SB_MAGIC = b"COWFSSB\x00"


@dataclass
class Superblock:
    """One superblock slot: which checkpoint is current and pool-wide settings."""

    version: int
    flags: int
    uuid: bytes
    gen: int
    blob_addr: int       # meta unit of the checkpoint blob
    blob_len: int        # bytes
    blob_csum: int
    journal_size: int    # bytes
    created_ns: int
    block_size: int = BLOCK

    def encode(self) -> bytes:
        body = _SB.pack(SB_MAGIC, self.version, self.flags, self.uuid, self.gen,
                        self.blob_addr, self.blob_len, self.blob_csum, self.journal_size,
                        self.created_ns, self.block_size)
        body += bytes(BLOCK - 8 - len(body))
        return body + struct.pack("<Q", checksum(body))

    @classmethod
    def decode(cls, raw: bytes, where: str) -> "Superblock | None":
        """Return the slot, ``None`` if it is blank or damaged, or raise
        FormatError if it is intact but of a format this code does not know."""
        if len(raw) < BLOCK or raw[:8] != SB_MAGIC:
            return None
        (stored,) = struct.unpack_from("<Q", raw, BLOCK - 8)
        if checksum(raw[: BLOCK - 8]) != stored:
            return None
        f = _SB.unpack_from(raw)
        if f[1] != FORMAT_VERSION:
            raise FormatError(
                f"{where}: pool format version {f[1]} is not supported by this cowfs "
                f"(it reads version {FORMAT_VERSION})")
        sb = cls(version=f[1], flags=f[2], uuid=f[3], gen=f[4], blob_addr=f[5],
                 blob_len=f[6], blob_csum=f[7], journal_size=f[8], created_ns=f[9],
                 block_size=f[10])
        if sb.block_size != BLOCK:
            raise FormatError(f"{where}: unsupported block size {sb.block_size}")
        return sb


def new_uuid() -> bytes:
    """A fresh random pool identifier."""
    return _uuid.uuid4().bytes


# ----------------------------------------------------------------------------
# Tree nodes
#
# A node is one meta unit: a 32-byte header, then fixed-position arrays.
#   leaf:     keys (Q, volume block number), addr (Q, data sector),
#             csum (Q, xxh3 of the stored bytes), slen (H, stored length;
#             BLOCK = stored raw, less = lz4-compressed)
#   internal: keys (Q, lowest key of each child), child (Q, meta unit)

_NODE_HDR = struct.Struct("<IBBHQQQ")   # magic, kind, pad, count, addr, gen, csum
NODE_MAGIC = 0x314E5743                  # "CWN1"
KIND_LEAF = 0
KIND_INTERNAL = 1
LEAF_CAP = (BLOCK - _NODE_HDR.size) // 26
INTERNAL_CAP = (BLOCK - _NODE_HDR.size) // 16
_L_KEYS = _NODE_HDR.size
_L_ADDR = _L_KEYS + 8 * LEAF_CAP
_L_CSUM = _L_ADDR + 8 * LEAF_CAP
_L_SLEN = _L_CSUM + 8 * LEAF_CAP
_I_KEYS = _NODE_HDR.size
_I_CHILD = _I_KEYS + 8 * INTERNAL_CAP


class Node:
    """A decoded tree node.  ``addr`` is its meta unit.

    A leaf holds parallel arrays ``keys``/``addr``/``csum``/``slen``; an
    internal node holds ``keys``/``child``.  Only the tree module mutates them.
    """

    __slots__ = ("addr", "leaf", "keys", "addrs", "csums", "slens", "children")

    def __init__(self, addr: int, leaf: bool) -> None:
        self.addr = addr
        self.leaf = leaf
        self.keys = array("Q")
        if leaf:
            self.addrs = array("Q")
            self.csums = array("Q")
            self.slens = array("H")
            self.children = None
        else:
            self.addrs = self.csums = self.slens = None
            self.children = array("Q")

    def copy(self, addr: int) -> "Node":
        """A copy of this node placed at meta unit ``addr``."""
        n = Node(addr, self.leaf)
        n.keys = array("Q", self.keys)
        if self.leaf:
            n.addrs = array("Q", self.addrs)
            n.csums = array("Q", self.csums)
            n.slens = array("H", self.slens)
        else:
            n.children = array("Q", self.children)
        return n

    def encode(self, gen: int) -> bytes:
        """Serialise to one checksummed unit."""
        buf = bytearray(BLOCK)
        count = len(self.keys)
        if self.leaf:
            buf[_L_KEYS:_L_KEYS + 8 * count] = self.keys.tobytes()
            buf[_L_ADDR:_L_ADDR + 8 * count] = self.addrs.tobytes()
            buf[_L_CSUM:_L_CSUM + 8 * count] = self.csums.tobytes()
            buf[_L_SLEN:_L_SLEN + 2 * count] = self.slens.tobytes()
        else:
            buf[_I_KEYS:_I_KEYS + 8 * count] = self.keys.tobytes()
            buf[_I_CHILD:_I_CHILD + 8 * count] = self.children.tobytes()
        kind = KIND_LEAF if self.leaf else KIND_INTERNAL
        _NODE_HDR.pack_into(buf, 0, NODE_MAGIC, kind, 0, count, self.addr, gen, 0)
        _NODE_HDR.pack_into(buf, 0, NODE_MAGIC, kind, 0, count, self.addr, gen, checksum(buf))
        return bytes(buf)

    @classmethod
    def decode(cls, raw: bytes, addr: int) -> "Node":
        """Parse a unit read from meta unit ``addr``; ValueError if damaged."""
        magic, kind, _, count, stored_addr, gen, csum = _NODE_HDR.unpack_from(raw)
        if magic != NODE_MAGIC:
            raise ValueError(f"meta unit {addr} is not a tree node")
        check = bytearray(raw)
        _NODE_HDR.pack_into(check, 0, magic, kind, 0, count, stored_addr, gen, 0)
        if checksum(check) != csum:
            raise ValueError(f"tree node at meta unit {addr} fails its checksum")
        if stored_addr != addr:
            raise ValueError(f"tree node at meta unit {addr} claims to live at {stored_addr}")
        leaf = kind == KIND_LEAF
        n = cls(addr, leaf)
        mv = memoryview(raw)
        if leaf:
            if count > LEAF_CAP:
                raise ValueError(f"leaf at meta unit {addr} has bad count {count}")
            n.keys = unpack_array("Q", mv[_L_KEYS:_L_KEYS + 8 * count])
            n.addrs = unpack_array("Q", mv[_L_ADDR:_L_ADDR + 8 * count])
            n.csums = unpack_array("Q", mv[_L_CSUM:_L_CSUM + 8 * count])
            n.slens = unpack_array("H", mv[_L_SLEN:_L_SLEN + 2 * count])
        else:
            if count > INTERNAL_CAP or kind != KIND_INTERNAL:
                raise ValueError(f"node at meta unit {addr} has bad kind/count")
            n.keys = unpack_array("Q", mv[_I_KEYS:_I_KEYS + 8 * count])
            n.children = unpack_array("Q", mv[_I_CHILD:_I_CHILD + 8 * count])
        return n


# ----------------------------------------------------------------------------
# Checkpoint blob: the volume table and where the reference-count pages live.
#
#   header  <8s I I Q Q>: magic, version, json length, data page count, meta page count
#   JSON    volumes, counters, overflow reference counts
#   arrays  data page units (Q), data page checksums (Q), meta page units, meta page checksums

_BLOB_HDR = struct.Struct("<8sIIQQ")
BLOB_MAGIC = b"COWFSCP\x00"
RC_PAGE = BLOCK             # one reference-count byte per unit, 4096 units a page


@dataclass
class Blob:
    """Decoded checkpoint blob."""

    state: dict
    data_pages: array
    data_page_csums: array
    meta_pages: array
    meta_page_csums: array

    def encode(self) -> bytes:
        js = json.dumps(self.state, separators=(",", ":")).encode()
        return b"".join([
            _BLOB_HDR.pack(BLOB_MAGIC, FORMAT_VERSION, len(js), len(self.data_pages),
                           len(self.meta_pages)),
            js, self.data_pages.tobytes(), self.data_page_csums.tobytes(),
            self.meta_pages.tobytes(), self.meta_page_csums.tobytes()])

    @classmethod
    def decode(cls, raw: bytes) -> "Blob":
        """Parse a blob whose checksum was already verified; ValueError if malformed."""
        magic, version, jlen, nd, nm = _BLOB_HDR.unpack_from(raw)
        if magic != BLOB_MAGIC or version != FORMAT_VERSION:
            raise ValueError("checkpoint blob has a bad header")
        pos = _BLOB_HDR.size
        state = json.loads(raw[pos:pos + jlen])
        pos += jlen
        arrays = []
        for n in (nd, nd, nm, nm):
            arrays.append(unpack_array("Q", raw[pos:pos + 8 * n]))
            pos += 8 * n
        if pos != len(raw):
            raise ValueError("checkpoint blob has a bad length")
        return cls(state, *arrays)
