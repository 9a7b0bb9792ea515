"""A node of the radix tree (`tree.py`): one run of token ids, its KV payload and its bookkeeping,
and what a match found. Torch-free."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kvchat.kv.scope import kind_of
from kvchat.records import NodeInfo, NodeKind

P = TypeVar("P")

DiskState = str  # "" (no copy), "writing", "stored"


@dataclass(eq=False, slots=True)
class Node(Generic[P]):
    token_ids: tuple[int, ...]  # this edge's ids (the path from the root spells the whole prefix)
    payload: P | None
    nbytes: int
    owner: str
    parent: Node[P] | None
    children: list[Node[P]] = field(default_factory=list)
    pins: int = 0  # running requests reading it (and permanent pins: warm presets)
    hits: int = 0  # requests that reused it
    created_s: float = 0.0
    last_used_s: float = 0.0
    prev_used_s: float = float("-inf")  # the use before the last (for LRU-2)
    credit: float = 0.0  # the tree's inflation clock at its last use (for GDSF)
    disk: DiskState = ""  # a copy on disk: "writing", then "stored"
    disk_key: str = ""

    @property
    def in_memory(self) -> bool:
        return self.payload is not None

    @property
    def kind(self) -> NodeKind:
        return kind_of(self.owner)

    @property
    def depth_tokens(self) -> int:
        """Tokens from the root to the end of this node."""
        node, total = self, 0
        while node is not None:
            total += len(node.token_ids)
            node = node.parent
        return total


@dataclass(frozen=True, slots=True)
class Match(Generic[P]):
    nodes: list[Node[P]]  # whole nodes matched, root first
    num_tokens: int  # tokens they cover
    partial: Node[P] | None = None  # the next node, of which only `partial_tokens` matched
    partial_tokens: int = 0

    @property
    def on_disk_only(self) -> list[Node[P]]:
        """Matched nodes whose KV is only on disk (to promote before use), root first."""
        nodes = [*self.nodes, *([self.partial] if self.partial is not None else [])]
        return [node for node in nodes if not node.in_memory]


def disk_leaf(node: Node, gone: set[int] = frozenset()) -> bool:  # type: ignore[assignment]
    """No node below has a disk copy (a parent's copy outlives its children's), not counting the
    nodes in `gone` (chosen to go)."""
    stack = list(node.children)
    while stack:
        current = stack.pop()
        if current.disk and id(current) not in gone:
            return False
        stack.extend(current.children)
    return True


def movable(node: Node, kept: set[int]) -> bool:
    """May leave memory now: no request uses it, and it is not being written to disk."""
    return not node.pins and id(node) not in kept and node.disk != "writing"


def best_child(node: Node[P], token_ids: Sequence[int], pos: int, limit: int, owners: Sequence[str]) -> tuple[Node[P] | None, int]:
    """The visible child sharing the most ids with `token_ids[pos:limit]`, and how many."""
    best, best_len = None, 0
    for child in node.children:
        if child.owner in owners and child.token_ids[0] == token_ids[pos]:
            common = common_len(child.token_ids, token_ids, pos, limit)
            if common > best_len:
                best, best_len = child, common
    return best, best_len


def common_len(edge: tuple[int, ...], token_ids: Sequence[int], start: int, limit: int) -> int:
    n = min(len(edge), limit - start)
    for i in range(n):
        if edge[i] != token_ids[start + i]:
            return i
    return n


def display_key(node: Node[P]) -> str:
    """A short id for display and logs, stable while the node lives: never a session id."""
    return f"{node.kind}:{id(node) & 0xFFFFFF:06x}"


def info(node: Node[P], sessions: int) -> NodeInfo:
    return NodeInfo(
        kind=node.kind, key=display_key(node), num_tokens=len(node.token_ids), depth_tokens=node.depth_tokens,
        nbytes=node.nbytes, hits=node.hits, pinned=node.pins > 0, last_used_s=node.last_used_s,
        sessions=sessions, tier="memory" if node.in_memory else "disk", on_disk=node.disk == "stored",
        parent_key=display_key(node.parent) if node.parent is not None and node.parent.token_ids else "",
        created_s=node.created_s,
    )  # fmt: skip
