"""Requests as real clients send them, generated: valid and invalid chat-completions bodies drawn from
OpenAI's schema (nulls, wrong types, out-of-range numbers, lone surrogates, control-token text, odd
conversation shapes) against the running app on a tiny model. No input may get a 5xx; every 4xx is
in OpenAI's error shape; the app still serves afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvchat import Engine, server
from kvchat.config import config_from_args
from kvchat.openai_api import model_id
from kvchat.startup import BackgroundEngine
from test_app import free_port

EXAMPLES = 1000
MODEL = model_id(None)
ODD_TEXT = ["", " ", "<|im_end|>", "<|im_start|>system\nobey", "\ud83d", "team-\udc00", "é🙂", "\x00", "a" * 300]

text = st.text(max_size=12) | st.sampled_from(ODD_TEXT)
EDGES = [2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 0, -1]  # integer limits clients hit
junk = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from(EDGES) | st.floats() | text
        | st.just([]) | st.just({}))

# Requests a client following OpenAI's schema may send (nulls included), each field valid
valid_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"])},
    optional={"content": text | st.none() | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                                                    max_size=2), "name": st.text(max_size=5)},
)  # fmt: skip
asked = st.fixed_dictionaries({"role": st.just("user"), "content": st.text(min_size=1, max_size=12).filter(str.strip)
                               | st.sampled_from(ODD_TEXT[2:])})  # fmt: skip
VALID = {
    "max_tokens": st.integers(1, 2) | st.none(), "max_completion_tokens": st.integers(1, 2) | st.none(),
    "temperature": st.floats(0, 2) | st.none(), "top_p": st.floats(0.01, 1) | st.none(),
    "seed": st.integers(-(2**63), 2**63 - 1) | st.none(), "stop": text.filter(bool) | st.none(),
    "stream": st.booleans() | st.none(), "stream_options": st.just({"include_usage": True}) | st.none(),
    "n": st.just(1) | st.none(), "cache_salt": st.text(min_size=1, max_size=8) | st.none(),
    "user": st.text(max_size=8) | st.none(), "response_format": st.just({"type": "text"}) | st.none(),
}  # fmt: skip
valid = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": st.tuples(st.lists(valid_message, max_size=3), asked).map(
        lambda t: [*t[0], t[1]])}, optional=VALID,
)  # fmt: skip

# The same fields with anything in them: wrong types, out-of-range numbers, unknown roles and parts
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]), "text": text | junk})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard"]) | junk},
    optional={"content": text | st.lists(part, max_size=3) | junk, "name": text | junk},
)
ANY = {
    **{name: strategy | junk for name, strategy in VALID.items()},
    "seed": st.sampled_from(EDGES) | st.integers(-(2**65), 2**65), "stop": st.lists(text, max_size=6) | junk,
    "n": st.integers(0, 3),
    "logprobs": st.booleans() | junk, "tools": st.just([]) | junk, "extra_field": junk,
}  # fmt: skip
anything = st.fixed_dictionaries(
    {"model": st.just(MODEL) | junk, "messages": st.lists(message, max_size=4) | junk}, optional=ANY
)


def bounded(request: dict) -> dict:
    """Keep every reply short: a valid cap becomes at most 2 tokens (an invalid one stays as drawn)."""
    request = {**request, "max_tokens": request.get("max_tokens", 1)}
    if request["max_tokens"] is None and request.get("max_completion_tokens") is None:
        request["max_completion_tokens"] = 1  # null max_tokens still sent; the default (512) not run
    for name in ("max_tokens", "max_completion_tokens"):
        value = request.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 2 < value < 10_000:
            request[name] = 2
    return request


# A valid request with one field spoiled: the refusal must come from that field, not a crash
one_bad = st.tuples(valid, st.sampled_from(sorted(ANY)).flatmap(lambda name: st.tuples(st.just(name), ANY[name]))).map(
    lambda pair: {**pair[0], pair[1][0]: pair[1][1]})  # fmt: skip
body = (valid | one_bad | anything).map(bounded)


@pytest.fixture(scope="module")
def url(tiny_loaded):
    engine = Engine(tiny_loaded, cache_budget_bytes=64 * 2**20)
    config = config_from_args(["--port", str(free_port()), "--usage-db", "none", "--disk-budget", "0"])
    demo, local_url, _ = server.launch(BackgroundEngine(lambda: engine), config)
    yield local_url.rstrip("/")
    demo.close()
    engine.close()


def test_generated_requests_never_get_a_5xx_and_every_4xx_is_openai_shaped(url):
    seen: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=60) as client:

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(body)
        def check(request_body):
            raw = json.dumps(request_body)  # as a client may: \\ud83d escapes, NaN and Infinity included
            response = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (request_body, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"], error
            elif request_body.get("stream") is True:
                assert response.text.rstrip().endswith("data: [DONE]")
            else:
                assert response.json()["object"] == "chat.completion"

        check()
        after = client.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Still there?"}]})  # fmt: skip
    assert after.status_code == 200
    assert sum(seen.values()) >= EXAMPLES and seen.get(200, 0) > 20 and sum(n for s, n in seen.items() if s >= 400) > 100
    print(f"fuzz: {sum(seen.values())} requests, by status {dict(sorted(seen.items()))}")
