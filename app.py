"""kvchat's browser app: `python app.py` starts it, with the same options as the `kvchat` command.

    python app.py --help

This file is only the entry point. The launcher is kvchat.cli (a page up at once, then the rest);
the page is kvchat.ui (layout and wiring) with kvchat.ui_chat and kvchat.ui_stats (what each event
does); the server process is kvchat.server. The names below are re-exported for scripts that
`import app`.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the slow imports below: the launcher puts a page up first
    from kvchat.cli import main

    raise SystemExit(main())

from kvchat.server import launch, serve
from kvchat.ui import CHATS_JS, CSS, browser_secret, build_ui
from kvchat.ui_chat import Frame, Handlers, ReplySettings, badge_message, queue_words
from kvchat.ui_stats import StatsHandlers

__all__ = ["CHATS_JS", "CSS", "Frame", "Handlers", "ReplySettings", "StatsHandlers", "badge_message",
           "browser_secret", "build_ui", "launch", "queue_words", "serve"]  # fmt: skip
