"""The tree's lower tier: which nodes go to disk (shared system prompts always; a conversation's own
turns only with `persist_sessions`), write-through as a node is made, loading a node back when a
request needs it, and hanging what the disk holds in the tree at start. The files are `store.py`.
"""

from __future__ import annotations

import torch

from kvchat.kv.disk.store import DiskStore, StoredRun, file_key
from kvchat.kv.node import Node
from kvchat.kv.runs import KVRun
from kvchat.kv.scope import SHARED
from kvchat.kv.tree import KVTree


class DiskTier:
    """The tree's lower tier: writes nodes through to the store, loads them back, restores at start."""

    def __init__(self, store: DiskStore, tree: KVTree[KVRun], device: torch.device, dtype: torch.dtype,
                 persist_sessions: bool = False) -> None:  # fmt: skip
        self.store = store
        self.tree = tree
        self.device = device
        self.dtype = dtype
        self.persist_sessions = persist_sessions
        self.reads = self.read_tokens = 0
        tree.on_forget = store.delete

    def wants(self, node: Node[KVRun]) -> bool:
        """System prompts always; a conversation's own turns only when the operator opted in."""
        return node.owner == SHARED or self.persist_sessions

    def persist(self, node: Node[KVRun]) -> None:
        """Write `node` through to disk in the background, if it belongs there and fits."""
        if not self.wants(node) or node.disk or not node.in_memory:
            return
        ancestors = []
        parent = node.parent
        while parent is not None and parent.parent is not None:
            ancestors.append(parent)
            parent = parent.parent
        if self.tree.make_disk_room(node.nbytes, keep=[node, *ancestors]) is None:
            return
        scope = self.tree.scope_of(node)
        key = file_key(scope, node.owner, self.tree.path_ids(node))
        parent_key = node.parent.disk_key if node.parent is not None else ""
        if not self.tree.start_write(node, key):
            return
        record = StoredRun(key, parent_key, scope, node.owner, node.token_ids, node.nbytes, 0, node.created_s,
                           node.last_used_s, node.hits)  # fmt: skip
        self.store.write(record, node.payload, lambda ok: self.tree.write_done(node, ok))  # type: ignore[arg-type]

    def load(self, node: Node[KVRun]) -> KVRun | None:
        """`node`'s KV from disk, verified, or None (the node is then dropped from the tree)."""
        run = self.store.read(node.disk_key, node.token_ids, self.device, self.dtype)
        if run is None:
            self.tree.forget(node)
            return None
        self.reads += 1
        self.read_tokens += len(node.token_ids)
        return run

    def restore(self) -> int:
        """Hang every complete file under its parent as a node on disk only; returns how many."""
        nodes: dict[str, Node[KVRun]] = {}
        for record in self.store.records():
            parent = nodes.get(record.parent_key) if record.parent_key else None
            if (record.parent_key and parent is None) or self.tree.make_disk_room(record.nbytes) is None:
                self.store.delete(record.key)
                continue
            nodes[record.key] = self.tree.insert_stored(
                record.scope, record.owner, parent, record.token_ids, record.nbytes, record.key,
                record.created_s, record.last_used_s, record.hits,
            )  # fmt: skip
        return len(nodes)

    def close(self) -> None:
        """Record every stored node's last use, finish writing, release the directory."""
        uses = [(n.disk_key, n.last_used_s, n.hits) for n in self.tree.nodes() if n.disk == "stored"]
        self.store.touch(uses)
        self.store.close()
