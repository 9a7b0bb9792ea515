"""The budget map: every byte of the memory budget as a treemap block, so a person sees at a glance
what the cache holds and who shares what.

The map is what the budget holds (the title says how much of the budget that is): a cached run is a
block whose area is its bytes, nested inside the run it continues (a conversation's turns inside the
system prompt they share); running requests' private buffers are a block of their own. Free space
is left out of the picture: on a roomy budget it would shrink everything else to slivers. Pure:
engine stats in, a Plotly figure out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvchat.config import format_bytes

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from kvchat.records import CacheStats, NodeInfo

ROOT = "budget"
COLOURS = {
    "shared prefix": "#4C78A8", "stateless turns": "#72B7B2", "session turns": "#F58518",
    "in use by a request": "#E45756", "pinned preset": "#9467BD", "running buffers": "#FF9DA6",
    ROOT: "#FFFFFF",
}  # fmt: skip
KIND_WORDS = {"prefix": "shared prefix", "stateless": "stateless turns", "session": "session turns"}


@dataclass(frozen=True, slots=True)
class Block:
    id: str
    parent: str
    label: str
    category: str  # a key of COLOURS
    nbytes: int  # its own bytes; a block's area also holds its children's
    hover: str


def category(entry: NodeInfo) -> str:
    if entry.preset:
        return "pinned preset"
    if entry.pinned:
        return "in use by a request"
    return KIND_WORDS[entry.kind]


def blocks(stats: CacheStats, now_s: float | None = None) -> list[Block]:
    """What the budget holds as blocks: cached runs in memory (nested by the run they continue) and
    running buffers. Their bytes add up to what is held."""
    now_s = time.time() if now_s is None else now_s
    memory = [e for e in stats.entries if e.tier == "memory"]
    ids = {e.key for e in memory}
    out = [Block(ROOT, "", f"{format_bytes(stats.used_bytes)} held", ROOT, 0,
                 f"{format_bytes(stats.used_bytes)} held of a {format_bytes(stats.budget_bytes)} budget")]  # fmt: skip
    for e in memory:
        kind = category(e)
        out.append(Block(
            id=e.key, parent=e.parent_key if e.parent_key in ids else ROOT,
            label=f"{kind} · {e.num_tokens:,} tok", category=kind, nbytes=e.nbytes,
            hover=(f"{kind}<br>{e.num_tokens:,} tokens (from token {e.depth_tokens - e.num_tokens:,})<br>"
                   f"{format_bytes(e.nbytes)} · {e.hits:,} hits · {e.sessions} session(s) under it<br>"
                   f"created {_ago(now_s - e.created_s)} · last used {_ago(now_s - e.last_used_s)}"
                   + ("<br>also on disk" if e.on_disk else "")),
        ))  # fmt: skip
    if stats.running_bytes:
        out.append(Block("running", ROOT, "running buffers", "running buffers", stats.running_bytes,
                         f"private buffers of {stats.running} running request(s): "
                         f"{format_bytes(stats.running_bytes)}"))  # fmt: skip
    return out


def figure(stats: CacheStats, now_s: float | None = None) -> go.Figure:
    """A Plotly treemap of `blocks` (Plotly is imported here: the first page does not need it)."""
    import plotly.graph_objects as go

    found = blocks(stats, now_s)
    treemap = go.Treemap(
        ids=[b.id for b in found], parents=[b.parent for b in found], labels=[b.label for b in found],
        values=[b.nbytes for b in found], branchvalues="remainder",
        marker={"colors": [COLOURS[b.category] for b in found], "line": {"width": 1, "color": "#FFFFFF"}},
        customdata=[b.hover for b in found], hovertemplate="%{customdata}<extra></extra>",
        textinfo="label", maxdepth=-1, sort=False,
    )  # fmt: skip
    fig = go.Figure(treemap)
    for name in (n for n in COLOURS if n != ROOT):  # a legend: one invisible marker per colour
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                 marker={"color": COLOURS[name], "size": 12, "symbol": "square"}))  # fmt: skip
    fig.update_layout(
        margin={"t": 30, "l": 5, "r": 5, "b": 5}, height=380, showlegend=True, uirevision="budget-map",
        legend={"orientation": "h", "y": -0.02}, xaxis={"visible": False}, yaxis={"visible": False},
        plot_bgcolor="rgba(0,0,0,0)", title={"text": title(stats), "font": {"size": 14}},
    )  # fmt: skip
    return fig


def title(stats: CacheStats) -> str:
    share = stats.used_bytes / stats.budget_bytes if stats.budget_bytes else 0.0
    free = max(0, stats.budget_bytes - stats.used_bytes)
    return (f"Budget map: {format_bytes(stats.used_bytes)} held of {format_bytes(stats.budget_bytes)} ({share:.0%}), "
            f"{format_bytes(free)} free · area = bytes · click a block to zoom")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"

