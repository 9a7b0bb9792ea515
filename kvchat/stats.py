"""What the stats panel, the per-reply badge and the /stats API say, from engine state and the usage log.

Pure formatting: no model, no Gradio. Live numbers come from `CacheStats`, history from SQLite
(`UsageSummary`), so a restart keeps the history while the live part starts empty.
"""

from __future__ import annotations

import time
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import pandas as pd

from kvchat.config import format_bytes
from kvchat.records import CacheSource, Usage

if TYPE_CHECKING:
    from kvchat.engine import Engine
    from kvchat.records import CachedTokens, CacheStats, Warmup
    from kvchat.usage_log import UsageSummary

SOURCE_WORDS: dict[CacheSource, str] = {
    "session": "this session", "stateless": "earlier stateless requests", "prefix": "shared prefix", "none": "none",
}  # fmt: skip
ENTRY_COLUMNS = ["kind", "tokens", "from start", "bytes", "where", "sessions under it", "hits", "in use", "last used"]
RECENT_COLUMNS = ["time", "source", "tier", "prompt tokens", "cached", "new", "TTFT ms", "finish"]


def badge(usage: Usage) -> str:
    """One line under a reply: what the cache did for it."""
    reused = f"{usage.cached_tokens:,} reused from {SOURCE_WORDS[usage.cache_source]}"
    if usage.disk_tokens:
        reused += f" ({usage.disk_tokens:,} read back from disk)"
    if usage.cached_tokens == 0:
        reused = "nothing reused (cold)"
    speed = f" · {usage.decode_tokens_per_s:.1f} tok/s" if usage.decode_tokens_per_s else ""
    mark = "⏹ stopped · " if usage.finish_reason == "cancelled" else "⚡ "
    return (
        f"{mark}{usage.prompt_tokens:,} prompt tokens · {reused} · prefilled {usage.prefilled_tokens:,}"
        f" · TTFT {usage.ttft_ms:,.0f} ms{speed}"
    )


def warmth_words(cached: CachedTokens) -> str:
    """The line under a chat just opened (`Engine.cached`): how much of it its next reply reuses."""
    if not cached.cached_tokens:
        return f"🧊 This chat is cold: none of its {cached.prompt_tokens:,} tokens are cached; its next reply computes them."
    disk = f", {cached.disk_tokens:,} of them on disk" if cached.disk_tokens else ""
    return (f"🔥 This chat is warm: {cached.cached_tokens:,} of its {cached.prompt_tokens:,} tokens are cached{disk}; "
            "its next reply prefills only the rest and your message.")  # fmt: skip


def badge_detail(usage: Usage) -> str:
    waited = ""
    if usage.wait_ms >= 50:
        ahead = f" behind {usage.queued_behind}" if usage.queued_behind else ""
        waited = f", queued {usage.wait_ms:,.0f} ms{ahead}"
    batch = f", decoded in batches of {usage.batch_size:.1f} on average" if usage.batch_size > 1.05 else ""
    return (
        f"{usage.new_tokens} new tokens in {usage.total_ms / 1000:.2f} s{waited}{batch}; finish: "
        f"{usage.finish_reason}; cache now holds {format_bytes(usage.cache_bytes)}"
        + (f"; evicted {usage.evictions} entr{'y' if usage.evictions == 1 else 'ies'}" if usage.evictions else "")
        + ("; no room left in the cache budget, so its turns were not kept" if usage.not_admitted else "")
    )


def disk_words(stats: CacheStats) -> str:
    """The disk tier in a few words, for the status line."""
    if not stats.disk_budget_bytes:
        return f"no disk cache ({stats.disk_problem})" if stats.disk_problem else "no disk cache"
    return f"disk {format_bytes(stats.disk_bytes)} of {format_bytes(stats.disk_budget_bytes)}"


def warmup_words(warmups: list[Warmup]) -> str:
    """Presets warmed at start: how many are ready, and from where."""
    if not warmups:
        return ""
    done = [w for w in warmups if w.done]
    from_disk = sum(1 for w in done if w.disk_tokens)
    pinned = sum(1 for w in done if w.pinned)
    if len(done) < len(warmups) and not any(w.error for w in warmups):
        return f"⏳ warming presets {len(done)}/{len(warmups)}"
    failed = [w.title for w in warmups if w.error]
    return (f"presets warm: {len(done)} ({from_disk} read from disk, {pinned} pinned)"
            + (f", failed: {', '.join(failed)}" if failed else ""))  # fmt: skip


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms"


def panel_markdown(stats: CacheStats, summary: UsageSummary | None, log_warning: str | None = None) -> str:
    used_pct = 100 * stats.used_bytes / stats.budget_bytes if stats.budget_bytes else 0.0
    sessions = sum(e.kind == "session" for e in stats.entries)
    prefixes = sum(e.kind == "prefix" for e in stats.entries)
    stateless = sum(e.kind == "stateless" for e in stats.entries)
    widest = max((e for e in stats.entries if e.kind == "prefix"), key=lambda e: e.sessions, default=None)
    lines = [
        "### Live cache (since start)",
        f"- **Token hit rate:** {stats.token_hit_rate:.1%} "
        f"({stats.cached_tokens:,} of {stats.prompt_tokens:,} prompt tokens served from cache)",
        f"- **Requests:** {stats.requests:,} ({stats.hits:,} warm, {stats.misses:,} cold)",
        f"- **Now:** {stats.running} running, {stats.waiting} waiting",
        f"- **Bytes held:** {format_bytes(stats.used_bytes)} of {format_bytes(stats.budget_bytes)} "
        f"budget ({used_pct:.1f}%): shared {format_bytes(stats.shared_bytes)}, private "
        f"{format_bytes(stats.private_bytes)}, running requests {format_bytes(stats.running_bytes)}",
        f"- **Cached runs:** {prefixes} shared prefix(es), {sessions} session turn(s), {stateless} stateless turn(s)"
        + (f"; the most shared prefix serves {widest.sessions} session(s)" if widest else ""),
        f"- **Evictions so far:** {stats.evictions:,} ({stats.demotions:,} of them demoted to disk)"
        + (f" · **turns not kept** (no room beside running requests): {stats.not_admitted:,}" if stats.not_admitted else ""),
        f"- **Pinned presets:** {format_bytes(stats.pinned_bytes)} (at most a quarter of the budget)"
        + (f"; {warmup_words(stats.warmups)}" if stats.warmups else ""),
        _disk_line(stats),
        f"- **Attention path:** {stats.attention}",
    ]
    lines.append("### History (usage log)")
    if summary is None:
        lines.append("- usage log unavailable")
    else:
        lines += [
            f"- **Requests logged:** {summary.requests:,} ({summary.errors} errors)",
            f"- **Token hit rate:** {summary.token_hit_rate:.1%}",
            f"- **Median TTFT:** warm {_ms(summary.median_ttft_warm_ms)} "
            f"({summary.warm_requests}) vs cold {_ms(summary.median_ttft_cold_ms)} ({summary.cold_requests})",
        ]
    if log_warning:
        lines.append(f"\n⚠️ {log_warning}")
    return "\n".join(lines)


def _disk_line(stats: CacheStats) -> str:
    if not stats.disk_budget_bytes:
        return "- **Disk tier:** off" + (f" ({stats.disk_problem})" if stats.disk_problem else "")
    line = (f"- **Disk tier:** {format_bytes(stats.disk_bytes)} of KV in {format_bytes(stats.disk_file_bytes)} of "
            f"files, budget {format_bytes(stats.disk_budget_bytes)}; {stats.disk_reads:,} run(s) read back "
            f"({stats.disk_read_tokens:,} tokens); {stats.disk_evictions:,} dropped from disk")  # fmt: skip
    return line + (f"\n\n⚠️ Disk tier: {stats.disk_problem}" if stats.disk_problem else "")


def entry_rows(stats: CacheStats, now_s: float | None = None) -> list[list[object]]:
    now_s = time.time() if now_s is None else now_s
    return [
        [e.kind, e.num_tokens, e.depth_tokens - e.num_tokens, format_bytes(e.nbytes),
         "memory + disk" if e.tier == "memory" and e.on_disk else e.tier, e.sessions, e.hits,
         "yes" if e.pinned else "",
         f"{max(0.0, now_s - e.last_used_s):.0f} s ago"]
        for e in stats.entries
    ]  # fmt: skip


def recent_rows(rows: list[dict] | None) -> list[list[object]]:
    return [
        [time.strftime("%H:%M:%S", time.localtime(r["ts"])), r["cache_source"], r.get("cache_tier", ""),
         r["prompt_tokens"],
         r["cached_tokens"], r["new_tokens"], round(r["ttft_ms"]), r["finish_reason"]]
        for r in rows or []
    ]  # fmt: skip


def _finished(rows: list[dict] | None) -> list[dict]:
    return [r for r in rows or [] if r["finish_reason"] in ("stop", "length", "cancelled")]


REQUEST_AXIS_MIN_SPAN = 12  # requests: the plots' ticks stay whole numbers on plots up to ~700 px wide


def request_axis(frame: pd.DataFrame) -> list[float] | None:
    """x limits for a per-request plot: at least REQUEST_AXIS_MIN_SPAN wide, so the plot's ticks
    (about one per 40 px, rounded to 1, 2 or 5 × 10^k) never fall between two requests."""
    if frame.empty:
        return None
    first, last = int(frame["request"].min()), int(frame["request"].max())
    return [first - 0.5, max(last, first + REQUEST_AXIS_MIN_SPAN) + 0.5]  # half a request each side: whole dots


def hit_rate_frame(rows: list[dict] | None) -> pd.DataFrame:
    """Per request and cumulative token hit rate, in request order."""
    points, cached, prompt = [], 0, 0
    for r in _finished(rows):
        cached, prompt = cached + r["cached_tokens"], prompt + r["prompt_tokens"]
        points.append({"request": r["id"], "hit rate": r["cached_tokens"] / r["prompt_tokens"], "series": "this request"})
        points.append({"request": r["id"], "hit rate": cached / prompt, "series": "cumulative"})
    return pd.DataFrame(points, columns=["request", "hit rate", "series"])


def bytes_frame(rows: list[dict] | None) -> pd.DataFrame:
    points = []
    for r in rows or []:
        points.append({"request": r["id"], "MiB": round(r["cache_bytes"] / 2**20, 1), "series": "held"})
        if r.get("budget_bytes"):
            points.append({"request": r["id"], "MiB": round(r["budget_bytes"] / 2**20, 1), "series": "budget"})
    return pd.DataFrame(points, columns=["request", "MiB", "series"])


def ttft_frame(rows: list[dict] | None) -> pd.DataFrame:
    points = [
        {"request": r["id"], "TTFT ms": round(r["ttft_ms"]), "cache": "warm" if r["cached_tokens"] else "cold"}
        for r in _finished(rows) if r["ttft_ms"]
    ]  # fmt: skip
    return pd.DataFrame(points, columns=["request", "TTFT ms", "cache"])


# The /stats JSON: every CacheStats counter under its field's name, but these, which it has never
# carried (the panel shows them), and the two lists, whose records it spells its own way. Of a
# record, only the fields named here go out: a node's others are internals (its key, its parent's,
# when it was made), and a new one is published only by adding it here.
STATS_JSON_LEFT_OUT = frozenset({"prompt_tokens", "cached_tokens", "disk_read_tokens", "attention", "entries",
                                 "warmups"})  # fmt: skip
ENTRY_JSON = {"kind": "kind", "num_tokens": "tokens", "nbytes": "nbytes", "hits": "hits",
              "sessions": "sessions", "pinned": "in_use", "tier": "tier", "on_disk": "on_disk"}  # fmt: skip
WARMUP_JSON = {"title": "preset", "num_tokens": "tokens", "pinned": "pinned", "done": "done",
               "disk_tokens": "disk_tokens", "ms": "ms"}  # fmt: skip


def stats_json(engine: Engine | None) -> dict[str, Any]:
    """What the /stats API answers: the live cache numbers the panel shows, `{"ready": False}` while
    the model loads. A counter added to CacheStats appears here under its own name; the keys and
    values clients read today stay as they are (it is a public API)."""
    if engine is None:
        return {"ready": False}
    stats = engine.stats()
    counters = {f.name: getattr(stats, f.name) for f in fields(stats) if f.name not in STATS_JSON_LEFT_OUT}
    return {
        "ready": True, "busy": stats.busy, **counters, "token_hit_rate": stats.token_hit_rate,
        "eviction": engine.eviction,
        "warmups": [_named(w, WARMUP_JSON) | {"ms": round(w.ms)} for w in stats.warmups],
        "entries": [_named(e, ENTRY_JSON) for e in stats.entries],
    }  # fmt: skip


def _named(record: object, keys: dict[str, str]) -> dict[str, Any]:
    return {key: getattr(record, name) for name, key in keys.items()}
