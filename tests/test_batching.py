"""Many requests at once on the tiny model: batched replies equal solo ones, the budget holds at
every step, Stop removes one row and leaves the others untouched, stateless clients reuse."""

import threading

import pytest

from conftest import greedy_baseline
from kvchat import Engine
from kvchat.kv.attention import kv_layout
from kvchat.kv.runs import bytes_per_token
from kvchat.bench.meter import reachable_tensor_bytes
from kvchat.chat import ChatTemplate

SYSTEM = {"role": "system", "content": "You answer questions about rivers and lakes. " * 30}  # ~300 tokens:
# read in place by every row (cascade attention); SHORT_SYSTEM (< 256 tokens) is copied into each row
SHORT_SYSTEM = {"role": "system", "content": "You answer questions about rivers and lakes. " * 6}
NEW = 16


def user(text):
    return {"role": "user", "content": text}


def questions(n, system=SYSTEM):
    return [[system, user(f"Question {i}: how long is river number {i * 7}?")] for i in range(n)]


def start_together(engine, conversations, **settings):
    """Start every request before reading any, so they share forwards."""
    return [engine.stream(f"visitor-{i}", messages, **settings) for i, messages in enumerate(conversations)]


@pytest.mark.parametrize("system", [SYSTEM, SHORT_SYSTEM], ids=["shared-in-place", "short-copied"])
def test_batched_greedy_replies_equal_the_same_requests_served_alone(tiny_loaded, system):
    engine = Engine(tiny_loaded, cache_budget_bytes=2**26)
    conversations = questions(8, system)
    generations = start_together(engine, conversations, max_new_tokens=NEW)
    batched = [(g.wait(timeout=60), g.text) for g in generations]
    assert max(usage.batch_size for usage, _ in batched) > 4  # they really decoded together
    solo = Engine(tiny_loaded, cache_budget_bytes=2**26)
    for i, messages in enumerate(conversations):
        assert solo.chat(f"alone-{i}", messages, max_new_tokens=NEW).text == batched[i][1]
    assert batched[-1][1] == greedy_baseline(tiny_loaded, engine, conversations[-1], NEW)  # and plain generate's
    prefixes = [e for e in engine.stats().entries if e.kind == "prefix"]
    assert len(prefixes) == 1 and prefixes[0].sessions == 8  # the system prompt is stored once
    assert prefixes[0].num_tokens == engine.encode(conversations[0]).prefix_len
    engine.close()
    solo.close()


def test_the_budget_holds_at_every_forward_while_16_requests_run(tiny_loaded):
    conversations = questions(16)
    per_request = max(len(ChatTemplate(tiny_loaded.tokenizer).encode(m).token_ids) for m in conversations) + NEW
    per_token = bytes_per_token(kv_layout(tiny_loaded.model), tiny_loaded.device, tiny_loaded.dtype)
    budget = 4 * per_request * per_token  # room for about four at once: the rest must wait
    engine = Engine(tiny_loaded, cache_budget_bytes=budget)
    samples = []

    def sample(module, args, kwargs, output):
        samples.append(reachable_tensor_bytes(engine))  # idle runs, runs in use, running buffers

    hook = tiny_loaded.model.register_forward_hook(sample, with_kwargs=True)
    try:
        generations = start_together(engine, conversations, max_new_tokens=NEW)
        usages = [g.wait(timeout=120) for g in generations]
    finally:
        hook.remove()
    assert len(samples) > 16 and max(samples) <= budget
    assert max(samples) > budget // 2  # it was really under pressure
    assert all(u.finish_reason in ("stop", "length") for u in usages)
    assert max(u.wait_ms for u in usages) > 0 and max(u.queued_behind for u in usages) > 0
    stats = engine.stats()
    assert stats.running_bytes == 0 and not stats.busy
    assert reachable_tensor_bytes(engine) == stats.used_bytes <= budget
    engine.close()


def test_stop_in_the_middle_of_a_batch_leaves_the_others_untouched(tiny_loaded):
    engine = Engine(tiny_loaded, cache_budget_bytes=2**26)
    conversations = questions(4)
    generations = start_together(engine, conversations, max_new_tokens=40)
    stopped = generations[1]
    for _ in stopped:
        break  # the visitor of row 1 presses Stop after its first piece
    usage = stopped.wait(timeout=60)
    assert usage.finish_reason == "cancelled" and usage.new_tokens < 40
    others = [(g.wait(timeout=60), g.text) for i, g in enumerate(generations) if i != 1]
    solo = Engine(tiny_loaded, cache_budget_bytes=2**26)
    for (u, text), messages in zip(others, [conversations[0], *conversations[2:]]):
        assert text == solo.chat("alone", messages, max_new_tokens=40).text
    stats = engine.stats()
    assert not stats.busy and stats.running_bytes == 0 and not any(e.pinned for e in stats.entries)
    assert reachable_tensor_bytes(engine) == stats.used_bytes == sum(e.nbytes for e in stats.entries)
    engine.close()
    solo.close()


def test_a_stateless_client_resending_its_history_prefills_only_the_new_turn(tiny_loaded):
    engine = Engine(tiny_loaded, cache_budget_bytes=2**26)
    messages = [SYSTEM, user("Which lake is the deepest?")]
    first = engine.chat(None, messages, max_new_tokens=NEW)
    follow = messages + [{"role": "assistant", "content": first.text}, user("And the largest?")]
    second = engine.chat(None, follow, max_new_tokens=NEW)
    first_len = len(engine.encode(messages).token_ids)
    assert second.usage.cache_source == "stateless"
    assert second.usage.cached_tokens > first_len  # the whole first request and some of its reply
    assert second.usage.prefilled_tokens < second.usage.prompt_tokens - first_len
    named = engine.chat("alice", follow, max_new_tokens=NEW)  # a named session cannot read them
    assert named.usage.cache_source == "prefix"
    other_salt = engine.chat(None, follow, max_new_tokens=NEW, cache_salt="another-class")
    assert other_salt.usage.cache_source == "none"
    engine.close()


def test_waiting_requests_see_how_many_are_ahead(tiny_loaded):
    engine = Engine(tiny_loaded, cache_budget_bytes=2**26, max_batch=1)
    gate, seen = threading.Event(), []

    def hold(module, args, kwargs):
        gate.wait(timeout=30)

    hook = tiny_loaded.model.register_forward_pre_hook(hold, with_kwargs=True)
    try:
        generations = start_together(engine, questions(4), max_new_tokens=4)
        seen = [g.ahead for g in generations]
        waiting = [g.waiting for g in generations]
    finally:
        gate.set()
        hook.remove()
    for g in generations:
        g.wait(timeout=60)
    assert waiting[1:] == [True, True, True]
    assert seen[1:] in ([0, 1, 2], [1, 2, 3])  # the first may or may not have been admitted yet
    assert [g.wait().queued_behind for g in generations][-1] >= 2
    engine.close()


def test_max_batch_must_be_positive(tiny_loaded):
    from kvchat import InputError

    with pytest.raises(InputError, match="max batch"):
        Engine(tiny_loaded, cache_budget_bytes=2**20, max_batch=0)
