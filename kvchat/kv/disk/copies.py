"""The radix tree's disk side: which nodes have a copy on disk, their bytes under the disk budget,
and which copies to drop when the disk tier needs room. Torch-free; mixed into `tree.KVTree`, whose
lock, walk and unlink it uses. Writing and reading the files is `store.py`; which nodes go to disk
and when is `tier.py`.

A copy is "writing", then "stored". A node being written cannot leave memory (the writer still
reads its KV), so `writing_bytes` is memory that cannot be freed yet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from kvchat.kv.eviction import Verdict, Victims
from kvchat.kv.node import Node, disk_leaf, display_key
from kvchat.records import Eviction

P = TypeVar("P")


class DiskCopies(Generic[P]):
    """Disk-copy bookkeeping for `KVTree` (see there for the rules both tiers share)."""

    disk_budget_bytes: int
    disk_evictions: int
    on_forget: Callable[[str], None] | None
    _lock: threading.RLock
    _disk_bytes: int
    _writing_bytes: int
    _disk: Victims[Node[P]]

    @property
    def disk_bytes(self) -> int:
        """Bytes of disk copies, complete or being written."""
        return self._disk_bytes

    @property
    def writing_bytes(self) -> int:
        """Memory bytes of nodes being written to disk: they cannot leave memory until written."""
        return self._writing_bytes

    def make_disk_room(self, nbytes: int, keep: Sequence[Node[P]] = ()) -> list[Eviction] | None:
        """Drop disk copies of disk leaves, lowest priority first, until `nbytes` more fit the disk
        budget; None (dropping nothing) when they cannot. A node in memory keeps its KV there."""
        with self._lock:
            need = self._disk_bytes + nbytes - self.disk_budget_bytes
            if need <= 0:
                return []
            kept = {id(node) for node in keep}

            def verdict(node: Node[P], gone: set[int]) -> Verdict:
                if node.parent is None or node.disk != "stored" or id(node) in gone or not disk_leaf(node, gone):
                    return "never"  # offered again when the copies below it go
                return "not now" if id(node) in kept else "victim"

            chosen = self._choose(self._disk, need, verdict, self._stored_ancestor)
            if chosen is None:
                return None
            evicted: list[Eviction] = []
            for leaf in chosen:
                evicted.append(Eviction(display_key(leaf), leaf.nbytes, len(leaf.token_ids), tier="disk"))
                if leaf.in_memory:
                    self._drop_disk_copy(leaf)
                else:
                    self._unlink(leaf)
            self.disk_evictions += len(evicted)
            return evicted

    def insert_stored(
        self, scope: str, owner: str, parent: Node[P] | None, token_ids: Sequence[int], nbytes: int, key: str,
        created_s: float, last_used_s: float, hits: int,
    ) -> Node[P]:  # fmt: skip
        """Hang a node whose KV is only on disk (found there at start). The caller made disk room."""
        with self._lock:
            parent = self._parent_for(scope, parent)
            node = Node(tuple(token_ids), None, nbytes, owner, parent, hits=hits, created_s=created_s,
                        last_used_s=last_used_s, disk="stored", disk_key=key)  # fmt: skip
            self._attach(node)
            self._disk_bytes += nbytes
            return node

    def start_write(self, node: Node[P], key: str) -> bool:
        """Count a disk copy being written (after `make_disk_room` said it fits). False if the
        node left the tree meanwhile or already has a copy."""
        with self._lock:
            if node.parent is None or node.disk:
                return False
            node.disk, node.disk_key = "writing", key
            self._disk_bytes += node.nbytes
            self._writing_bytes += node.nbytes
            return True

    def write_done(self, node: Node[P], ok: bool) -> None:
        """The writer finished `node`'s copy (ok) or gave up (disk full, read-only...)."""
        with self._lock:
            if node.disk != "writing":
                return  # dropped or split meanwhile: its copy was already forgotten
            self._writing_bytes -= node.nbytes
            if ok:
                node.disk = "stored"
                self._disk.offer(node)
            else:
                self._disk_bytes -= node.nbytes
                node.disk, node.disk_key = "", ""
                self._offer_stored_ancestor(node)

    def _drop_disk_copy(self, node: Node[P]) -> None:
        self._disk_bytes -= node.nbytes
        if node.disk == "writing":
            self._writing_bytes -= node.nbytes
        key, node.disk, node.disk_key = node.disk_key, "", ""
        self._offer_stored_ancestor(node)
        if self.on_forget is not None:
            self.on_forget(key)

    def _offer_stored_ancestor(self, node: Node[P]) -> None:
        """A copy at or below `node` went: the nearest stored ancestor may now be a disk leaf."""
        if (ancestor := self._stored_ancestor(node)) is not None:
            self._disk.offer(ancestor)

    @staticmethod
    def _stored_ancestor(node: Node[P]) -> Node[P] | None:
        ancestor = node.parent
        while ancestor is not None and ancestor.parent is not None and ancestor.disk != "stored":
            ancestor = ancestor.parent
        return ancestor if ancestor is not None and ancestor.parent is not None else None

    # provided by KVTree
    def _parent_for(self, scope: str, parent: Node[P] | None) -> Node[P]: ...
    def _attach(self, node: Node[P]) -> None: ...
    def _unlink(self, node: Node[P]) -> None: ...
    def _choose(self, victims: Victims[Node[P]], need: int, verdict: Callable[[Node[P], set[int]], Verdict],
                above: Callable[[Node[P]], Node[P] | None]) -> list[Node[P]] | None: ...  # fmt: skip
