"""A reply being generated: the engine's model thread produces text pieces, the caller iterates them.

Leaving the iteration early (a Stop button, a closed tab, `break`) sets the cancel flag, and the
worker stops computing at its next token: the backend really stops, not just the display.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor

from kvchat.usage import Usage

_END = object()


class Generation:
    """Iterate for text pieces; afterwards `text` and `usage` are final."""

    def __init__(self, work: Callable[[Generation], Usage], executor: Executor) -> None:
        self._work = work
        self._executor = executor
        self._pieces: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self.text = ""
        self.usage: Usage | None = None
        self.error: BaseException | None = None

    def start(self) -> Generation:
        """Queue the work on the executor (the engine's single model thread)."""
        self._executor.submit(self._run)
        return self

    # --- worker side ---
    def emit(self, piece: str) -> None:
        self.text += piece
        self._pieces.put(piece)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _run(self) -> None:
        try:
            self.usage = self._work(self)
        except BaseException as err:  # handed to the consumer, who re-raises it
            self.error = err
        finally:
            self._done.set()
            self._pieces.put(_END)

    # --- consumer side ---
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
            self._cancel.set()  # no-op when finished; stops the worker when the caller left early

    def wait(self, timeout: float | None = None) -> Usage:
        """Block until the worker is done (it stops early if cancelled); re-raise its error."""
        if not self._done.wait(timeout):
            raise TimeoutError("generation still running")
        if self.error is not None:
            raise self.error
        assert self.usage is not None
        return self.usage
