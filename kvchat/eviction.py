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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

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
