"""The server process: the page, the OpenAI-compatible API and /metrics on one port; then the URLs
printed, a wait for SIGTERM or Ctrl-C (or a failed model load), and a shutdown that closes the engine.
The launcher (kvchat.cli) imports this module only once its first page is up: it imports Gradio.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from kvchat.config import Config
from kvchat.metrics import Metrics
from kvchat.openai_api import add_routes, model_id
from kvchat.startup import BackgroundEngine
from kvchat.ui import CHATS_JS, CSS, build_ui

if TYPE_CHECKING:
    from kvchat.first_page import FirstPage


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
        prevent_thread_lock=True, show_error=True, quiet=True, js=CHATS_JS, css=CSS,
    )  # fmt: skip
    add_routes(server, holder, served_id, config.api_key, metrics.response)
    return demo, local_url, share_url


def serve(holder: BackgroundEngine, config: Config, first_page: FirstPage | None = None) -> int:
    """Serve until SIGTERM or Ctrl-C (exit 0) or until the model fails to load (exit 1). The launcher
    (`kvchat.cli`) has started the engine loading and put up `first_page`, which yields the port."""
    demo, local_url, share_url = launch(holder, config, before_bind=first_page.close if first_page else None)
    print(f"kvchat: serving at {local_url}", flush=True)
    if config.usage_db:
        print(f"kvchat: usage log (SQLite, no message text) at {Path(config.usage_db).resolve()}", flush=True)
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
