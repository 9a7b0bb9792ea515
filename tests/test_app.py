"""The app as a user starts it: `python app.py`, then chats through gradio_client."""

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlite_utils
from gradio_client import Client

from kvchat.presets import load_presets
from conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
FAQ = load_presets()["Acme cloud support faq (long)"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_app(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def start_app(*args: str, auth: tuple[str, str] | None = None, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start `python app.py ARGS` on a free local port; returns once the model is loaded. Its disk
    cache is a fresh directory unless ARGS name one (never the user's own)."""
    port = port or free_port()
    if "--disk-dir" not in args:
        args = (*args, "--disk-dir", tempfile.mkdtemp(prefix="kvchat-disk-"))
    process = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "KVCHAT_HOST": "127.0.0.1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError("the app exited")
        try:
            return Client(url, verbose=False, auth=auth).predict(api_name="/stats")["ready"]
        except Exception:  # noqa: BLE001 - not up yet
            return False

    try:
        wait_until(ready, timeout_s=180, interval_s=1, message="the app has loaded its model")
    except (RuntimeError, pytest.fail.Exception) as err:
        process.kill()
        raise RuntimeError(f"app did not start:\n{process.stdout.read() if process.stdout else ''}") from err
    return process, url


def stop_app(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def running_app(folder: Path, *args: str, port: int | None = None) -> Iterator[tuple[str, Path]]:
    """The app with its own usage log and disk cache in `folder`: (url, db path), stopped afterwards."""
    db = folder / "usage.db"
    process, url = start_app("--usage-db", str(db), "--disk-dir", str(folder / "disk"), *args, port=port)
    try:
        yield url, db
    finally:
        stop_app(process)


@pytest.fixture(scope="module")
def app(tmp_path_factory, bundled_dir):
    with running_app(tmp_path_factory.mktemp("app")) as served:
        yield served


def ask(client: Client, text: str, history: list) -> list:
    history, box = client.predict(text, history, FAQ, 16, 0.0, 1.0, api_name="/chat")
    assert box == ""
    return history


def test_two_sessions_share_the_long_system_prompt_and_every_request_is_logged(app):
    url, db = app
    alice, bob = Client(url, verbose=False), Client(url, verbose=False)
    history = ask(alice, "How much does the Team plan cost?", [])
    assert [m["role"] for m in history] == ["user", "assistant", "assistant"]
    assert "reused" in history[-1]["metadata"]["title"]  # the badge under the reply
    history = ask(alice, "And Business?", history)
    bob_history = ask(bob, "What happens if my card payment fails?", [])
    assert "shared prefix" in bob_history[-1]["metadata"]["title"]
    rows = logged_rows(db, 3)  # the log writer is asynchronous
    assert len(rows) == 3
    assert rows[0]["cache_source"] == "prefix" and rows[0]["cached_tokens"] > 1000  # presets are warm at start
    assert rows[1]["cache_source"] == "session" and rows[1]["cached_tokens"] > 1000
    assert rows[2]["cache_source"] == "prefix" and rows[2]["cached_tokens"] > 1000
    assert rows[2]["session"] != rows[0]["session"]
    assert all(r["finish_reason"] in ("stop", "length") and r["ttft_ms"] > 0 for r in rows)
    assert all(r["user_text"] is None for r in rows)


def test_empty_message_is_refused_and_nothing_is_logged(app):
    url, db = app
    before = len(logged_rows(db, 0))
    client = Client(url, verbose=False)
    history, box = client.predict("   ", [], FAQ, 16, 0.0, 1.0, api_name="/chat")
    assert history == [] and box == "   "  # the typed text is given back
    ask(client, "And now a real question?", [])
    rows = logged_rows(db, before + 1)  # rows are written in order: a row for the refusal would come first
    assert len(rows) == before + 1 and rows[-1]["prompt_tokens"] > 1000


def logged_rows(db: Path, at_least: int, timeout_s: float = 30) -> list[dict]:
    """The log's rows once it holds `at_least` of them (the writer is asynchronous)."""
    def rows() -> list[dict]:
        return list(sqlite_utils.Database(db).query("select * from requests order by id")) if db.exists() else []

    wait_until(lambda: len(rows()) >= at_least, timeout_s=timeout_s,
               message=lambda: f"the log holds {at_least} rows (it holds {len(rows())})")
    return rows()


def test_a_message_longer_than_the_context_is_refused_and_given_back(app):
    url, _ = app
    emoji = "😀" * 25_000  # 100 KB
    history, box = Client(url, verbose=False).predict(emoji, [], FAQ, 16, 0.0, 1.0, api_name="/chat")
    assert history == [] and box == emoji


def test_help_lists_every_option_with_its_environment_variable():
    result = run_app("--help")
    assert result.returncode == 0
    for option in ("--model", "--device", "--dtype", "--cache-budget", "--usage-db", "--host", "--port",
                   "--share", "KVCHAT_CACHE_BUDGET"):  # fmt: skip
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [(["--cache-budget", "lots"], "cannot read 'lots'"), (["--model", "/no/such/model"], "does not exist"),
     (["--dtype", "float8"], "invalid choice")],
)  # fmt: skip
def test_bad_start_up_options_exit_non_zero_with_a_clear_message(args, words):
    result = run_app(*args)
    assert result.returncode != 0
    assert words in result.stderr
