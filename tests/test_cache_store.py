from kvchat.cache_store import CachedKV, CacheStore
from kvchat.prefix import PrefixKey


def test_prefix_hash_collision_serves_nothing():
    store: CacheStore[str] = CacheStore(budget_bytes=1_000)
    key = PrefixKey("prefix:same")
    store.put_prefix(key, CachedKV([1, 2, 3], "kv-of-123"), nbytes=10)
    with store.using_prefix(key, [9, 9, 9]) as hit:
        assert hit is None
    assert store.collisions == 1
    with store.using_prefix(key, [1, 2, 3]) as hit:
        assert hit is not None and hit.cache == "kv-of-123"


def test_prefix_in_use_is_pinned():
    store: CacheStore[str] = CacheStore(budget_bytes=100)
    key = PrefixKey("prefix:p")
    store.put_prefix(key, CachedKV([1], "p"), nbytes=60)
    with store.using_prefix(key, [1]):
        admission = store.checkin_session("s", CachedKV([1, 2], "s"), nbytes=60)  # cannot evict the pinned prefix
        assert not admission.admitted and admission.evicted == []
        assert store.has_prefix(key)
        assert not store.has_session("s")
    admission = store.checkin_session("s", CachedKV([1, 2], "s"), nbytes=60)  # unpinned now: the prefix goes
    assert admission.admitted and [e.key for e in admission.evicted] == [key]
    assert store.not_admitted == 1


def test_session_checkout_pins_until_checkin_and_budget_holds_after():
    store: CacheStore[str] = CacheStore(budget_bytes=100)
    store.checkin_session("a", CachedKV([1], "a1"), nbytes=50)
    kv = store.checkout_session("a")
    assert kv is not None and kv.cache == "a1"
    store.put_prefix(PrefixKey("prefix:x"), CachedKV([7], "x"), nbytes=80)  # "a" is pinned: x can't fit
    assert store.has_session("a") and not store.has_prefix(PrefixKey("prefix:x"))
    admission = store.checkin_session("a", CachedKV([1, 2], "a2"), nbytes=120)  # grew past the budget
    assert not admission.admitted and admission.evicted == []
    assert not store.has_session("a") and store.used_bytes == 0
    assert store.checkout_session("a") is None  # the next turn starts over, nothing stale is served


def test_release_drops_a_checked_out_session():
    store: CacheStore[str] = CacheStore(budget_bytes=100)
    store.checkin_session("a", CachedKV([1], "a1"), nbytes=10)
    store.checkout_session("a")
    store.release_session("a")
    assert store.checkout_session("a") is None


def test_entries_report_kind_tokens_bytes_hits():
    store: CacheStore[str] = CacheStore(budget_bytes=1_000)
    store.checkin_session("a", CachedKV([1, 2, 3], "a"), nbytes=30)
    store.put_prefix(PrefixKey("prefix:p"), CachedKV([1, 2], "p"), nbytes=20)
    with store.using_prefix(PrefixKey("prefix:p"), [1, 2]):
        pass
    infos = {e.kind: e for e in store.entries()}
    assert (infos["session"].num_tokens, infos["session"].nbytes) == (3, 30)
    assert (infos["prefix"].num_tokens, infos["prefix"].hits, infos["prefix"].pinned) == (2, 1, False)
