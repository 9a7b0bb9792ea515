"""Session caches and shared prefixes under one byte budget.

Torch-free: a cached value is opaque (`C`); the engine measures its bytes. Sessions are private,
prefixes are shared by content key and verified by their token ids before use.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from kvchat.lru import Admission, ByteBudgetLRU, Entry
from kvchat.prefix import PrefixKey

C = TypeVar("C")

SESSION = "session"
PREFIX = "prefix"


@dataclass(slots=True)
class CachedKV(Generic[C]):
    token_ids: list[int]  # the ids whose KV `cache` holds, position by position
    cache: C


@dataclass(frozen=True, slots=True)
class EntryInfo:
    kind: str  # "session" | "prefix"
    key: str
    num_tokens: int
    nbytes: int
    hits: int
    pinned: bool
    last_used_s: float


def session_key(session_id: str) -> str:
    return f"{SESSION}:{session_id}"


def entry_kind(key: str) -> str:
    return key.split(":", 1)[0]


class CacheStore(Generic[C]):
    """Thread-safe facade over `ByteBudgetLRU` with the session/prefix vocabulary."""

    def __init__(self, budget_bytes: int) -> None:
        self._lru: ByteBudgetLRU[CachedKV[C]] = ByteBudgetLRU(budget_bytes)
        self._lock = threading.Lock()
        self.collisions = 0  # prefix hash hits whose token ids differed

    @property
    def budget_bytes(self) -> int:
        return self._lru.budget_bytes

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._lru.used_bytes

    @property
    def evictions(self) -> int:
        return self._lru.evictions

    @property
    def not_admitted(self) -> int:
        """Entries refused because they could not fit the budget (they evicted nothing)."""
        return self._lru.not_admitted

    def checkout_session(self, session_id: str) -> CachedKV[C] | None:
        """The session's cache, pinned until `checkin_session`; None if it has none."""
        key = session_key(session_id)
        with self._lock:
            entry = self._lru.get(key)
            if entry is None:
                return None
            self._lru.pin(key)
            return entry.value

    def checkin_session(self, session_id: str, kv: CachedKV[C], nbytes: int) -> Admission:
        """Store the session's grown cache and release its checkout pin; evicts to fit the budget.
        A cache too big to fit is not kept (the next request of the session starts over)."""
        key = session_key(session_id)
        with self._lock:
            admission = self._lru.put(key, kv, nbytes, len(kv.token_ids))
            entry = self._lru.peek(key)
            if entry is not None and entry.pins > 0:  # pinned by our checkout
                self._lru.unpin(key)
            return admission

    def release_session(self, session_id: str) -> None:
        """Release a checkout without storing anything (the cache was dropped after a failure)."""
        with self._lock:
            entry = self._lru.pop(session_key(session_id))
            assert entry is None or entry.pins <= 1, "session checked out twice"

    def drop_session(self, session_id: str) -> bool:
        with self._lock:
            return self._lru.pop(session_key(session_id)) is not None

    def has_session(self, session_id: str) -> bool:
        with self._lock:
            return session_key(session_id) in self._lru

    @contextmanager
    def using_prefix(self, key: PrefixKey, token_ids: Sequence[int]) -> Iterator[CachedKV[C] | None]:
        """The shared prefix for exactly `token_ids`, pinned while the block runs; None on a miss.

        A stored prefix with the same key but other token ids is a hash collision: a miss.
        """
        with self._lock:
            entry = self._lru.peek(key)
            if entry is not None and entry.value.token_ids != list(token_ids):
                self.collisions += 1
                entry = None
            if entry is not None:
                entry = self._lru.get(key)
                self._lru.pin(key)
        try:
            yield entry.value if entry is not None else None
        finally:
            if entry is not None:
                with self._lock:
                    self._lru.unpin(key)

    def has_prefix(self, key: PrefixKey) -> bool:
        with self._lock:
            return key in self._lru

    def put_prefix(self, key: PrefixKey, kv: CachedKV[C], nbytes: int) -> Admission:
        with self._lock:
            return self._lru.put(key, kv, nbytes, len(kv.token_ids))

    def entries(self) -> list[EntryInfo]:
        with self._lock:
            return [_info(entry) for entry in reversed(self._lru.entries())]


def _info(entry: Entry[CachedKV[C]]) -> EntryInfo:
    return EntryInfo(
        kind=entry_kind(entry.key),
        key=entry.key,
        num_tokens=entry.num_tokens,
        nbytes=entry.nbytes,
        hits=entry.hits,
        pinned=entry.pins > 0,
        last_used_s=entry.last_used_s,
    )
