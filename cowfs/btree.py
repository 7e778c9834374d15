"""The extent tree: a copy-on-write B+tree with reference-counted nodes.

Each volume (and, later, each snapshot) is a root.  Keys are volume block
numbers; leaf values are block pointers ``(data sector, checksum, stored
length)``.  Trees share nodes: a node's reference count (in the meta
:class:`~cowfs.spacemap.RefTable`) is the number of parents and roots that
point at it, and a data unit's count is the number of leaf pointers that touch
it.  This is the scheme of Rodeh's "B-trees, shadowing and clones" as used by
btrfs and dm-thin, and it is what makes snapshots O(1): a snapshot is one more
reference on a root.

Rules that keep it crash safe and sharing safe:

* A node is modified in place only while it is *dirty* (created since the last
  checkpoint, so no durable structure points at it) and its count is 1.
* A clean node with count 1 is *relocated* to a fresh unit before change; its
  old unit becomes PENDING and is reused only after the next checkpoint.
* A shared node (count > 1) is *shadowed*: copied, the copy takes a reference
  on every child (or data unit), and the original loses one reference.

Dirty nodes live in memory until :meth:`NodeStore.flush` writes them at
checkpoint time; clean nodes are read on demand through a bounded LRU cache.
"""

from __future__ import annotations

import errno
import logging
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from typing import Callable, Iterator, Protocol

from .errors import PoolError
from .format import BLOCK, INTERNAL_CAP, LEAF_CAP, NULL, Node
from .spacemap import RESERVED, RefTable

log = logging.getLogger(__name__)

KEY_END = 1 << 64           # upper bound of the key space


class DataRefs(Protocol):
    """How the tree takes and drops references on data units."""

    def take(self, sector: int, slen: int) -> None:
        """One more leaf pointer touches the units of this stored block."""

    def take_all(self, sectors: array, slens: array) -> None:
        """:meth:`take` for each pointer of a leaf (one that was copied)."""

    def drop(self, sector: int, slen: int) -> None:
        """One leaf pointer to this stored block went away."""

    def drop_all(self, sectors: array, slens: array, start: int, end: int) -> None:
        """:meth:`drop` for pointers ``start`` to ``end - 1`` of a leaf."""


class Entries:
    """Sorted leaf entries to install: parallel arrays keys/addrs/csums/slens."""

    __slots__ = ("keys", "addrs", "csums", "slens")

    def __init__(self, keys: array | None = None, addrs: array | None = None,
                 csums: array | None = None, slens: array | None = None) -> None:
        self.keys = keys if keys is not None else array("Q")
        self.addrs = addrs if addrs is not None else array("Q")
        self.csums = csums if csums is not None else array("Q")
        self.slens = slens if slens is not None else array("H")

    def __len__(self) -> int:
        return len(self.keys)

    def within(self, lo: int, hi: int) -> "Entries":
        """The entries with ``lo <= key < hi``."""
        a = bisect_left(self.keys, lo)
        b = bisect_left(self.keys, hi)
        if a == 0 and b == len(self.keys):
            return self
        return Entries(self.keys[a:b], self.addrs[a:b], self.csums[a:b], self.slens[a:b])


class NodeStore:
    """Meta-unit allocation, the dirty-node set and the clean-node cache."""

    def __init__(self, read_unit: Callable[[int], bytes], mrc: RefTable,
                 grow: Callable[[], None], label: str, cache_nodes: int = 8192) -> None:
        self._read_unit = read_unit
        self.mrc = mrc
        self._grow = grow
        self._label = label
        self.cache: OrderedDict[int, Node] = OrderedDict()
        self.dirty: dict[int, Node] = {}
        self.cache_nodes = cache_nodes

    def get(self, addr: int) -> Node:
        """The node at meta unit ``addr`` (read and verified if not in memory)."""
        node = self.dirty.get(addr)
        if node is not None:
            return node
        node = self.cache.get(addr)
        if node is not None:
            self.cache.move_to_end(addr)
            return node
        try:
            node = Node.decode(self._read_unit(addr), addr)
        except ValueError as e:
            log.error("pool %s: %s", self._label, e)
            raise PoolError(errno.EIO, f"pool {self._label}: {e}") from None
        self.cache[addr] = node
        if len(self.cache) > self.cache_nodes:
            self.cache.popitem(last=False)
        return node

    def alloc_unit(self) -> int:
        """A free meta unit, marked RESERVED (grows the meta file if needed)."""
        u = self.mrc.find_free(1)
        if u < 0:
            self._grow()
            u = self.mrc.find_free(1)
            if u < 0:
                raise PoolError(errno.ENOSPC, f"pool {self._label}: no free metadata space")
        self.mrc.set_marker(u, RESERVED)  # until incref'd
        return u

    def new_node(self, leaf: bool) -> Node:
        """A fresh dirty node holding one reference (its parent's)."""
        u = self.alloc_unit()
        self.mrc.incref(u)
        node = Node(u, leaf)
        self.dirty[u] = node
        return node

    def place(self, node: Node) -> None:
        """Give ``node`` (a detached copy) a fresh unit with one reference."""
        u = self.alloc_unit()
        self.mrc.incref(u)
        node.addr = u
        self.dirty[u] = node

    def forget(self, addr: int) -> None:
        """Drop a node whose last reference went away from memory."""
        self.dirty.pop(addr, None)
        self.cache.pop(addr, None)

    def flush(self, write_unit: Callable[[int, bytes], None], gen: int) -> int:
        """Write every dirty node (at checkpoint); they become clean.  Returns the count."""
        n = 0
        for addr in sorted(self.dirty):
            write_unit(addr, self.dirty[addr].encode(gen))
            n += 1
        for addr, node in self.dirty.items():
            self.cache[addr] = node
        self.dirty.clear()
        while len(self.cache) > self.cache_nodes:
            self.cache.popitem(last=False)
        return n


class Tree:
    """Operations on copy-on-write trees identified by their root unit."""

    def __init__(self, store: NodeStore, refs: DataRefs) -> None:
        self.store = store
        self.refs = refs
        self.delta = 0   # change of mapped-key count made by the last replace()

    # -- reading ---------------------------------------------------------------

    def find_leaf(self, root: int, key: int) -> tuple[Node, int]:
        """The leaf whose range holds ``key`` and the upper bound of that range
        (``KEY_END`` for the last leaf)."""
        node = self.store.get(root)
        ub = KEY_END
        while not node.leaf:
            keys = node.keys
            i = bisect_right(keys, key) - 1
            if i < 0:
                i = 0
            if i + 1 < len(keys):
                ub = keys[i + 1]
            node = self.store.get(node.children[i])
        return node, ub

    def leaf_spans(self, root: int, lba: int, n: int) -> Iterator[tuple[Node, int, int]]:
        """The leaves that map any of blocks ``lba .. lba+n-1``, in key order:
        ``(leaf, i, j)`` where entries ``i .. j-1`` of ``leaf`` are exactly
        its entries in that range (never empty; blocks in no span are holes)."""
        end = lba + n
        pos = lba
        while root and pos < end:
            leaf, ub = self.find_leaf(root, pos)
            keys = leaf.keys
            stop = end if end < ub else ub
            i = bisect_left(keys, pos)
            j = bisect_left(keys, stop, i)
            if i < j:
                yield leaf, i, j
            pos = stop

    def iter_nodes(self, root: int):
        """Yield ``(node, depth)`` for every node reachable from ``root``, each
        shared node once per path (callers dedupe if they need to)."""
        if not root:
            return
        stack = [(root, 0)]
        while stack:
            addr, depth = stack.pop()
            node = self.store.get(addr)
            yield node, depth
            if not node.leaf:
                stack.extend((c, depth + 1) for c in reversed(node.children))

    def count_keys(self, root: int) -> int:
        """Number of mapped blocks under ``root`` (reads the whole subtree)."""
        return sum(len(n.keys) for n, _ in self.iter_nodes(root) if n.leaf)

    # -- changing --------------------------------------------------------------

    def replace(self, root: int, lo: int, hi: int, ent: Entries) -> int:
        """Remove every key in ``[lo, hi)`` and insert ``ent`` (keys within it).

        The caller already holds the data references of ``ent``; the
        references of removed pointers are dropped.  Returns the new root and
        sets :attr:`delta` to the change in mapped blocks.
        """
        self.delta = 0
        if root == NULL:
            if not len(ent):
                return NULL
            leaf = self.store.new_node(True)
            leaf.keys, leaf.addrs, leaf.csums, leaf.slens = (
                array("Q", ent.keys), array("Q", ent.addrs), array("Q", ent.csums),
                array("H", ent.slens))
            self.delta = len(ent)
            parts = self._split(leaf, 0, tail=True)
        else:
            parts = self._replace(root, lo, hi, ent, 0, KEY_END)
        while len(parts) > 1:
            parts = self._pack(parts)
        if not parts:
            return NULL
        return self._collapse(parts[0][1])

    def set_one(self, root: int, key: int, sector: int, csum: int) -> int:
        """Map ``key`` to the raw block at data ``sector`` (one whole unit,
        RESERVED until now): take that unit's reference and replace the one
        entry.  (The usual 4 KiB write never gets here: ``cowfs._oneblock``
        does it in C when the path may change in place.)"""
        self.refs.take(sector, BLOCK)
        return self.replace(root, key, key + 1, Entries(
            array("Q", (key,)), array("Q", (sector,)), array("Q", (csum,)), array("H", (BLOCK,))))

    def own_path(self, root: int, key: int) -> int:
        """Make every node on the path from ``root`` to the leaf where ``key``
        belongs one this tree may change in place (a copy of a shared node, a
        move of one the last checkpoint points at), as :meth:`_replace` does
        on its way down; returns the root, new if it moved.  Nothing else
        changes: what ``cowfs._oneblock.write_block`` needs before it can edit
        the leaf in place."""
        node = self._writable(root)
        top = node.addr
        while not node.leaf:
            i = max(0, bisect_right(node.keys, key) - 1)
            child = self._writable(node.children[i])
            node.children[i] = child.addr
            node = child
        return top

    def drop(self, root: int) -> None:
        """Release one reference on a whole tree (volume delete)."""
        if root:
            self._drop_subtree(root)

    def _writable(self, addr: int) -> Node:
        """A node with the content of ``addr`` that this path may change."""
        store = self.store
        node = store.get(addr)
        count = store.mrc.count(addr)
        if count == 1:
            if addr in store.dirty:
                return node
            # Clean: the last checkpoint points here.  Move, don't overwrite.
            store.cache.pop(addr, None)
            store.mrc.decref(addr)
            store.place(node)
            return node
        copy = node.copy(0)
        store.place(copy)
        store.mrc.decref(addr)
        if node.leaf:
            self.refs.take_all(node.addrs, node.slens)
        else:
            for c in node.children:
                store.mrc.incref(c)
        return copy

    def _free(self, node: Node) -> None:
        """Free a writable node that became empty."""
        self.store.mrc.decref(node.addr)
        self.store.forget(node.addr)

    def _drop_subtree(self, addr: int) -> None:
        if self.store.mrc.decref(addr) > 0:
            return
        node = self.store.get(addr)
        self.store.forget(addr)
        if node.leaf:
            self.refs.drop_all(node.addrs, node.slens, 0, len(node.addrs))
        else:
            for c in node.children:
                self._drop_subtree(c)

    def _replace(self, addr: int, lo: int, hi: int, ent: Entries, lb: int,
                 ub: int) -> list[tuple[int, int]]:
        node = self._writable(addr)
        keys = node.keys
        if node.leaf:
            a = bisect_left(keys, lo)
            b = bisect_left(keys, hi)
            before = len(keys)
            if b > a:
                self.refs.drop_all(node.addrs, node.slens, a, b)
            self.delta += len(ent) - (b - a)
            keys[a:b] = ent.keys
            node.addrs[a:b] = ent.addrs
            node.csums[a:b] = ent.csums
            node.slens[a:b] = ent.slens
            if not keys:
                self._free(node)
                return []
            return self._split(node, lb, tail=(b == before))
        children = node.children
        i0 = max(0, bisect_right(keys, lo) - 1)
        i1 = max(0, bisect_right(keys, hi - 1) - 1)
        new: list[tuple[int, int]] = []
        for i in range(i0, i1 + 1):
            clb = lb if i == 0 else keys[i]
            cub = keys[i + 1] if i + 1 < len(keys) else ub
            sub = ent.within(max(lo, clb), min(hi, cub))
            if lo <= clb and cub <= hi and not len(sub):
                self.delta -= self.count_keys(children[i])
                self._drop_subtree(children[i])
                continue
            new.extend(self._replace(children[i], max(lo, clb), min(hi, cub), sub, clb, cub))
        if i0 == i1 and len(new) == 1:
            # One child replaced by one node (most small writes): no key
            # moves, and the node cannot have grown past its capacity.
            keys[i0] = lb if i0 == 0 else new[0][0]
            children[i0] = new[0][1]
            return [(lb, node.addr)]
        keys[i0:i1 + 1] = array("Q", [k for k, _ in new])
        children[i0:i1 + 1] = array("Q", [c for _, c in new])
        if not keys:
            self._free(node)
            return []
        if i0 == 0:
            keys[0] = lb
        return self._split(node, lb, tail=False)

    def _split(self, node: Node, lb: int, tail: bool) -> list[tuple[int, int]]:
        """Split an overfull node into nodes that fit; returns ``(low key, unit)`` parts."""
        n = len(node.keys)
        cap = LEAF_CAP if node.leaf else INTERNAL_CAP
        if n <= cap:
            return [(lb, node.addr)]
        if tail:
            # Appending (sequential writes): keep nodes full, not half full.
            bounds = list(range(0, n, cap)) + [n]
        else:
            parts = n // cap + 1
            bounds = [n * i // parts for i in range(parts + 1)]
        out = [(lb, node.addr)]
        for s, e in zip(bounds[1:-1], bounds[2:]):
            sib = self.store.new_node(node.leaf)
            sib.keys = node.keys[s:e]
            if node.leaf:
                sib.addrs = node.addrs[s:e]
                sib.csums = node.csums[s:e]
                sib.slens = node.slens[s:e]
            else:
                sib.children = node.children[s:e]
            out.append((sib.keys[0], sib.addr))
        first = bounds[1]
        del node.keys[first:]
        if node.leaf:
            del node.addrs[first:]
            del node.csums[first:]
            del node.slens[first:]
        else:
            del node.children[first:]
        return out

    def _pack(self, parts: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """One new internal level over ``parts``."""
        node = self.store.new_node(False)
        node.keys = array("Q", [k for k, _ in parts])
        node.children = array("Q", [c for _, c in parts])
        return self._split(node, parts[0][0], tail=False)

    def _collapse(self, root: int) -> int:
        """Remove internal roots with a single child that only this tree owns."""
        store = self.store
        while True:
            node = store.get(root)
            if node.leaf or len(node.children) != 1:
                return root
            if root not in store.dirty or store.mrc.count(root) != 1:
                return root
            child = node.children[0]
            store.mrc.decref(root)
            store.forget(root)
            root = child

