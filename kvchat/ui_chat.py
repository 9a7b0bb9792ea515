"""The chat tab's events: sending, a reply streamed into the message list, Stop, Clear, Retry/Undo/
Edit, switching chats; and the /chat API. Each browser tab streams at most one reply; the chat list
itself lives in the browser (kvchat/chats.js), so nothing here stores a conversation.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

from kvchat import Busy, GenerationError, InputError
from kvchat import stats as panel
from kvchat.chat_history import kept_history, model_messages, plain_text, text_message
from kvchat.startup import BackgroundEngine
from kvchat.tab_replies import Reply, TabReplies

if TYPE_CHECKING:
    from kvchat.engine import Engine

log = logging.getLogger("kvchat.app")  # the name these lines have always carried in the log

LOAD_WAIT_S = 900  # a first start converts the bundled model; a request waits for it
QUEUE_POLL_S = 0.5  # how often a queued visitor's place in line is refreshed
FORGET_WAIT_S = 5.0  # how long Clear or Delete waits for a cancelled reply to let go of its KV
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
    """The chat tab's event handlers. Each browser tab streams at most one reply (`TabReplies`, keyed by Gradio's
    session hash); each chat is one engine session (`_session_id`)."""

    def __init__(self, holder: BackgroundEngine) -> None:
        self.holder = holder
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

