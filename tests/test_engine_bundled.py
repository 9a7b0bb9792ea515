"""Exactness on the real bundled SmolLM2 (float32, greedy): a reply that reuses cached KV is the
reply plain `model.generate` gives on the whole conversation, token for token."""

import pytest

from conftest import greedy_baseline
from kvchat import Engine
from kvchat.kv.attention import kv_layout
from kvchat.kv.runs import bytes_per_token
from kvchat.chat import ChatTemplate
from kvchat.presets import load_presets

NEW = 24
FAQ = {"role": "system", "content": load_presets()["Acme cloud support faq (long)"]}
CONVERSATIONS = {
    "cooking": ({"role": "system", "content": "You are a friendly cooking teacher."},
                ["How do I boil an egg?", "And for a soft yolk?", "Can I use an air fryer?"]),
    "no-system": (None, ["What is the capital of France?", "What is it famous for?", "Name a museum."]),
    "faq": (FAQ, ["How much does the Team plan cost?", "What happens if a payment fails?", "Thanks!"]),
}  # fmt: skip


@pytest.fixture
def engine(bundled_loaded):
    engine = Engine(bundled_loaded, cache_budget_bytes=512 * 2**20, usage_log=None)
    yield engine
    engine.close()


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_multi_turn_replies_equal_plain_generate(engine, bundled_loaded, name):
    system, questions = CONVERSATIONS[name]
    messages = [system] if system else []
    for turn, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        reply = engine.chat(name, messages, max_new_tokens=NEW)
        assert reply.text == greedy_baseline(bundled_loaded, engine, messages, NEW), f"turn {turn}"
        if turn:
            assert reply.usage.cache_source == "session" and reply.usage.prefilled_tokens < 40
        messages.append({"role": "assistant", "content": reply.text})


def test_shared_long_prefix_then_edit_stays_exact(engine, bundled_loaded):
    engine.chat("alice", [FAQ, {"role": "user", "content": "Do you offer refunds?"}], max_new_tokens=NEW)
    messages = [FAQ, {"role": "user", "content": "How do I add a custom domain?"}]
    reply = engine.chat("bob", messages, max_new_tokens=NEW)
    assert reply.usage.cache_source == "prefix" and reply.usage.cached_tokens > 1000
    assert reply.text == greedy_baseline(bundled_loaded, engine, messages, NEW)
    messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "Is it free?"}]
    engine.chat("bob", messages, max_new_tokens=NEW)
    messages[1] = {"role": "user", "content": "How do I add a wildcard domain?"}  # edit the first question
    edited = engine.chat("bob", messages[:2], max_new_tokens=NEW)
    assert edited.usage.cache_source == "session" and edited.usage.cached_tokens > 1000
    assert edited.text == greedy_baseline(bundled_loaded, engine, messages[:2], NEW)


def test_after_an_eviction_the_evicted_session_is_still_exact(bundled_loaded):
    first = [{"role": "user", "content": "Give me a fun fact about owls."}]
    follow = first + [{"role": "assistant", "content": "Owls can turn their heads far."},
                      {"role": "user", "content": "Another one, please."}]  # fmt: skip
    per_token = bytes_per_token(kv_layout(bundled_loaded.model), bundled_loaded.device, bundled_loaded.dtype)
    budget = per_token * (len(ChatTemplate(bundled_loaded.tokenizer).encode(follow).token_ids) + NEW)
    engine = Engine(bundled_loaded, cache_budget_bytes=budget, usage_log=None)  # the follow-up just fits alone
    engine.chat("alice", first, max_new_tokens=NEW)
    engine.chat("bob", [{"role": "user", "content": "Give me a fun fact about bees."}], max_new_tokens=NEW)
    assert engine.stats().evictions >= 1 and engine.stats().used_bytes <= budget
    reply = engine.chat("alice", follow, max_new_tokens=NEW)
    assert reply.text == greedy_baseline(bundled_loaded, engine, follow, NEW)


def test_after_a_restart_the_conversation_read_back_from_disk_is_exact(bundled_loaded, tmp_path):
    messages = [FAQ, {"role": "user", "content": "How much does the Team plan cost?"}]
    engine = Engine(bundled_loaded, cache_budget_bytes=512 * 2**20, usage_log=None, disk_dir=tmp_path,
                    persist_sessions=True)  # fmt: skip
    first = engine.chat("alice", messages, max_new_tokens=NEW)
    engine.close()
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And Business?"}]
    engine = Engine(bundled_loaded, cache_budget_bytes=512 * 2**20, usage_log=None, disk_dir=tmp_path,
                    persist_sessions=True)  # fmt: skip
    reply = engine.chat("alice", messages, max_new_tokens=NEW)
    engine.close()
    assert reply.usage.cache_tier == "disk" and reply.usage.prefilled_tokens < 40
    assert reply.text == greedy_baseline(bundled_loaded, engine, messages, NEW)
