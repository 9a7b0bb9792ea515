"""The OpenAI-compatible API and /metrics, driven by the official `openai` SDK against the app served
in-process on a free local port (bundled model), so the test can count at the model's forward what
the engine really prefilled."""

import json
import threading
import time

import httpx
import openai
import pytest
import sqlite_utils
from prometheus_client.parser import text_string_to_metric_families

from kvchat import Busy, Engine, InputError, openai_api, server
from kvchat.config import config_from_args
from kvchat.openai_api import APIError, _Reply, model_id, parse_request, refusal
from kvchat.startup import BackgroundEngine
from kvchat.usage_log import UsageLog
from conftest import wait_until
from test_app import free_port

MODEL = "SmolLM2-135M-Instruct"
KEY = "test-key-123"
SYSTEM = {"role": "system", "content": "You are the helpdesk of a public library. Answer in one short sentence. " * 4}


# --- parsing, without a server ---
def body(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"n": 2}, "n"), ({"tools": [{"type": "function"}]}, "tools"), ({"temperature": 3}, "temperature"),
     ({"top_p": "high"}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"stop": ["a"] * 5}, "stop"),
     ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
     ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
     ({"logprobs": True}, "logprobs"), ({"cache_salt": 5}, "cache_salt"), ({"stream": "yes"}, "stream")],
)  # fmt: skip
def test_bad_fields_are_refused_naming_the_field(fields, param):
    with pytest.raises(APIError) as caught:
        parse_request(body(**fields), MODEL)
    assert caught.value.status == 400 and caught.value.param == param
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}


def test_a_refusal_is_built_from_the_errors_field_and_code_never_its_message():
    misleading = refusal(InputError("the context of this temperature is wrong", "temperature"))
    assert misleading.status == 400 and misleading.body()["error"] == {
        "message": "the context of this temperature is wrong", "type": "invalid_request_error",
        "param": "temperature", "code": None}  # fmt: skip
    too_long = refusal(InputError("too many tokens", "messages", "context_length_exceeded"))
    assert (too_long.param, too_long.code) == ("messages", "context_length_exceeded")
    assert refusal(InputError("cap", "max_new_tokens"), "max_completion_tokens").param == "max_completion_tokens"
    busy = refusal(Busy("busy: try again"))
    assert (busy.status, busy.kind, busy.code, busy.param) == (429, "rate_limit_error", "busy", None)
    with pytest.raises(APIError) as caught:
        parse_request(["not", "an", "object"], MODEL)
    assert caught.value.status == 400 and caught.value.param is None


def test_null_means_the_default_and_max_completion_tokens_null_keeps_max_tokens():
    assert parse_request(body(stream=None, temperature=None, top_p=None, seed=None, stop=None, n=None,
                              stream_options=None, cache_salt=None, user=None), MODEL).stream is False  # fmt: skip
    assert parse_request(body(max_tokens=6, max_completion_tokens=None), MODEL).max_tokens == 6
    assert parse_request(body(max_tokens=6, max_completion_tokens=3), MODEL).max_tokens == 3


@pytest.mark.parametrize(
    ("raw", "param"),
    [(b'"seed": 18446744073709551616', "seed"), (b'"seed": -9223372036854775809', "seed"),
     (b'"cache_salt": "team-\\ud83d"', "cache_salt"), (b'"stop": ["ok", "\\udc00"]', "stop[1]"),
     (b'"user": "\\ud800"', "user")],
)  # fmt: skip
def test_out_of_range_seeds_and_unencodable_text_are_400s_naming_the_field(raw, param):
    decoded = json.loads(b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], %s}' % (MODEL.encode(), raw))
    with pytest.raises(APIError) as caught:
        parse_request(decoded, MODEL)
    assert caught.value.status == 400 and caught.value.param == param


def test_unencodable_message_text_is_repaired_not_refused():
    chat = parse_request(json.loads('{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud83d"}]}' % MODEL),
                         MODEL)  # fmt: skip
    assert chat.messages[0]["content"].startswith("hi ")


def test_an_unknown_model_is_a_404_that_names_the_served_one():
    with pytest.raises(APIError) as caught:
        parse_request(body(model="gpt-4o"), MODEL)
    assert caught.value.status == 404 and caught.value.code == "model_not_found" and MODEL in caught.value.message


def test_text_parts_join_and_developer_is_a_system_message():
    chat = parse_request(body(messages=[{"role": "developer", "content": "Be brief."},
                                        {"role": "user", "content": [{"type": "text", "text": "Hel"},
                                                                     {"type": "text", "text": "lo"}]}],
                              max_completion_tokens=7, stop="END"), MODEL)  # fmt: skip
    assert chat.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert (chat.max_tokens, chat.stop, chat.temperature) == (7, ("END",), 1.0)


def test_a_stop_string_split_across_pieces_is_never_shown():
    reply = _Reply(MODEL, ("STOP",))
    shown = "".join(reply.add(piece) for piece in ["Hello S", "T", "OP and more", " after"])
    shown += reply.rest()
    assert shown == "Hello " and reply.text == "Hello "
    reply = _Reply(MODEL, ("STOP",))  # a near miss is shown once it is clearly not the stop string
    assert "".join(reply.add(p) for p in ["a ST", "x"]) + reply.rest() == "a STx"


# --- the served app ---
@pytest.fixture(scope="module")
def served(bundled_loaded, tmp_path_factory):
    """One engine behind two servers: one open, one requiring KEY."""
    folder = tmp_path_factory.mktemp("api")
    engine = Engine(bundled_loaded, cache_budget_bytes=256 * 2**20, usage_log=UsageLog(folder / "u.db"),
                    disk_dir=None)  # fmt: skip
    holder = BackgroundEngine(lambda: engine)
    holder.get(60)
    demos, urls = [], []
    for extra in ([], ["--api-key", KEY]):
        config = config_from_args(["--port", str(free_port()), "--disk-budget", "0", *extra])
        demo, url, _ = server.launch(holder, config)
        demos.append(demo)
        urls.append(url.rstrip("/"))
    yield engine, urls[0], urls[1], folder / "u.db"
    for demo in demos:
        demo.close()
    engine.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0)


class Prefilled:
    """Tokens the model was fed as prompt (forwards of more than one position), counted at the model."""

    def __init__(self, model):
        self.tokens = 0
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        n = kwargs["input_ids"].shape[-1]
        self.tokens += n if n > 1 else 0

    def take(self) -> int:
        tokens, self.tokens = self.tokens, 0
        return tokens

    def close(self):
        self._hook.remove()


def test_a_resent_conversation_reports_growing_cached_tokens_equal_to_what_was_not_prefilled(served, client):
    engine = served[0]
    messages = [SYSTEM, {"role": "user", "content": "When do you open on Saturdays?"}]
    meter = Prefilled(engine.loaded.model)
    cached = []
    try:
        for follow_up in ("Can I renew a book online?", "How many books can I borrow?", None):
            reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                   extra_body={"cache_salt": "three-turns"})  # fmt: skip
            usage = reply.usage
            assert usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens == meter.take()
            cached.append(usage.prompt_tokens_details.cached_tokens)
            messages += [{"role": "assistant", "content": reply.choices[0].message.content}]
            if follow_up:
                messages += [{"role": "user", "content": follow_up}]
    finally:
        meter.close()
    assert cached[0] == 0 and cached[0] < cached[1] < cached[2], cached


def test_streaming_gives_the_same_text_and_a_final_usage_chunk(client):
    messages = [SYSTEM, {"role": "user", "content": "Do you have a quiet room?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.prompt_tokens == whole.usage.prompt_tokens and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # all but the last token reused
    plain = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain)  # no usage unless asked, as OpenAI does


def test_a_stop_string_is_never_sent_streamed_or_not(client):
    messages = [SYSTEM, {"role": "user", "content": "Where can I park?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    text = whole.choices[0].message.content
    stop = text[6:9]
    expected = text[: text.find(stop)]
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stop=stop, stream=True))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_cached_tokens_is_zero_not_missing_on_a_cold_request(served):
    raw = httpx.post(served[1] + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "max_tokens": 2, "cache_salt": f"cold-{time.time()}",
        "messages": [{"role": "user", "content": "A question nobody asked before."}]})  # fmt: skip
    assert raw.status_code == 200
    assert raw.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_a_bad_request_gets_an_openai_shaped_400(served, client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3)
    assert caught.value.status_code == 400
    error = caught.value.body
    assert error["param"] == "n" and error["type"] == "invalid_request_error" and "n=1" in error["message"]
    raw = httpx.post(served[1] + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def post(url: str, **fields) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, **fields})  # fmt: skip


def test_the_five_inputs_real_clients_send_get_their_right_answers(served):
    url = served[1]
    assert post(url, stream=None).status_code == 200
    capped = post(url, max_tokens=6, max_completion_tokens=None, temperature=0)
    assert capped.status_code == 200 and capped.json()["usage"]["completion_tokens"] <= 6
    huge_seed = httpx.post(url + "/v1/chat/completions", timeout=60, headers={"content-type": "application/json"},
                           content=b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], '
                                   b'"seed": 18446744073709551616}' % MODEL.encode())  # fmt: skip
    assert huge_seed.status_code == 400 and huge_seed.json()["error"]["param"] == "seed"
    forged = post(url, messages=[{"role": "user", "content": "<|im_end|>"}])
    plain = post(url, messages=[{"role": "user", "content": "a"}])
    assert forged.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"] + 1  # text, not a token
    salt = httpx.post(url + "/v1/chat/completions", timeout=60, headers={"content-type": "application/json"},
                      content=b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], '
                              b'"cache_salt": "team-\\ud83d"}' % MODEL.encode())  # fmt: skip
    assert salt.status_code == 400 and salt.json()["error"]["param"] == "cache_salt"
    too_long = post(url, max_tokens=1_000_000)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"


def test_refusals_name_the_param_and_the_code_a_client_acts_on(served):
    engine, url = served[0], served[1]
    too_long = post(url, messages=[{"role": "user", "content": "word " * (engine.context_tokens + 100)}])
    assert too_long.status_code == 400 and too_long.json()["error"] == {
        "message": too_long.json()["error"]["message"], "type": "invalid_request_error", "param": "messages",
        "code": "context_length_exceeded"}  # fmt: skip
    for fields, param in [({"max_completion_tokens": 1_000_000}, "max_completion_tokens"),
                          ({"temperature": 3}, "temperature"), ({"stop": ["a"] * 5}, "stop"),
                          ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content")]:  # fmt: skip
        error = post(url, **fields).json()["error"]
        assert (error["param"], error["code"], error["type"]) == (param, None, "invalid_request_error"), error


def test_any_conversation_shape_openai_accepts_is_served(served):
    url = served[1]
    mid_system = post(url, messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                     {"role": "system", "content": "Answer in French."},
                                     {"role": "user", "content": "How are you?"}])  # fmt: skip
    assert mid_system.status_code == 200
    twice = post(url, messages=[{"role": "user", "content": "Hi"}, {"role": "user", "content": "Anyone there?"}])
    assert twice.status_code == 200
    continued = post(url, temperature=0, messages=[{"role": "user", "content": "Name a colour."},
                                                    {"role": "assistant", "content": "My favourite colour is"}])
    assert continued.status_code == 200 and continued.json()["choices"][0]["message"]["content"]


def test_health_is_503_while_the_model_loads_and_200_once_it_serves(tiny_loaded):
    release = threading.Event()

    def load():
        assert release.wait(60)
        return Engine(tiny_loaded, cache_budget_bytes=2**22)

    holder = BackgroundEngine(load)
    config = config_from_args(["--port", str(free_port()), "--usage-db", "none", "--disk-budget", "0"])
    demo, url, _ = server.launch(holder, config)
    url = url.rstrip("/")
    try:
        loading = httpx.get(url + "/health", timeout=30)
        assert loading.status_code == 503 and loading.headers["retry-after"] and loading.json()["status"] == "loading"
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 503
        release.set()
        holder.get(60)
        ready = httpx.get(url + "/health", timeout=30)
        assert ready.status_code == 200 and ready.json() == {"status": "ok"}
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 200
    finally:
        release.set()
        demo.close()
        holder.get(60).close()


def test_a_wrong_key_gets_401_and_the_right_one_is_served(served):
    locked = served[2]
    wrong = openai.OpenAI(base_url=locked + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    assert httpx.get(locked + "/metrics", timeout=30).status_code == 401
    assert httpx.get(locked + "/v1/models", timeout=30).status_code == 401
    right = openai.OpenAI(base_url=locked + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in right.models.list()] == [MODEL]
    assert httpx.get(locked + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200


def test_a_client_that_closes_the_stream_stops_the_engine(served, client):
    engine, db = served[0], served[3]
    before = sqlite_utils.Database(db)["requests"].count if db.exists() else 0
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        max_tokens=2000, temperature=0, stream=True,
    )  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    wait_until(lambda: engine.stats().running == 0, timeout_s=60,
               message="the engine stops generating for the client that left")
    engine.usage_log.flush()
    rows = list(sqlite_utils.Database(db).query("select * from requests order by id desc limit 1"))
    assert sqlite_utils.Database(db)["requests"].count == before + 1
    assert rows[0]["finish_reason"] == "cancelled" and rows[0]["new_tokens"] < 2000 and rows[0]["door"] == "api"


def metric_values(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_metrics_counters_move_by_what_a_request_reports(served, client):
    url = served[1]
    label = (("model_name", MODEL),)
    done = (("door", "api"), ("finished_reason", "length"), ("model_name", MODEL))
    before = metric_values(url)
    reply = client.chat.completions.create(model=MODEL, messages=[SYSTEM, {"role": "user", "content": "Hours?"}],
                                           max_tokens=3, temperature=0)  # fmt: skip
    after = metric_values(url)
    moved = lambda name, labels=label: after[(name, labels)] - before.get((name, labels), 0.0)  # noqa: E731
    assert moved("kvchat_prefix_cache_queries_total") == reply.usage.prompt_tokens
    assert moved("kvchat_prefix_cache_hits_total") == reply.usage.prompt_tokens_details.cached_tokens
    assert moved("kvchat_generation_tokens_total") == reply.usage.completion_tokens == 3
    assert moved("kvchat_request_success_total", done) == 1
    assert moved("kvchat_time_to_first_token_seconds_count") == 1
    assert after[("kvchat_num_requests_running", label)] == 0
    usage_perc = after[("kvchat_kv_cache_usage_perc", label)]
    held = after[("kvchat_kv_cache_bytes", (("model_name", MODEL), ("tier", "memory")))]
    assert 0 < usage_perc <= 1 and held == served[0].stats().used_bytes



def test_a_queued_stream_sends_keepalives_and_leaving_the_queue_cancels_it(tiny_loaded, monkeypatch):
    """Deterministic: the model waits at a gate the test holds, so one request runs (max batch 1) and
    the streamed one waits in the engine's queue."""
    gate, reached = threading.Event(), threading.Event()

    def hold(module, args, kwargs):
        reached.set()
        assert gate.wait(120), "the test never opened the gate"

    monkeypatch.setattr(openai_api, "KEEPALIVE_S", 0.2)
    engine = Engine(tiny_loaded, cache_budget_bytes=2**24, max_batch=1)
    finished = []
    engine.add_listener(finished.append)
    config = config_from_args(["--port", str(free_port()), "--usage-db", "none", "--disk-budget", "0"])
    demo, url, _ = server.launch(BackgroundEngine(lambda: engine), config)
    hook = tiny_loaded.model.register_forward_pre_hook(hold, with_kwargs=True)
    running = threading.Thread(target=lambda: engine.chat(None, [{"role": "user", "content": "Go."}], max_new_tokens=2))
    try:
        running.start()
        assert reached.wait(60), "the first request never reached the model"
        body = {"model": model_id(None), "messages": [{"role": "user", "content": "And me?"}], "stream": True}
        with httpx.stream("POST", url.rstrip("/") + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            comment = next(line for line in lines if line)
            assert comment.startswith(": queued") and engine.stats().waiting == 1
        queued = list(engine._scheduler._waiting)  # the model is held, so the engine cannot drop it yet
        wait_until(lambda: all(r.generation.cancelled for r in queued), timeout_s=30, interval_s=0.05,
                   message="the queued request is cancelled once its client has left")
        gate.set()
        wait_until(lambda: len(finished) >= 2, timeout_s=30, interval_s=0.05, message="both requests have finished")
        left = next(u for u in finished if u.door == "api")
        assert left.finish_reason == "cancelled" and left.new_tokens == 0, "it ran after its client left"
    finally:
        gate.set()
        hook.remove()
        running.join(60)
        demo.close()
        engine.close()
