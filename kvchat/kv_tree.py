"""Which KV is cached, for whom, and what to evict: a radix tree over token ids, under one byte budget.

Why a tree rather than hashed blocks (vLLM): a chat's reuse is always "the longest cached prefix",
and conversations branch (edits, retries, many sessions under one system prompt). A tree answers
the longest-prefix question in one walk, stores every run of tokens once however many branches
use it, and makes "evict leaves first" natural: a parent is never dropped while a child needs it.
Blocks would also hash partial runs away (only full blocks are shareable) and need a gather or a
paged kernel to attend; a node here is one contiguous run, read in place.

Every node is an edge of token ids with an opaque payload (the KV, held by `kv_storage`) and its
real byte count. Matching compares token ids, never a hash alone. The tree is torch-free, so its
rules are testable without a model:
- nodes used by a running request are pinned and never evicted;
- eviction takes the least recently used unpinned leaf, again and again;
- room that cannot be made (pinned bytes and running reservations leave too little) evicts nothing;
- bytes of idle nodes plus bytes reserved by running requests never exceed the budget.

Scopes: one root per scope (model fingerprint + salt): nothing crosses a scope. Inside a scope a
node has an owner: `SHARED` (a system prompt, anyone's), `STATELESS` (turns of requests without a
session, shared among them) or a session id (that session's own turns, private). A request sees
only the owners it is allowed (`owners_for`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

P = TypeVar("P")

SHARED = ""  # system prompts: shared by every request in the scope
STATELESS = "\x00stateless"  # requests without a session: shared among themselves in the scope

NodeKind = Literal["prefix", "stateless", "session"]


def owners_for(session_id: str | None) -> tuple[str, ...]:
    """Whose nodes a request may read: system prompts, and its session's turns (or the stateless ones)."""
    return (SHARED, owner_of(session_id))


def owner_of(session_id: str | None) -> str:
    """Who owns the turns a request adds. Session ids are namespaced, so no session id can name
    the shared or the stateless owner."""
    return STATELESS if session_id is None else f"session:{session_id}"


@dataclass(eq=False, slots=True)
class Node(Generic[P]):
    token_ids: tuple[int, ...]  # this edge's ids (the path from the root spells the whole prefix)
    payload: P | None
    nbytes: int
    owner: str
    parent: Node[P] | None
    children: list[Node[P]] = field(default_factory=list)
    pins: int = 0  # running requests reading it
    hits: int = 0  # requests that reused it
    created_s: float = 0.0
    last_used_s: float = 0.0

    @property
    def kind(self) -> NodeKind:
        if self.owner == SHARED:
            return "prefix"
        return "stateless" if self.owner == STATELESS else "session"

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


@dataclass(frozen=True, slots=True)
class Eviction:
    key: str
    nbytes: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node, as the stats tab shows it."""

    kind: NodeKind
    key: str  # short stable id, never the session id
    num_tokens: int  # this node's own tokens
    depth_tokens: int  # tokens from the root to its end
    nbytes: int
    hits: int
    pinned: bool
    last_used_s: float
    sessions: int  # distinct sessions (and the stateless crowd) under it


class KVTree(Generic[P]):
    """The cached KV of every scope, idle or in use, under one budget. Thread-safe."""

    def __init__(
        self, budget_bytes: int, clock: Callable[[], float] = time.time
    ) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._roots: dict[str, Node[P]] = {}
        self._clock = clock
        self._lock = threading.RLock()
        self._node_bytes = 0
        self.running_bytes = 0  # reserved by running requests (their private buffers)
        self.evictions = 0
        self.refused = 0  # make_room calls that could not be satisfied

    # --- reading ---
    @property
    def node_bytes(self) -> int:
        return self._node_bytes

    @property
    def used_bytes(self) -> int:
        """Every byte held: idle and in-use nodes plus running reservations."""
        with self._lock:
            return self._node_bytes + self.running_bytes

    def match(self, scope: str, owners: Sequence[str], token_ids: Sequence[int], limit: int) -> Match[P]:
        """The longest run of nodes whose ids equal the first ids of `token_ids`, at most `limit`."""
        with self._lock:
            node, pos, nodes = self._roots.get(scope), 0, []
            while node is not None and pos < limit:
                child, common = _best_child(node, token_ids, pos, limit, owners)
                if child is None:
                    break
                if common < len(child.token_ids):
                    return Match(nodes, pos, child if common else None, common)
                nodes.append(child)
                pos += common
                node = child
            return Match(nodes, pos)

    def entries(self) -> list[NodeInfo]:
        """Every node, most recently used first."""
        with self._lock:
            infos = [_info(node, _sessions_under(node)) for node in self._walk()]
        return sorted(infos, key=lambda info: info.last_used_s, reverse=True)

    def has_owner(self, owner: str) -> bool:
        with self._lock:
            return any(node.owner == owner for node in self._walk())

    # --- changing ---
    def touch(self, nodes: Sequence[Node[P]]) -> None:
        """A request reused these nodes: count a hit and make them most recently used."""
        with self._lock:
            now = self._clock()
            for node in nodes:
                node.hits += 1
                node.last_used_s = now

    def pin(self, nodes: Sequence[Node[P]]) -> None:
        with self._lock:
            for node in nodes:
                node.pins += 1

    def unpin(self, nodes: Sequence[Node[P]]) -> None:
        with self._lock:
            for node in nodes:
                assert node.pins > 0, "unpin without pin"
                node.pins -= 1

    def make_room(self, nbytes: int, keep: Sequence[Node[P]] = ()) -> list[Eviction] | None:
        """Evict least recently used unpinned leaves until `nbytes` more fit the budget. Returns the
        evictions, or None (evicting nothing) when even evicting all it may would not make room.
        Nodes in `keep` are treated as pinned."""
        with self._lock:
            need = self._node_bytes + self.running_bytes + nbytes - self.budget_bytes
            if need <= 0:
                return []
            kept = {id(node) for node in keep}
            if self._evictable_bytes(kept) < need:
                self.refused += 1
                return None
            evicted: list[Eviction] = []
            while need > 0:
                leaf = min(
                    (n for n in self._walk() if not n.children and not n.pins and id(n) not in kept),
                    key=lambda n: n.last_used_s,
                )
                evicted.append(Eviction(_key(leaf), leaf.nbytes, len(leaf.token_ids)))
                need -= leaf.nbytes
                self._unlink(leaf)
            self.evictions += len(evicted)
            return evicted

    def reserve(self, nbytes: int) -> None:
        """Count a running request's private bytes (after `make_room` said they fit)."""
        with self._lock:
            self.running_bytes += nbytes
            assert self._node_bytes + self.running_bytes <= self.budget_bytes, "reserved past the budget"

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.running_bytes -= nbytes
            assert self.running_bytes >= 0

    def insert(
        self, scope: str, owner: str, parent: Node[P] | None, token_ids: Sequence[int], payload: P, nbytes: int
    ) -> Node[P]:
        """Hang a new node under `parent` (None: the scope's root). The caller made room for it.
        If an identical node exists (same owner and ids), that one is returned and `payload` is
        not kept: the run is stored once."""
        with self._lock:
            if parent is None:
                parent = self._roots.setdefault(scope, Node((), None, 0, SHARED, None))
            elif parent.parent is None:
                raise ValueError("cannot insert under a node that left the tree (pin it first)")
            for child in parent.children:
                if child.owner == owner and child.token_ids == tuple(token_ids):
                    return child
            now = self._clock()
            node = Node(tuple(token_ids), payload, nbytes, owner, parent, created_s=now, last_used_s=now)
            parent.children.append(node)
            self._node_bytes += nbytes
            assert self._node_bytes + self.running_bytes <= self.budget_bytes, "inserted past the budget"
            return node

    def split(self, node: Node[P], at: int, split_payload: Callable[[P], tuple[P, int, P, int]]) -> Node[P]:
        """Cut `node` after `at` of its tokens; returns the head (the tail keeps the children).
        `split_payload` returns (head, head bytes, tail, tail bytes); the caller made room for both."""
        with self._lock:
            assert 0 < at < len(node.token_ids) and node.parent is not None and node.payload is not None
            head_payload, head_bytes, tail_payload, tail_bytes = split_payload(node.payload)
            head = Node(node.token_ids[:at], head_payload, head_bytes, node.owner, node.parent,
                        [node], node.pins, node.hits, node.created_s, node.last_used_s)  # fmt: skip
            siblings = node.parent.children
            siblings[siblings.index(node)] = head
            self._node_bytes += head_bytes + tail_bytes - node.nbytes
            node.token_ids, node.payload, node.nbytes, node.parent = node.token_ids[at:], tail_payload, tail_bytes, head
            return head

    def remove(self, node: Node[P]) -> None:
        """Drop an unpinned leaf (its owner took or ended it); not an eviction."""
        with self._lock:
            assert not node.children and not node.pins, "remove takes unpinned leaves"
            self._unlink(node)

    def drop_owner(self, owner: str) -> int:
        """Remove an owner's unpinned nodes, deepest first (a session ended). Returns how many."""
        with self._lock:
            removed = 0
            for node in sorted(self._walk(), key=lambda n: n.depth_tokens, reverse=True):
                if node.owner == owner and not node.children and not node.pins:
                    self._unlink(node)
                    removed += 1
            return removed

    # --- inside ---
    def _walk(self) -> Iterator[Node[P]]:
        stack = [child for root in self._roots.values() for child in root.children]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children)

    def _evictable_bytes(self, kept: set[int]) -> int:
        """Bytes of nodes whose whole subtree is unpinned (leaf-first eviction can reach them)."""

        def free_below(node: Node[P]) -> tuple[bool, int]:
            free, total = not node.pins and id(node) not in kept, 0
            for child in node.children:
                child_free, child_bytes = free_below(child)
                free &= child_free
                total += child_bytes
            return free, total + (node.nbytes if free else 0)

        return sum(free_below(child)[1] for root in self._roots.values() for child in root.children)

    def _unlink(self, node: Node[P]) -> None:
        assert node.parent is not None
        node.parent.children.remove(node)
        self._node_bytes -= node.nbytes
        node.payload, node.parent = None, None


def _best_child(node: Node[P], token_ids: Sequence[int], pos: int, limit: int, owners: Sequence[str]) -> tuple[Node[P] | None, int]:
    """The visible child sharing the most ids with `token_ids[pos:limit]`, and how many."""
    best, best_len = None, 0
    for child in node.children:
        if child.owner in owners and child.token_ids[0] == token_ids[pos]:
            common = _common_len(child.token_ids, token_ids, pos, limit)
            if common > best_len:
                best, best_len = child, common
    return best, best_len


def _common_len(edge: tuple[int, ...], token_ids: Sequence[int], start: int, limit: int) -> int:
    n = min(len(edge), limit - start)
    for i in range(n):
        if edge[i] != token_ids[start + i]:
            return i
    return n


def _key(node: Node[P]) -> str:
    """A short stable id for display and logs: never a session id."""
    return f"{node.kind}:{id(node) & 0xFFFFFF:06x}"


def _sessions_under(node: Node[P]) -> int:
    owners, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current.owner != SHARED:
            owners.add(current.owner)
        stack.extend(current.children)
    return len(owners)


def _info(node: Node[P], sessions: int) -> NodeInfo:
    return NodeInfo(
        kind=node.kind, key=_key(node), num_tokens=len(node.token_ids), depth_tokens=node.depth_tokens,
        nbytes=node.nbytes, hits=node.hits, pinned=node.pins > 0, last_used_s=node.last_used_s,
        sessions=sessions,
    )  # fmt: skip
