"""The pool: block volumes over copy-on-write extent trees, with a journal.

Life of a write (see README "On-disk format"):

1. The new blocks go to *fresh* data units (never over a unit any tree or any
   durable structure may still reference), checksummed, lz4-compressed when
   that saves space.
2. The volume's tree is updated in memory (copy-on-write, reference counted)
   and a logical record is buffered in the journal.
3. :meth:`Pool.sync` (fsync) makes the data durable, then commits the journal
   group: from then on the write survives any crash.
4. Every so often a checkpoint writes the dirty tree nodes and reference-count
   pages to fresh meta units and switches the superblock to them; the journal
   then starts over.  Mount = newest checkpoint + replay of its journal.

Units freed in memory are not reused until nothing durable refers to them: data
units after the journal commit that records the free, meta units after the
next checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn
import lz4.block

from .blockio import PoolFile, Storage
from .btree import KEY_END, Entries, NodeStore, Tree
from .dataset import Dataset, SnapshotInfo, VolumeInfo, validate_name
from .errors import ChecksumError, FormatError, PoolError
from .format import (BLOCK, DATA_FILE, FLAG_COMPRESSION, JOURNAL_FILE, META_FILE, POOL_FILES,
                     SECTOR, SECTORS_PER_BLOCK, SUPERBLOCK_FILE, Blob, Node, Superblock, checksum,
                     new_uuid, units_of, unpack_array, FORMAT_VERSION)
from .integrity import recount
from .journal import (ATTR, CREATE, ONE_ID, R_ATTR, R_CREATE, R_DELETE, R_RENAME, R_TRUNCATE,
                      R_SNAPOP, R_WRITE, RENAME, TRUNCATE, WRITE, WRITE_ONE, Journal,
                      replay)
from .snapshots import SnapshotOps
from .spacemap import SYSTEM, RefTable
from ._oneblock import (OWN_PATH_FIRST, block_checksums, decref_blocks, first_bad,
                        incref_blocks, raw_run, read_block, write_block)

log = logging.getLogger(__name__)

__all__ = ["Pool", "VolumeInfo", "SnapshotInfo", "PoolStats", "BLOCK", "MAX_VOLUME_SIZE",
           "validate_name"]

MAX_VOLUME_SIZE = 1 << 50            # 1 PiB
JOURNAL_SIZE = 16 << 20
COMMIT_INTERVAL = 5.0                # seconds unsynced records may wait (like ext4's commit=5)
CHECKPOINT_INTERVAL = 30.0
TICK_WARN_INTERVAL = 60.0            # seconds between warnings of a failing background commit
DIRTY_NODE_LIMIT = 12288             # ~50 MiB of dirty tree nodes before a checkpoint
JOURNAL_BUFFER_LIMIT = 4 << 20
META_RESERVE_UNITS = 1024            # free meta units kept so commits never need new space
HOST_HEADROOM = 32 << 20             # data never takes the last bytes of the host file system
WRITEBACK_BYTES = 16 << 20           # data written between two writeback hints
INCOMPRESSIBLE_GIVE_UP = 2           # blocks of one write lz4 may fail on before it stops trying
INCOMPRESSIBLE_STREAK = 8            # writes of a volume lz4 gave up on in a row, after which...
LZ4_PROBE_EVERY = 16                 # ...it is tried on one of this many writes only
MIN_GROW_UNITS = 1024                # grow pool files by at least 4 MiB
ZERO_BLOCK = bytes(BLOCK)
ZERO_CSUM = checksum(ZERO_BLOCK)


def _is_zero(blk: memoryview) -> bool:
    """Whether a one-block buffer holds only zeros (stored as a hole)."""
    # memoryview == bytes compares item by item; bytes() then memcmp is ~10x
    # faster on a zero block, and the first byte rules out most.
    return blk[0] == 0 and bytes(blk) == ZERO_BLOCK


@dataclass
class PoolStats:
    """Capacity figures for statfs, in bytes."""

    total: int
    free: int
    used: int          # bytes of data units in use
    volumes: int


class Pool(SnapshotOps):
    """An open pool.  Single-threaded: call every method from one thread.

    Every method that refuses raises :class:`PoolError` before changing
    anything.  If an internal step fails after the point of no return (a tree
    node that cannot be read in the middle of an update, a checkpoint that
    cannot be written), the operation fails and the next request first reloads
    the pool's durable state, as a remount would, after committing what was
    already acknowledged; until that reload succeeds every request gets EIO.
    Only a failed data sync is worse: the kernel may have dropped the pages it
    could not write, so the unsynced changes are given up and the pool serves
    its durable state read-only (EROFS, and EIO to every fsync) until it is
    mounted again.
    """

    # -- creation and mounting --------------------------------------------------

    def __init__(self, storage: Storage, sb: Superblock) -> None:
        self.storage = storage
        self.label = storage.label
        self.sb = sb
        self.compress = bool(sb.flags & FLAG_COMPRESSION)
        self.meta = storage.open(META_FILE)
        self.data = storage.open(DATA_FILE)
        self.jfile = storage.open(JOURNAL_FILE)
        # Open for the pool's life, not per checkpoint: a file whose 4 KiB
        # write went out through native AIO (OsFile gathers lone pages) ends
        # its AIO context at close, and io_destroy took 29-47 ms on the
        # development VM; closing this file was 25-53 ms of every 38-71 ms
        # checkpoint, with the request loop stopped.
        self.sbf = storage.open(SUPERBLOCK_FILE)
        self.journal = Journal(self.jfile, sb.journal_size, sb.gen, self.label)
        self.drc = RefTable()
        self.mrc = RefTable()
        self.store = NodeStore(self._read_meta_unit, self.mrc, self._grow_meta, self.label)
        self.tree = Tree(self.store, self)
        self.datasets: dict[int, Dataset] = {}          # volumes and snapshots
        # Volumes whose mtime/ctime changed since they were last journaled:
        # kept apart so that a sync need not visit every snapshot.
        self.times_dirty: dict[int, Dataset] = {}
        self.by_name: dict[str, Dataset] = {}           # volumes
        self.snaps: dict[tuple[str, str], Dataset] = {}  # (owner, name) -> snapshot
        self.next_id = 1
        self.dpages = array("Q")
        self.dpage_csums = array("Q")
        self.mpages = array("Q")
        self.mpage_csums = array("Q")
        self.blob_units: list[int] = []
        self.stale: str | None = None      # memory may be half changed: reload first
        self.degraded: str | None = None   # unsynced changes were lost: read-only
        self.reloads = 0                   # times memory was reloaded from disk
        # Called after a reload with one more than the highest dataset id
        # memory held before it (the FUSE layer drops what the kernel cached).
        self.on_reload: Callable[[int], None] | None = None
        self.readonly = False
        self.checksum_errors = 0     # checksum mismatches seen since mount
        self.io_errors = 0           # I/O errors from the pool's files since mount
        self.uncached_reads = 0      # reads told not to wait that found data on disk only
        # Seconds a data read that waits for the disk polls for its data
        # before it sleeps (OsFile.pread); 0 sleeps at once.  Set by the
        # daemon, which knows whether a CPU is free for it.
        self.read_poll = 0.0
        self.closed = False
        self._locked = False
        self._replaying = False
        self._data_dirty = False
        self._unflushed = 0              # data bytes written since the last writeback hint
        self._first_unsynced = 0.0
        self._last_checkpoint = time.monotonic()
        self._tick_failures = 0          # background commits failed in a row (tick)
        self._tick_warned = 0.0          # when the last of them was logged

    @classmethod
    def mkfs(cls, storage: Storage, *, compression: bool = True, force: bool = False,
             journal_size: int = JOURNAL_SIZE) -> None:
        """Create an empty pool in ``storage``.

        Refuses (EEXIST) a directory that already holds a pool or any other
        file, unless ``force``; with ``force`` the pool files are reset.
        """
        names = [n for n in storage.names() if n != "lock"]
        if not force:
            if SUPERBLOCK_FILE in names:
                raise PoolError(errno.EEXIST, f"{storage.label} already holds a cowfs pool; "
                                "use --force to overwrite it (this destroys its volumes)")
            if names:
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                raise PoolError(errno.EEXIST, f"{storage.label} is not empty (holds {shown}); "
                                "choose an empty directory or use --force")
        storage.lock()
        try:
            for name in POOL_FILES:
                storage.open(name, create=True).close()
            storage.sync_dir()
            jf = storage.open(JOURNAL_FILE)
            try:
                jf.allocate(journal_size)
                # Old records must never replay into the new pool.
                for off in range(0, journal_size, 1 << 20):
                    jf.pwrite(bytes(min(1 << 20, journal_size - off)), off)
                jf.sync()
            finally:
                jf.close()
            sb = Superblock(version=FORMAT_VERSION,
                            flags=FLAG_COMPRESSION if compression else 0, uuid=new_uuid(),
                            gen=0, blob_addr=0, blob_len=0, blob_csum=0,
                            journal_size=journal_size, created_ns=time.time_ns())
            pool = cls(storage, sb)
            pool.sbf.pwrite(bytes(2 * BLOCK), 0)
            pool.sbf.sync()
            pool.mrc.grow(1)
            pool.mrc.set_marker(0, SYSTEM)   # unit 0 is the null node address
            pool._grow_meta()
            pool.checkpoint()
            pool._close_files()
        finally:
            storage.unlock()
        log.info("created pool %s (compression %s)", storage.label,
                 "on" if compression else "off")

    @classmethod
    def open(cls, storage: Storage, *, lock: bool = True, readonly: bool = False) -> "Pool":
        """Mount: lock the pool, load its newest checkpoint, replay the journal.

        ``readonly`` (fsck) replays in memory only and never writes the pool.

        Raises PoolError(EBUSY) if the pool is in use, FormatError with a
        message naming the pool if it is not a pool, damaged, or of an unknown
        format version.
        """
        if lock:
            try:
                storage.lock()
            except OSError as e:
                raise PoolError(e.errno or errno.EIO,
                                f"cannot open pool {storage.label}: {e.strerror}") from None
        try:
            try:
                pool = cls._load(storage, readonly)
            except OSError as e:
                what = os.path.basename(e.filename) if e.filename else "its files"
                raise FormatError(f"pool {storage.label}: cannot read {what}: "
                                  f"{e.strerror}") from None
        except BaseException:
            if lock:
                storage.unlock()
            raise
        pool._locked = lock
        return pool

    @classmethod
    def _load(cls, storage: Storage, readonly: bool) -> "Pool":
        label = storage.label
        names = [n for n in storage.names() if n != "lock"]
        if SUPERBLOCK_FILE not in names:
            if not names:
                raise FormatError(f"{label} is not a cowfs pool (empty directory); "
                                  "create one with 'cowfs mkfs'")
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise FormatError(f"{label} is not a cowfs pool (no superblock; holds {shown})")
        missing = [n for n in POOL_FILES if n not in names]
        if missing:
            raise FormatError(f"pool {label} is incomplete: missing {', '.join(missing)}")
        sbf = storage.open(SUPERBLOCK_FILE)
        try:
            raw = sbf.pread(2 * BLOCK, 0)
        finally:
            sbf.close()
        slots = [Superblock.decode(raw[i * BLOCK:(i + 1) * BLOCK], f"pool {label}")
                 for i in range(2)]
        valid = [s for s in slots if s is not None]
        if not valid:
            raise FormatError(f"{label} is not a usable cowfs pool: both superblock copies "
                              "are missing or damaged")
        sb = max(valid, key=lambda s: s.gen)
        pool = cls(storage, sb)
        pool.readonly = readonly
        try:
            pool._load_checkpoint()
            pool._replay()
        except BaseException:
            pool._close_files()
            raise
        return pool

    def _load_checkpoint(self) -> None:
        sb, label = self.sb, self.label
        meta_units = self.meta.size() // BLOCK
        nblob = -(-sb.blob_len // BLOCK)
        if sb.blob_addr + nblob > meta_units or sb.blob_addr == 0:
            raise FormatError(f"pool {label}: checkpoint {sb.gen} lies outside the meta file "
                              "(meta file truncated or superblock damaged)")
        raw = self.meta.pread(sb.blob_len, sb.blob_addr * BLOCK)
        if checksum(raw) != sb.blob_csum:
            raise FormatError(f"pool {label}: checkpoint {sb.gen} fails its checksum "
                              "(meta file damaged)")
        try:
            blob = Blob.decode(raw)
            st = blob.state
            data_units = st["data_units"]
            if st["meta_units"] > meta_units or data_units > self.data.size() // BLOCK:
                raise ValueError("pool files are shorter than the checkpoint says")
            self.drc.grow(self.data.size() // BLOCK)
            self.mrc.grow(meta_units)
            for table, pages, csums, what in (
                    (self.drc, blob.data_pages, blob.data_page_csums, "data"),
                    (self.mrc, blob.meta_pages, blob.meta_page_csums, "meta")):
                for p, (u, c) in enumerate(zip(pages, csums)):
                    if not u:
                        continue
                    img = self.meta.pread(BLOCK, u * BLOCK)
                    if checksum(img) != c:
                        raise ValueError(f"{what} reference page {p} fails its checksum")
                    table.load_page(p, img)
            for table, key in ((self.drc, "data_overflow"), (self.mrc, "meta_overflow")):
                for u, c in st[key]:
                    table.overflow[u] = c
            self.dpages, self.dpage_csums = blob.data_pages, blob.data_page_csums
            self.mpages, self.mpage_csums = blob.meta_pages, blob.meta_page_csums
            self.mrc.set_marker(0, SYSTEM)
            for u in list(self.dpages) + list(self.mpages):
                if u:
                    self.mrc.set_marker(u, SYSTEM)
            self.blob_units = list(range(sb.blob_addr, sb.blob_addr + nblob))
            for u in self.blob_units:
                self.mrc.set_marker(u, SYSTEM)
            for d in st["datasets"]:
                self._add(Dataset.from_json(d))
            self.next_id = st["next_id"]
        except (ValueError, KeyError, TypeError, struct.error) as e:
            raise FormatError(f"pool {label}: checkpoint {sb.gen} is damaged: {e}") from None
        self.mrc.dirty_pages.clear()
        self.drc.dirty_pages.clear()

    def _replay(self) -> None:
        count = 0
        self._replaying = True
        try:
            for rtype, payload in replay(self.jfile, self.sb.journal_size, self.sb.gen):
                try:
                    self._apply_record(rtype, payload)
                    # A replayed free is durable: a later record may reuse the unit.
                    self.drc.release_pending()
                except (PoolError, struct.error, KeyError, ValueError, UnicodeError) as e:
                    raise FormatError(f"pool {self.label}: journal record {count} of "
                                      f"checkpoint {self.sb.gen} does not apply: {e}") from None
                count += 1
        finally:
            self._replaying = False
        # Everything replayed is durable; frees it recorded can be reused.
        self.drc.release_pending()
        if count:
            log.info("pool %s: replayed %d journal records", self.label, count)
            if not self.readonly:
                self.checkpoint()

    def close(self) -> None:
        """Make everything durable (checkpoint) and release the pool.  Idempotent."""
        if self.closed:
            return
        try:
            if (self.stale is None and self.degraded is None and not self.readonly
                    and self._changed_since_checkpoint()):
                self.checkpoint()
        finally:
            self.closed = True
            self._close_files()
            if self._locked:
                self.storage.unlock()
                self._locked = False

    def _changed_since_checkpoint(self) -> bool:
        return bool(self.store.dirty or self.journal.used() or self.drc.dirty_pages
                    or self.mrc.dirty_pages
                    or self.times_dirty)

    def _close_files(self) -> None:
        """Close the four pool files, each even if another fails; the
        first failure is raised once all are closed.

        The closes run side by side: a file that made native AIO contexts
        (for gathered page writes or reads) frees each at close, and
        io_destroy took 29-47 ms on the development VM; one after the other
        the four took about 0.16 s of the daemon's 165-176 ms close at
        unmount (71-78 ms side by side)."""
        errors: list[BaseException] = []

        def close(f: PoolFile) -> None:
            try:
                f.close()
            except BaseException as e:   # raised below, in the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=close, args=(f,), name="closing pool files")
                   for f in (self.meta, self.data, self.jfile, self.sbf)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    # -- volumes ----------------------------------------------------------------

    def volumes(self) -> list[VolumeInfo]:
        """All volumes, by name."""
        self.ready()
        return [self.by_name[n].info() for n in sorted(self.by_name)]

    def lookup(self, name: str) -> VolumeInfo:
        """The volume called ``name`` (ENOENT if none)."""
        self.ready()
        v = self.by_name.get(name)
        if v is None:
            raise PoolError(errno.ENOENT, f"no volume named {name!r} in pool {self.label}")
        return v.info()

    def get(self, vol_id: int) -> VolumeInfo:
        """The volume with id ``vol_id`` (ENOENT if it was deleted)."""
        v = self._dataset(vol_id)
        if v.is_snapshot:
            raise PoolError(errno.ENOENT, f"{v.label} is a snapshot, not a volume")
        return v.info()

    def _vol(self, vol_id: int) -> Dataset:
        """A volume about to be changed (EROFS for a snapshot or a read-only pool)."""
        v = self.datasets.get(vol_id)
        # Every write comes here: the usual case is settled with attribute
        # tests, and only a refusal or a pending reload takes the calls below.
        if (v is None or v.owner is not None or self.closed or self.stale is not None
                or self.degraded is not None or self.readonly):
            v = self._dataset(vol_id)
            self._refuse_read_only()
            if v.is_snapshot:
                raise PoolError(errno.EROFS, f"snapshot {v.label} is read-only")
        return v

    def _dataset(self, ds_id: int) -> Dataset:
        self.ready()
        v = self.datasets.get(ds_id)
        if v is None:
            raise PoolError(errno.ENOENT, f"volume or snapshot {ds_id} no longer exists in "
                            f"pool {self.label}")
        return v

    def _add(self, v: Dataset) -> None:
        self.datasets[v.id] = v
        if v.is_snapshot:
            self.snaps[(v.owner, v.name)] = v
        else:
            self.by_name[v.name] = v
        self.next_id = max(self.next_id, v.id + 1)

    def _remove(self, v: Dataset) -> None:
        del self.datasets[v.id]
        if v.is_snapshot:
            del self.snaps[(v.owner, v.name)]
        else:
            del self.by_name[v.name]

    def ready(self) -> None:
        """Return when the pool can serve a request: reload its durable state
        first if a failure left memory half changed.  EIO while it cannot."""
        if self.closed:
            raise PoolError(errno.EIO, f"pool {self.label} is closed")
        if self.stale is not None:
            self._reload()

    def _writable(self) -> None:
        """:meth:`ready`, and EROFS if the pool only serves reads."""
        self.ready()
        self._refuse_read_only()

    def _refuse_read_only(self) -> None:
        if self.degraded is not None:
            raise PoolError(errno.EROFS, f"pool {self.label} is read-only: {self.degraded}; "
                            "unmount and mount it again to write")
        if self.readonly:
            raise PoolError(errno.EROFS, f"pool {self.label} is open read-only")

    def create_volume(self, name: str, size: int = 0, mode: int = 0o644, uid: int = 0,
                      gid: int = 0) -> VolumeInfo:
        """Create an empty (all-zero, unallocated) volume of ``size`` bytes."""
        self._writable()
        validate_name(name)
        self._check_size(name, size)
        if name in self.by_name:
            raise PoolError(errno.EEXIST, f"volume {name!r} already exists in pool {self.label}")
        self._ensure_meta_reserve()
        vid = self.next_id
        now = time.time_ns()
        with self._mutation():
            self._apply_create(vid, name, size, mode & 0o7777, uid, gid, now)
            self._log(R_CREATE, CREATE.pack(vid, size, mode & 0o7777, uid, gid, now)
                      + os.fsencode(name))
        log.info("pool %s: created volume %s (%d bytes)", self.label, name, size)
        return self.by_name[name].info()

    def delete_volume(self, vol_id: int) -> None:
        """Delete a volume and free every block only it referenced."""
        v = self._vol(vol_id)
        with self._mutation():
            self._apply_delete(vol_id)
            self._log(R_DELETE, ONE_ID.pack(vol_id))
        log.info("pool %s: deleted volume %s", self.label, v.name)

    def rename_volume(self, vol_id: int, new_name: str) -> None:
        """Rename a volume; an existing volume of that name is replaced (POSIX rename)."""
        v = self._vol(vol_id)
        validate_name(new_name)
        if new_name == v.name:
            return
        target = self.by_name.get(new_name)
        replaced = target.id if target else 0
        clash = sorted(n for (o, n) in self.snaps if o == v.name and (new_name, n) in self.snaps)
        if clash:
            raise PoolError(errno.EEXIST, f"cannot rename volume {v.name!r} to {new_name!r}: "
                            f"both have a snapshot named {clash[0]!r}; rename or delete it first")
        self._ensure_meta_reserve()
        with self._mutation():
            self._apply_rename(vol_id, replaced, new_name)
            self._log(R_RENAME, RENAME.pack(vol_id, replaced) + os.fsencode(new_name))

    def set_attrs(self, vol_id: int, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None, atime_ns: int | None = None,
                  mtime_ns: int | None = None) -> VolumeInfo:
        """Change ownership, permission bits or times of a volume."""
        v = self._vol(vol_id)
        self._ensure_meta_reserve()
        with self._mutation():
            self._apply_attr(vol_id, v.mode if mode is None else mode & 0o7777,
                             v.uid if uid is None else uid, v.gid if gid is None else gid,
                             v.atime if atime_ns is None else atime_ns,
                             v.mtime if mtime_ns is None else mtime_ns, time.time_ns())
            self._log_attr(v)
        return v.info()

    def _check_size(self, name: str, size: int) -> None:
        if size < 0:
            raise PoolError(errno.EINVAL, f"volume {name!r}: negative size {size}")
        if size > MAX_VOLUME_SIZE:
            raise PoolError(errno.EFBIG, f"volume {name!r}: size {size} exceeds the "
                            f"{MAX_VOLUME_SIZE >> 40} TiB limit")

    # -- data -------------------------------------------------------------------

    def read(self, vol_id: int, offset: int, length: int,
             wait: bool | Callable[[], bool] = True) -> bytes | bytearray | None:
        """Bytes ``offset .. offset+length`` of a volume or snapshot, short at its end.

        Holes read as zeros.  A block whose checksum does not match raises
        ChecksumError (EIO) and is logged with pool, volume and offset.  The
        result is a fresh buffer the caller may keep (bytes, or a bytearray
        when that saves a copy).

        With ``wait`` false, data that is not in the host's page cache is not
        waited for: the disk read starts and the result is None (ask again to
        get it), so that a caller serving several requests can start theirs
        meanwhile.  A callable ``wait`` is asked at that point whether to wait
        after all (say, when nothing else is queued).
        """
        if length == BLOCK:
            # Random 4 KiB reads: cowfs/_oneblock.c reads an aligned block
            # whose tree path is in memory in one call (about 2.3 of its
            # 3.4 us were Python calls); any other case it leaves to the code
            # below, having read nothing.
            data = read_block(self, vol_id, offset, wait)
            if data is not False:
                return data
        v = self._dataset(vol_id)
        if offset < 0 or length < 0:
            raise PoolError(errno.EINVAL, f"volume {v.name!r}: negative offset or length")
        end = min(offset + length, v.size)
        if end <= offset:
            return b""
        b0 = offset // BLOCK
        b1 = (end + BLOCK - 1) // BLOCK
        out = self._read_blocks(v, b0, b1 - b0, wait)
        if out is None:
            return None
        start = offset - b0 * BLOCK
        if start == 0 and end - offset == len(out):
            return out          # the aligned case: no copy
        return bytes(memoryview(out)[start:start + end - offset])

    def _read_blocks(self, v: Dataset, b0: int, nb: int,
                     wait: bool | Callable[[], bool] = True) -> bytes | bytearray | None:
        """Blocks ``b0 .. b0+nb-1`` of ``v``, checksums verified (None: see
        :meth:`read`)."""
        if not v.root:
            return bytearray(nb * BLOCK)
        if nb == 1:
            return self._read_block(v, b0, wait)
        # Raw blocks stored one after the other (what sequential writes
        # leave) are one run, fetched with one read and checked in C, also
        # across leaves: per block in Python this was most of the cost of a
        # 1 MiB read.  A run is (first block - b0, its pieces (leaf, i, k):
        # entries i..k-1 of a leaf); a compressed block is a run of its own.
        runs: list[tuple[int, list[tuple[Node, int, int]]]] = []
        next_at = next_sector = -1      # where the last raw run would go on
        for leaf, i, j in self.tree.leaf_spans(v.root, b0, nb):
            keys, addrs, slens = leaf.keys, leaf.addrs, leaf.slens
            while i < j:
                k = raw_run(keys, addrs, slens, i, j)
                at = keys[i] - b0
                if slens[i] != BLOCK:
                    # Its own run; next_at stays behind it, so no raw run
                    # continues across it.
                    runs.append((at, [(leaf, i, k)]))
                    i = k
                    continue
                if at == next_at and addrs[i] == next_sector:
                    runs[-1][1].append((leaf, i, k))
                else:
                    runs.append((at, [(leaf, i, k)]))
                next_at = at + k - i
                next_sector = addrs[k - 1] + SECTORS_PER_BLOCK
                i = k
        out = None
        for at, pieces in runs:
            leaf, i, _ = pieces[0]
            if leaf.slens[i] == BLOCK:
                blk = self._read_run(v, pieces, wait)
            else:
                blk = self._load_block(v, leaf.keys[i], leaf.addrs[i], leaf.csums[i],
                                       leaf.slens[i], wait)
            if blk is None:
                return None
            if len(blk) == nb * BLOCK:
                return blk              # the whole range in one run: no copy
            if out is None:
                out = bytearray(nb * BLOCK)
            out[at * BLOCK:at * BLOCK + len(blk)] = blk
        return out if out is not None else bytearray(nb * BLOCK)

    def _read_run(self, v: Dataset, pieces: list[tuple[Node, int, int]],
                  wait: bool | Callable[[], bool]) -> bytes | bytearray | None:
        """The raw blocks of leaf entries ``pieces`` (stored one after the
        other) in one read, each checksum verified (None: see :meth:`read`)."""
        leaf, i, _ = pieces[0]
        blocks = sum(k - i for _, i, k in pieces)
        raw = self._pread_data(v, blocks * BLOCK, leaf.addrs[i], wait)
        if raw is None:
            return None
        mv = memoryview(raw)
        at = 0
        for leaf, i, k in pieces:
            bad = first_bad(mv[at:at + (k - i) * BLOCK], leaf.csums, i)
            if bad >= 0:
                self._bad_block(v, leaf.keys[i + bad], leaf.addrs[i + bad])
            at += (k - i) * BLOCK
        return raw

    def _read_block(self, v: Dataset, b: int,
                    wait: bool | Callable[[], bool] = True) -> bytes | bytearray | None:
        """Block ``b`` of ``v`` (the 4 KiB random read, kept short)."""
        leaf, _ = self.tree.find_leaf(v.root, b)
        keys = leaf.keys
        i = bisect_left(keys, b)
        if i == len(keys) or keys[i] != b:
            return bytearray(BLOCK)
        return self._load_block(v, b, leaf.addrs[i], leaf.csums[i], leaf.slens[i], wait)

    def _load_block(self, v: Dataset, b: int, sector: int, csum: int, slen: int,
                    wait: bool | Callable[[], bool] = True) -> bytes | bytearray | None:
        """Block ``b`` of ``v`` from its pointer: read, checksum verified,
        expanded if it is stored compressed (None: see :meth:`read`)."""
        raw = self._pread_data(v, slen, sector, wait)
        if raw is None:
            return None
        if checksum(raw) != csum:
            self._bad_block(v, b, sector)
        if slen == BLOCK:
            return raw
        try:
            return lz4.block.decompress(raw, uncompressed_size=BLOCK)
        except lz4.block.LZ4BlockError:
            self._bad_block(v, b, sector)

    def async_reads(self, notify_fd: int) -> bool:
        """Let reads told not to wait start their disk reads without
        starting the disk's work: :meth:`submit_reads` starts it for all
        started since, in one call; the eventfd ``notify_fd`` (the caller's)
        counts finished ones, :meth:`reap_reads` collects them and asking
        :meth:`read` again answers them.  False where the system cannot
        (then reads told not to wait start their disk reads as before).
        A reload of the pool's state turns it off."""
        return self.data.async_reads(notify_fd)

    def started_read(self) -> object:
        """A token of the disk read the last :meth:`read` that answered None
        waits for; :meth:`submit_reads` and :meth:`reap_reads` name reads by
        these tokens."""
        return self.data.started_read()

    def unsent_reads(self) -> int:
        """How many disk reads started since the last :meth:`submit_reads`
        wait to be handed to the disk."""
        return self.data.unsent_reads()

    def submit_reads(self) -> list[object]:
        """Hand the disk reads started since the last call to the disk; the
        tokens of those the system refused (asking :meth:`read` again reads
        them, waiting)."""
        return self.data.submit_reads()

    def reap_reads(self) -> list[object]:
        """Collect the finished disk reads (see :meth:`async_reads`); their
        tokens."""
        return self.data.reap_reads()

    def _pread_data(self, v: Dataset, length: int, sector: int,
                    wait: bool | Callable[[], bool] = True) -> bytes | bytearray | None:
        try:
            if wait is not True:
                raw = self.data.pread_cached(length, sector * SECTOR)
                if raw is not None:
                    return raw
                self.uncached_reads += 1
                if wait is False or not wait():
                    return None
            return self.data.pread(length, sector * SECTOR, self.read_poll)
        except OSError as e:
            raise self._io_error(e, f"reading {v.label} (data sector {sector})") from None

    def _bad_block(self, v: Dataset, block: int, sector: int) -> NoReturn:
        msg = (f"pool {self.label}: {v.label}: checksum mismatch at offset "
               f"{block * BLOCK} (data sector {sector}); returning EIO")
        log.error(msg)
        self.checksum_errors += 1
        raise ChecksumError(msg)

    def write(self, vol_id: int, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset`` (extending the volume if it ends past
        the end).  Returns the length written.  ENOSPC when the pool is full."""
        if len(data) == BLOCK:
            # Random 4 KiB writes: cowfs/_oneblock.c does the common case in
            # one call (about a third of the daemon's CPU per request when it
            # was Python); any other case it leaves, unchanged, to the code below.
            try:
                owed = write_block(self, vol_id, offset, data)
                if owed == OWN_PATH_FIRST:
                    self._own_path(vol_id, offset // BLOCK)
                    owed = write_block(self, vol_id, offset, data)
            except OSError as e:
                raise self._io_error(e, "writing data") from None
            if owed >= 0:
                if owed & 2:
                    self.data.start_writeback()
                if owed & 1:
                    self._after_change()
                return BLOCK
        v = self._vol(vol_id)
        n = len(data)
        if offset < 0:
            raise PoolError(errno.EINVAL, f"volume {v.name!r}: negative offset {offset}")
        if n == 0:
            return 0
        end = offset + n
        if end > MAX_VOLUME_SIZE:
            raise PoolError(errno.EFBIG, f"volume {v.name!r}: write past the size limit")
        b0 = offset // BLOCK
        b1 = (end + BLOCK - 1) // BLOCK
        mv = memoryview(data).cast("B")
        head = offset - b0 * BLOCK
        if head == 0 and n == BLOCK and not _is_zero(mv):
            # One whole data block (random 4 KiB writes): the short path.
            self._write_block(v, b0, mv, max(v.size, end))
            return n
        if head == 0 and end % BLOCK == 0:
            buf = mv
        else:
            buf = bytearray((b1 - b0) * BLOCK)
            if head:
                buf[:BLOCK] = self._read_blocks(v, b0, 1)
            if end % BLOCK and (b1 - 1 > b0 or not head):
                buf[-BLOCK:] = self._read_blocks(v, b1 - 1, 1)
            buf[head:head + n] = mv
            buf = memoryview(buf)
        self._write_blocks(v, b0, buf, max(v.size, end))
        return n

    def _write_blocks(self, v: Dataset, b0: int, buf: memoryview, new_size: int) -> None:
        """Store whole blocks starting at block ``b0`` and map them."""
        nb = len(buf) // BLOCK
        self._ensure_meta_reserve()
        stored: list[bytes | memoryview | None] = []
        slens = array("H", bytes(2 * nb))
        total_sectors = 0
        tried = self.compress and nb > 1
        if tried and v.incompressible >= INCOMPRESSIBLE_STREAK:
            # lz4 gave up on this volume's last writes (a stream of media,
            # encrypted or compressed data): its two tries cost 3.6% of the
            # request thread on 1 MiB writes.  Try one write in
            # LZ4_PROBE_EVERY, which ends this as soon as one packs a block.
            v.incompressible += 1
            tried = v.incompressible % LZ4_PROBE_EVERY == 0
        compress = tried
        packed = False
        misses = 0
        # Checksums of every block as it came, in one C call: what a block
        # stored raw keeps, and a cheap test for zero blocks (only a block
        # with the checksum of zeros is compared byte by byte).
        raw_csums = array("Q", bytes(8 * nb))
        block_checksums(buf, raw_csums)
        i = 0
        while i < nb and compress:
            blk = buf[i * BLOCK:(i + 1) * BLOCK]
            if raw_csums[i] == ZERO_CSUM and _is_zero(blk):
                stored.append(None)
            else:
                c = lz4.block.compress(blk, store_size=False)
                if len(c) <= BLOCK - SECTOR:
                    blk = c
                    packed = True
                else:
                    # Incompressible data (media, encrypted or already
                    # compressed) costs lz4 about 1 us a block for nothing:
                    # after INCOMPRESSIBLE_GIVE_UP misses, store the rest of
                    # this write as it is.
                    misses += 1
                    compress = misses < INCOMPRESSIBLE_GIVE_UP
                stored.append(blk)
                slens[i] = len(blk)
                total_sectors += -(-len(blk) // SECTOR)
            i += 1
        if packed:
            v.incompressible = 0
        elif tried and not compress and v.incompressible < INCOMPRESSIBLE_STREAK:
            v.incompressible += 1
        if i < nb:
            # The rest is stored as it came, without a Python step per block
            # (that loop was 13-14% of the request thread's samples on 1 MiB
            # writes) but for blocks whose checksum is the zero block's.
            slens[i:] = array("H", [BLOCK]) * (nb - i)
            total_sectors += (nb - i) * SECTORS_PER_BLOCK
            zeros = ZERO_CSUM in raw_csums[i:]
            if zeros or total_sectors != nb * SECTORS_PER_BLOCK:
                # Not one raw run: _store needs each block.
                stored += [buf[o:o + BLOCK] for o in range(i * BLOCK, nb * BLOCK, BLOCK)]
            if zeros:
                for j in range(i, nb):
                    if raw_csums[j] == ZERO_CSUM and _is_zero(stored[j]):
                        stored[j] = None
                        slens[j] = 0
                        total_sectors -= SECTORS_PER_BLOCK
        addrs = array("Q", bytes(8 * nb))
        csums = array("Q", bytes(8 * nb))
        if total_sectors == nb * SECTORS_PER_BLOCK:
            # All blocks raw: the buffer as it came is what goes to disk.
            self._store_raw(buf, addrs, csums, raw_csums)
        elif total_sectors:
            self._store(stored, slens, addrs, csums, total_sectors, raw_csums)
        with self._mutation():
            self._apply_write(v.id, b0, nb, addrs, csums, slens, new_size)
            self._log(R_WRITE, WRITE.pack(v.id, b0, nb) + struct.pack("<Q", new_size)
                      + addrs.tobytes() + csums.tobytes() + slens.tobytes())
        self._data_changed(v)

    def _own_path(self, vid: int, b: int) -> None:
        """Copy or move the nodes on the tree path of block ``b`` of volume
        ``vid`` that may not change in place (shared with a snapshot or
        clone, or pointed at by the last checkpoint), so that the next
        4 KiB write there is ``write_block``'s: what the general path's
        first steps would do (its first write into each leaf shared with a
        snapshot cost about 25 us in Python, one write in ten at 64 KiB
        strides)."""
        self._ensure_meta_reserve()
        v = self.datasets[vid]
        with self._mutation():
            v.root = self.tree.own_path(v.root, b)

    def _write_block(self, v: Dataset, b: int, blk: memoryview, new_size: int) -> None:
        """Store one non-zero block raw and map it at block ``b``: what
        :meth:`_write_blocks` does for it (single blocks are never
        compressed) with fewer steps, and the same journal record."""
        self._ensure_meta_reserve()
        unit = self._alloc_data(1)
        sector = unit * SECTORS_PER_BLOCK
        csum = checksum(blk)
        try:
            self.data.pwrite(blk, unit * BLOCK)
        except OSError as e:
            self.drc.free_marked(unit)
            raise self._io_error(e, "writing data") from None
        self._data_written(1)
        with self._mutation():
            self._apply_write_one(v.id, b, sector, csum, new_size)
            self._log(R_WRITE, WRITE_ONE.pack(v.id, b, 1, new_size, sector, csum, BLOCK))
        self._data_changed(v)

    def _data_changed(self, v: Dataset) -> None:
        """After a write or truncate of ``v``: new mtime and ctime (journaled
        at the next sync), and any commit or checkpoint that is now due."""
        v.mtime = v.ctime = time.time_ns()
        self.times_dirty[v.id] = v
        self._after_change()

    def _store_raw(self, buf: memoryview, addrs: array, csums: array,
                   raw_csums: array) -> None:
        """Write whole raw blocks ``buf`` (what sequential writes bring) to
        fresh data units, in one run where there is one; fill addrs/csums."""
        nb = len(buf) // BLOCK
        start = self._alloc_data(nb)
        if start < 0:
            self._store_scattered([buf[o:o + BLOCK] for o in range(0, nb * BLOCK, BLOCK)],
                                  addrs, csums, raw_csums)
            return
        # The pointers are a plain run, set without a loop in Python.
        sector = start * SECTORS_PER_BLOCK
        addrs[:] = array("Q", range(sector, sector + nb * SECTORS_PER_BLOCK, SECTORS_PER_BLOCK))
        csums[:] = raw_csums
        self._write_reserved(buf, start, nb)

    def _store(self, stored: list, slens: array, addrs: array, csums: array,
               total_sectors: int, raw_csums: array | list[int]) -> None:
        """Write stored blocks (None: a zero block, not stored) to fresh
        data units, packed in one run where there is one; fill addrs/csums.
        ``raw_csums``: checksum of each block as it came (used for the ones
        stored raw)."""
        units = -(-total_sectors // SECTORS_PER_BLOCK)
        start = self._alloc_data(units)
        if start < 0:
            self._store_scattered(stored, addrs, csums, raw_csums)
            return
        sector = start * SECTORS_PER_BLOCK
        parts = []
        for i, blk in enumerate(stored):
            if blk is None:
                continue
            addrs[i] = sector
            csums[i] = raw_csums[i] if len(blk) == BLOCK else checksum(blk)
            pad = (-len(blk)) % SECTOR
            parts.append(blk)
            if pad:
                parts.append(bytes(pad))
            sector += (len(blk) + pad) // SECTOR
        self._write_reserved(parts[0] if len(parts) == 1 else b"".join(parts), start, units)

    def _write_reserved(self, payload: bytes | memoryview, start: int, units: int) -> None:
        """Write ``payload`` at RESERVED data units ``start..start+units-1``;
        on failure they are free again and the caller gets EIO or ENOSPC."""
        try:
            self.data.pwrite(payload, start * BLOCK)
        except OSError as e:
            self._unreserve(range(start, start + units))
            raise self._io_error(e, "writing data") from None
        self._data_written(units)

    def _store_scattered(self, stored: list, addrs: array, csums: array,
                         raw_csums: array | list[int]) -> None:
        """What :meth:`_store` does when free space has no run long enough:
        one unit per stored block, wherever one is free."""
        reserved: list[int] = []
        writes: list[tuple[int, bytes | memoryview]] = []
        try:
            for i, blk in enumerate(stored):
                if blk is None:
                    continue
                u = self._alloc_data(1)
                if u < 0:
                    raise PoolError(errno.ENOSPC, f"pool {self.label} is full")
                reserved.append(u)
                addrs[i] = u * SECTORS_PER_BLOCK
                csums[i] = raw_csums[i] if len(blk) == BLOCK else checksum(blk)
                writes.append((u * BLOCK, blk))
        except BaseException:
            self._unreserve(reserved)
            raise
        try:
            for off, payload in writes:
                self.data.pwrite(payload, off)
        except OSError as e:
            self._unreserve(reserved)
            raise self._io_error(e, "writing data") from None
        self._data_written(len(reserved))

    def _data_written(self, units: int) -> None:
        """Account for ``units`` data units just written (not yet synced)."""
        self._data_dirty = True
        # Keep what the next commit must wait for small: a commit (fsync, or
        # every COMMIT_INTERVAL) blocks the daemon until the data is on disk.
        # Measured on 2 GiB of 1 MiB writes: 352-480 MiB/s with stalls of
        # 420 ms without these hints, 555-590 MiB/s and 13 ms with them.
        self._unflushed += units * BLOCK
        if self._unflushed >= WRITEBACK_BYTES:
            self._unflushed = 0
            self.data.start_writeback()

    def _unreserve(self, units: list[int] | range) -> None:
        for u in units:
            self.drc.free_marked(u)

    def _alloc_data(self, units: int) -> int:
        """Start of ``units`` contiguous free data units, now RESERVED; -1 if
        free space is too fragmented.  ENOSPC if the pool cannot grow."""
        start = self.drc.find_free(units)
        if start < 0 and self.drc.pending and not self._replaying:
            # Units freed by deletes or overwrites become reusable once the
            # journal group recording the free is durable: commit it now
            # rather than grow the pool (or fail with ENOSPC).
            self.sync()
            start = self.drc.find_free(units)
        if start < 0:
            try:
                self._grow_data(units)
            except PoolError:
                if units == 1:
                    raise
                return -1   # maybe fragmented free units still fit it
            start = self.drc.find_free(units)
            if start < 0:
                return -1
        self.drc.reserve_run(start, units)
        return start

    def _grow_data(self, units: int) -> None:
        cur = len(self.drc)
        _, avail = self.storage.space()
        room = (avail - HOST_HEADROOM) // BLOCK
        if room < units:
            raise PoolError(errno.ENOSPC, f"pool {self.label} is full: the file system under "
                            f"it has {max(avail, 0) >> 20} MiB left, kept in reserve for "
                            "metadata; delete volumes or add space")
        want = min(max(units, MIN_GROW_UNITS, min(cur // 8, 65536)), room)
        try:
            self.data.allocate((cur + want) * BLOCK)
        except OSError as e:
            raise self._io_error(e, "growing the data file") from None
        self.drc.grow(cur + want)

    def _grow_meta(self) -> None:
        cur = len(self.mrc)
        want = max(MIN_GROW_UNITS, min(cur // 8, 16384))
        try:
            self.meta.allocate((cur + want) * BLOCK)
        except OSError as e:
            raise self._io_error(e, "growing the meta file") from None
        self.mrc.grow(cur + want)

    def _ensure_meta_reserve(self) -> None:
        """Keep enough free meta units that commits and deletes never need new
        space; refuses (ENOSPC) before any change when it cannot."""
        need = (META_RESERVE_UNITS + len(self.drc.dirty_pages) + len(self.mrc.dirty_pages)
                + len(self.store.dirty) // 64)
        # Checked on every write: free_units() does not count the table,
        # which cost 10 us a write at 25k meta units and grew with the pool.
        if self.mrc.free_units() < need:
            self._grow_meta()

    def _io_error(self, e: OSError, doing: str) -> PoolError:
        if e.errno == errno.ENOSPC:
            return PoolError(errno.ENOSPC, f"pool {self.label} is full ({doing}): "
                             "the file system under it has no space left")
        self.io_errors += 1
        log.error("pool %s: I/O error %s", self.label, doing, exc_info=e)
        return PoolError(errno.EIO, f"pool {self.label}: I/O error {doing}: {e.strerror}")

    def truncate(self, vol_id: int, size: int) -> None:
        """Set a volume's size; blocks past a shrunk end are freed, a grown
        part reads as zeros."""
        v = self._vol(vol_id)
        self._check_size(v.name, size)
        if size == v.size:
            return
        self._ensure_meta_reserve()
        tail = (0, 0, 0)
        has_tail = 0
        if size < v.size and size % BLOCK:
            # The new last block keeps its head and loses its tail, in the same
            # record as the size change, so a later grow reads zeros there.
            b = size // BLOCK
            blk = bytearray(self._read_blocks(v, b, 1))
            cut = size - b * BLOCK
            if any(blk[cut:]):
                blk[cut:] = bytes(BLOCK - cut)
                has_tail = 1
                if any(blk):
                    addrs, csums = array("Q", [0]), array("Q", [0])
                    slens = array("H", [BLOCK])
                    self._store([blk], slens, addrs, csums, SECTORS_PER_BLOCK, [checksum(blk)])
                    tail = (addrs[0], csums[0], BLOCK)
        with self._mutation():
            self._apply_truncate(vol_id, size, has_tail, *tail)
            self._log(R_TRUNCATE, TRUNCATE.pack(vol_id, size, has_tail, *tail))
        self._data_changed(v)

    # -- durability ---------------------------------------------------------------

    def sync(self) -> None:
        """Return once everything written so far is durable (fsync).  EIO on
        a pool that gave up unsynced changes (see the class docstring)."""
        self.ready()
        if self.degraded is not None:
            raise PoolError(errno.EIO, f"pool {self.label}: {self.degraded}; it serves "
                            "reads only until it is mounted again")
        self._flush_times()
        if not self.journal.buf:
            return
        self._sync_data()
        try:
            self.journal.commit()
        except OSError as e:
            raise self._io_error(e, "committing the journal") from None
        # The frees those records describe are now durable: reuse is safe.
        self.drc.release_pending()
        if self._checkpoint_due():
            self._housekeeping(self.checkpoint)

    def _sync_data(self) -> None:
        """fdatasync the data file if it has unsynced writes.  After a failed
        fdatasync the kernel may have dropped the dirty pages, and a retry
        would report success for data that never reached the disk: the
        records that point at them are given up (:meth:`_lose_changes`)."""
        if not self._data_dirty:
            return
        try:
            self.data.sync()
        except OSError as e:
            self._lose_changes(e)
            raise self._io_error(e, "syncing data; unsynced changes are lost and the pool "
                                 "is read-only until it is mounted again") from None
        self._data_dirty = False

    def tick(self) -> None:
        """Housekeeping, called about once a second: retry a pending reload,
        commit records older than the commit interval, checkpoint when due."""
        if self.closed:
            return
        try:
            if self.stale is not None:
                self.ready()
            elif self.degraded is not None:
                return
            elif self.journal.buf and time.monotonic() - self._first_unsynced > COMMIT_INTERVAL:
                self.sync()
            elif self._checkpoint_due() or (
                    time.monotonic() - self._last_checkpoint > CHECKPOINT_INTERVAL
                    and (self.store.dirty or self.journal.used())):
                self.checkpoint()
        except PoolError as e:
            # Retried every second while the disk fails: one warning, then
            # one a minute, so that the log still shows what else happens.
            self._tick_failures += 1
            now = time.monotonic()
            if self._tick_failures == 1 or now - self._tick_warned >= TICK_WARN_INTERVAL:
                self._tick_warned = now
                log.warning("pool %s: background commit failed (%d in a row): %s",
                            self.label, self._tick_failures, e)
            return
        if self._tick_failures:
            log.warning("pool %s: background commit works again after %d failures",
                        self.label, self._tick_failures)
            self._tick_failures = 0

    def _checkpoint_due(self) -> bool:
        return (len(self.store.dirty) > DIRTY_NODE_LIMIT
                or self.journal.used() > self.journal.size * 3 // 4)

    def _after_change(self) -> None:
        if len(self.journal.buf) > JOURNAL_BUFFER_LIMIT:
            self._housekeeping(self.sync)
        elif len(self.store.dirty) > DIRTY_NODE_LIMIT:
            self._housekeeping(self.checkpoint)

    def _housekeeping(self, step) -> None:
        """Run a commit or checkpoint that an operation which already took
        effect triggers.  Its failure is not the operation's: the change is
        in the journal buffer, which a later sync (or the reload a failure
        schedules) commits, or the pool has gone read-only, in which case
        the next fsync reports it."""
        try:
            step()
        except PoolError as e:
            log.warning("pool %s: background %s failed: %s", self.label, step.__name__, e)

    def _flush_times(self) -> None:
        dirty, self.times_dirty = self.times_dirty, {}
        for vid, v in dirty.items():
            if self.datasets.get(vid) is v:     # not deleted meanwhile
                self._log_attr(v)

    def _log_attr(self, v: Dataset) -> None:
        self.times_dirty.pop(v.id, None)
        self._log(R_ATTR, ATTR.pack(v.id, v.mode, v.uid, v.gid, v.atime, v.mtime, v.ctime))

    def _log(self, rtype: int, payload: bytes) -> None:
        """Journal a change already applied in memory."""
        if self._replaying:
            return
        if not self.journal.buf:
            self._first_unsynced = time.monotonic()
        if not self.journal.fits(len(payload)):
            # The checkpoint captures the change itself; no record needed.
            self.checkpoint()
            return
        self.journal.append(rtype, payload)

    def checkpoint(self) -> None:
        """Write all dirty metadata to fresh units and switch the superblock
        to it; the journal then starts over.  Everything is durable after."""
        self._writable()
        try:
            self._checkpoint()
        except BaseException as e:
            if self.degraded is None:
                self._lose_memory(e)
            if isinstance(e, OSError):
                raise self._io_error(e, "writing a checkpoint") from None
            raise

    def _checkpoint(self) -> None:
        self.times_dirty.clear()
        self._sync_data()
        gen = self.sb.gen + 1
        self.store.flush(self._write_meta_unit, gen)
        retired: list[int] = []
        for table, pages, csums in ((self.drc, self.dpages, self.dpage_csums),
                                    (self.mrc, self.mpages, self.mpage_csums)):
            dirty = sorted(table.dirty_pages)
            table.dirty_pages.clear()
            for p in dirty:
                img = table.page_image(p)
                while len(pages) <= p:
                    pages.append(0)
                    csums.append(0)
                if pages[p]:
                    retired.append(pages[p])
                if RefTable.is_zero_page(img):
                    pages[p] = csums[p] = 0
                    continue
                u = self._alloc_system(1)
                self._write_meta_unit(u, img)
                pages[p], csums[p] = u, checksum(img)
        state = {
            "next_id": self.next_id,
            "data_units": len(self.drc),
            "meta_units": len(self.mrc),
            "datasets": [v.to_json() for v in self.datasets.values()],
            "data_overflow": self.drc.overflow_items(),
            "meta_overflow": self.mrc.overflow_items(),
        }
        raw = Blob(state, self.dpages, self.dpage_csums, self.mpages, self.mpage_csums).encode()
        nunits = -(-len(raw) // BLOCK)
        start = self._alloc_system(nunits)
        self.meta.pwrite(raw + bytes(nunits * BLOCK - len(raw)), start * BLOCK)
        self.meta.sync()
        sb = Superblock(version=self.sb.version, flags=self.sb.flags, uuid=self.sb.uuid,
                        gen=gen, blob_addr=start, blob_len=len(raw), blob_csum=checksum(raw),
                        journal_size=self.sb.journal_size, created_ns=self.sb.created_ns)
        # A failed write leaves the slot torn at worst, which its checksum
        # rules out: the previous checkpoint stays the newest.
        self.sbf.pwrite(sb.encode(), (gen % 2) * BLOCK)
        try:
            self.sbf.sync()
        except OSError as e:
            # Whether the new superblock reached the disk is unknown: a
            # reload would read it from the cache and start a journal that
            # a power cut could pair with the previous one.  Serve reads.
            self._lose_changes(e)
            raise
        # Committed.  What only the previous checkpoint used is free now.
        self.sb = sb
        for u in retired + self.blob_units:
            self.mrc.free_marked(u)
        self.blob_units = list(range(start, start + nunits))
        self.drc.release_pending()
        self.mrc.release_pending()
        self.journal.reset(gen)
        self._last_checkpoint = time.monotonic()

    def _alloc_system(self, n: int) -> int:
        start = self.mrc.find_free(n)
        if start < 0:
            self._grow_meta()
            start = self.mrc.find_free(n)
        for u in range(start, start + n):
            self.mrc.set_marker(u, SYSTEM)
        return start

    def _read_meta_unit(self, addr: int) -> bytes:
        try:
            return self.meta.pread(BLOCK, addr * BLOCK)
        except OSError as e:
            raise self._io_error(e, f"reading meta unit {addr}") from None

    def _write_meta_unit(self, addr: int, data: bytes) -> None:
        self.meta.pwrite(data, addr * BLOCK)

    # -- failure handling -------------------------------------------------------------

    def _lose_memory(self, e: BaseException) -> None:
        """Memory may be half changed: the next request reloads the durable
        state (:meth:`_reload`) before it is served."""
        if self.stale is None:
            self.stale = f"{type(e).__name__}: {e}"
            log.error("pool %s: an operation failed half way (%s); reloading its durable "
                      "state before the next request", self.label, self.stale,
                      exc_info=not isinstance(e, (PoolError, OSError)))

    def _lose_changes(self, e: BaseException) -> None:
        """The unsynced changes cannot be made durable: give them up, reload
        the durable state and serve it read-only."""
        if self.degraded is None:
            self.degraded = f"unsynced changes were lost after an I/O error ({e})"
            log.error("pool %s: %s; serving its durable state read-only until it is "
                      "mounted again", self.label, self.degraded)
        self.journal.buf.clear()
        self._data_dirty = False
        self.stale = self.stale or self.degraded

    def _reload(self) -> None:
        """Commit what is acknowledged but buffered, then replace the
        in-memory state with the pool's durable state, as a remount would.
        EIO (and still stale) if the disk does not let it yet."""
        try:
            if self.degraded is None and self.journal.buf:
                self._sync_data()
                self.journal.commit()
            self.journal.clear_torn_tail()
            fresh = Pool._load(self.storage, readonly=self.degraded is not None)
        except (OSError, PoolError, FormatError) as e:
            if isinstance(e, OSError):
                self.io_errors += 1
            raise PoolError(errno.EIO, f"pool {self.label} cannot reload its durable state "
                            f"after a failed operation ({e}); it retries at the next "
                            "request") from None
        self._close_files()
        id_limit = self.next_id
        keep = {k: getattr(self, k) for k in ("_locked", "checksum_errors", "io_errors",
                                               "degraded", "reloads", "on_reload",
                                               "_tick_failures", "_tick_warned")}
        self.__dict__.update(vars(fresh))
        self.__dict__.update(keep)
        self.reloads += 1
        log.warning("pool %s: reloaded its durable state (%d volumes, %d snapshots)%s",
                    self.label, len(self.by_name), len(self.snaps),
                    "; read-only" if self.degraded else "")
        if self.on_reload is not None:
            self.on_reload(max(id_limit, self.next_id))

    class _Mutation:
        def __init__(self, pool: "Pool") -> None:
            self.pool = pool

        def __enter__(self) -> None:
            return None

        def __exit__(self, et, e, tb) -> bool:
            if e is not None and not self.pool._replaying:
                self.pool._lose_memory(e)
                if not isinstance(e, PoolError) or e.errno not in (errno.EIO, errno.ENOSPC):
                    raise PoolError(errno.EIO, f"pool {self.pool.label}: internal error: {e}") from e
            return False

    def _mutation(self) -> "Pool._Mutation":
        """Context for in-memory changes: a failure inside makes the next
        request reload the durable state first."""
        return Pool._Mutation(self)

    # -- changes, shared by live operations and journal replay -------------------------

    def _apply_record(self, rtype: int, p: bytes) -> None:
        if rtype == R_WRITE:
            vid, b0, nb = WRITE.unpack_from(p)
            (new_size,) = struct.unpack_from("<Q", p, WRITE.size)
            o = WRITE.size + 8
            addrs = unpack_array("Q", p[o:o + 8 * nb])
            csums = unpack_array("Q", p[o + 8 * nb:o + 16 * nb])
            slens = unpack_array("H", p[o + 16 * nb:o + 18 * nb])
            self._apply_write(vid, b0, nb, addrs, csums, slens, new_size)
        elif rtype == R_CREATE:
            vid, size, mode, uid, gid, now = CREATE.unpack_from(p)
            self._apply_create(vid, os.fsdecode(p[CREATE.size:]), size, mode, uid, gid, now)
        elif rtype == R_DELETE:
            self._apply_delete(ONE_ID.unpack(p)[0])
        elif rtype == R_RENAME:
            vid, replaced = RENAME.unpack_from(p)
            self._apply_rename(vid, replaced, os.fsdecode(p[RENAME.size:]))
        elif rtype == R_ATTR:
            self._apply_attr(*ATTR.unpack(p))
        elif rtype == R_TRUNCATE:
            self._apply_truncate(*TRUNCATE.unpack(p))
        elif rtype == R_SNAPOP:
            self._apply_snapop(json.loads(p))
        else:
            raise ValueError(f"unknown record type {rtype}")

    def _known(self, vid: int) -> Dataset:
        v = self.datasets.get(vid)
        if v is None:
            raise KeyError(f"volume id {vid} does not exist")
        return v

    def _apply_create(self, vid: int, name: str, size: int, mode: int, uid: int, gid: int,
                      now: int) -> None:
        if name in self.by_name or vid in self.datasets:
            raise ValueError(f"volume {name!r} / id {vid} exists")
        self._add(Dataset(vid, name, size, mode, uid, gid, now))

    def _apply_delete(self, vid: int) -> None:
        v = self._known(vid)
        self.tree.drop(v.root)
        self._remove(v)

    def _apply_rename(self, vid: int, replaced: int, name: str) -> None:
        v = self._known(vid)
        if replaced:
            self._apply_delete(replaced)
        old = v.name
        self._remove(v)
        v.name = name
        self._add(v)
        # Snapshots follow their volume.
        for s in [s for (owner, _), s in self.snaps.items() if owner == old]:
            self._remove(s)
            s.owner = name
            self._add(s)

    def _apply_attr(self, vid: int, mode: int, uid: int, gid: int, atime: int, mtime: int,
                    ctime: int) -> None:
        v = self._known(vid)
        v.mode, v.uid, v.gid, v.atime, v.mtime, v.ctime = mode, uid, gid, atime, mtime, ctime

    def _apply_truncate(self, vid: int, size: int, has_tail: int, sector: int, csum: int,
                        slen: int) -> None:
        v = self._known(vid)
        if has_tail:
            # Replace the new last block with its zero-tailed copy (or a hole).
            b = size // BLOCK
            ent = Entries()
            if slen:
                self.take(sector, slen)
                ent = Entries(array("Q", [b]), array("Q", [sector]), array("Q", [csum]),
                              array("H", [slen]))
            v.root = self.tree.replace(v.root, b, b + 1, ent)
            v.mapped += self.tree.delta
        if size < v.size:
            first = -(-size // BLOCK)
            v.root = self.tree.replace(v.root, first, KEY_END, Entries())
            v.mapped += self.tree.delta
        v.size = size

    def _apply_write(self, vid: int, b0: int, nb: int, addrs: array, csums: array,
                     slens: array, new_size: int) -> None:
        v = self._known(vid)
        if (nb and addrs[0] % SECTORS_PER_BLOCK == 0 and slens.count(BLOCK) == nb
                and addrs == array("Q", range(addrs[0], addrs[0] + nb * SECTORS_PER_BLOCK,
                                              SECTORS_PER_BLOCK))
                and self.drc.take_run(addrs[0] // SECTORS_PER_BLOCK, nb)):
            # The common case of a write of incompressible data: whole blocks
            # in consecutive units, one unit each, taken in one slice above.
            ent = Entries(array("Q", range(b0, b0 + nb)), addrs, csums, slens)
        else:
            ent = Entries()
            take = self.take
            for i in range(nb):
                s = slens[i]
                if s:
                    ent.keys.append(b0 + i)
                    ent.addrs.append(addrs[i])
                    ent.csums.append(csums[i])
                    ent.slens.append(s)
                    take(addrs[i], s)
        v.root = self.tree.replace(v.root, b0, b0 + nb, ent)
        v.mapped += self.tree.delta
        v.size = new_size

    def _apply_write_one(self, vid: int, b: int, sector: int, csum: int,
                         new_size: int) -> None:
        """:meth:`_apply_write` of one raw block in a RESERVED unit."""
        v = self._known(vid)
        v.root = self.tree.set_one(v.root, b, sector, csum)
        v.mapped += self.tree.delta
        v.size = new_size

    # DataRefs for the tree
    def take(self, sector: int, slen: int) -> None:
        """A leaf pointer now references this stored block's units."""
        for u in units_of(sector, slen):
            self.drc.incref(u)

    def take_all(self, sectors: array, slens: array) -> None:
        """:meth:`take` for each pointer of a copied leaf, in one pass."""
        # In one C call unless a count would leave its byte (a unit with
        # MAX_DIRECT references): 4 KiB writes into leaves shared with a
        # snapshot went from 8.6 to 6.6 us each (in-process, one leaf copy per
        # ten writes).
        if incref_blocks(self.drc.rc, self.drc.dirty_pages, sectors, slens):
            return
        for a, s in zip(sectors, slens):
            self.take(a, s)

    def drop(self, sector: int, slen: int) -> None:
        """A leaf pointer to this stored block went away."""
        if slen == BLOCK and not sector % SECTORS_PER_BLOCK:
            self.drc.decref(sector // SECTORS_PER_BLOCK)   # a raw block: one unit
            return
        for u in units_of(sector, slen):
            self.drc.decref(u)

    def drop_all(self, sectors: array, slens: array, start: int, end: int) -> None:
        """:meth:`drop` for pointers ``start`` to ``end - 1`` of a leaf."""
        # In one C call unless a count is not in its byte: the 256 old
        # pointers of a 1 MiB overwrite cost a quarter of its CPU in Python.
        if decref_blocks(self.drc.rc, self.drc.dirty_pages, self.drc.pending,
                         sectors, slens, start, end):
            return
        for i in range(start, end):
            self.drop(sectors[i], slens[i])

    # -- space and consistency -------------------------------------------------------

    def statfs(self) -> PoolStats:
        """Capacity and free space of the pool (free data units plus what the
        file system under it can still give, less the metadata reserve)."""
        self.ready()
        total_host, avail = self.storage.space()
        # Units freed but not yet committed count as free: they are, a few
        # seconds from now at the latest.
        free_units = self.drc.free_units() + len(self.drc.pending)
        used = (len(self.drc) - free_units) * BLOCK
        free = free_units * BLOCK + max(0, avail - HOST_HEADROOM)
        return PoolStats(total=used + free, free=free, used=used,
                         volumes=len(self.by_name))

    def check(self) -> list[str]:
        """Recount every reference from the trees and compare with the
        reference tables: ``[]`` when consistent, else one line per problem."""
        self.ready()
        return [f.message for f in recount(self)]

    def __repr__(self) -> str:
        return f"Pool({self.label!r}, {len(self.by_name)} volumes, {len(self.snaps)} snapshots)"

