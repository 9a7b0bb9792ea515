"""The chat page as people use it, in Chromium on the bundled model: status is never conversation,
Stop/Clear/Undo end the reply in the engine with no error, typing is never erased, no tab loses a
turn, and a list of chats kept in the browser, each continuing warm."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import sqlite_utils
from gradio_client import Client
from playwright.sync_api import Page

from conftest import wait_until
from test_app import running_app
from test_browser import (  # noqa: F401 - `browser` is a fixture
    badges, browser, chat_and_keep, chat_once, message_box, send, set_max_tokens, stored_chats, wait_kept,
)

LOADED_S = 180


@pytest.fixture(scope="module")
def app(tmp_path_factory, bundled_dir):
    with running_app(tmp_path_factory.mktemp("chat-page")) as served:
        yield served


@pytest.fixture
def context(browser):
    """One browser profile: its tabs share the chats kept in localStorage."""
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    yield context
    context.close()


def open_tab(context, url: str) -> Page:
    page = context.new_page()
    page.goto(url)
    page.get_by_text("✅").first.wait_for(timeout=LOADED_S * 1000)
    page.wait_for_function("() => window.kvchat !== undefined")
    return page


def turns(page: Page) -> list[str]:
    """The texts of the message list's user and assistant messages, in order (badges excluded)."""
    return [t.strip() for t in page.locator(".message.panel-full-width:not(.thought)").all_inner_texts()]


def session_entries(url: str) -> int:
    """Cached runs that belong to one session (a chat's own turns), from the /stats API."""
    return sum(e["kind"] == "session" for e in Client(url, verbose=False).predict(api_name="/stats")["entries"])


def user_texts(page: Page) -> list[str]:
    return page.locator(".user.message").all_inner_texts()


def engine_idle(url: str, timeout_s: float = 15) -> None:
    client = Client(url, verbose=False)
    wait_until(lambda: not client.predict(api_name="/stats")["busy"], timeout_s=timeout_s, interval_s=0.2,
               message="the engine stops generating")


def row_count(db: Path) -> int:
    return sqlite_utils.Database(db)["requests"].count if db.exists() else 0


def settled_rows(url: str, db: Path) -> int:
    """The log's row count once the engine is idle and every request it finished is written (the
    engine logs each request it counts in /stats, on a writer thread)."""
    engine_idle(url)
    client = Client(url, verbose=False)
    finished = lambda: client.predict(api_name="/stats")["requests"]  # noqa: E731
    wait_until(lambda: row_count(db) == finished(), timeout_s=20, interval_s=0.2,
               message=lambda: f"the log holds a row per finished request ({row_count(db)} rows, {finished()} requests)")
    return row_count(db)


def wait_rows(db: Path, at_least: int, timeout_s: float = 20) -> list[dict]:
    wait_until(lambda: row_count(db) >= at_least, timeout_s=timeout_s, interval_s=0.2,
               message=lambda: f"the log holds {at_least} rows (it holds {row_count(db)})")
    return list(sqlite_utils.Database(db).query("select * from requests order by id"))


def no_error_shown(page: Page) -> bool:
    """Gradio's error states: the red "Error" over an output, or an error toast."""
    return page.get_by_text("Error", exact=True).count() == 0 and page.locator(".toast-body.error").count() == 0


def reply_grows(page: Page, chars: int, replies: int = 1) -> None:
    """Wait until the page shows `replies` replies, the last at least `chars` characters long."""
    page.wait_for_function("""([n, count]) => {
        const replies = document.querySelectorAll('.bot.message .message.panel-full-width:not(.thought)');
        return replies.length === count && replies[count - 1].innerText.trim().length >= n; }""",
                           arg=[chars, replies], timeout=120_000)  # fmt: skip


def streaming(context, url: str, text: str, max_tokens: int, chars: int) -> Page:
    """A fresh tab whose reply to `text` is streaming (at least `chars` characters in)."""
    page = open_tab(context, url)
    set_max_tokens(page, max_tokens)
    send(page, text)
    reply_grows(page, chars)
    return page


# --- 1. status is never conversation ---

def fill_the_engine(url: str, count: int, max_tokens: int) -> list:
    """`count` long streaming API requests, held open (closing one cancels it)."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=10) as response:
        model = json.load(response)["data"][0]["id"]
    streams = []
    for i in range(count):
        body = json.dumps({"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                           "messages": [{"role": "user", "content": f"Count slowly from {i} to a million."}]})
        request = urllib.request.Request(f"{url.rstrip('/')}/v1/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        response = urllib.request.urlopen(request, timeout=60)
        response.readline()  # the first event: it is running or waiting
        streams.append(response)
    return streams


def test_a_queued_reply_shows_its_place_outside_the_chat_and_stop_leaves_no_trace(app, context, tokenizer):
    url, db = app
    page = open_tab(context, url)
    system = page.get_by_label("System prompt", exact=True).input_value()
    # 512 MiB holds ~11,600 tokens of KV beside ~1,500 pinned: two of these reservations fit, four do not
    streams = fill_the_engine(url, 4, 4_200)
    try:
        send(page, "What is the capital of France?")
        status = page.locator("#kvchat-reply-status")
        status.get_by_text("⏳ Queued, 2 ahead").wait_for(timeout=30_000)
        assert "Queued" not in " ".join(turns(page)), "the status is drawn as a reply"
        page.get_by_role("button", name="Stop", exact=True).click()
        page.wait_for_function("() => !document.querySelector('#kvchat-reply-status').innerText.includes('Queued')",
                               timeout=10_000)  # fmt: skip
        assert turns(page) == ["What is the capital of France?"] and no_error_shown(page)
    finally:
        for stream in streams:
            stream.close()
    engine_idle(url, 60)
    page.reload()
    page.get_by_text("✅").first.wait_for(timeout=60_000)
    page.get_by_text("What is the capital of France?").first.wait_for(timeout=30_000)
    assert turns(page) == ["What is the capital of France?"]  # no placeholder came back with the reload
    before = settled_rows(url, db)
    chat_once(page, "And of Italy?", 8)
    row = wait_rows(db, before + 1)[-1]
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": "What is the capital of France?"},
         {"role": "user", "content": "And of Italy?"}], add_generation_prompt=True, tokenize=True, return_dict=True,
    )["input_ids"]  # fmt: skip
    assert row["prompt_tokens"] == len(expected), "the model was sent something besides the two questions"


# --- 2. Clear, Stop, Undo end cleanly ---

def test_clear_while_streaming_stops_the_engine_and_the_chat_stays_empty(app, context):
    url, db = app
    page = open_tab(context, url)
    sessions = session_entries(url)  # other chats' turns, earlier tests'
    chat_and_keep(page, "Name a planet.", 8)
    set_max_tokens(page, 150)
    before = settled_rows(url, db)
    send(page, "Write a long story about a lighthouse keeper.")
    reply_grows(page, 20, replies=2)
    page.get_by_role("button", name="Clear").click()
    engine_idle(url)
    row = wait_rows(db, before + 1)[-1]
    assert row["finish_reason"] == "cancelled" and row["new_tokens"] < 150
    # Clear drops the KV once the reply lets go of it, which it has: well within FORGET_WAIT_S (5 s),
    # after which Clear would drop it without waiting
    wait_until(lambda: session_entries(url) == sessions, timeout_s=3, interval_s=0.2,
               message="the cleared chat's KV leaves the cache")
    # Proving a negative: nothing on the page marks a stream's last frame, and anything still in
    # flight would have redrawn the chat by now
    time.sleep(1.5)
    assert turns(page) == [] and no_error_shown(page)
    page.reload()
    page.get_by_text("✅").first.wait_for(timeout=60_000)
    time.sleep(1)  # the page reopens its chat after ✅; a cleared one reopens as nothing, which nothing shows
    assert turns(page) == []
    assert not any("lighthouse" in json.dumps(chat) for chat in stored_chats(page).values())


def test_stop_ten_times_ends_each_reply_as_stopped_with_no_error(app, context):
    url, db = app
    page = open_tab(context, url)
    set_max_tokens(page, 200)
    topics = ("a dragon who bakes bread", "a lighthouse", "a lost robot", "two rival chefs", "a desert town",
              "a clockmaker", "a whale", "a tiny moon", "a library cat", "a mountain train")  # fmt: skip
    for attempt, topic in enumerate(topics):
        page.get_by_role("button", name="New chat").click()  # a long reply is likeliest in a fresh chat
        page.wait_for_function("() => document.querySelectorAll('.message-row').length === 0", timeout=10_000)
        before = settled_rows(url, db)
        send(page, f"Write a long story about {topic}.")
        reply_grows(page, 1 + 4 * attempt)  # a few words in, a little later each time
        page.get_by_role("button", name="Stop", exact=True).click()
        badges(page).first.wait_for(timeout=30_000)
        assert "stopped" in badges(page).first.inner_text(), f"Stop {attempt + 1} did not stop the reply"
        assert no_error_shown(page), f"an error is shown after Stop {attempt + 1}"
        assert wait_rows(db, before + 1)[-1]["finish_reason"] == "cancelled"
    assert page.locator("#kvchat-chats label").count() >= 10  # each stopped reply was kept
    before = settled_rows(url, db)  # Stop at once after Send, before the reply can have begun
    send(page, "Write a long story about a river.")
    page.get_by_role("button", name="Stop", exact=True).click()
    settled_rows(url, db)  # the engine is idle and each request it ended is logged
    rows = list(sqlite_utils.Database(db).query("select finish_reason from requests where id > ?", [before]))
    assert all(r["finish_reason"] == "cancelled" for r in rows), rows
    assert user_texts(page)[-1] == "Write a long story about a river." and no_error_shown(page)


def test_typing_while_a_reply_streams_is_kept(app, context):
    url, _ = app
    page = streaming(context, url, "Describe the sea in a few sentences.", 60, 5)
    message_box(page).type("my next question")
    badges(page).first.wait_for(timeout=120_000)
    wait_kept(page, "Describe the sea in a few sentences.")  # the reply's events have ended
    assert message_box(page).input_value() == "my next question"


def test_retry_undo_edit_wait_for_the_reply_and_what_a_reload_restores_is_on_screen(app, context):
    """Gradio disables Retry, Undo and Edit while a reply streams (so none can race it); after Stop
    they work, and a reload restores exactly the chat on screen."""
    url, db = app
    page = streaming(context, url, "Write a poem about autumn leaves.", 200, 20)
    for name in ("Retry", "Undo", "Edit"):
        assert page.get_by_role("button", name=name, exact=True).last.is_disabled(), f"{name} is usable mid-reply"
    page.get_by_role("button", name="Stop", exact=True).click()
    badges(page).first.wait_for(timeout=30_000)
    page.get_by_role("button", name="Undo", exact=True).click()
    page.wait_for_function("() => document.querySelectorAll('.message-row').length === 0", timeout=10_000)
    assert message_box(page).input_value() == "Write a poem about autumn leaves."
    chat_once(page, "Name two planets.", 8)
    page.get_by_role("button", name="Retry", exact=True).click()
    page.wait_for_function("() => document.querySelectorAll('.thought').length === 1", timeout=10_000)
    badges(page).first.wait_for(timeout=60_000)
    engine_idle(url)
    # let the retry's last frame and save land: a greedy retry redraws the very reply it replaces,
    # so neither the screen nor the stored chat shows when they have
    time.sleep(1)
    shown = turns(page)
    page.reload()
    page.get_by_text("✅").first.wait_for(timeout=60_000)
    page.get_by_text("Name two planets.").nth(1).wait_for(timeout=30_000)  # the list and the chat
    assert turns(page) == shown and no_error_shown(page)


def test_sending_while_a_reply_streams_keeps_the_message_in_the_box(app, context):
    url, _ = app
    page = streaming(context, url, "Write a long story about a snowy owl.", 120, 10)
    send(page, "And a short one?")
    page.get_by_text("A reply is still coming").first.wait_for(timeout=10_000)
    assert message_box(page).input_value() == "And a short one?" and len(user_texts(page)) == 1
    page.get_by_role("button", name="Stop", exact=True).click()
    badges(page).first.wait_for(timeout=30_000)
    message_box(page).press("Enter")  # now it goes
    page.locator(".user.message").filter(has_text="And a short one?").wait_for(timeout=10_000)
    assert message_box(page).input_value() == ""
    page.get_by_role("button", name="Stop", exact=True).click()


def test_an_empty_send_changes_nothing(app, context):
    url, _ = app
    page = open_tab(context, url)
    chat_and_keep(page, "Name a blue flower.", 8)
    shown = turns(page)
    send(page, "")
    page.get_by_text("Type a message first").first.wait_for(timeout=10_000)
    # Proving a negative: the reply event after an empty Send must draw nothing, and nothing on the
    # page marks its end
    time.sleep(1.5)
    assert turns(page) == shown and page.locator("#kvchat-chats label").filter(has_text="blue flower").count() == 1
    assert any("blue flower" in json.dumps(chat) for chat in stored_chats(page).values())


STORED_SINCE = """(since) => Object.values(JSON.parse(localStorage.getItem('kvchat-chats') || '{}').chats || {})
    .some((chat) => chat.updated_ms > since && chat.history.length >= 2)"""  # a reply, stored after `since`


def test_a_reload_mid_reply_keeps_what_was_written(app, context):
    url, _ = app
    page = streaming(context, url, "Write a long story about a copper kettle.", 200, 40)
    since_ms = page.evaluate("Date.now()")  # 40 characters of the reply are on screen
    wait_until(lambda: page.evaluate(STORED_SINCE, since_ms), timeout_s=2,
               message="the page stores the streaming reply (it does so at least once a second)")
    written = turns(page)[-1]
    page.reload()
    page.get_by_text("✅").first.wait_for(timeout=60_000)
    page.get_by_text("copper kettle").nth(1).wait_for(timeout=30_000)  # the list and the chat
    after = turns(page)
    assert after[0] == "Write a long story about a copper kettle." and len(after) == 2
    assert after[1].startswith(written[:40]), (written, after)
    engine_idle(url)  # the closed page stopped the reply in the engine


def test_switching_chats_while_a_reply_streams_keeps_each_chat_its_own(app, context):
    url, _ = app
    page = streaming(context, url, "Write a long story about a brave snail.", 200, 20)
    page.get_by_role("button", name="New chat").click()
    engine_idle(url)  # leaving the chat stopped its reply in the engine
    # Proving a negative: nothing on the page marks a stream's last frame, and anything still in
    # flight would have drawn the old chat here by now
    time.sleep(1.5)
    assert turns(page) == [] and no_error_shown(page)
    (snail,) = [c for c in stored_chats(page).values() if "brave snail" in json.dumps(c)]
    assert [m["role"] for m in snail["history"]] == ["user", "assistant"]  # kept, with what was written
    page.locator("#kvchat-chats label").filter(has_text="brave snail").click()
    page.locator(".user.message").filter(has_text="brave snail").wait_for(timeout=10_000)
    assert len(turns(page)) == 2


# --- 3. no tab loses a turn; a list of chats ---

def kept(page: Page, history: list[str], system: str = "") -> dict:
    """Save `history` (alternating user/assistant texts) as the tab's open chat, as the page does."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": [{"type": "text", "text": t}]}
                for i, t in enumerate(history)]  # fmt: skip
    return page.evaluate("([h, s]) => window.kvchat.save(h, s)[0]", [messages, system])


def test_the_rule_that_keeps_every_turn(app, context):
    """chats.js alone, in two tabs (no model): a tab that only looked never copies a chat; a chat
    cleared and begun again in one tab is not overwritten by the other; every version is kept."""
    url, _ = app
    first, second = open_tab(context, url), open_tab(context, url)
    kept(first, ["a", "b"])
    second.reload()  # opens the newest chat: the one `first` wrote
    second.wait_for_function("() => window.kvchat !== undefined")
    kept(first, ["a", "b", "c", "d"])
    index = second.evaluate("([h, s]) => window.kvchat.newChat(h, s)[2]", [[], ""])  # looked, changed nothing
    assert len(index["chats"]) == 1 and not index["notes"]
    third = open_tab(context, url)  # opens a-b-c-d
    kept(first, [])  # Clear...
    kept(first, ["hello", "there"])  # ...and begin again, in the same chat
    index = kept(third, ["a", "b", "c", "d", "e", "f"])
    assert any("changed in another tab" in note for note in index["notes"])
    chats = sorted(" ".join(m["content"][0]["text"] for m in c["history"]) for c in stored_chats(first).values())
    assert chats == ["a b c d e f", "hello there"]

def test_two_tabs_on_one_chat_never_lose_a_turn(app, context):
    url, _ = app
    first = open_tab(context, url)
    chat_and_keep(first, "Name a red fruit.", 8)
    second = open_tab(context, url)
    second.get_by_text("Name a red fruit.").first.wait_for(timeout=30_000)  # it opens the newest chat
    chat_and_keep(first, "Name a yellow fruit.", 8)
    chat_and_keep(second, "Name a green vegetable.", 8)
    second.get_by_text("changed in another tab").first.wait_for(timeout=10_000)  # it says so
    first.locator("#kvchat-chats label").nth(1).wait_for(timeout=10_000)  # the other tab's list follows
    first.reload()
    first.get_by_text("✅").first.wait_for(timeout=60_000)
    first.get_by_text("Name a yellow fruit.").first.wait_for(timeout=30_000)
    assert user_texts(first) == ["Name a red fruit.", "Name a yellow fruit."]
    assert user_texts(second) == ["Name a red fruit.", "Name a green vegetable."]
    kept = [[m for m in chat["history"] if m["role"] == "user"] for chat in stored_chats(first).values()]
    texts = sorted(" / ".join(part["text"] for m in chat for part in m["content"]) for chat in kept)
    assert texts == ["Name a red fruit. / Name a green vegetable.", "Name a red fruit. / Name a yellow fruit."]
    chats = first.locator("#kvchat-chats label")
    assert chats.count() == 2  # both versions are listed, in every tab


def test_two_chats_switch_reload_both_intact_and_the_old_one_continues_warm(app, context):
    url, _ = app
    page = open_tab(context, url)
    chat_and_keep(page, "Name three oceans.", 8)
    helpful = page.get_by_label("System prompt", exact=True).input_value()
    page.get_by_role("button", name="New chat").click()
    page.wait_for_function("() => document.querySelectorAll('.message-row').length === 0", timeout=10_000)
    page.get_by_label("System prompt", exact=True).fill("You answer in one word.")  # this chat's own
    chat_and_keep(page, "Name three rivers.", 8)
    chats = page.locator("#kvchat-chats label")
    assert chats.all_inner_texts() == ["Name three rivers.", "Name three oceans."]  # newest first
    page.reload()
    page.get_by_text("✅").first.wait_for(timeout=60_000)
    page.get_by_text("Name three rivers.").nth(1).wait_for(timeout=30_000)  # the list and the chat
    assert user_texts(page) == ["Name three rivers."]
    assert page.get_by_label("System prompt", exact=True).input_value() == "You answer in one word."
    chats.filter(has_text="Name three oceans.").click()
    page.locator(".user.message").filter(has_text="Name three oceans.").wait_for(timeout=10_000)
    assert user_texts(page) == ["Name three oceans."]
    assert page.get_by_label("System prompt", exact=True).input_value() == helpful  # each chat keeps its own
    page.locator("#kvchat-reply-status").get_by_text("This chat is warm").wait_for(timeout=10_000)  # said before
    chat_once(page, "And three seas?", 8)
    badge = badges(page).nth(1)
    assert "reused from this session" in badge.inner_text()  # its KV was still cached: warm
    prefilled = int(badge.inner_text().split("prefilled ")[1].split(" ")[0].replace(",", ""))
    assert prefilled < 30, badge.inner_text()
    page.get_by_label("Title").fill("Water")
    page.get_by_role("button", name="Rename").click()
    chats.filter(has_text="Water").wait_for(timeout=10_000)
    page.once("dialog", lambda dialog: dialog.dismiss())  # Cancel: nothing happens
    page.get_by_role("button", name="Delete this chat").click()
    # a dismissed Delete's events end by saying under the chat how warm it is (the line was empty)
    page.locator("#kvchat-reply-status").get_by_text("This chat is").wait_for(timeout=10_000)
    assert chats.count() == 2 and user_texts(page) == ["Name three oceans.", "And three seas?"]
    sessions = session_entries(url)
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete this chat").click()
    page.wait_for_function("() => document.querySelectorAll('#kvchat-chats label').length === 1", timeout=10_000)
    assert chats.all_inner_texts() == ["Name three rivers."]
    assert session_entries(url) < sessions  # its KV went with it
    page.locator(".user.message").filter(has_text="Name three rivers.").wait_for(timeout=10_000)


# --- the stats tab ---

X_AXIS_LABELS = """() => Array.from(document.querySelectorAll('.vega-embed svg')).map((svg) =>
    Array.from(svg.querySelectorAll('[aria-label^="X-axis"] .role-axis-label text')).map((t) => t.textContent))"""


def test_the_stats_plots_count_whole_requests(app, context):
    url, _ = app
    page = open_tab(context, url)
    chat_once(page, "Hello!", 4)
    page.get_by_role("tab", name="Cache stats").click()
    page.wait_for_function("document.querySelectorAll('.vega-embed svg').length >= 3", timeout=30_000)
    axes = wait_until(lambda: found if len(found := page.evaluate(X_AXIS_LABELS)) >= 3 and all(found) else None,
                      timeout_s=10, message="every plot has drawn its x axis")
    assert len(axes) >= 3
    for labels in axes:
        assert labels and all(label.replace(",", "").isdigit() for label in labels), labels
        assert len(labels) == len(set(labels)), labels
