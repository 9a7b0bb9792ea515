"""What a public demo link meets: hostile text, mismatched histories, Stop hammered, faults."""

import random

import pytest

from conftest import greedy_baseline
from kvchat import InputError

SYSTEM = {"role": "system", "content": "You are a helpful assistant for a physics class. " * 6}
NEW = 8


def user(text):
    return {"role": "user", "content": text}


def assert_consistent(engine):
    stats = engine.stats()
    assert not stats.busy
    assert not any(e.pinned for e in stats.entries)
    assert stats.used_bytes == sum(e.nbytes for e in stats.entries) <= stats.budget_bytes


def test_stop_pressed_100_times_at_random_points_leaves_the_engine_consistent(tiny_engine, tiny_loaded):
    rng = random.Random(5)
    sessions = {name: [SYSTEM, user(f"Explain topic {name} step by step.")] for name in "abc"}
    for _ in range(100):
        name = rng.choice("abc")
        generation = tiny_engine.stream(name, sessions[name], max_new_tokens=40)
        pieces = rng.randrange(0, 12)
        if pieces == 0:
            generation.cancel()  # pressed before the first token
        for index, _piece in enumerate(generation):
            if index + 1 >= pieces:
                break
        usage = generation.wait(timeout=60)
        assert usage.finish_reason in ("cancelled", "length", "stop")
        assert_consistent(tiny_engine)
        if rng.random() < 0.3:  # sometimes the user goes on from the partial reply
            sessions[name] = sessions[name] + [{"role": "assistant", "content": generation.text}, user("Go on.")]
    for name, messages in sessions.items():
        reply = tiny_engine.chat(name, messages, max_new_tokens=NEW)
        assert reply.text == greedy_baseline(tiny_loaded, tiny_engine, messages, NEW)
    assert_consistent(tiny_engine)


@pytest.mark.parametrize(
    "text",
    ["tab\tbell\x07 null\x00 escape\x1b[31m red", "lone surrogate \ud83d here", "\u202eright-to-left override",
     "e\u0301\u0301\u0301 combining marks"],
)  # fmt: skip
def test_odd_characters_get_a_reply(tiny_engine, text):
    reply = tiny_engine.chat("alice", [user(text)], max_new_tokens=NEW)
    assert reply.usage.finish_reason in ("length", "stop")


def test_100kb_of_emoji_is_refused_with_how_much_fits(tiny_engine, tiny_loaded):
    with pytest.raises(InputError, match=r"the conversation is \d+ tokens but the model's context holds 2048"):
        tiny_engine.stream("alice", [user("😀" * 25_000)])
    assert_consistent(tiny_engine)
    assert tiny_engine.stats().requests == 0  # refused before any work
    messages = [user("still there?")]
    reply = tiny_engine.chat("alice", messages, max_new_tokens=NEW)
    assert reply.text == greedy_baseline(tiny_loaded, tiny_engine, messages, NEW)


def test_a_too_long_system_prompt_is_refused_not_truncated(tiny_engine):
    with pytest.raises(InputError, match="context holds 2048"):
        tiny_engine.stream("alice", [{"role": "system", "content": "rule " * 3000}, user("hi")])


def test_a_history_the_session_never_saw_is_recomputed_not_served_stale(tiny_engine, tiny_loaded):
    tiny_engine.chat("alice", [SYSTEM, user("What is inertia?")], max_new_tokens=NEW)
    other = [{"role": "system", "content": "You are a pirate."}, user("What is inertia?"),
             {"role": "assistant", "content": "Arr, a thing at rest stays at rest."}, user("And momentum?")]  # fmt: skip
    reply = tiny_engine.chat("alice", other, max_new_tokens=NEW)
    stale = tiny_engine.encode([SYSTEM, user("What is inertia?")]).token_ids
    fresh = tiny_engine.encode(other).token_ids
    shared = next(i for i, (a, b) in enumerate(zip(stale, fresh)) if a != b)
    assert reply.usage.cached_tokens <= shared
    assert reply.text == greedy_baseline(tiny_loaded, tiny_engine, other, NEW)
    unknown = tiny_engine.chat("never-seen-before", other, max_new_tokens=NEW)
    assert unknown.text == reply.text


def test_different_secrets_under_one_system_prompt_share_only_the_prompt(tiny_engine):
    tiny_engine.chat("alice", [SYSTEM, user("My locker code is 4417.")], max_new_tokens=NEW)
    bob = [SYSTEM, user("My locker code is 9021.")]
    reply = tiny_engine.chat("bob", bob, max_new_tokens=NEW)
    assert reply.usage.cache_source == "prefix"
    assert reply.usage.cached_tokens == tiny_engine.encode(bob).prefix_len


def test_chat_goes_on_when_the_usage_log_cannot_be_written(tiny_loaded, tmp_path):
    from kvchat import Engine
    from kvchat.usage_log import UsageLog

    engine = Engine(tiny_loaded, cache_budget_bytes=2**26, usage_log=UsageLog(tmp_path / "no" / "such" / "dir.db"))
    replies = [engine.chat("alice", [user(f"question {i}")], max_new_tokens=NEW) for i in range(3)]
    engine.usage_log.flush()
    assert all(r.usage.finish_reason in ("length", "stop") for r in replies)
    assert engine.log_warning is not None and "not written" in engine.log_warning
    assert engine.usage_log.rows_failed == 3
    engine.close()
