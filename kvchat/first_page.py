"""A page that is up a fraction of a second after start, while Gradio (several seconds to import on
two cores) and the model load.

It is Python's own `http.server` on the app's port, so it costs no imports. It answers "/" with a
small page saying kvchat is starting, which polls and reloads itself once the real app answers;
`/health` gets 503 `{"status": "loading"}`, anything else a 503 with Retry-After (an
OpenAI-shaped error, so SDK clients and `gradio_client` scripts retry or wait). It hands
the port over just before Gradio binds it: a visitor's page keeps polling through the gap.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKER = "X-Kvchat-Starting"
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kvchat: starting</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:system-ui,sans-serif;margin:3rem auto;max-width:40rem;color:#222}
.dot{display:inline-block;animation:b 1s infinite}@keyframes b{50%{opacity:.2}}</style></head>
<body><h1>kvchat</h1><p><span class="dot">⏳</span> <b>Loading model…</b> The chat opens here by itself
in a few seconds.</p>
<script>
setInterval(async () => {
  try {
    const r = await fetch(location.href, {cache: "no-store"});
    if (r.ok && !r.headers.get("MARKER")) location.reload();
  } catch (e) {}  // the port is changing hands: try again
}, 500);
</script></body></html>
""".replace("MARKER", MARKER).encode()
BUSY = json.dumps({"error": {"message": "kvchat is starting; retry in a few seconds", "type": "server_error",
                             "param": None, "code": "starting"}}).encode()  # fmt: skip
LOADING = json.dumps({"status": "loading"}).encode()  # /health, as the app answers it while the model loads


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_POST(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        page = path in ("", "/")
        body = PAGE if page else LOADING if path == "/health" else BUSY
        self.send_response(200 if page else 503)
        self.send_header("Content-Type", "text/html; charset=utf-8" if page else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header(MARKER, "1")
        if not page:
            self.send_header("Retry-After", "2")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet, as Gradio is
        pass


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class FirstPage:
    """Serve the starting page on (host, port) until `close`. Binding raises OSError at once when
    the port is taken, before anything slow has happened."""

    def __init__(self, host: str, port: int) -> None:
        server_class = _Server6 if ":" in host else ThreadingHTTPServer
        self._server = server_class((host, port), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kvchat-first-page", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
