"""What one request measured: the record the UI badge, the stats and the SQLite log share."""

from __future__ import annotations

from dataclasses import dataclass

CACHE_SOURCES = ("session", "prefix", "none")
FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(slots=True)
class Usage:
    ts: float  # unix time the request arrived
    session: str  # opaque: a hash of the session id, never the id itself
    model: str
    prompt_tokens: int  # tokens of the whole rendered conversation
    cached_tokens: int = 0  # of those, served from cache instead of prefilled
    cache_source: str = "none"  # "session" | "prefix" | "none"
    new_tokens: int = 0  # reply tokens generated (the end-of-turn token not counted)
    wait_ms: float = 0.0  # queued behind other requests for the model
    ttft_ms: float = 0.0  # arrival -> first token, wait included
    total_ms: float = 0.0  # arrival -> done
    decode_tokens_per_s: float = 0.0
    finish_reason: str = "error"  # "stop" | "length" | "cancelled" | "error"
    cache_bytes: int = 0  # bytes all cached KV held after this request
    budget_bytes: int = 0  # the byte budget they were held under
    evictions: int = 0  # cache entries this request evicted
    not_admitted: int = 0  # caches this request computed but could not keep (too big for the budget)

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    usage: Usage
