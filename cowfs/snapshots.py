"""Snapshots, restore and clones: each one journal record, O(1) in data size.

A snapshot is one more reference on the volume's root node; a clone is a new
volume whose root is a snapshot's (or a live volume's) root with one more
reference; a restore points the volume at the snapshot's root and keeps the
root it replaces as an ``undo-<UTC time>`` snapshot.  Nothing is copied: the
first write to a shared node copies that node alone (see :mod:`cowfs.btree`).
Groups of these (several volumes at one instant) are one record, so after a
crash a group is either wholly there or not at all.

:class:`SnapshotOps` is mixed into :class:`cowfs.pool.Pool`; it uses the
pool's dataset tables, tree and journal.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .dataset import Dataset, SnapshotInfo, VolumeInfo, validate_name
from .errors import PoolError
from .format import BLOCK, units_of
from .journal import R_SNAPOP

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger(__name__)


def undo_name_for(now_ns: int) -> str:
    """Name of the snapshot that keeps what a restore at ``now_ns`` replaced."""
    return "undo-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now_ns / 1e9))


class SnapshotOps:
    """Snapshot, restore and clone operations of a pool."""

    # -- looking ------------------------------------------------------------------

    def snapshots(self: "Pool", volume: str | None = None) -> list[SnapshotInfo]:
        """Snapshots of ``volume`` (every snapshot if None), oldest first."""
        self.ready()
        found = [s for (owner, _), s in self.snaps.items() if volume is None or owner == volume]
        return [s.snap_info() for s in sorted(found, key=lambda s: (s.owner, s.mtime, s.id))]

    def snapshot_owners(self: "Pool") -> list[str]:
        """Volume names that have snapshots, including deleted volumes'."""
        self.ready()
        return sorted({owner for owner, _ in self.snaps})

    def snapshot_lookup(self: "Pool", volume: str, name: str) -> SnapshotInfo:
        """The snapshot ``volume@name`` (ENOENT if none)."""
        return self._snap(volume, name).snap_info()

    def snapshot_get(self: "Pool", snap_id: int) -> SnapshotInfo:
        """The snapshot with id ``snap_id`` (ENOENT if deleted or not a snapshot)."""
        s = self._dataset(snap_id)
        if not s.is_snapshot:
            raise PoolError(errno.ENOENT, f"{s.label} is a volume, not a snapshot")
        return s.snap_info()

    def is_snapshot(self: "Pool", ds_id: int) -> bool:
        """Whether id ``ds_id`` names a snapshot (False for volumes; ENOENT if neither)."""
        return self._dataset(ds_id).is_snapshot

    def _snap(self: "Pool", volume: str, name: str) -> Dataset:
        self.ready()
        s = self.snaps.get((volume, name))
        if s is None:
            raise PoolError(errno.ENOENT, f"no snapshot {volume}@{name} in pool {self.label}")
        return s

    def _volume_named(self: "Pool", name: str) -> Dataset:
        v = self.by_name.get(name)
        if v is None:
            raise PoolError(errno.ENOENT, f"no volume named {name!r} in pool {self.label}")
        return v

    def space(self: "Pool", ds_id: int) -> tuple[int, int]:
        """``(referenced, exclusive)`` bytes of a volume or snapshot, both
        counted in (uncompressed) 4 KiB blocks: the blocks its tree maps, and
        those no other volume or snapshot shares, which deleting it frees.
        Reads the dataset's unshared metadata."""
        v = self._dataset(ds_id)
        return v.mapped * BLOCK, self._exclusive_blocks(v.root) * BLOCK

    def _exclusive_blocks(self: "Pool", root: int) -> int:
        if not root or self.mrc.count(root) != 1:
            return 0
        # Pointers reachable only through unshared nodes, and how many of
        # them touch each data unit (compressed blocks share units).
        pointers: list[tuple[int, int]] = []
        touching: dict[int, int] = {}
        stack = [root]
        while stack:
            node = self.store.get(stack.pop())
            if node.leaf:
                for a, sl in zip(node.addrs, node.slens):
                    pointers.append((a, sl))
                    for u in units_of(a, sl):
                        touching[u] = touching.get(u, 0) + 1
            else:
                stack.extend(c for c in node.children if self.mrc.count(c) == 1)
        count = self.drc.count
        return sum(1 for a, sl in pointers
                   if all(count(u) == touching[u] for u in units_of(a, sl)))

    # -- changing -------------------------------------------------------------------

    def snapshot(self: "Pool", volumes: Sequence[str] | None, name: str, *,
                 dry_run: bool = False) -> list[SnapshotInfo]:
        """Snapshot ``volumes`` (all volumes if None or empty) as ``name``, all
        at one instant.  Refuses before any change if a volume is unknown
        (ENOENT), already has a snapshot of that name (EEXIST), or the name or
        the list is bad (EINVAL)."""
        self._writable()
        validate_name(name, "snapshot")
        targets = self._distinct_volumes(volumes, "snapshot")
        for v in targets:
            if (v.name, name) in self.snaps:
                raise PoolError(errno.EEXIST, f"volume {v.name!r} already has a snapshot "
                                f"named {name!r}")
        if dry_run:
            return [SnapshotInfo(0, v.name, name, v.size, v.mode, v.uid, v.gid,
                                 time.time_ns(), v.mapped * BLOCK) for v in targets]
        self._ensure_meta_reserve()
        items = []
        for v in targets:
            items.append([v.id, self.next_id + len(items)])
        self._snapop({"op": "snapshot", "time": time.time_ns(), "name": name, "items": items})
        log.info("pool %s: snapshot %s of %s", self.label, name,
                 ", ".join(v.name for v in targets))
        return [self.datasets[sid].snap_info() for _, sid in items]

    def delete_snapshot(self: "Pool", snap_id: int) -> None:
        """Delete a snapshot, freeing the blocks only it referenced."""
        s = self._snapshot_by_id(snap_id)
        self._snapop({"op": "delete", "id": snap_id})
        log.info("pool %s: deleted snapshot %s", self.label, s.label)

    def rename_snapshot(self: "Pool", snap_id: int, new_name: str) -> None:
        """Rename a snapshot within its volume (EEXIST if the name is taken)."""
        s = self._snapshot_by_id(snap_id)
        validate_name(new_name, "snapshot")
        if new_name == s.name:
            return
        if (s.owner, new_name) in self.snaps:
            raise PoolError(errno.EEXIST, f"volume {s.owner!r} already has a snapshot named "
                            f"{new_name!r}")
        self._snapop({"op": "rename", "id": snap_id, "name": new_name})

    def restore(self: "Pool", name: str, volumes: Sequence[str] | None = None, *,
                dry_run: bool = False) -> list[dict]:
        """Point each volume (every existing volume that has snapshot ``name``
        if None) at its snapshot ``name``, all at one instant.  What each
        volume held is kept as a snapshot ``undo-<UTC time>``.  Returns the
        plan: ``[{"volume", "snapshot", "undo", "size"}]``."""
        self._writable()
        validate_name(name, "snapshot")
        if volumes:
            targets = self._distinct_volumes(volumes, "restore")
            for v in targets:
                self._snap(v.name, name)
        else:
            targets = [self.by_name[o] for (o, n) in sorted(self.snaps)
                       if n == name and o in self.by_name]
            if not targets:
                raise PoolError(errno.ENOENT, f"no volume has a snapshot named {name!r}")
        now = time.time_ns()
        undo = undo_name_for(now)
        plan = []
        for v in targets:
            u, k = undo, 1
            while (v.name, u) in self.snaps:
                k += 1
                u = f"{undo}-{k}"
            plan.append({"volume": v.name, "snapshot": name, "undo": u,
                         "size": self.snaps[(v.name, name)].size})
        if dry_run:
            return plan
        self._ensure_meta_reserve()
        items = [[v.id, self.snaps[(v.name, name)].id, self.next_id + i, p["undo"]]
                 for i, (v, p) in enumerate(zip(targets, plan))]
        self._snapop({"op": "restore", "time": now, "items": items})
        log.info("pool %s: restored %s to snapshot %s", self.label,
                 ", ".join(v.name for v in targets), name)
        return plan

    def clone(self: "Pool", items: Sequence[tuple[str, str | None, str]], *,
              dry_run: bool = False) -> list[VolumeInfo]:
        """Create writable volumes sharing every block with their sources, all
        at one instant.  Each item is ``(volume, snapshot or None for the live
        volume, new volume name)``."""
        self._writable()
        if not items:
            raise PoolError(errno.EINVAL, "clone: nothing to clone")
        sources = []
        new_names: set[str] = set()
        for vol, snap, new in items:
            validate_name(new)
            if new in self.by_name or new in new_names:
                raise PoolError(errno.EEXIST, f"clone: volume {new!r} already exists")
            new_names.add(new)
            sources.append(self._snap(vol, snap) if snap is not None
                           else self._volume_named(vol))
        if dry_run:
            return [VolumeInfo(0, new, src.size, src.mode, src.uid, src.gid, 0, 0, 0,
                               src.mapped * BLOCK, {"source": src.label})
                    for src, (_, _, new) in zip(sources, items)]
        self._ensure_meta_reserve()
        now = time.time_ns()
        recs = [[self.next_id + i, src.id, new, src.label]
                for i, (src, (_, _, new)) in enumerate(zip(sources, items))]
        self._snapop({"op": "clone", "time": now, "items": recs})
        log.info("pool %s: cloned %s", self.label,
                 ", ".join(f"{src} -> {new}" for _, _, new, src in recs))
        return [self.datasets[r[0]].info() for r in recs]

    def _distinct_volumes(self: "Pool", volumes: Sequence[str] | None,
                          what: str) -> list[Dataset]:
        if not volumes:
            if not self.by_name:
                raise PoolError(errno.ENOENT, f"{what}: pool {self.label} has no volumes")
            return [self.by_name[n] for n in sorted(self.by_name)]
        if len(set(volumes)) != len(volumes):
            raise PoolError(errno.EINVAL, f"{what}: a volume is named twice")
        return [self._volume_named(n) for n in volumes]

    def _snapshot_by_id(self: "Pool", snap_id: int) -> Dataset:
        s = self._dataset(snap_id)
        if not s.is_snapshot:
            raise PoolError(errno.EINVAL, f"{s.label} is a volume, not a snapshot")
        return s

    def _snapop(self: "Pool", op: dict) -> None:
        self._writable()
        mark = self.journal.mark()
        with self._mutation():
            self._apply_snapop(op)
            self._log(R_SNAPOP, json.dumps(op, separators=(",", ":")).encode())
        # Snapshot, restore and clone are durable when they return: an
        # operator who took a snapshot before an upgrade must be able to
        # count on it, whoever forgets to fsync.  If the commit fails the
        # change cannot be taken back in memory: its record is dropped and
        # the next request reloads the durable state, without it.
        try:
            self.sync()
        except PoolError as e:
            if self.degraded is None:
                self.journal.rewind(mark)
                self._lose_memory(e)
            raise PoolError(e.errno, f"pool {self.label}: {op['op']} could not be committed, "
                            f"nothing changed: {e}") from None

    # -- changes, shared with journal replay ------------------------------------------

    def _apply_snapop(self: "Pool", op: dict) -> None:
        kind = op["op"]
        if kind == "snapshot":
            for vol_id, snap_id in op["items"]:
                v = self._known(vol_id)
                s = Dataset(snap_id, op["name"], v.size, v.mode, v.uid, v.gid, op["time"],
                            owner=v.name)
                self._share(s, v)
                self._add(s)
        elif kind == "delete":
            s = self._known(op["id"])
            self.tree.drop(s.root)
            self._remove(s)
        elif kind == "rename":
            s = self._known(op["id"])
            self._remove(s)
            s.name = op["name"]
            self._add(s)
        elif kind == "restore":
            for vol_id, snap_id, undo_id, undo_name in op["items"]:
                v, s = self._known(vol_id), self._known(snap_id)
                u = Dataset(undo_id, undo_name, v.size, v.mode, v.uid, v.gid, op["time"],
                            owner=v.name)
                # The undo snapshot takes over the volume's reference on its root.
                u.root, u.mapped = v.root, v.mapped
                self._add(u)
                self._share(v, s)
                v.size = s.size
                v.mtime = v.ctime = op["time"]
        elif kind == "clone":
            for new_id, src_id, name, source in op["items"]:
                src = self._known(src_id)
                c = Dataset(new_id, name, src.size, src.mode, src.uid, src.gid, op["time"])
                self._share(c, src)
                c.origin = {"source": source, "created": op["time"]}
                self._add(c)
        else:
            raise ValueError(f"unknown snapshot operation {kind!r}")

    def _share(self: "Pool", dst: Dataset, src: Dataset) -> None:
        """Make ``dst`` map exactly what ``src`` maps: one more reference on its root."""
        dst.root, dst.mapped = src.root, src.mapped
        if src.root:
            self.mrc.incref(src.root)
