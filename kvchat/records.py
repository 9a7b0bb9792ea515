"""Every record and word that more than one part of kvchat shares, defined once.

The words are `Literal` types: where reuse came from, which tier held it, why a reply ended, how a
request came in. The records are what crosses a module boundary: what one request measured
(`Usage`), one finished reply, one eviction, one cached node as the stats show it, and the whole
cache's numbers (`CacheStats`). Torch-free and importing nothing from kvchat, so the UI, the API,
the usage log and the metrics read them without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

NodeKind = Literal["prefix", "stateless", "session"]
"""Whose KV a cached run is: a shared system prompt, turns of requests without a session (shared
among them in their scope), or one session's own turns (private)."""

CacheSource = Literal[NodeKind, "none"]
"""The kind of the deepest cached run a request reused, or nothing."""

Tier = Literal["memory", "disk"]
"""Where a cached run's KV is: memory (which may also have a copy on disk), or only on disk."""

CacheTier = Literal[Tier, "none"]
"""Where the reused KV was when the request arrived: all in memory, some read back from disk, none."""

FinishReason = Literal["stop", "length", "cancelled", "error"]

Door = Literal["ui", "api", "library"]
"""How a request came in: the browser app, the OpenAI-compatible HTTP API, or Python code calling
the engine directly (the bench, tests, a notebook)."""


@dataclass(slots=True)
class Usage:
    """What one request measured: the record the UI badge, the stats and the SQLite log share."""

    ts: float  # unix time the request arrived
    session: str  # opaque: a hash of the session id (or "" for a stateless request), never the id
    model: str
    prompt_tokens: int  # tokens of the whole rendered conversation
    cached_tokens: int = 0  # of those, served from cache instead of prefilled
    cache_source: CacheSource = "none"
    new_tokens: int = 0  # reply tokens generated (the end-of-turn token not counted)
    wait_ms: float = 0.0  # in the engine's queue: arrival -> admitted (room and a batch slot)
    ttft_ms: float = 0.0  # arrival -> first token, wait included
    total_ms: float = 0.0  # arrival -> done
    decode_tokens_per_s: float = 0.0
    finish_reason: FinishReason = "error"
    cache_bytes: int = 0  # bytes all KV held after this request (idle and running)
    budget_bytes: int = 0  # the byte budget they were held under
    evictions: int = 0  # cached runs this request evicted
    not_admitted: int = 0  # runs this request computed but could not keep (no room in the budget)
    queued_behind: int = 0  # requests waiting ahead of it when it arrived
    batch_size: float = 0.0  # mean requests per forward while it decoded (1 = alone)
    disk_tokens: int = 0  # of `cached_tokens`, those read back from the disk tier
    cache_tier: CacheTier = "none"
    door: Door = "library"

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    usage: Usage


@dataclass(frozen=True, slots=True)
class Eviction:
    """One cached run leaving a tier to make room."""

    key: str  # the run's display key (`kv.tree.display_key`), never a session id
    nbytes: int
    num_tokens: int
    tier: Tier = "memory"  # which tier it left
    demoted: bool = False  # left memory for its copy on disk (still cached)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One cached run (a node of the radix tree), as the stats tab shows it."""

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


@dataclass(slots=True)
class Warmup:
    """One system prompt warmed at start: computed, or read back from disk."""

    title: str
    num_tokens: int
    pinned: bool
    disk_tokens: int = 0  # of its tokens, read back from disk
    done: bool = False
    ms: float = 0.0
    error: str = ""


@dataclass(frozen=True, slots=True)
class CachedTokens:
    """How much of a conversation the cache holds for a session right now (nothing is pinned: it
    may be evicted before the next request comes)."""

    prompt_tokens: int  # tokens the conversation renders to
    cached_tokens: int  # of those, the longest cached prefix this session may read
    disk_tokens: int  # of the cached ones, held only on disk (read back when used)


@dataclass(frozen=True, slots=True)
class CacheStats:
    budget_bytes: int
    used_bytes: int  # every byte of KV held: idle nodes, nodes in use, running buffers
    entries: list[NodeInfo]
    requests: int  # finished requests since start
    hits: int  # requests that reused at least one cached token
    misses: int
    prompt_tokens: int
    cached_tokens: int
    evictions: int
    not_admitted: int  # turns computed but not kept (no room beside what running requests hold)
    running: int  # requests in the batch (prefilling or decoding)
    waiting: int  # requests in the engine's queue
    running_bytes: int  # private buffers of running requests
    shared_bytes: int  # idle or in-use nodes readable by more than one session (system prompts, stateless)
    private_bytes: int  # nodes of one session's own turns
    pinned_bytes: int = 0  # warm presets kept in memory for good
    demotions: int = 0  # evictions from memory that kept the run on disk
    disk_budget_bytes: int = 0  # 0: no disk tier
    disk_bytes: int = 0  # KV bytes of runs on disk (complete or being written)
    disk_file_bytes: int = 0  # bytes of the complete files, headers included
    disk_evictions: int = 0
    disk_reads: int = 0  # runs read back from disk
    disk_read_tokens: int = 0
    disk_problem: str | None = None  # the disk tier's latest problem (or why there is none)
    attention: str = ""  # the attention path and why (probe.AttentionChoice.summary)
    warmups: list[Warmup] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return self.running + self.waiting > 0

    @property
    def token_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
