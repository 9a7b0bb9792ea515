"""The reply each browser tab is streaming, so that Stop, Clear, Undo, Retry, Edit and switching
chats end it in the engine and the stream then finishes normally.

Gradio's own `cancels=` kills the event instead; about 2 cancels in 5 race its stream and leave a red
"Error" over the page, and the steps chained after the event (saving the conversation) never run.
Here the engine's generation is cancelled; the handler sees the generation end, reads why
(`Reply.reason`) and decides what the page shows.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Literal

from kvchat.generation import Generation

EndReason = Literal["", "stopped", "cleared", "replaced"]
# A later reason overrides an earlier one when it says more about what the page shows: Stop keeps the
# reply, Clear then empties the chat, and a switch to another chat means drawing nothing at all.
_RANK: dict[str, int] = {"": 0, "stopped": 1, "cleared": 2, "replaced": 3}
_ids = itertools.count(1)


@dataclass
class Reply:
    """One reply in flight. `reason` says why it ended early ("" while it runs or if it finished)."""

    tab: str
    reason: EndReason = ""
    generation: Generation | None = None
    id: int = field(default_factory=lambda: next(_ids))
    _ended: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def wait_ended(self, timeout_s: float) -> bool:
        return self._ended.wait(timeout_s)

    def end(self, reason: EndReason) -> None:
        with self._lock:
            if _RANK[reason] > _RANK[self.reason]:
                self.reason = reason
            self._ended.set()
        if self.generation is not None:
            self.generation.cancel()

    def attach(self, generation: Generation) -> None:
        """The engine's generation for this reply; cancelled at once if the reply has already ended."""
        self.generation = generation
        if self._ended.is_set():
            generation.cancel()


class TabReplies:
    """At most one reply per tab (Gradio's session hash). Thread-safe: handlers run on Gradio's workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_tab: dict[str, Reply] = {}

    def start(self, tab: str) -> Reply:
        """A new reply for `tab`; the one it was streaming, if any, ends as "replaced"."""
        reply = Reply(tab)
        with self._lock:
            previous = self._by_tab.get(tab)
            self._by_tab[tab] = reply
        if previous is not None:
            previous.end("replaced")
        return reply

    def busy(self, tab: str) -> bool:
        """Whether the tab has a reply that has not ended."""
        with self._lock:
            reply = self._by_tab.get(tab)
        return reply is not None and not reply.ended

    def get(self, tab: str, reply_id: int) -> Reply | None:
        """The tab's reply `reply_id` if it is still the tab's (a Send registers its reply before the
        reply starts, so a Stop pressed in between ends it)."""
        with self._lock:
            reply = self._by_tab.get(tab)
        return reply if reply is not None and reply.id == reply_id else None

    def end(self, tab: str, reason: EndReason) -> Reply | None:
        """End the tab's reply, if it has one, and return it."""
        with self._lock:
            reply = self._by_tab.get(tab)
        if reply is not None:
            reply.end(reason)
        return reply

    def finished(self, reply: Reply) -> None:
        with self._lock:
            if self._by_tab.get(reply.tab) is reply:
                del self._by_tab[reply.tab]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_tab)
