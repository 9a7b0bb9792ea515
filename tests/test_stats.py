from kvchat import stats as panel
from kvchat.usage import Usage


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
