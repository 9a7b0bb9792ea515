"""kvchat's browser app: Gradio wiring only. The engine does the work; kvchat.stats says what to show.

    python app.py --help
"""

from __future__ import annotations

if __name__ == "__main__":  # before the slow imports below: the launcher puts a page up first
    from kvchat.cli import main

    raise SystemExit(main())

import contextlib
import logging
import os
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

import kvchat
from kvchat import Busy, GenerationError, InputError
from kvchat import budget_map
from kvchat import stats as panel
from kvchat.chat_history import kept_history, model_messages, plain_text, text_message
from kvchat.config import Config, format_bytes
from kvchat.metrics import Metrics
from kvchat.openai_api import add_routes, model_id
from kvchat.presets import load_presets
from kvchat.startup import BackgroundEngine
from kvchat.tab_replies import Reply, TabReplies

if TYPE_CHECKING:
    from kvchat.engine import Engine
    from kvchat.first_page import FirstPage

log = logging.getLogger("kvchat.app")

LOAD_WAIT_S = 900  # a first start converts the bundled model; a request waits for it
QUEUE_POLL_S = 0.5  # how often a queued visitor's place in line is refreshed
FORGET_WAIT_S = 5.0  # how long Clear or Delete waits for a cancelled reply to let go of its KV
# The chat list reads top to bottom, newest first; the reply's status sits quietly under the list.
CSS = """
#kvchat-chats .wrap { flex-direction: column; align-items: stretch; }
#kvchat-chats label { width: 100%; }
#kvchat-reply-status { min-height: 1.5em; color: var(--body-text-color-subdued); }
"""
CHATS_JS = (Path(kvchat.__file__).parent / "chats.js").read_text()
# The chat list lives in the browser (`window.kvchat`, kvchat/chats.js); the server never stores a conversation.
DELETE_JS = "(yes, h, s) => yes ? window.kvchat.remove(s) : [h, s, window.kvchat.refresh()[0]]"
History = list[dict[str, Any]]
SKIP = gr.skip()


@dataclass
class Frame:
    """One update of a reply: the message list, and what is said beside it (never in it)."""

    history: History | None  # None: leave the page as it is (it shows another chat now)
    status: str | None = ""  # waiting or loading, shown under the message list (None: leave it)
    give_back: str | None = None  # the request was refused: this text goes back to the message box
    refused: str | None = None  # why the engine would not take it now (busy)


@dataclass
class ReplySettings:
    system_prompt: str
    max_new_tokens: float
    temperature: float
    top_p: float


def badge_message(usage: Any) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": panel.badge_detail(usage),
        "metadata": {"title": panel.badge(usage), "status": "done"},
    }


def queue_words(ahead: int) -> str:
    return f"⏳ Queued, {ahead} ahead…" if ahead else "⏳ Queued, next in line…"


class Handlers:
    """Event handlers. Each browser tab streams at most one reply (`TabReplies`, keyed by Gradio's
    session hash); each chat is one engine session (`_session_id`)."""

    def __init__(self, holder: BackgroundEngine, config: Config) -> None:
        self.holder = holder
        self.config = config
        self.replies = TabReplies()
        self._warnings_shown: set[str] = set()

    # --- sending: the box is emptied once, here; what is typed while a reply streams stays ---
    def take(self, message: str, history: History, request: gr.Request) -> tuple[Any, Any, Any]:
        """Outputs: the box, the message to answer (with its reply's id, so a Stop pressed before the
        reply starts still ends it), the message list (with the message appended). While a reply
        streams the message stays in the box: one reply at a time per chat, as the chat shows it."""
        text = message if isinstance(message, str) else ""
        if not text.strip():
            gr.Warning("Type a message first.")
            return SKIP, None, SKIP
        if self.replies.busy(_tab(request)):
            gr.Warning("A reply is still coming: press Stop (or wait for it), then send.")
            return SKIP, None, SKIP
        reply = self.replies.start(_tab(request))
        return "", {"text": text, "reply": reply.id}, list(history or []) + [text_message("user", text)]

    def respond(self, pending: Any, history: History, system_prompt: str, max_new_tokens: float,
                temperature: float, top_p: float, visitor: str, index: Any, request: gr.Request) -> Iterator[tuple]:  # fmt: skip
        reply = self.replies.get(_tab(request), pending["reply"]) if isinstance(pending, dict) else None
        if reply is None:  # nothing sent, or the tab has moved on (another message, another chat)
            yield SKIP, SKIP, SKIP  # Gradio sets an event's outputs to empty when a generator yields nothing
            return
        settings = ReplySettings(system_prompt, max_new_tokens, temperature, top_p)
        session = _session_id(visitor, index, request)
        yield from _page(self._reply(list(history or []), settings, session, reply, give_back=pending["text"]))

    def retry(self, data: gr.RetryData, history: History, system_prompt: str, max_new_tokens: float,
              temperature: float, top_p: float, visitor: str, index: Any, request: gr.Request) -> Iterator[tuple]:  # fmt: skip
        history = list(history or [])[: _index(data) + 1]
        settings = ReplySettings(system_prompt, max_new_tokens, temperature, top_p)
        reply = self.replies.start(_tab(request))
        yield from _page(self._reply(history, settings, _session_id(visitor, index, request), reply, give_back=None))

    def edit(self, data: gr.EditData, history: History, system_prompt: str, max_new_tokens: float,
             temperature: float, top_p: float, visitor: str, index: Any, request: gr.Request) -> Iterator[tuple]:  # fmt: skip
        history = list(history or [])[: _index(data)] + [text_message("user", plain_text(data.value))]
        settings = ReplySettings(system_prompt, max_new_tokens, temperature, top_p)
        reply = self.replies.start(_tab(request))
        yield from _page(self._reply(history, settings, _session_id(visitor, index, request), reply, give_back=None))

    def undo(self, data: gr.UndoData, history: History, request: gr.Request) -> tuple[History, str, str]:
        """Drop the user message and everything after it; put its text back in the box."""
        self.replies.end(_tab(request), "replaced")
        return list(history or [])[: _index(data)], plain_text(data.value), ""

    def api_chat(self, message: str, history: list[dict], system_prompt: str, max_new_tokens: float,
                 temperature: float, top_p: float, request: gr.Request) -> Iterator[tuple[list[dict], str]]:  # fmt: skip
        """One reply to `message` after `history` (the same dicts this returns). Yields (history with
        the message, its reply and the reply's badge, "") as the reply grows; a refused message comes
        back as (history, message). Calls never replace one another, even from one client."""
        text = message if isinstance(message, str) else ""
        if not text.strip():
            gr.Warning("Type a message first.")
            yield _api_history(history or []), text
            return
        history = kept_history(history) + [text_message("user", text)]
        settings = ReplySettings(system_prompt, max_new_tokens, temperature, top_p)
        reply = self.replies.start(f"api:{uuid.uuid4().hex}")
        for frame in self._reply(history, settings, _session_id("", None, request), reply, give_back=text):
            if frame.refused:
                raise gr.Error(frame.refused)
            if frame.history is not None:
                yield _api_history(frame.history), frame.give_back or ""

    # --- ending a reply early: the engine stops, the stream ends normally, nothing is left over it ---
    def stop(self, request: gr.Request) -> Any:
        """Stop the tab's reply; with none running, leave the line under the chat as it is."""
        return "" if self.replies.end(_tab(request), "stopped") else SKIP

    def clear(self, visitor: str, index: Any, request: gr.Request) -> str:
        """Clear (the trash icon): the reply stops, and the chat's KV goes from memory and disk."""
        self._forget(self.replies.end(_tab(request), "cleared"), _session_id(visitor, index, request))
        return ""

    def leave(self, request: gr.Request) -> str:
        """The tab shows another chat: its reply (if any) stops and draws nothing more."""
        self.replies.end(_tab(request), "replaced")
        return ""

    def delete(self, confirmed: bool, visitor: str, index: Any, request: gr.Request) -> Any:
        """Before a confirmed Delete: stop the tab's reply and drop the chat's KV from memory and
        disk (its own turns; a shared system prompt stays for others)."""
        if confirmed is not True:
            return SKIP
        self._forget(self.replies.end(_tab(request), "replaced"), _session_id(visitor, index, request))
        return ""

    def _forget(self, ended: Reply | None, session: str) -> None:
        """Drop a chat's own KV, once the reply just ended (if any) has let go of it: a stopped
        reply keeps the turns it computed, which would bring the chat's KV back."""
        engine = self.holder.peek()
        if engine is None:
            return
        if ended is not None and ended.generation is not None:
            ended.generation.wait_done(FORGET_WAIT_S)
        try:
            engine.end_session(session)
        except Exception:  # the chat goes from the page regardless; its KV ages out of the budget
            log.exception("could not drop a cleared or deleted chat's KV")

    def _reply(self, history: History, settings: ReplySettings, session: str, reply: Reply,
               give_back: str | None) -> Iterator[Frame]:  # fmt: skip
        """Frames of one reply to `history` (which ends with the user's message), registered as
        `reply` (`TabReplies.start`). `give_back` is the message's text when it was typed in the
        box: a message the engine refuses at once goes back there."""
        try:
            yield from self._frames(reply, history, settings, session, give_back)
        finally:
            self.replies.finished(reply)

    def _frames(self, reply: Reply, history: History, settings: ReplySettings, session: str,
                give_back: str | None) -> Iterator[Frame]:  # fmt: skip
        unsent = history[:-1] if give_back is not None else history
        if reply.ended:  # stopped before it began
            yield from _ended(reply, history)
            return
        engine = self.holder.peek()
        if engine is None:
            yield Frame(history, "⏳ Loading the model… your message is answered as soon as it is ready.")
            engine = self._await_engine(reply)
            if engine is None:  # the message stays in the chat: the box may hold newer typing by now
                yield from _ended(reply, history) if reply.ended else [Frame(history)]
                return
        try:
            generation = engine.stream(
                session, model_messages(settings.system_prompt, history), max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature, top_p=settings.top_p, door="ui",
            )  # fmt: skip
        except Busy as err:
            yield Frame(unsent, give_back=give_back, refused=str(err))
            return
        except InputError as err:
            gr.Warning(str(err))
            yield Frame(unsent, give_back=give_back)
            return
        reply.attach(generation)
        answer = text_message("assistant", "")
        try:
            while not generation.wait_admitted(QUEUE_POLL_S):  # the engine's queue: say where we are
                if reply.ended:
                    break
                yield Frame(history, queue_words(generation.ahead))
            for piece in generation:
                answer["content"][0]["text"] += piece
                if reply.reason in ("cleared", "replaced"):
                    break
                yield Frame(history + [answer])
        except GenerationError as err:
            gr.Warning(f"The reply failed ({err}). Your conversation is kept: press Retry.")
            yield Frame(history + ([answer] if generation.text else []))
            return
        finally:
            generation.cancel()  # a closed tab lands here too: stop the backend
        if reply.ended:
            with contextlib.suppress(GenerationError):  # what it computed is moot: it was ended
                generation.wait()  # the usage is final once the engine has let go of the request
        if reply.reason in ("cleared", "replaced"):
            yield from _ended(reply, history)
            return
        answer["content"][0]["text"] = generation.text
        shown = [answer, badge_message(generation.usage)] if generation.text else []
        yield Frame(history + shown)
        self._warn_once(engine)

    def _await_engine(self, reply: Reply) -> Engine | None:
        """The engine once loaded; None if the reply was ended first or the load failed (said)."""
        deadline = time.monotonic() + LOAD_WAIT_S
        while not reply.wait_ended(0.25):
            if self.holder.done:
                try:
                    return self.holder.get(0)
                except Exception as err:  # noqa: BLE001 - shown to the user, who cannot chat without it
                    gr.Warning(f"The model failed to load: {err}")
                    return None
            if time.monotonic() > deadline:
                gr.Warning("The model is still loading; send your message again in a moment.")
                return None
        return None

    def _warn_once(self, engine: Engine) -> None:
        """A side part's problem (the usage log, the disk tier) is said once, after a reply it did
        not stop; the stats tab keeps showing it."""
        for warning in (engine.log_warning, engine.disk_problem):
            if warning and warning not in self._warnings_shown:
                self._warnings_shown.add(warning)
                gr.Warning(warning)

    # --- the chat list, kept in the browser by kvchat/chats.js ---
    def legacy(self, saved: Any) -> dict[str, Any]:
        """The single conversation an older kvchat kept in this browser (Gradio's encrypted
        BrowserState): handed to the page once, which files it as a chat and forgets the old key."""
        saved = saved if isinstance(saved, dict) else {}
        visitor = saved.get("visitor") if isinstance(saved.get("visitor"), str) else ""
        return {"visitor": visitor, "history": kept_history(saved.get("history"))}

    def show_chats(self, index: Any, title: str, shown: str | None) -> tuple[Any, Any, str | None]:
        """The chat list, and the open chat's title unless the user is typing one for the chat on
        screen (`shown`: the chat the title box was last filled for); from what kvchat/chats.js reports."""
        index = index if isinstance(index, dict) else {}
        for note in index.get("notes") or []:
            gr.Warning(str(note))
        chats = [c for c in index.get("chats") or [] if isinstance(c, dict) and isinstance(c.get("id"), str)]
        choices = [(str(c.get("title") or "New chat"), c["id"]) for c in chats]
        open_id = index.get("open") if isinstance(index.get("open"), str) else None
        listed = open_id if any(c["id"] == open_id for c in chats) else None
        typing = open_id == shown and bool((title or "").strip()) and bool(index.get("title"))
        return gr.Radio(choices=choices, value=listed), SKIP if typing else str(index.get("title") or ""), open_id

    def warmth(self, history: History, system_prompt: str, visitor: str, index: Any, request: gr.Request) -> str:
        """Under a chat just opened: how much of it the cache still holds, so its next reply's cost is
        seen before it is paid."""
        engine = self.holder.peek()
        messages = model_messages(system_prompt, list(history or []))
        if engine is None or not any(m["role"] != "system" for m in messages):
            return ""
        try:
            cached = engine.cached(_session_id(visitor, index, request), messages)
        except Exception:  # a side part: the chat works without it
            log.exception("could not tell what the cache holds for this chat")
            return ""
        return panel.warmth_words(cached)

    def clear_cache(self) -> str:
        engine = self.holder.peek()
        if engine is None:
            return "The model is still loading: nothing is cached yet."
        removed = engine.clear_cache()
        return f"Cleared {removed} cached run(s) from memory and disk; pinned presets and runs in use stay."

    # --- status and stats ---
    def status(self) -> tuple[str, gr.Timer]:
        if self.holder.error is not None:
            return f"❌ **The model failed to load:** {self.holder.error}", gr.Timer(active=False)
        engine = self.holder.peek()
        if engine is None:
            waited = time.time() - self.holder.started_s
            return f"⏳ **Loading model…** ({waited:.0f} s; the first start converts the bundled model)", gr.Timer()
        loaded, stats = engine.loaded, engine.stats()
        auto = " (auto)" if self.config.cache_budget_bytes is None else ""
        text = (
            f"✅ **{loaded.name}** on `{loaded.device}` ({str(loaded.dtype).removeprefix('torch.')}) · "
            + (f"{loaded.quantization.summary()} · " if loaded.quantization else "") +
            f"KV budget {format_bytes(engine.budget_bytes)}{auto} · {panel.disk_words(stats)} · "
            f"context {engine.context_tokens:,} tokens · attention: {engine.attention.path}"
        )
        warming = panel.warmup_words(stats.warmups)
        if warming:
            text += f" · {warming}"
        still_warming = any(not w.done and not w.error for w in stats.warmups)
        return text, gr.Timer(active=still_warming)

    def refresh_stats(self) -> tuple[Any, ...]:
        """Panel text, the budget map, entries, recent requests, then the three plots (from the usage log)."""
        engine = self.holder.peek()
        if engine is None:
            return ("Model still loading…", None, [], [], *_EMPTY_PLOTS)
        try:
            stats = engine.stats()
            timeline = engine.usage_timeline()
            return (
                panel.panel_markdown(stats, engine.usage_summary(), engine.log_warning),
                budget_map.figure(stats),
                panel.entry_rows(stats),
                panel.recent_rows(engine.recent_requests(10)),
                *_request_plots(timeline),
            )
        except Exception as err:
            log.exception("stats panel failed")
            return (f"Stats unavailable right now: {err}", None, [], [], *_EMPTY_PLOTS)


_EMPTY_PLOTS = (panel.hit_rate_frame([]), panel.bytes_frame([]), panel.ttft_frame([]))


def _request_plots(timeline: list[dict] | None) -> tuple[Any, Any, Any]:
    """The three per-request plots, their x axes spanning whole requests."""
    frames = (panel.hit_rate_frame(timeline), panel.bytes_frame(timeline), panel.ttft_frame(timeline))
    kinds = (gr.LinePlot, gr.LinePlot, gr.ScatterPlot)
    return tuple(kind(value=frame, x_lim=panel.request_axis(frame)) for kind, frame in zip(kinds, frames))


def _index(data: Any) -> int:
    return data.index if isinstance(data.index, int) else data.index[0]


def _page(frames: Iterator[Frame]) -> Iterator[tuple[History, Any, str]]:
    """Frames as the page's outputs: the message list, the box (touched only to give text back), the status."""
    for frame in frames:
        if frame.refused:
            gr.Warning(frame.refused)
        box = SKIP if frame.give_back is None else frame.give_back
        yield _or_skip(frame.history), box, _or_skip(frame.status)


def _or_skip(value: Any) -> Any:
    return SKIP if value is None else value


def _ended(reply: Reply, history: History) -> list[Frame]:
    """What a reply ended early draws: an empty chat after a Clear; nothing after the tab moved on
    (another chat is on screen); else the conversation as it was when the reply began."""
    if reply.reason == "replaced":  # Gradio redraws an event's last output when it ends: make it "nothing"
        return [Frame(None, None)]
    return [Frame([] if reply.reason == "cleared" else history)]


def _api_history(history: list[dict]) -> list[dict]:
    """Messages as API clients have always received them from the chat box: content as a list of
    text parts, a badge with its metadata."""
    return [
        text_message(m["role"], plain_text(m.get("content"))) | ({"metadata": m["metadata"]} if m.get("metadata") else {})
        for m in kept_history(history)
    ]


def _tab(request: gr.Request) -> str:
    return request.session_hash or "anonymous"


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


def _session_id(visitor: str, index: Any, request: gr.Request) -> str:
    """One engine session per chat: "<this browser's id>/<the chat's id>" (both kept in the browser,
    so a chat continues warm after a reload or a switch); else this page's Gradio session (API).

    Per chat, not per browser: a session's turns form one line of conversation, and the engine
    moves a session's private turns into the request that continues them, so a second chat in
    the same session would take the first one's KV."""
    chat = index.get("open") if isinstance(index, dict) else None
    if isinstance(visitor, str) and visitor and isinstance(chat, str) and chat:
        return f"{visitor}/{chat}"
    return request.session_hash or "anonymous"


def build_ui(holder: BackgroundEngine, config: Config) -> gr.Blocks:
    presets = load_presets(extra=config.preset_files)
    first_preset = next(iter(presets), None)
    handlers = Handlers(holder, config)
    with gr.Blocks(title="kvchat") as demo:
        gr.Markdown("# kvchat\nA chat that never recomputes what it has already computed.")
        status = gr.Markdown(handlers.status()[0])
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
        clear_cache.click(handlers.clear_cache, outputs=cleared, api_visibility="private")
        preset.change(lambda name: presets.get(name, ""), preset, system_box, api_visibility="private")
        status_timer.tick(handlers.status, outputs=[status, status_timer], api_visibility="private")
        stats_outputs = [stats_md, budget_plot, entries, recent, hit_plot, bytes_plot, ttft_plot]
        stats_timer.tick(handlers.refresh_stats, outputs=stats_outputs, api_visibility="private")
        stats_tab.select(handlers.refresh_stats, outputs=stats_outputs, api_visibility="private").then(
            lambda: gr.Timer(active=True), outputs=stats_timer, api_visibility="private"
        )
        chat_tab.select(lambda: gr.Timer(active=False), outputs=stats_timer, api_visibility="private")
        gr.api(_stats_api(holder), api_name="stats")
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


def _stats_api(holder: BackgroundEngine):
    def stats() -> dict:
        """Live cache numbers (what the stats panel shows) as JSON."""
        engine = holder.peek()
        if engine is None:
            return {"ready": False}
        s = engine.stats()
        return {
            "ready": True, "busy": s.busy, "budget_bytes": s.budget_bytes, "used_bytes": s.used_bytes,
            "requests": s.requests, "hits": s.hits, "misses": s.misses, "evictions": s.evictions,
            "not_admitted": s.not_admitted, "running": s.running, "waiting": s.waiting,
            "running_bytes": s.running_bytes, "shared_bytes": s.shared_bytes, "private_bytes": s.private_bytes,
            "pinned_bytes": s.pinned_bytes, "token_hit_rate": s.token_hit_rate, "eviction": engine.eviction,
            "demotions": s.demotions, "disk_budget_bytes": s.disk_budget_bytes, "disk_bytes": s.disk_bytes,
            "disk_file_bytes": s.disk_file_bytes, "disk_evictions": s.disk_evictions, "disk_reads": s.disk_reads,
            "disk_problem": s.disk_problem,
            "warmups": [{"preset": w.title, "tokens": w.num_tokens, "pinned": w.pinned, "done": w.done,
                         "disk_tokens": w.disk_tokens, "ms": round(w.ms)} for w in s.warmups],
            "entries": [{"kind": e.kind, "tokens": e.num_tokens, "nbytes": e.nbytes, "hits": e.hits,
                         "sessions": e.sessions, "in_use": e.pinned, "tier": e.tier, "on_disk": e.on_disk}
                        for e in s.entries],
        }  # fmt: skip

    return stats


def launch(holder: BackgroundEngine, config: Config,
           before_bind: Callable[[], None] | None = None) -> tuple[gr.Blocks, str, str | None]:  # fmt: skip
    """Build the UI and serve it without blocking, with the OpenAI-compatible API and /metrics on
    the same server; returns (demo, local URL, share URL or None)."""
    demo = build_ui(holder, config)
    demo.queue(max_size=config.max_queue, default_concurrency_limit=4)
    auth = tuple(config.auth.split(":", 1)) if config.auth else None
    served_id = model_id(config.model)
    metrics = Metrics(holder, served_id)
    holder.on_ready(metrics.attach)
    if before_bind is not None:
        before_bind()
    server, local_url, share_url = demo.launch(
        server_name=config.host, server_port=config.port, share=config.share, auth=auth,
        prevent_thread_lock=True, show_error=True, quiet=True, js=CHATS_JS, css=CSS,
    )  # fmt: skip
    add_routes(server, holder, served_id, config.api_key, metrics.response)
    return demo, local_url, share_url


def serve(holder: BackgroundEngine, config: Config, first_page: FirstPage | None = None) -> int:
    """Serve until SIGTERM or Ctrl-C (exit 0) or until the model fails to load (exit 1). The launcher
    (`kvchat.cli`) has started the engine loading and put up `first_page`, which yields the port."""
    demo, local_url, share_url = launch(holder, config, before_bind=first_page.close if first_page else None)
    print(f"kvchat: serving at {local_url}", flush=True)
    if config.usage_db:
        print(f"kvchat: usage log (SQLite, no message text) at {Path(config.usage_db).resolve()}", flush=True)
    print(f"kvchat: OpenAI-compatible API at {local_url.rstrip('/')}/v1 (model {model_id(config.model)!r}), "
          f"Prometheus metrics at {local_url.rstrip('/')}/metrics", flush=True)  # fmt: skip
    if config.exposed and config.api_key is None:
        print("kvchat: warning: the API and /metrics are open to anyone who can reach this server "
              "(the --auth login guards only the page); set --api-key or KVCHAT_API_KEY", flush=True)  # fmt: skip
    if config.share:
        print(f"kvchat: public share link: {share_url}" if share_url else
              "kvchat: no share link could be made (Gradio could not reach its share service or fetch "
              f"its tunnel client; see above); the app is still serving locally at {local_url}", flush=True)  # fmt: skip
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while not holder.done or holder.ready:
            time.sleep(0.5)
        print(f"kvchat: cannot start: the model failed to load: {holder.error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvchat: shutting down", flush=True)
        return 0
    finally:
        demo.close()
        engine = holder.peek()
        if engine is not None:
            engine.close()  # flushes the usage log


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
