"""kvchat's browser app: Gradio wiring only. The engine does the work; kvchat.stats says what to show.

    python app.py --help
"""

from __future__ import annotations

if __name__ == "__main__":  # before the slow imports below: the launcher puts a page up first
    from kvchat.cli import main

    raise SystemExit(main())

import logging
import os
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from kvchat import Busy, GenerationError, InputError
from kvchat import budget_map
from kvchat import stats as panel
from kvchat.config import Config, format_bytes
from kvchat.metrics import Metrics
from kvchat.openai_api import add_routes, model_id
from kvchat.presets import load_presets
from kvchat.startup import BackgroundEngine

if TYPE_CHECKING:
    from kvchat.engine import Engine
    from kvchat.first_page import FirstPage

log = logging.getLogger("kvchat.app")

LOAD_WAIT_S = 900  # a first start converts the bundled model; a request waits for it
QUEUE_POLL_S = 0.5  # how often a queued visitor's place in line is refreshed
# The conversation is saved by the page itself: a server round trip would queue behind busy visitors
# and leave a window after each reply in which a reload loses it. The visitor id is read from the saved
# value, since a gr.State never reaches the page.
SAVE_JS = "(history, saved) => ({...saved, history: history || []})"
CLEAR_JS = "(saved) => ({...saved, history: []})"
ROLES = ("user", "assistant")
History = list[dict[str, Any]]
Yield = Iterator[tuple[History, str]]


def is_badge(message: dict[str, Any]) -> bool:
    """Badges are UI-only messages (with a metadata title); the model never sees them."""
    return bool((message.get("metadata") or {}).get("title"))


def conversation(system_prompt: str, history: History) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": system_prompt}] if (system_prompt or "").strip() else []
    return messages + [
        {"role": m.get("role"), "content": m.get("content")} for m in history if not is_badge(m)
    ]


def text_message(role: str, text: str) -> dict[str, Any]:
    """Content as a text part: Gradio passes it through verbatim, while a plain string is run
    through `inspect.cleandoc` (leading spaces and indentation lost), which would make the next
    prompt differ from what the model actually generated."""
    return {"role": role, "content": [{"type": "text", "text": text}]}


def badge_message(usage: Any) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": panel.badge_detail(usage),
        "metadata": {"title": panel.badge(usage), "status": "done"},
    }


class Handlers:
    """Event handlers; each browser tab is one engine session (Gradio's session hash)."""

    def __init__(self, holder: BackgroundEngine, config: Config) -> None:
        self.holder = holder
        self.config = config
        self._warnings_shown: set[str] = set()

    # --- chat ---
    def respond(self, message: str, history: History, system_prompt: str, max_new_tokens: float,
                temperature: float, top_p: float, visitor: str, request: gr.Request) -> Yield:  # fmt: skip
        history = list(history or [])
        text = message if isinstance(message, str) else ""
        if not text.strip():
            gr.Warning("Type a message first.")
            yield history, text
            return
        history.append(text_message("user", text))
        yield from self._reply(history, system_prompt, max_new_tokens, temperature, top_p, visitor, request, text)

    def retry(self, data: gr.RetryData, history: History, system_prompt: str, max_new_tokens: float,
              temperature: float, top_p: float, visitor: str, request: gr.Request) -> Yield:  # fmt: skip
        history = list(history or [])[: _index(data) + 1]
        yield from self._reply(history, system_prompt, max_new_tokens, temperature, top_p, visitor, request, None)

    def edit(self, data: gr.EditData, history: History, system_prompt: str, max_new_tokens: float,
             temperature: float, top_p: float, visitor: str, request: gr.Request) -> Yield:  # fmt: skip
        history = list(history or [])[: _index(data)] + [text_message("user", plain_text(data.value))]
        yield from self._reply(history, system_prompt, max_new_tokens, temperature, top_p, visitor, request, None)

    def undo(self, data: gr.UndoData, history: History) -> tuple[History, str]:
        """Drop the user message and everything after it; put its text back in the box."""
        return list(history or [])[: _index(data)], plain_text(data.value)

    def _reply(self, history: History, system_prompt: str, max_new_tokens: float, temperature: float,
               top_p: float, visitor: str, request: gr.Request, restore: str | None) -> Yield:  # fmt: skip
        """Stream one reply. On bad input, warn and give the typed text back (`restore`)."""
        engine = self.holder.peek()
        if engine is None:
            yield history + [text_message("assistant", "⏳ Loading the model… the reply follows.")], ""
            try:
                engine = self.holder.get(LOAD_WAIT_S)
            except Exception as err:  # noqa: BLE001 - shown to the user, who cannot chat without it
                gr.Warning(f"The model failed to load: {err}")
            if engine is None:
                yield (history[:-1] if restore is not None else history), restore or ""
                return
        try:
            generation = engine.stream(
                _session_id(visitor, request), conversation(system_prompt, history),
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, door="ui",
            )  # fmt: skip
        except Busy as err:  # an error, so API clients see it too; the typed text stays in the box
            raise gr.Error(str(err)) from err
        except InputError as err:
            gr.Warning(str(err))
            yield (history[:-1] if restore is not None else history), restore or ""
            return
        reply = text_message("assistant", "")
        try:
            while not generation.wait_admitted(QUEUE_POLL_S):  # the engine's queue: say where we are
                ahead = generation.ahead
                reply["content"][0]["text"] = f"⏳ Queued, {ahead} ahead…" if ahead else "⏳ Queued, next in line…"
                yield history + [reply], ""
            reply["content"][0]["text"] = ""
            for piece in generation:
                reply["content"][0]["text"] += piece
                yield history + [reply], ""
        except GenerationError as err:
            gr.Warning(f"The reply failed ({err}). Your conversation is kept: press Retry.")
            yield history + ([reply] if generation.text else []), ""
            return
        finally:
            generation.cancel()  # Stop or a closed tab lands here: stop the backend too
        yield history + [reply, badge_message(generation.usage)], ""
        self._warn_once(engine)

    def _warn_once(self, engine: Engine) -> None:
        """A side part's problem (the usage log, the disk tier) is said once, after a reply it did
        not stop; the stats tab keeps showing it."""
        for warning in (engine.log_warning, engine.disk_problem):
            if warning and warning not in self._warnings_shown:
                self._warnings_shown.add(warning)
                gr.Warning(warning)

    # --- the conversation in the visitor's browser ---
    def restore(self, saved: Any) -> tuple[History, str, dict[str, Any]]:
        """On page load: the conversation this browser kept (a reload or a restart loses nothing),
        and its visitor id, which names its session in the engine, so it continues warm."""
        saved = saved if isinstance(saved, dict) else {}
        visitor = saved.get("visitor") if isinstance(saved.get("visitor"), str) else ""
        visitor = visitor or uuid.uuid4().hex
        history = [m for m in saved.get("history") or [] if isinstance(m, dict) and m.get("role") in ROLES]
        return history, visitor, {"visitor": visitor, "history": history}

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
                panel.hit_rate_frame(timeline),
                panel.bytes_frame(timeline),
                panel.ttft_frame(timeline),
            )
        except Exception as err:
            log.exception("stats panel failed")
            return (f"Stats unavailable right now: {err}", None, [], [], *_EMPTY_PLOTS)


_EMPTY_PLOTS = (panel.hit_rate_frame([]), panel.bytes_frame([]), panel.ttft_frame([]))


def plain_text(value: Any) -> str:
    """Text of a message value, whether a string or a list of parts (as the browser sends it)."""
    if isinstance(value, list):
        return "".join(part.get("text", "") for part in value if isinstance(part, dict))
    return str(value or "")


def _index(data: Any) -> int:
    return data.index if isinstance(data.index, int) else data.index[0]


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


def _session_id(visitor: str, request: gr.Request) -> str:
    """The browser's own visitor id (kept across reloads), else this page's Gradio session."""
    return visitor if isinstance(visitor, str) and visitor else request.session_hash or "anonymous"


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
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Conversation", height=560, editable="user")
                    with gr.Row():
                        textbox = gr.Textbox(placeholder="Message…", show_label=False, scale=5,
                                             autofocus=True, submit_btn=False)  # fmt: skip
                        send = gr.Button("Send", variant="primary", scale=1)
                        stop = gr.Button("Stop", variant="stop", scale=1)
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
                                           y_lim=[0, 1], height=260)  # fmt: skip
                    bytes_plot = gr.LinePlot(x="request", y="MiB", color="series", title="KV bytes held vs budget",
                                             height=260)  # fmt: skip
                    ttft_plot = gr.ScatterPlot(x="request", y="TTFT ms", color="cache",
                                               title="Time to first token, warm vs cold", height=260)  # fmt: skip
                stats_timer = gr.Timer(2.0, active=False)
                with gr.Row(visible=not config.share or bool(config.auth)):  # only the operator may clear
                    clear_cache = gr.Button("Clear cache (memory and disk)", variant="secondary", scale=0,
                                            min_width=320)  # fmt: skip
                    cleared = gr.Markdown()
        saved = gr.BrowserState({"visitor": "", "history": []}, storage_key="kvchat-conversation",
                                secret=browser_secret(config.home))  # fmt: skip
        visitor = gr.State("")

        settings = [system_box, max_tokens, temperature, top_p, visitor]
        run = {"concurrency_limit": None}  # the engine batches and queues; Gradio must not serialise
        chat_io = {"inputs": [textbox, chatbot, *settings], "outputs": [chatbot, textbox]}
        events = [
            textbox.submit(handlers.respond, **chat_io, **run, api_name="chat"),
            send.click(handlers.respond, **chat_io, **run, api_visibility="private"),
            chatbot.retry(handlers.retry, [chatbot, *settings], [chatbot, textbox], **run, api_visibility="private"),
            chatbot.edit(handlers.edit, [chatbot, *settings], [chatbot, textbox], **run, api_visibility="private"),
            chatbot.undo(handlers.undo, [chatbot], [chatbot, textbox], api_visibility="private"),
        ]
        stop.click(None, cancels=events[:-1])
        for event in events:  # the browser keeps the conversation after every change, in the browser
            event.then(None, [chatbot, saved], saved, js=SAVE_JS)
        chatbot.clear(None, saved, saved, js=CLEAR_JS)
        demo.load(handlers.restore, saved, [chatbot, visitor, saved], api_visibility="private")
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
    return demo


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
        prevent_thread_lock=True, show_error=True, quiet=True,
    )  # fmt: skip
    add_routes(server, holder, served_id, config.api_key, metrics.response)
    return demo, local_url, share_url


def serve(holder: BackgroundEngine, config: Config, first_page: FirstPage | None = None) -> int:
    """Serve until SIGTERM or Ctrl-C (exit 0) or until the model fails to load (exit 1). The launcher
    (`kvchat.cli`) has started the engine loading and put up `first_page`, which yields the port."""
    demo, local_url, share_url = launch(holder, config, before_bind=first_page.close if first_page else None)
    print(f"kvchat: serving at {local_url}", flush=True)
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
