from dataclasses import dataclass
from types import SimpleNamespace

from kvchat import budget_map
from kvchat import stats as panel
from kvchat.records import CacheStats, NodeInfo, Usage, Warmup


def test_badge_names_the_source_and_the_numbers():
    usage = Usage(ts=0, session="s", model="m", prompt_tokens=1200, cached_tokens=1169, cache_source="prefix",
                  new_tokens=32, ttft_ms=262.4, total_ms=2800, decode_tokens_per_s=12.3, finish_reason="length")  # fmt: skip
    text = panel.badge(usage)
    assert "1,169 reused from shared prefix" in text and "TTFT 262 ms" in text and "prefilled 31" in text
    cold = Usage(ts=0, session="s", model="m", prompt_tokens=10, finish_reason="stop")
    assert "nothing reused" in panel.badge(cold)


def test_panel_shows_hit_rate_budget_and_history(tiny_engine):
    tiny_engine.chat("a", [{"role": "system", "content": "Be kind. " * 20}, {"role": "user", "content": "Hi"}],
                     max_new_tokens=3)  # fmt: skip
    tiny_engine.chat("b", [{"role": "system", "content": "Be kind. " * 20}, {"role": "user", "content": "Yo"}],
                     max_new_tokens=3)  # fmt: skip
    tiny_engine.usage_log.flush()
    stats = tiny_engine.stats()
    text = panel.panel_markdown(stats, tiny_engine.usage_summary(), "disk full")
    assert "Token hit rate:** " in text and "of 64.0 MiB budget" in text and "1 warm, 1 cold" in text
    assert "Requests logged:** 2" in text and "disk full" in text
    rows = panel.entry_rows(stats)
    assert sorted(r[0] for r in rows) == ["prefix", "session", "session"]
    assert len(panel.recent_rows(tiny_engine.recent_requests())) == 2


def test_budget_map_blocks_add_up_to_what_is_held_and_nest_sessions_in_their_prefix(tiny_engine):
    system = {"role": "system", "content": "Be kind. " * 20}
    for session, text in (("a", "Hi"), ("b", "Yo")):
        tiny_engine.chat(session, [system, {"role": "user", "content": text}], max_new_tokens=3)
    stats = tiny_engine.stats()
    blocks = budget_map.blocks(stats)
    assert sum(b.nbytes for b in blocks) == stats.used_bytes  # the map is what the budget holds
    assert sum(b.nbytes for b in blocks if b.id != "running") == sum(
        e.nbytes for e in stats.entries if e.tier == "memory")  # fmt: skip
    by_id = {b.id: b for b in blocks}
    sessions = [b for b in blocks if b.category == "session turns"]
    assert len(sessions) == 2 and all(by_id[b.parent].category == "shared prefix" for b in sessions)
    assert "2 session(s) under it" in by_id[sessions[0].parent].hover
    figure = budget_map.figure(stats)
    assert list(figure.data[0].values) == [b.nbytes for b in blocks]
    assert "of 64.0 MiB" in figure.layout.title.text and "free" in figure.layout.title.text


def stats_api_as_written_by_hand(engine) -> dict:
    """The /stats answer as app.py spelled it out field by field before `stats_json`: the API's contract."""
    s = engine.stats()
    return {
        "ready": True, "busy": s.busy, "budget_bytes": s.budget_bytes, "used_bytes": s.used_bytes,
        "requests": s.requests, "hits": s.hits, "misses": s.misses, "evictions": s.evictions,
        "not_admitted": s.not_admitted, "running": s.running, "waiting": s.waiting,
        "running_bytes": s.running_bytes, "shared_bytes": s.shared_bytes, "private_bytes": s.private_bytes,
        "pinned_bytes": s.pinned_bytes, "token_hit_rate": s.token_hit_rate, "eviction": engine.eviction,
        "demotions": s.demotions, "disk_budget_bytes": s.disk_budget_bytes, "disk_bytes": s.disk_bytes,
        "disk_file_bytes": s.disk_file_bytes, "disk_evictions": s.disk_evictions, "disk_reads": s.disk_reads,
        "disk_problem": s.disk_problem,
        "warmups": [{"preset": w.title, "tokens": w.num_tokens, "pinned": w.pinned, "done": w.done,
                     "disk_tokens": w.disk_tokens, "ms": round(w.ms)} for w in s.warmups],
        "entries": [{"kind": e.kind, "tokens": e.num_tokens, "nbytes": e.nbytes, "hits": e.hits,
                     "sessions": e.sessions, "in_use": e.pinned, "tier": e.tier, "on_disk": e.on_disk}
                    for e in s.entries],
    }  # fmt: skip


def every_field_set(stats_class=CacheStats, **extra) -> SimpleNamespace:
    """An engine whose stats have a distinct value in every field (a swapped key would show)."""
    node = NodeInfo(kind="prefix", key="k1", num_tokens=11, depth_tokens=12, nbytes=13, hits=14,
                    pinned=True, last_used_s=15.0, sessions=16, tier="memory", on_disk=True, parent_key="k0",
                    created_s=17.0, preset=True)  # fmt: skip
    warmup = Warmup(title="FAQ", num_tokens=21, pinned=True, disk_tokens=22, done=True, ms=23.6, error="e")
    stats = stats_class(
        budget_bytes=1, used_bytes=2, entries=[node], requests=3, hits=4, misses=5, prompt_tokens=60,
        cached_tokens=7, evictions=8, not_admitted=9, running=10, waiting=0, running_bytes=31, shared_bytes=32,
        private_bytes=33, pinned_bytes=34, demotions=35, disk_budget_bytes=36, disk_bytes=37,
        disk_file_bytes=38, disk_evictions=39, disk_reads=40, disk_read_tokens=41, disk_problem="slow disk", attention="cascade",
        warmups=[warmup], **extra,
    )  # fmt: skip
    return SimpleNamespace(stats=lambda: stats, eviction="gdsf")


def test_the_stats_api_answers_the_same_keys_and_values_as_ever():
    engine = every_field_set()
    assert panel.stats_json(engine) == stats_api_as_written_by_hand(engine)
    assert panel.stats_json(None) == {"ready": False}  # the model is still loading


def test_the_stats_api_of_a_real_engine_is_what_it_always_was(tiny_engine):
    tiny_engine.chat("a", [{"role": "system", "content": "Be kind. " * 20}, {"role": "user", "content": "Hi"}],
                     max_new_tokens=3)  # fmt: skip
    answer = panel.stats_json(tiny_engine)
    assert answer == stats_api_as_written_by_hand(tiny_engine) and answer["entries"]


def test_a_counter_added_to_cache_stats_appears_in_the_stats_api_without_a_hand_edit():
    @dataclass(frozen=True)
    class WithNewCounter(CacheStats):
        new_counter: int = 0

    answer = panel.stats_json(every_field_set(WithNewCounter, new_counter=42))
    assert answer["new_counter"] == 42
