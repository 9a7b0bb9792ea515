"""What the model sees of the page's history, and the reply each tab streams: pure logic, no model."""

from __future__ import annotations

import threading

import pandas as pd
import pytest

from kvchat import stats as panel
from kvchat.chat import content_text
from kvchat.chat_history import kept_history, model_messages, text_message
from kvchat.generation import Generation
from kvchat.tab_replies import TabReplies
from kvchat.records import Usage
from kvchat.ui_chat import Frame, Handlers, ReplySettings, queue_words

SYSTEM = "You are terse."


def badge() -> dict:
    return {"role": "assistant", "content": "12 new tokens in 0.40 s; finish: stop",
            "metadata": {"title": "⚡ 52 prompt tokens · 40 reused from this session", "status": "done"}}  # fmt: skip


# Every status the page has shown: today's live in the status line (queue_words, the loading
# line); older kvchat wrote these into the reply itself, and browsers may still hold them.
STATUSES = [queue_words(2), queue_words(0), "⏳ Loading the model… the reply follows."]


def test_the_model_sees_turns_only_never_a_badge_or_a_status():
    history = [text_message("user", "Hi"), text_message("assistant", "Hello!"), badge()]
    for status in STATUSES:
        history += [text_message("user", "Still there?"), text_message("assistant", status)]
    history += [text_message("user", "Bye")]
    sent = model_messages(SYSTEM, history)
    assert sent == [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        *[{"role": "user", "content": "Still there?"}] * len(STATUSES), {"role": "user", "content": "Bye"},
    ]  # fmt: skip


def test_a_reply_that_merely_mentions_a_status_is_kept():
    said = "Your order shows “⏳ Queued, 2 ahead…” on the tracking page: it ships tomorrow."
    history = [text_message("user", "Where is my order?"), text_message("assistant", said)]
    assert model_messages("", history)[-1]["content"] == said


def test_text_is_kept_verbatim_whatever_shape_the_browser_sends():
    code = "    indented\n\tand tabbed\n"
    sent = model_messages("  ", [{"role": "user", "content": code}, text_message("assistant", code)])
    assert [m["content"] for m in sent] == [code, code]  # a blank system prompt is not sent


def test_the_page_reads_content_as_the_engine_does_and_never_refuses_what_a_browser_saved():
    parts = [{"type": "text", "text": "see "}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": 5}, {"type": "text", "text": "this"}]  # fmt: skip
    history = [{"role": "user", "content": parts}, {"role": "assistant", "content": 42}]
    assert kept_history(history) == history  # a non-string text part no longer breaks a restore
    sent = model_messages("", history)
    assert sent == [{"role": "user", "content": content_text(parts)}, {"role": "assistant", "content": "42"}]
    assert sent[0]["content"] == "see this"


def test_a_saved_history_drops_statuses_and_junk_and_keeps_badges():
    saved = [text_message("user", "Hi"), text_message("assistant", queue_words(3)), "junk", {"role": "tool"},
             text_message("assistant", "Hello!"), badge()]  # fmt: skip
    assert kept_history(saved) == [text_message("user", "Hi"), text_message("assistant", "Hello!"), badge()]
    assert kept_history("not a list") == []


def test_the_page_never_puts_a_status_in_the_message_list():
    """Every frame of a reply that waits in the engine's queue and is then stopped: the statuses
    are in the status line, the message list holds the user's message only."""
    history = [text_message("user", "What is the capital of France?")]

    class Queued:  # stands in for the engine: the request waits two polls, then Stop ends it
        log_warning = disk_problem = None

        def __init__(self) -> None:
            self.generation = Generation()

        def stream(self, *args, **kwargs) -> Generation:
            return self.generation

    engine = Queued()
    handlers = Handlers(Holder(engine))
    request = Request("tab-1")
    reply = handlers.replies.start("tab-1")
    frames = handlers._reply(history, ReplySettings(SYSTEM, 16, 0.0, 1.0), "s", reply, give_back="x")
    seen = [next(frames), next(frames)]
    engine.generation.ahead = 0
    handlers.stop(request)
    engine.generation.finish(Usage(ts=0.0, session="", model="m", prompt_tokens=9, finish_reason="cancelled"))
    seen += list(frames)
    assert [f.status for f in seen[:2]] == [queue_words(0)] * 2
    assert all(f.history == history for f in seen), "a status or an empty reply reached the message list"
    assert seen[-1].status == "" and len(handlers.replies) == 0


def test_a_reply_whose_tab_moved_to_another_chat_draws_nothing_more():
    """Switching chats while a reply waits: its frames stop, so it cannot draw over the other chat
    (which the page would then save as if it were that chat's)."""
    engine_generation = Generation()

    class Queued:
        log_warning = disk_problem = None

        def stream(self, *args, **kwargs) -> Generation:
            return engine_generation

    handlers = Handlers(Holder(Queued()))
    reply = handlers.replies.start("tab-1")
    frames = handlers._reply([text_message("user", "Hi")], ReplySettings("", 16, 0.0, 1.0), "s", reply, None)
    next(frames)  # queued
    handlers.leave(Request("tab-1"))
    engine_generation.finish(Usage(ts=0.0, session="", model="m", prompt_tokens=3, finish_reason="cancelled"))
    assert list(frames) == [Frame(None, None)] and engine_generation.cancelled  # the page is left as it is


class Holder:
    def __init__(self, engine) -> None:
        self.engine = engine

    def peek(self):
        return self.engine


class Request:
    def __init__(self, session_hash: str) -> None:
        self.session_hash = session_hash


def test_a_new_reply_in_a_tab_ends_the_one_it_replaces_and_only_that_tab():
    replies = TabReplies()
    first, other = replies.start("tab"), replies.start("other-tab")
    generation = Generation()
    first.attach(generation)
    second = replies.start("tab")
    assert first.reason == "replaced" and generation.cancelled
    assert not second.ended and not other.ended
    assert replies.get("tab", first.id) is None and replies.get("tab", second.id) is second


def test_stop_before_the_reply_starts_still_stops_it():
    replies = TabReplies()
    reply = replies.start("tab")  # Send registers the reply...
    assert replies.end("tab", "stopped")  # ...Stop lands before the engine was asked
    generation = Generation()
    reply.attach(generation)
    assert generation.cancelled and reply.reason == "stopped"
    replies.finished(reply)
    assert not replies.end("tab", "stopped") and len(replies) == 0


def test_a_later_end_says_more_stop_then_clear_empties_and_a_switch_draws_nothing():
    replies = TabReplies()
    reply = replies.start("tab")
    replies.end("tab", "stopped")
    replies.end("tab", "cleared")
    assert reply.reason == "cleared"
    replies.end("tab", "replaced")
    replies.end("tab", "stopped")
    assert reply.reason == "replaced"


def test_a_tab_is_busy_until_its_reply_ends():
    replies = TabReplies()
    reply = replies.start("tab")
    assert replies.busy("tab") and not replies.busy("other")
    replies.end("tab", "stopped")
    assert not replies.busy("tab")
    replies.finished(reply)
    assert len(replies) == 0


def test_ending_is_safe_from_many_threads():
    replies = TabReplies()
    reply = replies.start("tab")
    threads = [threading.Thread(target=replies.end, args=("tab", reason)) for reason in ("stopped", "cleared") * 20]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert reply.ended and reply.reason in ("stopped", "cleared")


@pytest.mark.parametrize(("first", "last"), [(1, 1), (5, 6), (1, 7), (100, 400)])
def test_request_axes_span_enough_requests_for_whole_number_ticks(first, last):
    frame = pd.DataFrame({"request": list(range(first, last + 1))})
    low, high = panel.request_axis(frame)
    assert low < first and high > max(last, first + panel.REQUEST_AXIS_MIN_SPAN) and high - low > 12
    assert panel.request_axis(pd.DataFrame({"request": []})) is None
