"""The page: its layout (the chat tab, the Cache stats tab, the status line over them) and which
handler each event calls. What a handler does is in kvchat.ui_chat and kvchat.ui_stats; the chat
list itself is kept in the browser by kvchat/chats.js.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

import gradio as gr

from kvchat import stats as panel
from kvchat.config import Config
from kvchat.presets import load_presets
from kvchat.startup import BackgroundEngine
from kvchat.ui_chat import Handlers
from kvchat.ui_stats import StatsHandlers

log = logging.getLogger("kvchat.app")  # the name these lines have always carried in the log

# The chat list reads top to bottom, newest first; the reply's status sits quietly under the list.
CSS = """
#kvchat-chats .wrap { flex-direction: column; align-items: stretch; }
#kvchat-chats label { width: 100%; }
#kvchat-reply-status { min-height: 1.5em; color: var(--body-text-color-subdued); }
"""
CHATS_JS = (Path(__file__).parent / "chats.js").read_text()
# The chat list lives in the browser (`window.kvchat`, kvchat/chats.js); the server never stores a conversation.
DELETE_JS = "(yes, h, s) => yes ? window.kvchat.remove(s) : [h, s, window.kvchat.refresh()[0]]"


def build_ui(holder: BackgroundEngine, config: Config) -> gr.Blocks:
    presets = load_presets(extra=config.preset_files)
    first_preset = next(iter(presets), None)
    handlers = Handlers(holder)
    stats_handlers = StatsHandlers(holder, config)
    with gr.Blocks(title="kvchat") as demo:
        gr.Markdown("# kvchat\nA chat that never recomputes what it has already computed.")
        status = gr.Markdown(stats_handlers.status()[0])
        status_timer = gr.Timer(1.0)
        with gr.Tabs():
            with gr.Tab("Chat") as chat_tab, gr.Row():
                with gr.Column(scale=1, min_width=220):
                    new_chat = gr.Button("New chat", variant="secondary")
                    chats = gr.Radio([], label="Chats (kept in this browser)", elem_id="kvchat-chats")
                    title = gr.Textbox(label="Title", placeholder="Name this chat", max_lines=1,
                                       submit_btn="Rename")  # fmt: skip
                    delete = gr.Button("Delete this chat", variant="secondary", size="sm")
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Conversation", height=560, editable="user")
                    reply_status = gr.Markdown(elem_id="kvchat-reply-status")
                    with gr.Row():
                        textbox = gr.Textbox(placeholder="Message…", show_label=False, scale=5, elem_id="kvchat-message",
                                             autofocus=True, submit_btn=False)  # fmt: skip
                        send = gr.Button("Send", variant="primary", scale=0, min_width=90)
                        stop = gr.Button("Stop", variant="stop", scale=0, min_width=90)
                with gr.Column(scale=2):
                    preset = gr.Dropdown(list(presets), value=first_preset, label="System prompt preset")
                    system_box = gr.Textbox(presets.get(first_preset, ""), label="System prompt",
                                            lines=10, max_lines=18)  # fmt: skip
                    with gr.Accordion("Generation settings", open=False):
                        max_tokens = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens")
                        temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
                        top_p = gr.Slider(0.01, 1, value=1, step=0.01, label="Top-p")
            with gr.Tab("Cache stats") as stats_tab:
                stats_md = gr.Markdown("Open this tab to see the cache at work.")
                budget_plot = gr.Plot(label="Budget map (hover a block: tokens, hits, age)", show_label=False)
                gr.Markdown("#### Cached entries (most recently used first)")
                entries = gr.Dataframe(headers=panel.ENTRY_COLUMNS, interactive=False)
                gr.Markdown("#### Recent requests (from the usage log)")
                recent = gr.Dataframe(headers=panel.RECENT_COLUMNS, interactive=False)
                with gr.Row():
                    hit_plot = gr.LinePlot(x="request", y="hit rate", color="series", title="Token hit rate",
                                           y_lim=[0, 1], height=260, x_axis_format="d")  # fmt: skip
                    bytes_plot = gr.LinePlot(x="request", y="MiB", color="series", title="KV bytes held vs budget",
                                             height=260, x_axis_format="d")  # fmt: skip
                    ttft_plot = gr.ScatterPlot(x="request", y="TTFT ms", color="cache", x_axis_format="d",
                                               title="Time to first token, warm vs cold", height=260)  # fmt: skip
                stats_timer = gr.Timer(2.0, active=False)
                with gr.Row(visible=not config.share or bool(config.auth)):  # only the operator may clear
                    clear_cache = gr.Button("Clear cache (memory and disk)", variant="secondary", scale=0,
                                            min_width=320)  # fmt: skip
                    cleared = gr.Markdown()
        legacy = gr.BrowserState({"visitor": "", "history": []}, storage_key="kvchat-conversation",
                                 secret=browser_secret(config.home))  # fmt: skip
        visitor = gr.Textbox(visible=False)  # this browser's id, set by kvchat/chats.js
        index = gr.JSON(visible=False)  # the chat list, as kvchat/chats.js reports it
        found = gr.JSON(visible=False)  # what an older kvchat left in this browser
        pending = gr.State(None)  # the message being sent (the box is already empty) and its reply's id
        shown = gr.State(None)  # the chat the title box was last filled for
        confirmed = gr.Checkbox(visible=False)  # the answer to "Delete this chat?"
        refresh = gr.Button(visible="hidden", elem_id="kvchat-refresh")  # clicked when another tab saves
        _wire_chat(handlers, locals())
        clear_cache.click(stats_handlers.clear_cache, outputs=cleared, api_visibility="private")
        preset.change(lambda name: presets.get(name, ""), preset, system_box, api_visibility="private")
        status_timer.tick(stats_handlers.status, outputs=[status, status_timer], api_visibility="private")
        stats_outputs = [stats_md, budget_plot, entries, recent, hit_plot, bytes_plot, ttft_plot]
        stats_timer.tick(stats_handlers.refresh_stats, outputs=stats_outputs, api_visibility="private")
        stats_tab.select(stats_handlers.refresh_stats, outputs=stats_outputs, api_visibility="private").then(
            lambda: gr.Timer(active=True), outputs=stats_timer, api_visibility="private"
        )
        chat_tab.select(lambda: gr.Timer(active=False), outputs=stats_timer, api_visibility="private")
        gr.api(stats_handlers.stats, api_name="stats")
        gr.api(handlers.api_chat, api_name="chat", concurrency_limit=None)
    return demo


def _wire_chat(handlers: Handlers, c: dict[str, Any]) -> None:
    """The chat tab's events. Every change to the message list ends with `window.kvchat.save`
    (kvchat/chats.js), then the chat list is drawn again; only the reply itself waits its turn."""
    private = {"api_visibility": "private", "show_progress": "hidden"}  # the reply status says what is going on
    now = {"queue": False, **private}  # Stop and friends must not wait behind busy visitors
    # the engine batches and queues, so Gradio must not serialise; queued, so a handler can warn (gr.Warning)
    run = {"concurrency_limit": None, **private}
    chatbot, index, system = c["chatbot"], c["index"], c["system_box"]
    settings = [system, c["max_tokens"], c["temperature"], c["top_p"], c["visitor"], index]
    streamed = [chatbot, c["textbox"], c["reply_status"]]

    def show_chats(event: Any) -> None:
        event.then(handlers.show_chats, [index, c["title"], c["shown"]], [c["chats"], c["title"], c["shown"]], **run)

    def listed(event: Any) -> Any:
        """Save the message list (and the system prompt it is written under), then draw the chat list."""
        saved = event.then(None, [chatbot, system], [index], js="(h, s) => window.kvchat.save(h, s)", **private)
        show_chats(saved)
        return saved

    for trigger in (c["textbox"].submit, c["send"].click):
        sent = listed(trigger(handlers.take, [c["textbox"], chatbot], [c["textbox"], c["pending"], chatbot], **run))
        listed(sent.then(handlers.respond, [c["pending"], chatbot, *settings], streamed, **run))
    listed(chatbot.retry(handlers.retry, [chatbot, *settings], streamed, **run))
    listed(chatbot.edit(handlers.edit, [chatbot, *settings], streamed, **run))
    listed(chatbot.undo(handlers.undo, [chatbot], [chatbot, c["textbox"], c["reply_status"]], **now))
    c["stop"].click(handlers.stop, None, c["reply_status"], **now)
    listed(chatbot.clear(handlers.clear, [c["visitor"], index], c["reply_status"], **now))
    # a reply is also saved while it streams (at most once a second), so a reload or a closed tab
    # mid-reply keeps what was written; the save after the reply stores its end
    chatbot.change(None, [chatbot, system], None, js="(h, s) => { window.kvchat.saveSoon(h, s); return []; }",
                   **private)  # fmt: skip

    def opened(event: Any) -> None:
        """A chat is on screen: draw the list, and say how warm the chat is."""
        show_chats(event)
        event.then(handlers.warmth, [chatbot, system, c["visitor"], index], c["reply_status"], **run)

    def switching(trigger: Any, inputs: list, js: str) -> None:
        """Stop this tab's reply (it would draw over the other chat), then let chats.js switch."""
        left = trigger(handlers.leave, None, c["reply_status"], **now)
        opened(left.then(None, inputs, [chatbot, system, index], js=js, **private))

    switching(c["new_chat"].click, [chatbot, system], "(h, s) => window.kvchat.newChat(h, s)")
    switching(c["chats"].input, [c["chats"], chatbot, system], "(id, h, s) => window.kvchat.open(id, h, s)")
    asked = c["delete"].click(None, None, c["confirmed"], js="() => [confirm('Delete this chat?')]", **private)
    left = asked.then(handlers.delete, [c["confirmed"], c["visitor"], index], c["reply_status"], **now)
    opened(left.then(None, [c["confirmed"], chatbot, system], [chatbot, system, index], js=DELETE_JS, **private))
    show_chats(c["title"].submit(None, [c["title"], chatbot, system], [index],
                                 js="(t, h, s) => window.kvchat.rename(t, h, s)", **private))  # fmt: skip
    show_chats(c["refresh"].click(None, None, [index], js="() => window.kvchat.refresh()", **private))
    found = c["demo"].load(handlers.legacy, c["legacy"], c["found"], **now)
    opened(found.then(None, [c["found"], system], [chatbot, system, index, c["visitor"]],
                      js="(old, s) => window.kvchat.boot(old, s)", **private))  # fmt: skip


def browser_secret(home: Path) -> str:
    """The key Gradio encrypts each browser's saved conversation with. Kept under --home (owner-only),
    so a restarted app can still read what browsers saved; a fresh random one per start would not."""
    path = home / "browser-state.key"
    try:
        if not path.is_file():
            home.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))
        return path.read_text().strip()
    except OSError as err:  # an unwritable home: conversations then survive reloads, not restarts
        log.warning("cannot keep the browser-state key in %s (%s)", home, err)
        return secrets.token_hex(32)

