"""Eviction policies: which idle run of cached KV goes first when room is needed.

Each policy is one function from a node to a priority; the lowest priority is evicted first (the
tree only ever offers leaves: a run is never dropped before the runs that extend it). The same
function orders both tiers, memory and disk. Torch-free, like the tree that calls it.

- `lru`   least recently used (the default; what vLLM, SGLang and llama.cpp do)
- `fifo`  oldest first, whatever its use
- `lfu`   fewest reuses first, ties by recency
- `lru-2` LRU-K with K=2 (O'Neil et al.): by the time of the second-to-last use, so a run used
          once (a visitor who never came back) goes before one used twice long ago
- `gdsf`  GreedyDual-Size-Frequency adapted to KV (Cao & Irani; Cherkasova): a run's value is its
          reuses times what recomputing it costs per byte, plus an inflation clock `L` that rises
          to each victim's value, so old value fades without timestamps. KV bytes per token are
          fixed, but recompute time per token is not: a token deep in a conversation attends over
          everything before it, so keeping deep runs saves more time per byte than keeping
          shallow ones. None of the peers weigh this.

The tree keeps GreedyDual's clock for every policy: after each eviction it rises to the victim's
first priority, and a node used now is credited with it. Only `gdsf` reads the credit, so the other
policies are unaffected, and no policy is a special case in the tree.

`Victims` finds the lowest-ranked candidate in O(log n) instead of a walk of the whole tree per
victim: a heap of offers, as SGLang's radix cache keeps its evictable leaves in a heap.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Generic, Literal, Protocol, TypeVar

from kvchat.errors import InputError

Priority = tuple[float, ...]

ATTENTION_TOKENS = 1024.0
"""Depth at which a token's attention costs about as much as the rest of its forward (a
135M-parameter model on CPU prefilled ~500 tok/s near the start of a prompt and about half that
deep in a 2k one: NOTES.md). Only the ratio between runs matters to the policy."""


class Evictable(Protocol):
    token_ids: tuple[int, ...]
    nbytes: int
    hits: int
    created_s: float
    last_used_s: float
    prev_used_s: float
    credit: float

    @property
    def depth_tokens(self) -> int: ...


Policy = Callable[[Evictable], Priority]


def lru(node: Evictable) -> Priority:
    return (node.last_used_s,)


def fifo(node: Evictable) -> Priority:
    return (node.created_s,)


def lfu(node: Evictable) -> Priority:
    return (node.hits, node.last_used_s)


def lru_2(node: Evictable) -> Priority:
    return (node.prev_used_s, node.last_used_s)


def gdsf(node: Evictable) -> Priority:
    return (node.credit + (node.hits + 1) * recompute_cost_per_token(node), node.last_used_s)


def recompute_cost_per_token(node: Evictable) -> float:
    """Relative prefill time per token of this run: 1 for the projections and MLP, plus attention
    over the tokens before it (its middle's depth, in units of `ATTENTION_TOKENS`)."""
    middle = node.depth_tokens - len(node.token_ids) / 2
    return 1.0 + middle / ATTENTION_TOKENS


POLICIES: dict[str, Policy] = {"lru": lru, "lfu": lfu, "fifo": fifo, "lru-2": lru_2, "gdsf": gdsf}


def policy_named(name: str) -> Policy:
    if name not in POLICIES:
        raise InputError(f"unknown eviction policy {name!r}: choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


N = TypeVar("N")
Verdict = Literal["victim", "not now", "never"]


class Victims(Generic[N]):
    """Candidates for eviction from one tier, lowest priority first.

    The tree `offer`s a node whenever its priority or its chance to become a candidate may have
    changed (made, used, split, or a child left the tier); an older offer of the same node is then
    stale and skipped. `lowest` asks the tree about each offer it reaches, cheapest first:
    "victim" ends the search, "not now" (pinned, kept for the caller, being written) keeps the offer
    for later, "never" (gone, or no longer a leaf of the tier: it is offered again when it becomes
    one) drops it. Ties go to the earlier offer. O(log n) per offer; a search costs O(log n) per
    offer it passes.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._heap: list[tuple[Priority, int, N]] = []
        self._latest: dict[int, int] = {}  # id(node) -> its latest offer's stamp
        self._stamps = itertools.count()

    def offer(self, node: N) -> None:
        stamp = next(self._stamps)
        self._latest[id(node)] = stamp
        heapq.heappush(self._heap, (self.policy(node), stamp, node))  # type: ignore[arg-type]
        if len(self._heap) > 2 * len(self._latest) + 64:  # mostly stale offers: keep the live ones
            self._heap = [entry for entry in self._heap if self._latest.get(id(entry[2])) == entry[1]]
            heapq.heapify(self._heap)

    def forget(self, node: N) -> None:
        """`node` left the tree: its offers are stale."""
        self._latest.pop(id(node), None)

    def lowest(self, verdict: Callable[[N], Verdict]) -> N | None:
        """The lowest-priority node `verdict` calls a victim (its offer is used up), or None."""
        later: list[tuple[Priority, int, N]] = []
        found = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            _, stamp, node = entry
            if self._latest.get(id(node)) != stamp:
                continue
            answer = verdict(node)
            if answer == "victim":
                del self._latest[id(node)]
                found = node
                break
            if answer == "not now":
                later.append(entry)
            else:
                del self._latest[id(node)]
        for entry in later:
            heapq.heappush(self._heap, entry)
        return found

    def __len__(self) -> int:
        return len(self._latest)
