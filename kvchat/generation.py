"""A reply being generated: the engine's scheduler produces text pieces, the caller iterates them.

Leaving the iteration early (a Stop button, a closed tab, `break`) sets the cancel flag, and the
scheduler drops the request at its next step: the backend really stops, not just the display.
While the request waits in the engine's queue, `ahead` says how many requests are before it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator

from kvchat.records import Usage

_END = object()


class Generation:
    """Iterate for text pieces; afterwards `text` and `usage` are final."""

    def __init__(self) -> None:
        self._pieces: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._started = threading.Event()
        self.ahead = 0  # requests before this one in the engine's queue (0 once admitted)
        self.token_ids: list[int] = []  # the reply's token ids (the end-of-turn token not included)
        self.text = ""
        self.usage: Usage | None = None
        self.error: BaseException | None = None

    # --- scheduler side ---
    def emit(self, piece: str) -> None:
        self.text += piece
        self._pieces.put(piece)

    def admitted(self) -> None:
        self.ahead = 0
        self._started.set()

    def finish(self, usage: Usage, error: BaseException | None = None) -> None:
        self.usage, self.error = usage, error
        self._started.set()
        self._done.set()
        self._pieces.put(_END)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # --- consumer side ---
    @property
    def waiting(self) -> bool:
        """Still in the engine's queue (not yet admitted to the batch)."""
        return not self._started.is_set()

    def wait_admitted(self, timeout: float | None = None) -> bool:
        return self._started.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def __iter__(self) -> Iterator[str]:
        try:
            while (item := self._pieces.get()) is not _END:
                yield item  # type: ignore[misc]
            self._pieces.put(_END)  # a second iteration ends at once
            if self.error is not None:
                raise self.error
        finally:
            self._cancel.set()  # no-op when finished; stops the request when the caller left early

    async def pieces(self, poll_s: float = 0.02) -> AsyncIterator[str]:
        """The same pieces for asyncio callers (the HTTP API). It polls: a thread blocked per
        stream would exhaust the event loop's small executor with a class of clients."""
        try:
            while True:
                try:
                    item = self._pieces.get_nowait()
                except queue.Empty:
                    await asyncio.sleep(poll_s)
                    continue
                if item is _END:
                    break
                yield item  # type: ignore[misc]
            self._pieces.put(_END)
            if self.error is not None:
                raise self.error
        finally:
            self._cancel.set()  # a client gone mid-stream stops the request, as Stop does

    def wait_done(self, timeout: float | None = None) -> bool:
        """Block until the request is done, whatever its outcome; False if `timeout` passed first."""
        return self._done.wait(timeout)

    def wait(self, timeout: float | None = None) -> Usage:
        """Block until the request is done (it stops early if cancelled); re-raise its error."""
        if not self._done.wait(timeout):
            raise TimeoutError("generation still running")
        if self.error is not None:
            raise self.error
        assert self.usage is not None
        return self.usage
