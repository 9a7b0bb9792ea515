"""Which KV is cached, for whom, and what to evict: a radix tree over token ids, under one byte budget.

Why a tree rather than hashed blocks (vLLM): a chat's reuse is always "the longest cached prefix",
and conversations branch (edits, retries, many sessions under one system prompt). A tree answers
the longest-prefix question in one walk, stores every run of tokens once however many branches
use it, and makes "evict leaves first" natural: a parent is never dropped while a child needs it.
Blocks would also hash partial runs away (only full blocks are shareable) and need a gather or a
paged kernel to attend; a node here is one contiguous run, read in place.

Every node is an edge of token ids with an opaque payload (the KV, a `runs.KVRun`) and its real
byte count. Matching compares token ids, never a hash alone. The tree is torch-free, so its rules
are testable without a model:
- nodes used by a running request are pinned and never evicted;
- eviction takes the unpinned leaf the policy ranks lowest (`eviction.py`; LRU by default), again
  and again, chosen through a heap (`eviction.Victims`) without a walk of the tree: an admission
  that evicts k runs costs O(k log n), and one that cannot fit costs a pass over what may go;
- room that cannot be made (pinned bytes and running reservations leave too little) evicts nothing;
- bytes of idle nodes plus bytes reserved by running requests never exceed the budget; every byte
  count is a running sum, kept as nodes come and go.

Two tiers. A node may also have a copy on disk (`disk`: "writing", then "stored"), counted under
the disk budget. Memory eviction demotes a stored node (its payload goes, the node stays, matchable)
instead of dropping it; a demoted node is promoted back when a request needs it. Memory nodes
always form the top of the tree (a node in memory has its parent in memory); the disk tier evicts
its own leaves under its own budget with the same policy. A node still being written is not
demoted (its bytes are still needed by the writer), so the memory count stays true.

One root per scope, and an owner per node (`scope.py`): a match sees only the owners it is given.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from kvchat.kv.disk.copies import DiskCopies
from kvchat.kv.eviction import Policy, Verdict, Victims, lru
from kvchat.kv.node import Match, Node, best_child, display_key, info, movable
from kvchat.kv.scope import SHARED
from kvchat.records import Eviction, NodeInfo

P = TypeVar("P")


class KVTree(DiskCopies[P]):
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
        self._writing_bytes = 0
        self._owners: Counter[str] = Counter()  # nodes per owner
        self._memory = Victims[Node[P]](policy)
        self._disk = Victims[Node[P]](policy)
        self.running_bytes = 0  # reserved by running requests (their private buffers)
        self.evictions = 0  # left memory (dropped or demoted)
        self.demotions = 0  # of those, kept on disk
        self.disk_evictions = 0
        self.refused = 0  # make_room calls that could not be satisfied
        self.inflation = 0.0  # GreedyDual's clock: the first priority of the last victim

    # --- reading ---
    @property
    def node_bytes(self) -> int:
        return self._node_bytes

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
                child, common = best_child(node, token_ids, pos, limit, owners)
                if child is None:
                    break
                if common < len(child.token_ids):
                    return Match(nodes, pos, child if common else None, common)
                nodes.append(child)
                pos += common
                node = child
            return Match(nodes, pos)

    def entries(self) -> list[NodeInfo]:
        """Every node, most recently used first (ties in walk order). Sessions under a node are
        counted in one pass, children before parents."""
        with self._lock:
            walked = list(self._walk())
            owners: dict[int, set[str]] = {id(node): set() for node in walked}
            for node in sorted(walked, key=lambda n: n.depth_tokens, reverse=True):
                if node.owner != SHARED:
                    owners[id(node)].add(node.owner)
                if id(node.parent) in owners:
                    owners[id(node.parent)] |= owners[id(node)]
            infos = [info(node, len(owners[id(node)])) for node in walked]
        return sorted(infos, key=lambda entry: entry.last_used_s, reverse=True)

    def nodes(self) -> list[Node[P]]:
        """Every node, parents before children."""
        with self._lock:
            return sorted(self._walk(), key=lambda node: node.depth_tokens)

    def has_owner(self, owner: str) -> bool:
        with self._lock:
            return self._owners[owner] > 0

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
                self._offer(node)

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

            def verdict(node: Node[P], gone: set[int]) -> Verdict:
                if node.parent is None or not node.in_memory or id(node) in gone:
                    return "never"
                if any(child.in_memory and id(child) not in gone for child in node.children):
                    return "never"  # offered again when its last child in memory goes
                return "victim" if movable(node, kept) else "not now"

            chosen = self._choose(self._memory, need, verdict, lambda node: node.parent)
            if chosen is None:
                self.refused += 1
                return None
            evicted = [self._evict_from_memory(node) for node in chosen]
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
            self._attach(node)
            self._node_bytes += nbytes
            assert self._node_bytes + self.running_bytes <= self.budget_bytes, "inserted past the budget"
            return node

    def promote(self, node: Node[P], payload: P) -> None:
        """A node only on disk is back in memory (the caller made room)."""
        with self._lock:
            assert not node.in_memory and node.parent is not None
            assert node.parent.parent is None or node.parent.in_memory, "promote parents first"
            node.payload = payload
            self._node_bytes += node.nbytes
            self._memory.offer(node)
            assert self._node_bytes + self.running_bytes <= self.budget_bytes, "promoted past the budget"

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
            self._owners[head.owner] += 1
            self._node_bytes += head_bytes + tail_bytes - node.nbytes
            node.token_ids, node.payload, node.nbytes, node.parent = node.token_ids[at:], tail_payload, tail_bytes, head
            self._offer(head)
            self._offer(node)
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

    def _attach(self, node: Node[P]) -> None:
        assert node.parent is not None
        node.parent.children.append(node)
        self._owners[node.owner] += 1
        self._offer(node)

    def _offer(self, node: Node[P]) -> None:
        """`node`'s priority (or its chance to be a leaf) may have changed: both tiers hear of it."""
        if node.in_memory:
            self._memory.offer(node)
        if node.disk == "stored":
            self._disk.offer(node)

    def _choose(self, victims: Victims[Node[P]], need: int, verdict: Callable[[Node[P], set[int]], Verdict],
                above: Callable[[Node[P]], Node[P] | None]) -> list[Node[P]] | None:  # fmt: skip
        """Victims, lowest priority first, until their bytes cover `need`, evicting nothing yet:
        each one chosen may make the node `above` it a leaf, which is offered and may be chosen
        next (leaves first, as if evicted one by one). None, with every offer back, when all that
        may go does not cover `need`. The last victim's first priority becomes the inflation clock.
        O(log n) per node passed, so an admission that evicts k runs costs O(k log n)."""
        chosen: list[Node[P]] = []
        gone: set[int] = set()
        while need > 0:
            victim = victims.lowest(lambda node: verdict(node, gone))
            if victim is None:
                for node in chosen:
                    victims.offer(node)
                return None
            chosen.append(victim)
            gone.add(id(victim))
            need -= victim.nbytes
            if (parent := above(victim)) is not None and parent.parent is not None:
                victims.offer(parent)
        for node in chosen:
            self.inflation = max(self.inflation, self.policy(node)[0])
        return chosen

    def _evict_from_memory(self, node: Node[P]) -> Eviction:
        if node.disk == "stored":
            node.payload = None
            self._node_bytes -= node.nbytes
            self.demotions += 1
            self._offer_parent(node)
            return Eviction(display_key(node), node.nbytes, len(node.token_ids), demoted=True)
        eviction = Eviction(display_key(node), node.nbytes, len(node.token_ids))
        self._unlink(node)
        return eviction

    def _offer_parent(self, node: Node[P]) -> None:
        """`node` left memory: its parent may now be a memory leaf. (A disk copy's going is
        `_offer_stored_ancestor`'s: the nearest stored ancestor, which need not be the parent.)"""
        parent = node.parent
        if parent is not None and parent.parent is not None and parent.in_memory:
            self._memory.offer(parent)

    def _walk(self) -> Iterator[Node[P]]:
        stack = [child for root in self._roots.values() for child in root.children]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children)

    def _unlink(self, node: Node[P]) -> None:
        """Take `node` and its subtree out of the tree, forgetting their disk copies."""
        assert node.parent is not None
        node.parent.children.remove(node)
        self._offer_parent(node)
        self._offer_stored_ancestor(node)  # copies below it go too
        stack = [node]
        while stack:
            current = stack.pop()
            stack.extend(current.children)
            if current.in_memory:
                self._node_bytes -= current.nbytes
            if current.disk:
                self._drop_disk_copy(current)
            self._owners[current.owner] -= 1
            self._memory.forget(current)
            self._disk.forget(current)
            current.payload, current.parent = None, None


