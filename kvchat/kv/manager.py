"""The seam between the step loop and the KV: admit, feed, publish, commit, free.

The scheduler (`scheduler.py`) owns the loop and knows nothing of the tree; it asks this manager
once per request to `admit` it, tells it after every forward which ids were `fed`, and at the end
`commit`s what the request computed and `free`s what it held. Everything about reuse and room
happens here, in one place:

- admission: find the longest cached prefix the request may read (`tree.py`, `scope.py`), read
  back what of it is only on disk (`disk/`), cut a shared run it branches from, and decide what it
  builds on, what of its own turns it moves into its buffer, whether short shared runs are copied
  in (`inline`), and the buffers to reserve under the budget, evicting idle leaves;
- a system prompt nobody has cached yet is prefilled alone into an exact-size buffer and published
  as a shared node the moment it is complete, so requests behind it reuse it;
- at the end, the request's new turns become one exact-size node of the tree, and its pins and
  reservation are released.

Shared runs are read in place (cascade attention, see `attention.py`) when they are long. When all a
request reads by reference is shorter than `CASCADE_MIN_TOKENS`, it copies them to the front of its
own buffer instead: a few MiB at most, and its attention is then one plain call, which is faster
for a lone request (scripts/cascade.py measures both ways; vLLM has the same threshold). On the
compatible path (a model the cascade cannot reproduce, see `probe.py`) every request copies them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvchat.kv.attention import Row
from kvchat.kv.disk.store import DiskStore, DiskUnavailable
from kvchat.kv.disk.tier import DiskTier
from kvchat.kv.node import Match, Node
from kvchat.kv.runs import KVRun, RowBuffer
from kvchat.kv.scope import SHARED, owner_of, owners_for, source_of
from kvchat.kv.tree import KVTree
from kvchat.records import Eviction, Usage

log = logging.getLogger(__name__)

CASCADE_MIN_TOKENS = 256  # shared runs shorter than this are copied into the request's buffer


@dataclass(eq=False)
class Allocation:
    """One request's KV, from arrival to the end: what it needs, what it was given, what it reused.
    Reuse is written into `usage` (cached, disk and source), as the usage log reports it."""

    scope: str
    owner: str  # who owns the turns it adds (`scope.owner_of`)
    token_ids: list[int]  # the prompt
    prefix_len: int  # leading ids that are a shareable system prompt
    max_new_tokens: int
    usage: Usage
    prefix_only: bool = False  # a warm-up: compute (or read back) the system prompt only
    # set when admitted
    nodes: list[Node[KVRun]] = field(default_factory=list)  # cached runs it builds on (pinned)
    inline: bool = False  # `nodes` are copied to the front of `buffer` instead of read in place
    inline_tokens: int = 0  # how many leading buffer positions are that copy
    buffer: RowBuffer | None = None  # private KV: uncached prompt tail, then the reply
    buffer_ids: list[int] = field(default_factory=list)  # ids whose KV `buffer` holds
    publish: RowBuffer | None = None  # an uncached system prompt, published when complete
    reserved_bytes: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV existed at admission
    evictions: list[Eviction] = field(default_factory=list)  # what making room for it evicted

    @property
    def publishing(self) -> bool:
        return self.publish is not None

    @property
    def publish_room_tokens(self) -> int:
        """Positions left in the system prompt's own buffer (its chunks end where it does)."""
        assert self.publish is not None
        return self.publish.capacity_tokens - self.publish.num_tokens

    def row(self, token_ids: list[int]) -> Row:
        """Its part of the next forward: the runs it reads in place, the buffer written, the ids fed."""
        if self.publish is not None:
            return Row([node.payload for node in self.nodes], self.publish, token_ids)  # type: ignore[misc]
        assert self.buffer is not None
        runs = [] if self.inline else [node.payload for node in self.nodes]
        return Row(runs, self.buffer, token_ids)  # type: ignore[misc]


@dataclass(slots=True)
class _Layout:
    """Where an admitted request's KV comes from and goes: what `_plan` decided."""

    nodes: list[Node[KVRun]]  # whole cached runs it builds on (pinned while it runs)
    detached: list[tuple[Node[KVRun], int]]  # its own private runs (and how much of each) to move in
    publish_tokens: int  # an uncached system prompt's length, computed into its own buffer
    buffer_tokens: int  # its private buffer's capacity
    inline: bool  # `nodes` are copied to the front of the buffer
    evicted: list[Eviction]  # what making room for it evicted

    @property
    def held_tokens(self) -> int:
        return sum(len(node.token_ids) for node in self.nodes)


class KVManager:
    """All cached KV of one engine: the tree (both tiers' bookkeeping), the disk tier if any, and
    the running requests' buffers, under one budget. Called from the scheduler's thread only
    (other threads go through `Scheduler.call`)."""

    def __init__(
        self,
        tree: KVTree[KVRun],
        new_buffer: Callable[[int], RowBuffer],
        bytes_per_token: int,
        context_tokens: int,
        reads_runs_in_place: bool,
    ) -> None:
        self.tree = tree
        self.new_buffer = new_buffer
        self.bytes_per_token = bytes_per_token
        self.context_tokens = context_tokens
        self.reads_runs_in_place = reads_runs_in_place
        self.disk: DiskTier | None = None
        self.disk_note: str | None = None  # why there is no disk tier

    def open_disk(self, directory: Path, fingerprint: str, layers: int, budget_bytes: int,
                  persist_sessions: bool, device: torch.device, dtype: torch.dtype) -> int:  # fmt: skip
        """Open the disk tier and hang what it holds in the tree; returns how many runs it found.
        Without it (unwritable, in use by another process) the reason is kept and serving goes on."""
        try:
            store = DiskStore(directory, fingerprint, layers)
        except DiskUnavailable as err:
            self.disk_note = str(err)
            log.warning("disk cache off: %s", err)
            return 0
        self.tree.disk_budget_bytes = budget_bytes
        self.disk = DiskTier(store, self.tree, device, dtype, persist_sessions)
        restored = self.disk.restore()
        if restored:
            log.info("disk cache: %d cached run(s) found in %s", restored, store.directory)
        return restored

    # --- what is cached, without changing anything ---
    def cached(self, scope: str, session_id: str | None, token_ids: Sequence[int]) -> tuple[int, int]:
        """(cached tokens, of which only on disk) a next request of `session_id` would find, as
        admission matches them; nothing is pinned."""
        match = self.tree.match(scope, owners_for(session_id), token_ids, len(token_ids))
        runs = [(node, len(node.token_ids)) for node in match.nodes]
        if match.partial is not None:
            runs.append((match.partial, match.partial_tokens))
        disk = sum(count for node, count in runs if not node.in_memory)
        return match.num_tokens + match.partial_tokens, disk

    def room_may_come(self, others_running: bool) -> bool:
        """Whether waiting can free memory: running requests finish, runs being written may leave."""
        return others_running or bool(self.tree.writing_bytes)

    # --- admission ---
    def admit(self, kv: Allocation, others_running: bool) -> bool:
        """Pin what is cached, reserve the rest; False (nothing changed) when it does not fit yet.
        Raises what allocating its buffers raises (out of memory)."""
        ids = kv.token_ids
        owners = (SHARED, kv.owner)
        limit = len(ids) if kv.prefix_only else len(ids) - 1  # a reply needs one id fed
        while True:
            found = self.tree.match(kv.scope, owners, ids, limit)
            match = self._promote(kv, found, others_running)
            if match is False:
                return False
            if match is not None:
                break
        if self._split_shared(kv, match):
            match = self.tree.match(kv.scope, owners, ids, limit)
        # cheapest to run first; the compatible path always copies runs in, so it has only two to try
        tries = ((True, True), (True, False), (False, False)) if self.reads_runs_in_place else \
            ((True, True), (False, True))
        for detach, inline in tries:
            if not detach and self.tree.writing_bytes:
                return False  # runs being written free their memory within moments: wait, reuse more
            layout = self._plan(kv, match, detach, inline)
            if layout is not None:
                break
        else:
            return False
        self._take(kv, layout)
        return True

    def _take(self, kv: Allocation, layout: _Layout) -> None:
        """Pin, allocate and move in what `layout` says; account the reuse."""
        kv.evictions += layout.evicted
        self.tree.touch(layout.nodes)
        self.tree.pin(layout.nodes)
        kv.nodes = layout.nodes
        if layout.publish_tokens:
            kv.publish = self.new_buffer(layout.publish_tokens)
        kv.buffer = self.new_buffer(layout.buffer_tokens)
        kv.reserved_bytes = kv.buffer.nbytes + (kv.publish.nbytes if kv.publish else 0)
        self.tree.reserve(kv.reserved_bytes)
        kv.inline = layout.inline
        if layout.inline and not layout.publish_tokens:
            self._copy_inline(kv)
        for node, num_tokens in layout.detached:  # move private turns into the buffer, then free them
            kv.buffer.append_run(node.payload, num_tokens)  # type: ignore[arg-type]
            kv.buffer_ids += node.token_ids[:num_tokens]
        for node, _ in reversed(layout.detached):
            self.tree.remove(node)
        reused = layout.held_tokens + len(kv.buffer_ids)
        kv.reused_tokens = reused
        usage = kv.usage
        usage.cached_tokens = reused
        usage.cache_source = source_of([n.owner for n in (*layout.nodes, *(n for n, _ in layout.detached))], kv.owner)
        usage.disk_tokens = min(usage.disk_tokens, reused)
        usage.cache_tier = "disk" if usage.disk_tokens else "memory" if reused else "none"

    def _promote(self, kv: Allocation, match: Match[KVRun], others_running: bool) -> Match[KVRun] | bool | None:
        """Read back the matched nodes whose KV is only on disk, root first; returns the match to
        use. False: no room in memory yet (wait); None: a file proved bad and its node is gone
        (match again). A node that cannot fit even when nothing else runs is not used: the match
        ends before it and the request computes the rest."""
        for node in match.on_disk_only:
            assert self.disk is not None, "a node on disk only without a disk tier"
            evicted = self.tree.make_room(node.nbytes, keep=match.nodes)
            if evicted is None:
                if self.room_may_come(others_running):
                    return False
                kept = match.nodes[: match.nodes.index(node)] if node in match.nodes else match.nodes
                return Match(kept, sum(len(n.token_ids) for n in kept))
            kv.evictions += evicted
            run = self.disk.load(node)
            if run is None:
                return None
            self.tree.promote(node, run)
            kv.usage.disk_tokens += match.partial_tokens if node is match.partial else len(node.token_ids)
        return match

    def _split_shared(self, kv: Allocation, match: Match[KVRun]) -> bool:
        """A run we share only the start of (two system prompts that begin alike, stateless
        histories that branch) is cut in two, so the common start is read by both, stored once.
        Only idle runs are cut, and only when the budget has room for the copy it takes."""
        node = match.partial
        if node is None or node.pins or _detachable(node, kv.owner, []):
            return False
        length, at = len(node.token_ids), match.partial_tokens
        copied_nbytes = -(-node.nbytes * min(at, length - at) // length)  # the smaller side is copied
        evicted = self.tree.make_room(copied_nbytes, keep=[*match.nodes, node])
        if evicted is None:
            return False
        kv.evictions += evicted

        def halves(run: KVRun) -> tuple[KVRun, int, KVRun, int]:
            head, tail = run.split(at)
            return head, head.nbytes, tail, tail.nbytes

        head = self.tree.split(node, at, halves)
        self._persist(head)
        self._persist(node)
        return True

    def _plan(self, kv: Allocation, match: Match[KVRun], detach: bool, inline: bool) -> _Layout | None:
        """Which matched nodes to build on, which private ones to move into the buffer, whether to
        copy short shared runs into it too, and the buffers to allocate; None when the bytes
        cannot be found now."""
        whole = [(node, len(node.token_ids)) for node in match.nodes]
        if match.partial is not None:
            whole.append((match.partial, match.partial_tokens))
        detached: list[tuple[Node[KVRun], int]] = []
        if detach:
            while whole and _detachable(whole[-1][0], kv.owner, [n for n, _ in detached]):
                detached.insert(0, whole.pop())
        nodes = [node for node, num_tokens in whole if num_tokens == len(node.token_ids)]
        held = sum(len(node.token_ids) for node in nodes)
        if held < kv.prefix_len and any(node.owner != SHARED for node in nodes):
            nodes, held, detached = [], 0, []  # never read someone's turns as our system prompt
        detached_tokens = sum(num_tokens for _, num_tokens in detached)
        publish_tokens = max(0, kv.prefix_len - held) if not detached else 0
        end = min(len(kv.token_ids) + kv.max_new_tokens, self.context_tokens)
        buffer_tokens = end - held - publish_tokens
        short = held + publish_tokens < CASCADE_MIN_TOKENS
        copy_runs = not self.reads_runs_in_place or (inline and short)  # compatible: its own buffer only
        inline = copy_runs and not kv.prefix_only and held + publish_tokens > 0
        if inline:
            buffer_tokens += held + publish_tokens
        need = (publish_tokens + buffer_tokens) * self.bytes_per_token
        evicted = self.tree.make_room(need, keep=nodes + [node for node, _ in detached])
        if evicted is None:
            return None
        assert detached_tokens <= buffer_tokens
        return _Layout(nodes, detached, publish_tokens, buffer_tokens, inline, evicted)

    def _copy_inline(self, kv: Allocation) -> None:
        """Copy the runs the request builds on to the front of its (still empty) buffer."""
        assert kv.buffer is not None and kv.buffer.num_tokens == 0
        for node in kv.nodes:
            kv.buffer.append_run(node.payload, len(node.token_ids))  # type: ignore[arg-type]
        kv.inline_tokens = kv.buffer.num_tokens

    # --- while it runs ---
    def fed(self, kv: Allocation, token_ids: list[int]) -> None:
        """A forward wrote the KV of `token_ids` into the request's buffer (or its system prompt's)."""
        if kv.publish is None:
            kv.buffer_ids += token_ids
        elif kv.publish.num_tokens == kv.publish.capacity_tokens:
            self._publish(kv)

    def _publish(self, kv: Allocation) -> None:
        """The system prompt's buffer is full: it becomes a shared node (no copy)."""
        buffer = kv.publish
        assert buffer is not None
        run = buffer.as_run()
        parent = kv.nodes[-1] if kv.nodes else None
        start = sum(len(node.token_ids) for node in kv.nodes)
        ids = kv.token_ids[start : start + buffer.num_tokens]
        self.tree.release(buffer.nbytes)
        node = self.tree.insert(kv.scope, SHARED, parent, ids, run, run.nbytes)
        self._persist(node)
        self.tree.pin([node])
        kv.nodes.append(node)
        kv.reserved_bytes -= buffer.nbytes
        kv.publish = None
        if kv.inline:
            self._copy_inline(kv)

    # --- the end ---
    def commit(self, kv: Allocation) -> None:
        """Store what the buffer computed (prompt tail and reply) as an exact-size node; when the
        budget has no room for the copy, count it in `usage.not_admitted` instead."""
        buffer = kv.buffer
        if buffer is None or not kv.buffer_ids or kv.publish is not None:
            return
        n = len(kv.buffer_ids)
        # the exact run fits in what the buffer reserved; the copy needs one layer's worth more
        transient = RowBuffer.transient_nbytes(n, self.bytes_per_token, len(buffer.keys))
        exact = n * self.bytes_per_token
        evicted = self.tree.make_room(transient + max(0, exact - kv.reserved_bytes), keep=kv.nodes)
        if evicted is None:
            kv.usage.not_admitted += 1
            return
        kv.evictions += evicted
        run = buffer.take_run(n, start=kv.inline_tokens)
        self.tree.release(kv.reserved_bytes)
        kv.reserved_bytes = 0
        parent = kv.nodes[-1] if kv.nodes else None
        node = self.tree.insert(kv.scope, kv.owner, parent, kv.buffer_ids, run, run.nbytes)
        self._persist(node)

    def pin_for_good(self, kv: Allocation) -> list[Node[KVRun]]:
        """Keep what a warm-up built on in memory for good (`free` unpins the request's own pin)."""
        self.tree.pin(kv.nodes)
        return list(kv.nodes)

    def free(self, kv: Allocation) -> None:
        """Unpin what the request read and release what it reserved."""
        if kv.nodes:
            self.tree.unpin(kv.nodes)
            kv.nodes = []
        if kv.reserved_bytes:
            self.tree.release(kv.reserved_bytes)
            kv.reserved_bytes = 0
        kv.buffer = kv.publish = None

    # --- sessions ---
    def end_session(self, session_id: str) -> int:
        """Drop a session's own turns from both tiers; returns how many runs went."""
        return self.tree.drop_owner(owner_of(session_id))

    def has_session(self, session_id: str) -> bool:
        return self.tree.has_owner(owner_of(session_id))

    def _persist(self, node: Node[KVRun]) -> None:
        if self.disk is not None:
            self.disk.persist(node)


def _detachable(node: Node[KVRun], owner: str, below: list[Node[KVRun]]) -> bool:
    """A private node only this request needs: its owner's, unused, with no other branch below."""
    if node.owner == SHARED or node.owner != owner or node.pins:
        return False
    return all(child in below for child in node.children)
