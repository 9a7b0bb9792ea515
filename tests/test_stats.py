from kvchat import budget_map
from kvchat import stats as panel
from kvchat.records import Usage


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
