"""Engine behaviour on a tiny random Llama (fast); the same checks on the real model live in
test_engine_bundled.py."""

import itertools

import pytest

from conftest import greedy_baseline
from kvchat import Engine, GenerationError, InputError
from kvchat.kv.attention import kv_layout
from kvchat.kv.runs import bytes_per_token
from kvchat.bench.meter import reachable_tensor_bytes
from kvchat.chat import ChatTemplate
from kvchat.usage_log import UsageLog

SYSTEM = {"role": "system", "content": "You answer questions about the solar system. " * 8}
NEW = 12


def user(text):
    return {"role": "user", "content": text}


def grow(messages, reply, question):
    return messages + [{"role": "assistant", "content": reply}, user(question)]


def test_multi_turn_replies_equal_plain_generate_and_follow_ups_prefill_less(tiny_engine, tiny_loaded):
    messages = [SYSTEM, user("What is the largest planet?")]
    for turn, question in enumerate(["And the smallest?", "Which has rings?", "Thanks!"]):
        reply = tiny_engine.chat("alice", messages, max_new_tokens=NEW)
        assert reply.text == greedy_baseline(tiny_loaded, tiny_engine, messages, NEW)
        usage = reply.usage
        if turn == 0:
            assert usage.cache_source == "none" and usage.cached_tokens == 0
        else:
            assert usage.cache_source == "session"
            assert usage.prefilled_tokens < 25 < usage.cached_tokens  # only the new turn is prefilled
        messages = grow(messages, reply.text, question)


def test_second_session_starts_from_the_shared_system_prefix(tiny_engine, tiny_loaded):
    first = tiny_engine.chat("alice", [SYSTEM, user("Tell me about Mars.")], max_new_tokens=NEW)
    messages = [SYSTEM, user("Tell me about Venus.")]
    second = tiny_engine.chat("bob", messages, max_new_tokens=NEW)
    prefix_len = tiny_engine.encode(messages).prefix_len
    assert first.usage.cached_tokens == 0
    assert second.usage.cache_source == "prefix"
    assert second.usage.cached_tokens == prefix_len > 50
    assert second.text == greedy_baseline(tiny_loaded, tiny_engine, messages, NEW)


def test_private_turns_never_reach_another_session(tiny_engine):
    secret = [SYSTEM, user("My password is hunter2, remember it.")]
    tiny_engine.chat("alice", secret, max_new_tokens=NEW)
    other = tiny_engine.chat("bob", secret, max_new_tokens=NEW)  # same text, other session
    assert other.usage.cache_source == "prefix"
    assert other.usage.cached_tokens == tiny_engine.encode(secret).prefix_len


def test_edit_and_retry_crop_the_session_cache_and_stay_exact(tiny_engine, tiny_loaded):
    messages = [SYSTEM, user("Name a moon of Jupiter.")]
    first = tiny_engine.chat("alice", messages, max_new_tokens=NEW)
    messages = grow(messages, first.text, "How big is it?")
    tiny_engine.chat("alice", messages, max_new_tokens=NEW)
    retry = tiny_engine.chat("alice", messages, max_new_tokens=NEW)  # regenerate the last turn
    assert retry.usage.cached_tokens == retry.usage.prompt_tokens - 1  # everything but the last token
    edited = [SYSTEM, user("Name a moon of Saturn.")]  # edit the first user message
    reply = tiny_engine.chat("alice", edited, max_new_tokens=NEW)
    ids = tiny_engine.encode(edited).token_ids
    old = tiny_engine.encode(messages).token_ids
    expected = next(i for i, (a, b) in enumerate(zip(ids, old)) if a != b)
    assert reply.usage.cache_source == "session"
    assert reply.usage.cached_tokens == expected  # kept up to where the conversation changed
    assert reply.text == greedy_baseline(tiny_loaded, tiny_engine, edited, NEW)


def test_budget_holds_after_every_request_and_evicted_sessions_still_answer(tiny_loaded, usage_db):
    conversations = {f"s{i}": [SYSTEM, user(f"Question number {i} about comets?")] for i in range(8)}
    prompt_tokens = len(ChatTemplate(tiny_loaded.tokenizer).encode(conversations["s0"]).token_ids)
    budget = _nbytes(tiny_loaded, prompt_tokens + NEW + 40)  # one running request and ~2 sessions' turns
    engine = Engine(tiny_loaded, cache_budget_bytes=budget, usage_log=UsageLog(usage_db))
    for name, messages in itertools.chain(conversations.items(), conversations.items()):
        reply = engine.chat(name, messages, max_new_tokens=NEW)
        held = reachable_tensor_bytes(engine)  # counted from the tensors, not from the store's ledger
        assert 0 < held <= engine.stats().budget_bytes
        assert held == engine.stats().used_bytes
        assert reply.text == greedy_baseline(tiny_loaded, engine, messages, NEW)
    assert engine.stats().evictions > 0
    engine.close()


def test_request_bigger_than_the_whole_budget_is_refused_before_any_work(tiny_loaded):
    engine = Engine(tiny_loaded, cache_budget_bytes=_nbytes(tiny_loaded, 40), usage_log=None)
    with pytest.raises(InputError, match=r"needs [\d.]+ MiB of KV cache .* but the cache budget is [\d.]+ MiB"):
        engine.stream("alice", [SYSTEM, user("Hello?")], max_new_tokens=NEW)
    assert engine.stats().requests == 0 and reachable_tensor_bytes(engine) == 0
    engine.close()


def test_an_oversized_conversation_does_not_wipe_other_sessions(tiny_loaded):
    engine = Engine(tiny_loaded, cache_budget_bytes=_nbytes(tiny_loaded, 768), usage_log=None)
    short = {name: [user(f"Hi, I am {name}.")] for name in ("alice", "bob")}
    for name, messages in short.items():
        engine.chat(name, messages, max_new_tokens=NEW)
    huge = [user("Tell me everything about comets. " * 200)]  # ~1,250 tokens: over the 768-position budget
    with pytest.raises(InputError, match="cache budget"):
        engine.chat("carol", huge, max_new_tokens=NEW)
    for name, messages in short.items():  # both still find their own cache
        follow = engine.chat(name, grow(messages, "Hello.", "And then?"), max_new_tokens=NEW)
        assert follow.usage.cache_source == "session" and follow.usage.cached_tokens > 10
    engine.close()


def test_cached_bytes_are_the_real_tensor_bytes(tiny_engine):
    tiny_engine.chat("alice", [user("Hi")], max_new_tokens=NEW)
    tiny_engine.chat("bob", [SYSTEM, user("Hi")], max_new_tokens=NEW)
    stats = tiny_engine.stats()
    assert len(stats.entries) == 3  # two sessions and the shared prefix
    assert stats.used_bytes == sum(e.nbytes for e in stats.entries) == reachable_tensor_bytes(tiny_engine) > 0


def test_a_system_prompt_that_only_begins_alike_is_not_served_the_others_kv(tiny_engine, tiny_loaded):
    tiny_engine.chat("alice", [SYSTEM, user("Hi")], max_new_tokens=NEW)
    other = [{"role": "system", "content": SYSTEM["content"] + " Answer in French."}, user("Hi")]
    reply = tiny_engine.chat("bob", other, max_new_tokens=NEW)
    assert reply.usage.cached_tokens < tiny_engine.encode(other).prefix_len
    assert reply.text == greedy_baseline(tiny_loaded, tiny_engine, other, NEW)


def test_cache_salt_scopes_sharing_of_system_prompts(tiny_loaded):
    engine = Engine(tiny_loaded, cache_budget_bytes=2**26, prefix_salt="default-team")
    messages = [SYSTEM, user("Hi")]
    sources = {}
    for name, salt in (("alice", "team-a"), ("bob", "team-b"), ("carol", "team-a"), ("dave", None), ("erin", None)):
        sources[name] = engine.chat(name, messages, max_new_tokens=2, cache_salt=salt).usage.cache_source
    assert sources == {"alice": "none", "bob": "none", "carol": "prefix", "dave": "none", "erin": "prefix"}
    with pytest.raises(InputError, match="cache_salt"):
        engine.stream("frank", messages, cache_salt=7)


def test_stop_mid_reply_cancels_the_backend_and_the_session_stays_exact(tiny_engine, tiny_loaded):
    messages = [SYSTEM, user("Count to one hundred.")]
    generation = tiny_engine.stream("alice", messages, max_new_tokens=200)
    for _ in generation:
        break  # the consumer leaves: a Stop button or a closed tab
    usage = generation.wait(timeout=30)
    assert usage.finish_reason == "cancelled"
    assert usage.new_tokens < 200
    stats = tiny_engine.stats()
    assert not stats.busy and not any(e.pinned for e in stats.entries)
    follow = grow(messages, generation.text, "Go on.")
    reply = tiny_engine.chat("alice", follow, max_new_tokens=NEW)
    assert reply.usage.cache_source == "session"
    assert reply.text == greedy_baseline(tiny_loaded, tiny_engine, follow, NEW)


def test_failing_forward_reports_error_then_the_session_recovers(tiny_engine, tiny_loaded):
    messages = [SYSTEM, user("Hello there")]
    tiny_engine.chat("alice", messages, max_new_tokens=NEW)
    calls = itertools.count()

    def flaky(module, args, kwargs):
        if next(calls) == 3:  # the fourth forward: mid-reply, after the cache was written
            raise RuntimeError("injected fault")

    hook = tiny_loaded.model.register_forward_pre_hook(flaky, with_kwargs=True)
    follow = grow(messages, "ok", "What next?")
    try:
        with pytest.raises(GenerationError, match="injected fault") as failure:
            tiny_engine.chat("alice", follow, max_new_tokens=NEW)
    finally:
        hook.remove()
    assert failure.value.usage.finish_reason == "error"
    assert [e.kind for e in tiny_engine.stats().entries] == ["prefix"]  # the half-written turns were dropped
    assert tiny_engine.stats().running_bytes == 0 and not tiny_engine.stats().busy
    reply = tiny_engine.chat("alice", follow, max_new_tokens=NEW)
    assert reply.usage.cache_source == "prefix"  # started over from what could be trusted
    assert reply.text == greedy_baseline(tiny_loaded, tiny_engine, follow, NEW)


@pytest.mark.parametrize(
    ("messages", "settings", "words"),
    [
        ([], {}, "empty"),
        ([user("hi"), {"role": "system", "content": "yo"}], {}, "end with a user"),
        ([user("hi")], {"seed": 2**64}, "seed must be a whole number"),
        ([{"role": "robot", "content": "x"}], {}, "role"),
        ([user("hi")], {"temperature": -1}, "temperature"),
        ([user("hi")], {"temperature": "warm"}, "temperature must be a number"),
        ([user("hi")], {"max_new_tokens": 2.5}, "whole number"),
        ([user("hi")], {"max_new_tokens": "many"}, "must be a number"),
        ([user("hi")], {"top_p": 0}, "top-p"),
        ([user("hi")], {"top_p": 1.5}, "top-p"),
        ([user("hi")], {"max_new_tokens": 0}, "max new tokens"),
        ([user("hi")], {"max_new_tokens": 10**6}, "max new tokens"),
        ([user("word " * 3000)], {}, "context holds 2048"),
    ],
)  # fmt: skip
def test_bad_input_raises_a_clear_input_error_and_nothing_changes(tiny_engine, messages, settings, words):
    with pytest.raises(InputError, match=words):
        tiny_engine.stream("alice", messages, **settings)
    assert tiny_engine.stats().requests == 0


def test_end_session_frees_its_bytes_but_keeps_the_shared_prefix(tiny_engine):
    tiny_engine.chat("alice", [SYSTEM, user("Hi")], max_new_tokens=NEW)
    assert tiny_engine.has_session("alice")
    assert tiny_engine.end_session("alice")
    assert not tiny_engine.has_session("alice")
    kinds = [e.kind for e in tiny_engine.stats().entries]
    assert kinds == ["prefix"]


def test_sampling_with_a_seed_is_reproducible(tiny_engine):
    messages = [user("Write something random.")]
    settings = {"max_new_tokens": NEW, "temperature": 0.9, "top_p": 0.9, "seed": 3}
    assert tiny_engine.chat("a", messages, **settings).text == tiny_engine.chat("b", messages, **settings).text


def test_a_stop_string_ends_the_reply_where_it_first_appears(tiny_engine):
    messages = [user("Count for me.")]
    whole = tiny_engine.chat(None, messages, max_new_tokens=24)
    assert whole.usage.finish_reason == "length" and len(whole.text) > 8
    stop = whole.text[4:7]
    cut = tiny_engine.chat(None, messages, max_new_tokens=24, stop=[stop])
    assert cut.usage.finish_reason == "stop" and cut.usage.new_tokens < whole.usage.new_tokens
    assert whole.text.startswith(cut.text) and cut.text.find(stop) == whole.text.find(stop)  # at its first place


def test_every_request_is_logged_without_its_text(tiny_engine, usage_db):
    import sqlite_utils

    tiny_engine.chat("alice", [SYSTEM, user("The secret word is pineapple.")], max_new_tokens=NEW)
    tiny_engine.chat("bob", [SYSTEM, user("Hello")], max_new_tokens=NEW)
    assert tiny_engine.usage_log.flush()
    rows = list(sqlite_utils.Database(usage_db)["requests"].rows)
    assert [r["cache_source"] for r in rows] == ["none", "prefix"]
    assert rows[1]["cached_tokens"] > 0 and rows[1]["session"] != rows[0]["session"]
    assert all(r["user_text"] is None and r["reply_text"] is None for r in rows)
    assert b"pineapple" not in usage_db.read_bytes()
    assert "alice" not in {r["session"] for r in rows}  # session ids are stored hashed


def _nbytes(loaded, num_tokens):
    """Bytes of `num_tokens` positions of KV, measured on a real buffer."""
    return bytes_per_token(kv_layout(loaded.model), loaded.device, loaded.dtype) * num_tokens


def test_store_text_logs_the_typed_text_of_browser_style_messages(tiny_loaded, usage_db):
    import sqlite_utils

    engine = Engine(tiny_loaded, cache_budget_bytes=2**26, usage_log=UsageLog(usage_db, store_text=True))
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is a comet?"}]}]
    reply = engine.chat("alice", parts, max_new_tokens=NEW)
    engine.close()
    row = next(sqlite_utils.Database(usage_db)["requests"].rows)
    assert (row["user_text"], row["reply_text"]) == ("What is a comet?", reply.text)


def test_a_continued_assistant_message_equals_plain_generate_and_reuses_the_session(tiny_engine, tiny_loaded):
    messages = [SYSTEM, user("Describe Saturn."), {"role": "assistant", "content": "Saturn is the planet"}]
    reply = tiny_engine.chat("carol", messages, max_new_tokens=NEW)
    assert reply.text == greedy_baseline(tiny_loaded, tiny_engine, messages, NEW)
    again = tiny_engine.chat("carol", messages[:-1] + [{"role": "assistant", "content": "Saturn is the planet"
                                                       + reply.text}, user("And Jupiter?")], max_new_tokens=NEW)
    assert again.usage.cache_source == "session"
    assert again.usage.cached_tokens >= len(tiny_engine.encode(messages).token_ids)  # the continued prompt, reused


def test_a_vanishing_temperature_samples_like_greedy_instead_of_failing(tiny_engine, tiny_loaded):
    messages = [SYSTEM, user("Which planet is red?")]
    reply = tiny_engine.chat("dora", messages, max_new_tokens=NEW, temperature=4.4e-173, seed=1)
    assert reply.text == greedy_baseline(tiny_loaded, tiny_engine, messages, NEW)


def test_cached_says_what_the_next_request_would_reuse_and_matches_it(tiny_engine):
    messages = [SYSTEM, user("What is the largest planet?")]
    assert tiny_engine.cached("alice", messages).cached_tokens == 0  # nothing computed yet
    reply = tiny_engine.chat("alice", messages, max_new_tokens=NEW)
    follow_up = grow(messages, reply.text, "And the smallest?")
    alice, bob = tiny_engine.cached("alice", follow_up), tiny_engine.cached("bob", follow_up)
    assert alice.prompt_tokens == len(tiny_engine.encode(follow_up).token_ids) and alice.disk_tokens == 0
    assert bob.cached_tokens < alice.cached_tokens < alice.prompt_tokens  # bob may read the system prompt only
    assert tiny_engine.chat("alice", follow_up, max_new_tokens=NEW).usage.cached_tokens == alice.cached_tokens
    tiny_engine.clear_cache()
    assert tiny_engine.cached("alice", follow_up).cached_tokens == 0
