"""The status line over the tabs and the Cache stats tab, as Gradio shows them: what the model and
the cache are doing, refreshed on timers; and the /stats API. The words come from kvchat.stats, the
budget treemap from kvchat.budget_map.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gradio as gr

from kvchat import budget_map
from kvchat import stats as panel
from kvchat.config import Config, format_bytes
from kvchat.startup import BackgroundEngine

log = logging.getLogger("kvchat.app")  # the name these lines have always carried in the log


class StatsHandlers:
    """Event handlers of the status line and the stats tab; each reads the engine once it is loaded."""

    def __init__(self, holder: BackgroundEngine, config: Config) -> None:
        self.holder = holder
        self.config = config

    def clear_cache(self) -> str:
        engine = self.holder.peek()
        if engine is None:
            return "The model is still loading: nothing is cached yet."
        removed = engine.clear_cache()
        return f"Cleared {removed} cached run(s) from memory and disk; pinned presets and runs in use stay."

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

    def stats(self) -> dict:
        """Live cache numbers (what the stats panel shows) as JSON."""
        return panel.stats_json(self.holder.peek())

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

