"""Loading the engine in the background, so the page is up (saying "loading model…") at once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kvchat.engine import Engine

log = logging.getLogger(__name__)


class BackgroundEngine:
    def __init__(self, load: Callable[[], Engine]) -> None:
        self._load = load
        self._ready = threading.Event()
        self._engine: Engine | None = None
        self.error: BaseException | None = None
        self.started_s = time.time()
        threading.Thread(target=self._run, name="kvchat-load", daemon=True).start()

    def _run(self) -> None:
        try:
            self._engine = self._load()
        except BaseException as err:  # reported by `get`, the status line and the launcher
            log.error("model failed to load: %s", err)
            self.error = err
        finally:
            self._ready.set()

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
