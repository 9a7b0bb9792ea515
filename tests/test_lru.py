import random

import pytest

from kvchat.lru import ByteBudgetLRU


def test_evicts_least_recently_used_first():
    lru = ByteBudgetLRU[str](budget_bytes=300)
    lru.put("a", "A", 100, 1)
    lru.put("b", "B", 100, 1)
    lru.put("c", "C", 100, 1)
    lru.get("a")  # a is now the most recent; b is the oldest
    evicted = lru.put("d", "D", 100, 1)
    assert [e.key for e in evicted] == ["b"]
    assert set(e.key for e in lru.entries()) == {"a", "c", "d"}
    assert lru.evictions == 1


def test_pinned_entry_is_never_evicted_and_goes_once_unpinned():
    lru = ByteBudgetLRU[str](budget_bytes=200)
    lru.put("old", "x", 150, 1)
    lru.pin("old")
    evicted = lru.put("new", "y", 100, 1)
    assert [e.key for e in evicted] == ["new"]  # only the unpinned newcomer could go
    assert "old" in lru
    lru.put("new", "y", 40, 1)
    assert lru.used_bytes == 190
    lru.put("big", "z", 60, 1)  # over budget: "new" (older, unpinned) goes, "old" stays
    assert "old" in lru and "new" not in lru
    lru.pin("old")
    lru.unpin("old")
    lru.unpin("old")
    assert lru.used_bytes <= 200


def test_entry_larger_than_budget_is_not_kept():
    lru = ByteBudgetLRU[str](budget_bytes=100)
    lru.put("small", "s", 50, 1)
    evicted = lru.put("huge", "h", 101, 1)
    assert "huge" in {e.key for e in evicted}
    assert "huge" not in lru
    assert lru.used_bytes <= 100


def test_replace_keeps_pins_and_hits_and_recounts_bytes():
    lru = ByteBudgetLRU[str](budget_bytes=1000)
    lru.put("s", "v1", 100, 10)
    lru.get("s")
    lru.pin("s")
    lru.put("s", "v2", 300, 30)
    entry = lru.peek("s")
    assert (entry.value, entry.nbytes, entry.num_tokens, entry.pins, entry.hits) == ("v2", 300, 30, 1, 1)
    assert lru.used_bytes == 300


def test_budget_holds_under_random_operations():
    rng = random.Random(7)
    lru = ByteBudgetLRU[int](budget_bytes=1_000)
    pinned: list[str] = []
    for step in range(2_000):
        key = f"k{rng.randrange(30)}"
        action = rng.random()
        if action < 0.6:
            lru.put(key, step, rng.randrange(1, 400), 1)
        elif action < 0.75 and key in lru and len(pinned) < 2:
            lru.pin(key)
            pinned.append(key)
        elif action < 0.9 and pinned:
            lru.unpin(pinned.pop())
        else:
            lru.get(key)
        pinned = [k for k in pinned if k in lru]
        pinned_bytes = sum(e.nbytes for e in lru.entries() if e.pins)
        assert lru.used_bytes <= max(lru.budget_bytes, pinned_bytes)
        assert all(e.pins >= 0 for e in lru.entries())


def test_negative_sizes_are_refused():
    with pytest.raises(ValueError):
        ByteBudgetLRU[str](budget_bytes=-1)
    with pytest.raises(ValueError):
        ByteBudgetLRU[str](budget_bytes=10).put("a", "x", -5, 1)
