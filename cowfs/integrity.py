"""Integrity: the reference recount, offline fsck and the online scrubber.

* :func:`recount` walks every tree once and compares what it finds with the
  reference tables: leaked units (counted but unreferenced), under-counted
  units (referenced more often than counted: a later free would release a
  block still in use), pointers outside the data file, keys past a volume's
  end, wrong mapped-block counts.  ``Pool.check()`` is this recount.
* :func:`fsck` opens a pool that is not mounted, replays its journal in memory
  without writing, verifies every tree node and every stored block against its
  checksum, runs the recount and :func:`check_lineage`, and with ``repair`` rewrites the counts (leaks
  and miscounts are the problems it can fix safely; lost data it can only
  name).
* :class:`Scrubber` verifies every live block of every volume and snapshot of
  a *mounted* pool in small steps, so the daemon can interleave it with
  requests.  Each step starts again from the dataset's current root, so a
  scrub never follows a node address that a concurrent write has retired.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .blockio import Storage
from .btree import KEY_END
from .dataset import validate_name
from .errors import PoolError
from .format import BLOCK, SECTOR, checksum, units_of
from .spacemap import MAX_DIRECT, OVERFLOW, PAGE_SHIFT, RESERVED, SYSTEM

if TYPE_CHECKING:
    from .format import Node
    from .pool import Pool

log = logging.getLogger(__name__)


@dataclass
class Finding:
    """One problem found by fsck, the recount or a scrub."""

    kind: str             # bad-block, bad-node, refcount, leak, pointer, size, count, lineage
    object: str           # 'vm1.img', 'vm1.img@snap', 'data unit 12', ...
    offset: int | None    # byte offset in the volume or snapshot, for bad blocks
    message: str
    fixed: bool = False


@dataclass
class FsckReport:
    """What :func:`fsck` checked and found."""

    findings: list[Finding] = field(default_factory=list)
    nodes_checked: int = 0
    blocks_checked: int = 0
    datasets: int = 0

    def exit_code(self) -> int:
        """e2fsck style: 0 clean, 1 every problem fixed, 4 problems left."""
        if not self.findings:
            return 0
        return 1 if all(f.fixed for f in self.findings) else 4

    def to_json(self) -> dict:
        return {"clean": not self.findings, "exit_code": self.exit_code(),
                "nodes_checked": self.nodes_checked, "blocks_checked": self.blocks_checked,
                "datasets": self.datasets, "findings": [asdict(f) for f in self.findings]}


def _count_references(pool: "Pool", found: list[Finding]) -> tuple[dict[int, int], dict[int, int]]:
    """References every tree holds on meta units and on data units, each
    shared node counted once; damaged nodes and wild pointers go to ``found``."""
    exp_m: dict[int, int] = {}
    exp_d: dict[int, int] = {}
    seen: set[int] = set()
    data_units = len(pool.drc)
    for v in pool.datasets.values():
        if v.root:
            exp_m[v.root] = exp_m.get(v.root, 0) + 1
        stack = [v.root] if v.root else []
        while stack:
            addr = stack.pop()
            if addr in seen:
                continue
            seen.add(addr)
            try:
                node = pool.store.get(addr)
            except PoolError as e:
                found.append(Finding("bad-node", v.label, None, str(e)))
                continue
            if list(node.keys) != sorted(node.keys):
                found.append(Finding("bad-node", v.label, None,
                                     f"tree node {addr} of {v.label}: keys out of order"))
            if node.leaf:
                for s, sl in zip(node.addrs, node.slens):
                    for u in units_of(s, sl):
                        if u >= data_units:
                            found.append(Finding("pointer", v.label, None,
                                                 f"tree node {addr} of {v.label} points past "
                                                 f"the end of the data file (unit {u})"))
                        exp_d[u] = exp_d.get(u, 0) + 1
            else:
                for c in node.children:
                    exp_m[c] = exp_m.get(c, 0) + 1
                    stack.append(c)
    return exp_m, exp_d


def recount(pool: "Pool") -> list[Finding]:
    """Recount every reference from the trees and compare with the tables."""
    found: list[Finding] = []
    exp_m, exp_d = _count_references(pool, found)
    for v in pool.datasets.values():
        try:
            mapped = pool.tree.count_keys(v.root)
            if mapped != v.mapped:
                found.append(Finding("count", v.label, None,
                                     f"{v.label}: {v.mapped} blocks counted, {mapped} mapped"))
            if v.root:
                limit = -(-v.size // BLOCK)
                for node, _ in pool.tree.iter_nodes(v.root):
                    if node.leaf and len(node.keys) and node.keys[-1] >= limit:
                        found.append(Finding("size", v.label, node.keys[-1] * BLOCK,
                                             f"{v.label}: block {node.keys[-1]} is mapped past "
                                             f"its size {v.size}"))
        except PoolError:
            pass    # the damaged node is already reported
    for what, table, exp in (("meta", pool.mrc, exp_m), ("data", pool.drc, exp_d)):
        for u in range(len(table)):
            have = table.count(u)
            want = exp.get(u, 0)
            if have > want:
                found.append(Finding("leak", f"{what} unit {u}", None,
                                     f"{what} unit {u} has reference count {have} but "
                                     f"{want} references (space leaked)"))
            elif have < want:
                found.append(Finding("refcount", f"{what} unit {u}", None,
                                     f"{what} unit {u} has reference count {have} but "
                                     f"{want} references (would be freed while in use)"))
            elif want and table.rc[u] in (RESERVED, SYSTEM):
                found.append(Finding("refcount", f"{what} unit {u}", None,
                                     f"{what} unit {u} is referenced but marked {table.rc[u]}"))
    return found


def check_lineage(pool: "Pool") -> list[Finding]:
    """Check what ties volumes, snapshots and clones together: valid and
    unique names, ids below the next id to be given, every snapshot naming
    the volume it was taken of, every clone's record of its source well
    formed.  (A snapshot may outlive its volume and a clone its source: those
    are not problems.)"""
    found: list[Finding] = []

    def bad(label: str, why: str) -> None:
        found.append(Finding("lineage", label, None, f"{label}: {why}"))

    if len(pool.datasets) != len(pool.by_name) + len(pool.snaps):
        bad(f"pool {pool.label}", "two volumes or two snapshots of one volume share a name")
    for v in pool.datasets.values():
        if v.id >= pool.next_id:
            bad(v.label, f"id {v.id} is not below the next id to give, {pool.next_id}")
        try:
            if v.is_snapshot:
                validate_name(v.owner or "")
                validate_name(v.name, "snapshot")
            else:
                validate_name(v.name)
        except PoolError as e:
            bad(v.label, f"bad name: {e}")
        if v.origin is None:
            continue
        source, created = v.origin.get("source"), v.origin.get("created")
        try:
            if not isinstance(source, str) or not isinstance(created, int):
                raise PoolError(0, f"source {source!r}, created {created!r}")
            vol, _, snap = source.partition("@")
            validate_name(vol)
            if snap:
                validate_name(snap, "snapshot")
        except PoolError as e:
            bad(v.label, f"its record of the volume or snapshot it was cloned from is "
                f"damaged: {e}")
    return found


def _fix_counts(pool: "Pool") -> None:
    """Set every reference count and mapped-block count to what the trees say."""
    exp_m, exp_d = _count_references(pool, [])
    for v in pool.datasets.values():
        v.mapped = pool.tree.count_keys(v.root)
    for table, exp in ((pool.mrc, exp_m), (pool.drc, exp_d)):
        for u in range(len(table)):
            if table.rc[u] in (SYSTEM, RESERVED):
                continue
            want = exp.get(u, 0)
            if table.count(u) != want:
                table.overflow.pop(u, None)
                if want > MAX_DIRECT:
                    table.rc[u] = OVERFLOW
                    table.overflow[u] = want
                else:
                    table.rc[u] = want
                table.dirty_pages.add(u >> PAGE_SHIFT)
        table.recount_free()


class Scrubber:
    """Verify every live block of every volume and snapshot, a few at a time.

    :meth:`step` may be called between requests; shared leaves are read once
    per scrub and their bad blocks reported for every dataset that shares them.
    """

    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self._ids = sorted(pool.datasets)
        self._i = 0
        self._pos = 0
        self._leaf_bad: dict[int, tuple[int, ...]] = {}
        self._reloads = pool.reloads
        self._reported: set[tuple[str, int | None]] = set()
        self.blocks_total = sum(pool.datasets[i].mapped for i in self._ids)
        self.blocks_done = 0       # blocks covered, per dataset (progress)
        self.blocks_read = 0       # distinct blocks read and verified
        self.bad: list[Finding] = []
        self.started_ns = time.time_ns()
        self.finished_ns: int | None = None
        self.cancelled = False

    @property
    def finished(self) -> bool:
        return self.finished_ns is not None

    def step(self, max_blocks: int) -> bool:
        """Verify up to about ``max_blocks`` more block pointers; True when done."""
        budget = max_blocks
        pool = self.pool
        pool.ready()
        if pool.reloads != self._reloads:
            # Leaf addresses seen before a reload may hold other leaves now.
            self._reloads = pool.reloads
            self._leaf_bad.clear()
        while budget > 0 and self._i < len(self._ids):
            ds = pool.datasets.get(self._ids[self._i])
            if ds is None or not ds.root:
                self._next_dataset()
                continue
            try:
                leaf, ub = pool.tree.find_leaf(ds.root, self._pos)
            except PoolError as e:
                self._report(Finding("bad-node", ds.label, self._pos * BLOCK,
                                     f"{ds.label}: metadata unreadable from offset "
                                     f"{self._pos * BLOCK}: {e}"))
                self._next_dataset()
                continue
            bad = self._leaf_bad.get(leaf.addr)
            if bad is None:
                bad = self._verify_leaf(leaf)
                self._leaf_bad[leaf.addr] = bad
                budget -= max(1, len(leaf.keys))
            # Progress counts every dataset's blocks, shared ones included,
            # so that it ends at blocks_total; shared leaves are read once.
            self.blocks_done += len(leaf.keys)
            for key in bad:
                self._report(Finding("bad-block", ds.label, key * BLOCK,
                                     f"{ds.label}: checksum mismatch at offset {key * BLOCK}"))
            if ub >= KEY_END:
                self._next_dataset()
            else:
                self._pos = ub
        if self._i >= len(self._ids) and self.finished_ns is None:
            self.finished_ns = time.time_ns()
        return self.finished

    def cancel(self) -> None:
        """Stop early; the report says so."""
        self.cancelled = True
        if self.finished_ns is None:
            self.finished_ns = time.time_ns()
        self._i = len(self._ids)

    def _next_dataset(self) -> None:
        self._i += 1
        self._pos = 0

    def _verify_leaf(self, leaf: "Node") -> tuple[int, ...]:
        pool = self.pool
        bad = []
        for k, a, c, s in zip(leaf.keys, leaf.addrs, leaf.csums, leaf.slens):
            try:
                raw = pool.data.pread(s, a * SECTOR)
                ok = checksum(raw) == c
            except OSError:
                pool.io_errors += 1
                ok = False
            self.blocks_read += 1
            if not ok:
                bad.append(k)
        if bad:
            pool.checksum_errors += len(bad)
        return tuple(bad)

    def _report(self, f: Finding) -> None:
        key = (f.object, f.offset)
        if key in self._reported:
            return
        self._reported.add(key)
        self.bad.append(f)
        log.error("pool %s: scrub: %s", self.pool.label, f.message)

    def to_json(self) -> dict:
        state = ("cancelled" if self.cancelled else "finished" if self.finished
                 else "running")
        return {"state": state, "started_ns": self.started_ns, "finished_ns": self.finished_ns,
                "blocks_checked": self.blocks_done, "blocks_total": self.blocks_total,
                "blocks_read": self.blocks_read,
                "bad_blocks": [asdict(f) for f in self.bad]}


def fsck(storage: Storage, repair: bool = False) -> FsckReport:
    """Check a pool that is not mounted; with ``repair`` fix what is safe.

    Raises FormatError if the pool cannot be opened at all and PoolError for
    operational errors (EBUSY: it is mounted; ENOENT: no such directory).
    """
    from .pool import Pool   # the pool module imports this one

    pool = Pool.open(storage, readonly=not repair)
    report = FsckReport(datasets=len(pool.datasets))
    try:
        scrub = Scrubber(pool)
        while not scrub.step(4096):
            pass
        report.blocks_checked = scrub.blocks_read
        report.findings.extend(scrub.bad)
        report.nodes_checked = len(scrub._leaf_bad)
        problems = recount(pool)
        report.findings.extend(problems)
        report.findings.extend(check_lineage(pool))
        if repair and problems:
            fixable = [f for f in problems if f.kind in ("leak", "refcount", "count")]
            if fixable and not any(f.kind in ("bad-node", "pointer") for f in problems):
                _fix_counts(pool)
                pool.checkpoint()
                for f in fixable:
                    f.fixed = True
                log.info("pool %s: fsck repaired %d reference counts", pool.label,
                         len(fixable))
    finally:
        pool.close()
    return report


