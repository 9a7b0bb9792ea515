import random

import pytest

from kvchat.lru import ByteBudgetLRU


def held(lru: ByteBudgetLRU) -> set[str]:
    return {entry.key for entry in lru.entries()}


def test_evicts_least_recently_used_first():
    lru = ByteBudgetLRU[str](budget_bytes=300)
    lru.put("a", "A", 100, 1)
    lru.put("b", "B", 100, 1)
    lru.put("c", "C", 100, 1)
    lru.get("a")  # a is now the most recent; b is the oldest
    admission = lru.put("d", "D", 100, 1)
    assert admission.admitted and [e.key for e in admission.evicted] == ["b"]
    assert held(lru) == {"a", "c", "d"}
    assert lru.evictions == 1


def test_pinned_entry_is_never_evicted_and_goes_once_unpinned():
    lru = ByteBudgetLRU[str](budget_bytes=200)
    lru.put("old", "x", 150, 1)
    lru.pin("old")
    refused = lru.put("new", "y", 100, 1)  # 150 pinned + 100 > 200: refused, nothing evicted
    assert not refused.admitted and refused.evicted == []
    assert held(lru) == {"old"}
    assert [e.key for e in lru.put("new", "y", 40, 1).evicted] == []
    assert held(lru) == {"old", "new"} and lru.used_bytes == 190
    admission = lru.put("big", "z", 50, 1)  # over budget: "new" (unpinned) goes, pinned "old" stays
    assert [e.key for e in admission.evicted] == ["new"]
    assert held(lru) == {"old", "big"}
    lru.get("old")  # now the most recent, yet the older "big" must not go while "old" is pinned
    lru.unpin("old")  # unpinned: the least recently used is now "big"
    admission = lru.put("late", "w", 100, 1)
    assert [e.key for e in admission.evicted] == ["big", "old"]
    assert held(lru) == {"late"}


def test_entry_larger_than_budget_is_refused_and_evicts_nothing():
    lru = ByteBudgetLRU[str](budget_bytes=100)
    lru.put("small", "s", 50, 1)
    lru.put("other", "o", 30, 1)
    admission = lru.put("huge", "h", 101, 1)
    assert not admission.admitted and admission.evicted == []
    assert held(lru) == {"small", "other"}  # one oversized conversation wipes no other session
    assert (lru.evictions, lru.not_admitted) == (0, 1)


def test_entry_that_fits_only_without_the_pinned_ones_is_refused():
    lru = ByteBudgetLRU[str](budget_bytes=100)
    lru.put("pinned", "p", 60, 1)
    lru.pin("pinned")
    lru.put("idle", "i", 30, 1)
    admission = lru.put("mid", "m", 50, 1)  # 60 pinned + 50 > 100 whatever is evicted
    assert not admission.admitted and admission.evicted == []
    assert held(lru) == {"pinned", "idle"}


def test_a_replacement_too_big_to_fit_drops_the_stale_entry_only():
    lru = ByteBudgetLRU[str](budget_bytes=100)
    lru.put("a", "a1", 40, 1)
    lru.put("b", "b1", 40, 1)
    admission = lru.put("a", "a2", 120, 3)  # "a" grew past the budget: its old value is stale
    assert not admission.admitted and admission.evicted == []
    assert held(lru) == {"b"}


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
        assert lru.used_bytes <= lru.budget_bytes
        assert all(e.pins >= 0 for e in lru.entries())
        assert all(lru.peek(k) is not None and lru.peek(k).pins > 0 for k in pinned)


def test_negative_sizes_are_refused():
    with pytest.raises(ValueError):
        ByteBudgetLRU[str](budget_bytes=-1)
    with pytest.raises(ValueError):
        ByteBudgetLRU[str](budget_bytes=10).put("a", "x", -5, 1)
