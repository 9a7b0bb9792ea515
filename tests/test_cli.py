"""The launcher: a page at once, nothing slow on the way to it, a clear word when the port is taken."""

import ast
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from kvchat.first_page import MARKER, FirstPage
from test_app import ROOT, free_port


def test_the_way_to_the_first_page_imports_no_torch_transformers_or_gradio():
    code = ("import sys, kvchat.cli, kvchat.openai_api, kvchat.metrics, kvchat.stats, kvchat.budget_map; "
            "print([m for m in ('torch', 'transformers', 'gradio', 'plotly') if m in sys.modules])")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_package_never_imports_the_entry_point_and_the_entry_point_still_offers_the_app():
    """app.py sits on top of kvchat: a module of the package importing it back would be a cycle."""
    for path in (ROOT / "kvchat").rglob("*.py"):
        nodes = list(ast.walk(ast.parse(path.read_text())))
        imported = {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module}
        assert "app" not in imported, path
    import app
    from kvchat import server, ui, ui_chat

    assert (app.launch, app.serve, app.build_ui, app.Handlers) == (server.launch, server.serve, ui.build_ui,
                                                                    ui_chat.Handlers)  # fmt: skip


def test_the_first_page_says_loading_and_api_callers_get_a_503_to_retry():
    port = free_port()
    page = FirstPage("127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as response:
            assert response.status == 200 and response.headers[MARKER] == "1"
            assert "Loading model…" in response.read().decode()
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models")
        assert caught.value.code == 503 and caught.value.headers["Retry-After"]
        assert json.loads(caught.value.read())["error"]["code"] == "starting"
    finally:
        page.close()
    with socket.socket() as sock:  # handed over: the app can bind the port now
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


def test_a_taken_port_is_refused_at_once_with_a_clear_message():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "app.py", "--port", str(port), "--usage-db", "none"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
