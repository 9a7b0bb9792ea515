"""The app in a real browser (Debian's chromium driven by Playwright), on the bundled model."""

import shutil
import subprocess
import sys
import urllib.request

import pytest
import sqlite_utils
from gradio_client import Client
from playwright.sync_api import Page, sync_playwright

from conftest import wait_until
from test_app import ROOT, free_port, running_app, stop_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def app(tmp_path_factory, bundled_dir):
    with running_app(tmp_path_factory.mktemp("browser")) as served:
        yield served


@pytest.fixture(scope="module")
def browser():
    assert shutil.which(CHROMIUM), "Debian's chromium is needed (apt-get install chromium); .ci/run installs it"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(app, browser) -> Page:
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.goto(app[0])
    page.get_by_text("✅").first.wait_for(timeout=180_000)  # model loaded
    yield page
    page.close()


def set_max_tokens(page: Page, count: int) -> None:
    box = page.get_by_label("number input for Max new tokens")
    if not box.is_visible():
        page.get_by_text("Generation settings").click()
    box.fill(str(count))
    box.press("Tab")


def message_box(page: Page):
    return page.locator("#kvchat-message textarea")


def send(page: Page, text: str) -> None:
    box = message_box(page)
    box.fill(text)
    box.press("Enter")


def badges(page: Page):
    return page.get_by_text("prompt tokens ·")


def chat_once(page: Page, text: str, max_tokens: int) -> None:
    """Send one message and wait for its reply to finish (its badge appears)."""
    set_max_tokens(page, max_tokens)
    send(page, text)
    badges(page).first.wait_for(timeout=120_000)


def stored_chats(page: Page) -> dict:
    """The chats this browser keeps (kvchat/chats.js), by id."""
    return page.evaluate("JSON.parse(localStorage.getItem('kvchat-chats') || '{}').chats || {}")


def chat_and_keep(page: Page, text: str, max_tokens: int) -> None:
    """Send `text`, wait for its reply, then for the page to store both (wait_kept)."""
    chat_once(page, text, max_tokens)
    wait_kept(page, text)


def wait_kept(page: Page, text: str) -> None:
    """Wait for the page to store the chat holding `text` with its reply (it does so as the reply
    ends; a reload in the same instant could still beat it)."""
    page.wait_for_function("""(text) => Object.values(JSON.parse(localStorage.getItem('kvchat-chats')).chats)
        .some((chat) => JSON.stringify(chat.history).includes(text) && chat.history.length >= 3)""", arg=text,
                           timeout=10_000)  # fmt: skip


def last_reply_length(page: Page) -> int:
    replies = page.locator(".bot.message")
    return len(replies.last.inner_text()) if replies.count() else 0


def test_reply_streams_then_shows_its_badge(page):
    set_max_tokens(page, 40)
    page.evaluate("""() => {  // every change of the last reply's text, however fast they come
        window.replyLengths = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('.bot.message');
            if (replies.length) window.replyLengths.push(replies[replies.length - 1].innerText.length);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    send(page, "Tell me about the moon in three sentences.")
    badges(page).first.wait_for(timeout=120_000)
    growing = sorted(set(n for n in page.evaluate("window.replyLengths") if n))
    assert len(growing) >= 3, f"the reply did not stream: {growing}"
    assert "TTFT" in badges(page).first.inner_text()


def test_stop_ends_generation_in_the_engine(page, app):
    url, db = app
    set_max_tokens(page, 400)
    send(page, "Write a long story about a dragon who learns to bake bread.")
    page.wait_for_function("() => { const r = document.querySelectorAll('.bot.message');"
                           " return r.length && r[r.length - 1].innerText.length >= 30; }", timeout=120_000)
    page.get_by_role("button", name="Stop", exact=True).click()
    client = Client(url, verbose=False)
    wait_until(lambda: not client.predict(api_name="/stats")["busy"], timeout_s=10, interval_s=0.2,
               message="the engine stops generating after Stop")
    frozen = last_reply_length(page)  # the engine is idle: nothing more can arrive

    def last_row() -> dict | None:
        rows = sqlite_utils.Database(db).query("select finish_reason, new_tokens from requests order by id desc limit 1")
        return next(iter(rows), None)

    last = wait_until(lambda: row if (row := last_row()) and row["finish_reason"] == "cancelled" else None,
                      timeout_s=10, interval_s=0.2,
                      message=lambda: f"the log's last row is the stopped reply's (it is {last_row()})")
    assert last["new_tokens"] < 400
    assert last_reply_length(page) == frozen


def test_retry_and_edit_reuse_the_session_cache(page):
    chat_once(page, "Name three planets.", 12)
    page.get_by_role("button", name="Retry").click()
    page.get_by_text("reused from this session").first.wait_for(timeout=120_000)
    page.get_by_role("button", name="Edit").first.click()
    editor = next(t for t in page.locator("textarea").all() if t.input_value() == "Name three planets.")
    editor.fill("Name three moons.")
    page.get_by_role("button", name="Submit").click()
    page.get_by_text("Name three moons.").first.wait_for(timeout=30_000)
    badge = page.get_by_text("reused from this session").first
    badge.wait_for(timeout=120_000)
    assert "prefilled" in badge.inner_text()


def test_stats_panel_shows_numbers_and_plots(page):
    chat_once(page, "Hello!", 8)
    page.get_by_role("tab", name="Cache stats").click()
    page.get_by_text("Token hit rate:").first.wait_for(timeout=30_000)
    page.get_by_text("Bytes held:").first.wait_for()
    for title in ("Token hit rate", "KV bytes held vs budget", "Time to first token, warm vs cold"):
        page.get_by_text(title, exact=True).first.wait_for()
    page.wait_for_function("document.querySelectorAll('.vega-embed svg').length >= 3", timeout=30_000)
    assert page.locator("table").get_by_text("session", exact=True).count() >= 1  # this tab's cache


def test_budget_map_draws_shared_and_session_blocks(page):
    chat_once(page, "What is a prefix cache?", 8)
    page.get_by_role("tab", name="Cache stats").click()
    page.get_by_text("area = bytes").first.wait_for(timeout=30_000)
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot g.slice').length >= 3", timeout=30_000)
    labels = page.evaluate("document.querySelector('.js-plotly-plot').data[0].labels")
    assert any(label.startswith("session turns") or label.startswith("in use") for label in labels), labels
    assert any(label.startswith(("shared prefix", "pinned preset")) for label in labels), labels


def test_two_tabs_stream_at_the_same_time(app, browser):
    """Two visitors send together: both replies grow during the same interval (served in one batch,
    not one after the other)."""
    pages = [browser.new_page(viewport={"width": 1300, "height": 1000}) for _ in range(2)]
    try:
        for page in pages:
            page.goto(app[0])
            page.get_by_text("✅").first.wait_for(timeout=180_000)
            set_max_tokens(page, 60)
            page.evaluate("""() => {  // when the last reply's text changes: wall-clock time in ms
                window.changes = [];
                new MutationObserver(() => {
                    const replies = document.querySelectorAll('.bot.message');
                    if (replies.length && replies[replies.length - 1].innerText.length)
                        window.changes.push(performance.timeOrigin + performance.now());
                }).observe(document.body, {subtree: true, childList: true, characterData: true});
            }""")
        for page, topic in zip(pages, ("the sea", "the mountains")):
            send(page, f"Write a short poem about {topic}.")
        for page in pages:
            badges(page).first.wait_for(timeout=180_000)
        spans = [(min(c), max(c)) for c in (page.evaluate("window.changes") for page in pages)]
        overlap_ms = min(end for _, end in spans) - max(start for start, _ in spans)
        assert overlap_ms > 1_000, f"the replies did not stream at the same time: {spans}"
    finally:
        for page in pages:
            page.close()


def test_a_reload_keeps_the_conversation_and_continues_it_warm(page):
    chat_and_keep(page, "Name three planets.", 8)
    page.reload()
    page.get_by_text("✅").first.wait_for(timeout=60_000)
    page.get_by_text("Name three planets.").first.wait_for(timeout=30_000)  # kept by the browser
    chat_once(page, "And three moons?", 8)
    page.get_by_text("reused from this session").first.wait_for(timeout=120_000)


def test_the_starting_page_turns_into_the_app_by_itself(browser, tmp_path, bundled_dir):
    port = free_port()
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--usage-db", "none", "--disk-dir",
                                str(tmp_path / "disk")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    page = browser.new_page()
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: page_answers(url), timeout_s=60, interval_s=0.05, message="the starting page answers")
        page.goto(url)  # Gradio takes seconds to import: this is the starting page
        assert page.title() == "kvchat: starting" and page.get_by_text("Loading model…").first.is_visible()
        page.get_by_text("✅").first.wait_for(timeout=180_000)  # the same tab, never reloaded by the test
        assert page.title() == "kvchat"
    finally:
        page.close()
        stop_app(process)


def page_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def test_after_an_app_restart_the_browser_continues_warm_from_disk(browser, tmp_path, bundled_dir):
    context = browser.new_context(viewport={"width": 1300, "height": 1000})  # its storage outlives the app
    port = free_port()  # the same address both times: a browser keeps storage per origin
    try:
        with running_app(tmp_path, "--persist-sessions", port=port) as (url, _):
            page = context.new_page()
            page.goto(url)
            page.get_by_text("✅").first.wait_for(timeout=180_000)
            chat_and_keep(page, "Name three planets.", 8)
            page.close()
        with running_app(tmp_path, "--persist-sessions", port=port) as (url, _):
            page = context.new_page()
            page.goto(url)
            page.get_by_text("✅").first.wait_for(timeout=180_000)
            page.get_by_text("Name three planets.").first.wait_for(timeout=30_000)
            chat_once(page, "And three moons?", 8)
            badge = page.get_by_text("read back from disk").first
            badge.wait_for(timeout=120_000)
            assert "reused from this session" in badge.inner_text()
    finally:
        context.close()
