"""A byte-budgeted LRU map with pinning. Generic and torch-free, so its rules are testable alone.

Rules a caller may rely on:
- after any call returns, the sum of `nbytes` of held entries is <= `budget_bytes`;
- pinned entries are never evicted; eviction takes the least recently used unpinned entry first;
- an entry that cannot fit, even with every other unpinned entry gone, is not admitted and evicts
  nothing: one oversized conversation must not wipe every other session's cache.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(slots=True)
class Entry(Generic[V]):
    key: str  # "session:<id>" or "prefix:<hex>"
    value: V
    nbytes: int  # real bytes of the value, as counted by the caller
    num_tokens: int  # tokens of KV the value holds (for display)
    pins: int = 0  # > 0 while a generation reads or extends it; never evicted then
    hits: int = 0  # times it was read after being stored
    created_s: float = field(default_factory=time.time)
    last_used_s: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class Eviction:
    key: str
    nbytes: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Admission:
    """What a `put` did: whether the entry is held now, and what it evicted to make room."""

    admitted: bool
    evicted: list[Eviction]


class ByteBudgetLRU(Generic[V]):
    """Entries under one byte budget; `OrderedDict` order is recency (last = most recent)."""

    def __init__(self, budget_bytes: int, clock: Callable[[], float] = time.time) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, Entry[V]] = OrderedDict()
        self._clock = clock
        self.evictions = 0
        self.not_admitted = 0  # puts refused because the entry could not fit

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def entries(self) -> list[Entry[V]]:
        """Snapshot, least recently used first."""
        return list(self._entries.values())

    def get(self, key: str) -> Entry[V] | None:
        """Look up and mark as most recently used (a hit)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.hits += 1
        self._touch(entry)
        return entry

    def peek(self, key: str) -> Entry[V] | None:
        """Look up without changing recency or hit counts."""
        return self._entries.get(key)

    def put(self, key: str, value: V, nbytes: int, num_tokens: int) -> Admission:
        """Insert or replace, evicting least recently used unpinned entries to make room. Keeps pins
        and hits of a replaced entry.

        If the entry cannot fit beside the pinned ones, nothing is evicted and it is not kept; an
        entry it was to replace goes too, since its value is stale.
        """
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        old = self._entries.pop(key, None)
        pinned_bytes = sum(e.nbytes for e in self._entries.values() if e.pins > 0)
        if pinned_bytes + nbytes > self.budget_bytes:
            self.not_admitted += 1
            return Admission(admitted=False, evicted=[])
        entry = Entry(key=key, value=value, nbytes=nbytes, num_tokens=num_tokens)
        if old is not None:
            entry.pins, entry.hits, entry.created_s = old.pins, old.hits, old.created_s
        self._entries[key] = entry
        self._touch(entry)
        return Admission(admitted=True, evicted=self._evict_until_fits())

    def pop(self, key: str) -> Entry[V] | None:
        """Remove without counting an eviction (the owner ended it)."""
        return self._entries.pop(key, None)

    def pin(self, key: str) -> None:
        self._entries[key].pins += 1

    def unpin(self, key: str) -> None:
        """Release one pin (a no-op for an entry that is gone)."""
        entry = self._entries.get(key)
        if entry is None:
            return
        assert entry.pins > 0, f"unpin without pin: {key}"
        entry.pins -= 1

    def _touch(self, entry: Entry[V]) -> None:
        entry.last_used_s = self._clock()
        self._entries.move_to_end(entry.key)

    def _evict_until_fits(self) -> list[Eviction]:
        """Evict unpinned entries, least recently used first, until the budget holds. `put` admits
        only what fits beside the pinned entries, so the newest entry is never reached."""
        evicted: list[Eviction] = []
        used = self.used_bytes
        for entry in list(self._entries.values()):  # least recently used first
            if used <= self.budget_bytes:
                break
            if entry.pins > 0:
                continue
            del self._entries[entry.key]
            used -= entry.nbytes
            evicted.append(Eviction(entry.key, entry.nbytes, entry.num_tokens))
        assert used <= self.budget_bytes, "admitted an entry that does not fit"
        self.evictions += len(evicted)
        return evicted
