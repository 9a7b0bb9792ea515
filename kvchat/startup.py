"""Loading the engine in the background, so the page is up (saying "loading model…") at once.

This module is on the path to the first page: it must not import torch or transformers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvchat.engine import Engine

log = logging.getLogger(__name__)


class BackgroundEngine:
    def __init__(self, load: Callable[[], Engine]) -> None:
        self._load = load
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._on_ready: list[Callable[[Engine], None]] = []
        self._engine: Engine | None = None
        self.error: BaseException | None = None
        self.started_s = time.time()
        threading.Thread(target=self._run, name="kvchat-load", daemon=True).start()

    def _run(self) -> None:
        try:
            engine = self._load()
            with self._lock:  # callbacks see the engine before any caller can use it
                for callback in self._on_ready:
                    _call(callback, engine)
                self._engine = engine
        except BaseException as err:  # reported by `get`, the status line and the launcher
            log.error("model failed to load: %s", err)
            self.error = err
        finally:
            self._ready.set()

    def on_ready(self, callback: Callable[[Engine], None]) -> None:
        """Run `callback(engine)` once the engine is loaded (now, if it is), before anyone uses it."""
        with self._lock:
            if self._engine is None:
                self._on_ready.append(callback)
                return
        _call(callback, self._engine)

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def done(self) -> bool:
        return self._ready.is_set()

    def get(self, timeout_s: float | None = None) -> Engine | None:
        """The engine once loaded; None if still loading after `timeout_s`. Re-raises a load error."""
        self._ready.wait(timeout_s)
        if self.error is not None:
            raise self.error
        return self._engine

    def peek(self) -> Engine | None:
        return self._engine


def _call(callback: Callable[[Engine], None], engine: Engine) -> None:
    try:
        callback(engine)
    except Exception:  # a side part (metrics) never keeps the chat from starting
        log.exception("a start-up hook failed")
