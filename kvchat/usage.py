"""What one request measured: the record the UI badge, the stats and the SQLite log share.

The words for where reuse came from and why a reply ended are defined here once, as `Literal`
types; every module that writes or reads them imports them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CacheSource = Literal["session", "stateless", "prefix", "none"]
"""Deepest cached run a request reused: its own session's turns, turns of stateless requests
(no session) in its scope, a shared system prompt, or nothing."""

FinishReason = Literal["stop", "length", "cancelled", "error"]

Door = Literal["ui", "api", "library"]
"""How a request came in: the browser app, the OpenAI-compatible HTTP API, or Python code calling
the engine directly (the bench, tests, a notebook)."""

CacheTier = Literal["memory", "disk", "none"]
"""Where the reused KV was when the request arrived: all in memory, some read back from disk, none."""


@dataclass(slots=True)
class Usage:
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
