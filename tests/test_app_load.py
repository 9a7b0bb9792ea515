"""The app under a demo's load, on the tiny model (saved like any local model): many sessions at
once, a full queue, a login, SIGTERM. Loopback only, bounded in count and time."""

import signal
import threading

import pytest
import sqlite_utils
from gradio_client import Client

from kvchat import Engine, server
from kvchat.config import config_from_args
from kvchat.startup import BackgroundEngine
from conftest import wait_until
from test_app import free_port, run_app, start_app, stop_app

SYSTEM = "You are the helpdesk of a school. Answer in one sentence. " * 4
SESSIONS, TURNS, NEW = 16, 5, 6
BUDGET = "1MiB"  # holds a few tiny sessions: evictions happen during the test


def question(session: int, turn: int) -> str:
    return f"Student {session} asks question {turn}: when does the library open on day {turn + session}?"


def expected_alone(tiny_loaded, session: int) -> list[str]:
    """The replies this session gets when it is the only one (greedy, fresh engine)."""
    engine = Engine(tiny_loaded, cache_budget_bytes=2**30)
    messages, replies = [{"role": "system", "content": SYSTEM}], []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": question(session, turn)})
        replies.append(engine.chat("alone", messages, max_new_tokens=NEW).text)
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


@pytest.fixture(scope="module")
def tiny_app(tiny_model_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("load") / "usage.db"
    process, url = start_app("--model", str(tiny_model_dir), "--cache-budget", BUDGET, "--usage-db", str(db))
    yield process, url, db
    stop_app(process)


def test_16_concurrent_sessions_x_5_turns(tiny_app, tiny_loaded):
    process, url, db = tiny_app
    replies: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    samples: list[tuple[int, int]] = []
    done = threading.Event()

    def chat(session: int) -> None:
        try:
            client, history, got = Client(url, verbose=False), [], []
            for turn in range(TURNS):
                history, _ = client.predict(question(session, turn), history, SYSTEM, NEW, 0.0, 1.0, api_name="/chat")
                got.append(history[-2]["content"][0]["text"] if history[-2]["content"] else "")
            replies[session] = got
        except BaseException as err:  # noqa: BLE001 - counted below
            errors.append(err)

    def sample() -> None:
        client = Client(url, verbose=False)
        while True:  # at least once, however fast the chats finish
            stats = client.predict(api_name="/stats")
            samples.append((stats["used_bytes"], stats["budget_bytes"]))
            if done.wait(0.05):
                return

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=chat, args=(i,)) for i in range(SESSIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    done.set()
    sampler.join(timeout=30)
    assert errors == []
    assert samples and all(used <= budget for used, budget in samples)
    for session in range(SESSIONS):
        assert replies[session] == expected_alone(tiny_loaded, session), f"session {session}"
    wait_until(lambda: sqlite_utils.Database(db)["requests"].count >= SESSIONS * TURNS, timeout_s=10,
               interval_s=0.2, message=f"the log holds all {SESSIONS * TURNS} rows")  # its writer is asynchronous
    rows = list(sqlite_utils.Database(db).query("select finish_reason, evictions from requests"))
    assert len(rows) == SESSIONS * TURNS
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)
    assert sum(r["evictions"] for r in rows) > 0  # the budget really was under pressure
    print(f"load: {SESSIONS * TURNS} requests, {len(errors)} errors, max held {max(u for u, _ in samples)} "
          f"of {samples[0][1]} bytes over {len(samples)} samples, {len(rows)} rows, "
          f"{sum(r['evictions'] for r in rows)} evictions")


def test_sigterm_flushes_the_log_and_exits_cleanly(tiny_model_dir, tmp_path):
    db = tmp_path / "usage.db"
    process, url = start_app("--model", str(tiny_model_dir), "--usage-db", str(db))  # its own app: it is killed
    try:
        Client(url, verbose=False).predict("One last question?", [], SYSTEM, NEW, 0.0, 1.0, api_name="/chat")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        stop_app(process)
    assert "shutting down" in process.stdout.read()
    assert sqlite_utils.Database(db)["requests"].count == 1  # written before the exit, not lost


def test_full_queue_says_busy_and_the_queued_are_served(tiny_loaded, tmp_path):
    """Deterministic: the model waits at a gate the test holds, so the first request is running
    (max batch 1) and the second waiting in the engine's queue when the others arrive."""
    gate, reached = threading.Event(), threading.Event()

    def hold(module, args, kwargs):
        reached.set()
        assert gate.wait(120), "the test never opened the gate"

    engine = Engine(tiny_loaded, cache_budget_bytes=2**24, max_batch=1, max_waiting=1)
    config = config_from_args(["--max-queue", "1", "--port", str(free_port()), "--usage-db", str(tmp_path / "u.db")])
    demo, url, _ = server.launch(BackgroundEngine(lambda: engine), config)
    hook = tiny_loaded.model.register_forward_pre_hook(hold, with_kwargs=True)
    try:
        ask = lambda: Client(url, verbose=False).submit("Tell me a story.", [], "", 4, 0.0, 1.0, api_name="/chat")  # noqa: E731
        running = ask()
        assert reached.wait(60), "the first request never reached the model"
        waiting = ask()
        wait_until(lambda: engine.stats().waiting == 1, timeout_s=60, interval_s=0.05,
                   message="the second request waits in the engine's queue")
        refused = [ask() for _ in range(3)]
        for job in refused:
            with pytest.raises(Exception, match="(?i)busy"):
                job.result(timeout=60)
        assert engine.stats().waiting == 1
        gate.set()
        for job in (running, waiting):
            history, _ = job.result(timeout=120)
            assert history[0]["role"] == "user" and history[1]["role"] == "assistant"
            assert "Queued" not in history[1]["content"][0]["text"]
    finally:
        gate.set()
        hook.remove()
        demo.close()
        engine.close()


def test_auth_keeps_strangers_out(tiny_model_dir, tmp_path):
    process, url = start_app("--model", str(tiny_model_dir), "--auth", "teacher:s3cret", "--usage-db",
                             str(tmp_path / "a.db"), auth=("teacher", "s3cret"))  # fmt: skip
    try:
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own error types
            Client(url, verbose=False).predict(api_name="/stats")
        history, _ = Client(url, verbose=False, auth=("teacher", "s3cret")).predict(
            "Hello", [], "", 4, 0.0, 1.0, api_name="/chat")  # fmt: skip
        assert history[0]["role"] == "user"
    finally:
        stop_app(process)


def test_a_directory_that_is_not_a_model_stops_the_start_with_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    result = run_app("--model", str(tmp_path), "--usage-db", "none", timeout=180)
    assert result.returncode != 0
    assert "cannot load" in result.stderr
