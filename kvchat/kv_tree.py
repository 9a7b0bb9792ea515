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
- eviction takes the unpinned leaf the policy ranks lowest (`eviction.py`; LRU by default), again
  and again;
- room that cannot be made (pinned bytes and running reservations leave too little) evicts nothing;
- bytes of idle nodes plus bytes reserved by running requests never exceed the budget.

Two tiers. A node may also have a copy on disk (`disk`: "writing", then "stored"), counted under
the disk budget. Memory eviction demotes a stored node (its payload goes, the node stays, matchable)
instead of dropping it; a demoted node is promoted back when a request needs it. Memory nodes
always form the top of the tree (a node in memory has its parent in memory); the disk tier evicts
its own leaves under its own budget with the same policy. A node still being written is not
demoted (its bytes are still needed by the writer), so the memory count stays true.

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

import xxhash

from kvchat.eviction import Policy, gdsf, lru

P = TypeVar("P")

SHARED = ""  # system prompts: shared by every request in the scope
STATELESS = "\x00stateless"  # requests without a session: shared among themselves in the scope

NodeKind = Literal["prefix", "stateless", "session"]
DiskState = Literal["", "writing", "stored"]
Tier = Literal["memory", "disk"]


def owners_for(session_id: str | None) -> tuple[str, ...]:
    """Whose nodes a request may read: system prompts, and its session's turns (or the stateless ones)."""
    return (SHARED, owner_of(session_id))


def owner_of(session_id: str | None) -> str:
    """Who owns the turns a request adds. Session ids are hashed and namespaced: no session id can
    name the shared or the stateless owner, and none is ever held or written to disk in clear."""
    if session_id is None:
        return STATELESS
    return "session:" + xxhash.xxh3_128_hexdigest(session_id.encode("utf-8"))


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
    disk: DiskState = ""  # a copy on disk: being written, or complete
    disk_key: str = ""

    @property
    def in_memory(self) -> bool:
        return self.payload is not None

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

    @property
    def on_disk_only(self) -> list[Node[P]]:
        """Matched nodes whose KV is only on disk (to promote before use), root first."""
        nodes = [*self.nodes, *([self.partial] if self.partial is not None else [])]
        return [node for node in nodes if not node.in_memory]


@dataclass(frozen=True, slots=True)
class Eviction:
    key: str
    nbytes: int
    num_tokens: int
    tier: Tier = "memory"  # which tier it left
    demoted: bool = False  # left memory for its copy on disk (still cached)


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
    tier: Tier  # where its KV is now (memory may also have a copy on disk)
    on_disk: bool  # a complete copy is on disk
    parent_key: str = ""  # "" at the top of its scope
    created_s: float = 0.0
    preset: bool = False  # a warm preset pinned for good (set by the engine, which pinned it)


class KVTree(Generic[P]):
    """The cached KV of every scope, idle or in use, under one memory budget and one disk budget.
    Thread-safe.

    `on_forget(key)` is called (under the tree's lock: it must not block) whenever a node's disk
    copy stops being wanted: the node was dropped, split, or the disk tier evicted it."""

    def __init__(
        self,
        budget_bytes: int,
        clock: Callable[[], float] = time.time,
        policy: Policy = lru,
        disk_budget_bytes: int = 0,
        on_forget: Callable[[str], None] | None = None,
    ) -> None:
        if budget_bytes < 0 or disk_budget_bytes < 0:
            raise ValueError("budgets must be >= 0")
        self.budget_bytes = budget_bytes
        self.disk_budget_bytes = disk_budget_bytes
        self.policy = policy
        self.on_forget = on_forget
        self._roots: dict[str, Node[P]] = {}
        self._clock = clock
        self._lock = threading.RLock()
        self._node_bytes = 0
        self._disk_bytes = 0
        self.running_bytes = 0  # reserved by running requests (their private buffers)
        self.evictions = 0  # left memory (dropped or demoted)
        self.demotions = 0  # of those, kept on disk
        self.disk_evictions = 0
        self.refused = 0  # make_room calls that could not be satisfied
        self.inflation = 0.0  # GDSF's clock: the priority of the last victim

    # --- reading ---
    @property
    def node_bytes(self) -> int:
        return self._node_bytes

    @property
    def disk_bytes(self) -> int:
        """Bytes of disk copies, complete or being written."""
        return self._disk_bytes

    @property
    def writing_bytes(self) -> int:
        """Memory bytes of nodes being written to disk: they cannot leave memory until written."""
        with self._lock:
            return sum(node.nbytes for node in self._walk() if node.disk == "writing")

    @property
    def used_bytes(self) -> int:
        """Every byte held in memory: idle and in-use nodes plus running reservations."""
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

    def nodes(self) -> list[Node[P]]:
        """Every node, parents before children."""
        with self._lock:
            return sorted(self._walk(), key=lambda node: node.depth_tokens)

    def has_owner(self, owner: str) -> bool:
        with self._lock:
            return any(node.owner == owner for node in self._walk())

    def path_ids(self, node: Node[P]) -> list[int]:
        """Every token id from the root to the end of `node`."""
        with self._lock:
            parts = []
            while node is not None and node.token_ids:
                parts.append(node.token_ids)
                node = node.parent
            return [token for part in reversed(parts) for token in part]

    def scope_of(self, node: Node[P]) -> str:
        with self._lock:
            while node.parent is not None:
                node = node.parent
            return next((scope for scope, root in self._roots.items() if root is node), "")

    # --- changing ---
    def touch(self, nodes: Sequence[Node[P]]) -> None:
        """A request reused these nodes: count a hit and make them most recently used."""
        with self._lock:
            now = self._clock()
            for node in nodes:
                node.hits += 1
                node.prev_used_s, node.last_used_s = node.last_used_s, now
                node.credit = self.inflation

    def pin(self, nodes: Sequence[Node[P]]) -> None:
        with self._lock:
            for node in nodes:
                assert node.in_memory, "pin a node in memory (promote it first)"
                node.pins += 1

    def unpin(self, nodes: Sequence[Node[P]]) -> None:
        with self._lock:
            for node in nodes:
                assert node.pins > 0, "unpin without pin"
                node.pins -= 1

    def make_room(self, nbytes: int, keep: Sequence[Node[P]] = ()) -> list[Eviction] | None:
        """Evict unpinned memory leaves, lowest priority first, until `nbytes` more fit the budget.
        A node with a copy on disk is demoted (stays matchable); others are dropped. Returns the
        evictions, or None (evicting nothing) when even evicting all it may would not make room.
        Nodes in `keep` are treated as pinned."""
        with self._lock:
            need = self._node_bytes + self.running_bytes + nbytes - self.budget_bytes
            if need <= 0:
                return []
            kept = {id(node) for node in keep}
            evictable = self._reachable_bytes(lambda n: not n.in_memory or _movable(n, kept), lambda n: n.in_memory)
            if evictable < need:
                self.refused += 1
                return None
            evicted: list[Eviction] = []
            while need > 0:
                leaf = self._lowest(n for n in self._walk() if _memory_leaf(n) and _movable(n, kept))
                need -= leaf.nbytes
                evicted.append(self._evict_from_memory(leaf))
            self.evictions += len(evicted)
            return evicted

    def make_disk_room(self, nbytes: int, keep: Sequence[Node[P]] = ()) -> list[Eviction] | None:
        """Drop disk copies of disk leaves, lowest priority first, until `nbytes` more fit the disk
        budget; None (dropping nothing) when they cannot. A node in memory keeps its KV there."""
        with self._lock:
            need = self._disk_bytes + nbytes - self.disk_budget_bytes
            if need <= 0:
                return []
            kept = {id(node) for node in keep}
            droppable = self._reachable_bytes(lambda n: id(n) not in kept and n.disk != "writing",
                                              lambda n: n.disk == "stored")  # fmt: skip
            if droppable < need:
                return None
            evicted: list[Eviction] = []
            while need > 0:
                leaf = self._lowest(n for n in self._walk() if n.disk == "stored" and _disk_leaf(n)
                                    and id(n) not in kept)  # fmt: skip
                need -= leaf.nbytes
                evicted.append(Eviction(node_key(leaf), leaf.nbytes, len(leaf.token_ids), tier="disk"))
                if leaf.in_memory:
                    self._drop_disk_copy(leaf)
                else:
                    self._unlink(leaf)
            self.disk_evictions += len(evicted)
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
        not kept: the run is stored once (and a copy only on disk is promoted with it)."""
        with self._lock:
            parent = self._parent_for(scope, parent)
            for child in parent.children:
                if child.owner == owner and child.token_ids == tuple(token_ids):
                    if not child.in_memory:
                        self.promote(child, payload)
                    return child
            now = self._clock()
            node = Node(tuple(token_ids), payload, nbytes, owner, parent, created_s=now, last_used_s=now,
                        credit=self.inflation)  # fmt: skip
            parent.children.append(node)
            self._node_bytes += nbytes
            assert self._node_bytes + self.running_bytes <= self.budget_bytes, "inserted past the budget"
            return node

    def insert_stored(
        self, scope: str, owner: str, parent: Node[P] | None, token_ids: Sequence[int], nbytes: int, key: str,
        created_s: float, last_used_s: float, hits: int,
    ) -> Node[P]:  # fmt: skip
        """Hang a node whose KV is only on disk (found there at start). The caller made disk room."""
        with self._lock:
            parent = self._parent_for(scope, parent)
            node = Node(tuple(token_ids), None, nbytes, owner, parent, hits=hits, created_s=created_s,
                        last_used_s=last_used_s, disk="stored", disk_key=key)  # fmt: skip
            parent.children.append(node)
            self._disk_bytes += nbytes
            return node

    def promote(self, node: Node[P], payload: P) -> None:
        """A node only on disk is back in memory (the caller made room)."""
        with self._lock:
            assert not node.in_memory and node.parent is not None
            assert node.parent.parent is None or node.parent.in_memory, "promote parents first"
            node.payload = payload
            self._node_bytes += node.nbytes
            assert self._node_bytes + self.running_bytes <= self.budget_bytes, "promoted past the budget"

    def start_write(self, node: Node[P], key: str) -> bool:
        """Count a disk copy being written (after `make_disk_room` said it fits). False if the
        node left the tree meanwhile or already has a copy."""
        with self._lock:
            if node.parent is None or node.disk:
                return False
            node.disk, node.disk_key = "writing", key
            self._disk_bytes += node.nbytes
            return True

    def write_done(self, node: Node[P], ok: bool) -> None:
        """The writer finished `node`'s copy (ok) or gave up (disk full, read-only...)."""
        with self._lock:
            if node.disk != "writing":
                return  # dropped or split meanwhile: its copy was already forgotten
            if ok:
                node.disk = "stored"
            else:
                self._disk_bytes -= node.nbytes
                node.disk, node.disk_key = "", ""

    def forget(self, node: Node[P]) -> None:
        """Drop a node and everything under it (its disk copy proved unreadable); unpinned only."""
        with self._lock:
            if node.parent is not None:
                self._unlink(node)

    def split(self, node: Node[P], at: int, split_payload: Callable[[P], tuple[P, int, P, int]]) -> Node[P]:
        """Cut `node` after `at` of its tokens; returns the head (the tail keeps the children).
        `split_payload` returns (head, head bytes, tail, tail bytes); the caller made room for both.
        A disk copy of the whole no longer matches either half: it is forgotten."""
        with self._lock:
            assert 0 < at < len(node.token_ids) and node.parent is not None and node.payload is not None
            if node.disk:
                self._drop_disk_copy(node)
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
        return self._drop_where(lambda node: node.owner == owner)

    def drop_idle(self, idle_s: float) -> int:
        """Remove conversations' own turns (not system prompts) unused for `idle_s` seconds."""
        cutoff = self._clock() - idle_s
        return self._drop_where(lambda node: node.owner != SHARED and node.last_used_s < cutoff)

    def clear(self) -> int:
        """Remove every node that no request uses and no pin keeps, from both tiers."""
        return self._drop_where(lambda node: True)

    # --- inside ---
    def _drop_where(self, wanted: Callable[[Node[P]], bool]) -> int:
        with self._lock:
            removed = 0
            for node in sorted(self._walk(), key=lambda n: n.depth_tokens, reverse=True):
                if not node.children and not node.pins and wanted(node):
                    self._unlink(node)
                    removed += 1
            return removed

    def _parent_for(self, scope: str, parent: Node[P] | None) -> Node[P]:
        if parent is None:
            return self._roots.setdefault(scope, Node((), None, 0, SHARED, None))
        if parent.parent is None:
            raise ValueError("cannot insert under a node that left the tree (pin it first)")
        return parent

    def _lowest(self, candidates: Iterator[Node[P]]) -> Node[P]:
        """The candidate the policy ranks lowest; its value becomes the inflation clock."""
        victim = min(candidates, key=self.policy)
        if self.policy is gdsf:
            self.inflation = max(self.inflation, gdsf(victim)[0])
        return victim

    def _evict_from_memory(self, node: Node[P]) -> Eviction:
        if node.disk == "stored":
            node.payload = None
            self._node_bytes -= node.nbytes
            self.demotions += 1
            return Eviction(node_key(node), node.nbytes, len(node.token_ids), demoted=True)
        eviction = Eviction(node_key(node), node.nbytes, len(node.token_ids))
        self._unlink(node)
        return eviction

    def _walk(self) -> Iterator[Node[P]]:
        stack = [child for root in self._roots.values() for child in root.children]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children)

    def _reachable_bytes(self, may_go: Callable[[Node[P]], bool], counted: Callable[[Node[P]], bool]) -> int:
        """Bytes leaf-first eviction can reach: of `counted` nodes that may go and have nothing
        below them that may not (a parent never goes before its children)."""

        def free_below(node: Node[P]) -> tuple[bool, int]:
            free, total = may_go(node), 0
            for child in node.children:
                child_free, child_bytes = free_below(child)
                free &= child_free
                total += child_bytes
            return free, total + (node.nbytes if free and counted(node) else 0)

        return sum(free_below(child)[1] for root in self._roots.values() for child in root.children)

    def _drop_disk_copy(self, node: Node[P]) -> None:
        self._disk_bytes -= node.nbytes
        key, node.disk, node.disk_key = node.disk_key, "", ""
        if self.on_forget is not None:
            self.on_forget(key)

    def _unlink(self, node: Node[P]) -> None:
        """Take `node` and its subtree out of the tree, forgetting their disk copies."""
        assert node.parent is not None
        node.parent.children.remove(node)
        stack = [node]
        while stack:
            current = stack.pop()
            stack.extend(current.children)
            if current.in_memory:
                self._node_bytes -= current.nbytes
            if current.disk:
                self._drop_disk_copy(current)
            current.payload, current.parent = None, None


def _memory_leaf(node: Node) -> bool:
    return node.in_memory and not any(child.in_memory for child in node.children)


def _disk_leaf(node: Node) -> bool:
    """No node below has a disk copy (a parent's copy outlives its children's)."""
    stack = list(node.children)
    while stack:
        current = stack.pop()
        if current.disk:
            return False
        stack.extend(current.children)
    return True


def _movable(node: Node, kept: set[int]) -> bool:
    """May leave memory now: no request uses it, and it is not being written to disk."""
    return not node.pins and id(node) not in kept and node.disk != "writing"


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


def node_key(node: Node[P]) -> str:
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
        kind=node.kind, key=node_key(node), num_tokens=len(node.token_ids), depth_tokens=node.depth_tokens,
        nbytes=node.nbytes, hits=node.hits, pinned=node.pins > 0, last_used_s=node.last_used_s,
        sessions=sessions, tier="memory" if node.in_memory else "disk", on_disk=node.disk == "stored",
        parent_key=node_key(node.parent) if node.parent is not None and node.parent.token_ids else "",
        created_s=node.created_s,
    )  # fmt: skip
