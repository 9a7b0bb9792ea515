"""Shared fixtures: the real bundled model is loaded once per test session; fast logic tests use a
tiny randomly initialised Llama that shares the bundled tokenizer and chat template."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvchat import models  # noqa: E402
from kvchat.engine import Engine  # noqa: E402
from kvchat.usage_log import UsageLog  # noqa: E402

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.1,
               message: str | Callable[[], str] = "the condition holds") -> T:
    """Call `predicate` every `interval_s` until it returns something truthy, and return that.

    For a test that waits on something asynchronous (a log writer, the engine's loop, a child
    process) instead of sleeping a fixed time. On timeout the test fails, saying what it awaited
    (`message`, or what `message()` says then, so it can report the state it found) and the
    predicate's last value when that says more than False or None. An exception from `predicate`
    is not retried: it ends the wait."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            awaited = message() if callable(message) else message
            seen = "" if value is None or value is False else f" (last seen: {value!r})"
            pytest.fail(f"timed out after {timeout_s:g} s waiting until {awaited}{seen}")
        time.sleep(interval_s)
    return value


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The float32 copy of the bundled GGUF (converted on the first run, ~30 s, then reused)."""
    path, _ = models.converted_bundled(models_home())
    return path


def models_home() -> Path:
    from kvchat.config import default_home

    return Path(os.environ.get("KVCHAT_HOME", default_home()))


@pytest.fixture(scope="session")
def tokenizer(bundled_dir: Path):
    return AutoTokenizer.from_pretrained(bundled_dir)


@pytest.fixture(scope="session")
def tiny_loaded(tokenizer) -> models.LoadedModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    return models.LoadedModel(
        model=model, tokenizer=tokenizer, name="tiny-random-llama", identity="tiny:seed0",
        device=torch.device("cpu"), dtype=torch.float32, load_s=0.0,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_loaded, tmp_path_factory) -> Path:
    """The tiny model saved like any local model, so the app can start on it with --model."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_loaded.model.save_pretrained(path)
    tiny_loaded.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bundled_loaded() -> models.LoadedModel:
    return models.load(None, device="cpu", dtype="float32", home=models_home())


@pytest.fixture
def usage_db(tmp_path: Path) -> Path:
    return tmp_path / "usage.db"


@pytest.fixture
def tiny_engine(tiny_loaded, usage_db: Path):
    engine = Engine(tiny_loaded, cache_budget_bytes=64 * 2**20, usage_log=UsageLog(usage_db))
    yield engine
    engine.close()


def greedy_baseline(loaded: models.LoadedModel, engine: Engine, messages, max_new_tokens: int) -> str:
    """What plain `model.generate` answers on the whole conversation (the recompute baseline)."""
    from kvchat.bench.systems import Recompute

    assert engine.loaded is loaded, "the baseline runs the engine's own model"
    return Recompute(engine).reply("baseline", messages, max_new_tokens).text


def saved_family(family: str, tokenizer, directory: Path) -> Path:
    """A tiny random model of `family` (bench/families.py), saved with the tokenizer as a user's model directory."""
    from kvchat.bench.families import FAMILIES, tiny_family

    tiny_family(family, tokenizer, FAMILIES[family][0]).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def assert_turns_match_generate(engine: Engine, system: dict, questions: tuple[str, str, str], new_tokens: int):
    """Turn 1, a follow-up in the same session (read from its cached turns) and a second session
    (reading the shared system prompt) each equal plain `generate`. Returns the follow-up's and
    the second session's replies."""
    loaded = engine.loaded
    first = [system, {"role": "user", "content": questions[0]}]
    reply = engine.chat("alice", first, max_new_tokens=new_tokens)
    assert reply.text == greedy_baseline(loaded, engine, first, new_tokens), "turn 1"
    follow_up = first + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": questions[1]}]
    again = engine.chat("alice", follow_up, max_new_tokens=new_tokens)
    assert again.text == greedy_baseline(loaded, engine, follow_up, new_tokens), "follow-up"
    assert again.usage.cache_source == "session"
    assert again.usage.cached_tokens >= len(engine.encode(first).token_ids)  # turn 1 is not prefilled again
    other = [system, {"role": "user", "content": questions[2]}]
    second = engine.chat("bob", other, max_new_tokens=new_tokens)
    assert second.text == greedy_baseline(loaded, engine, other, new_tokens), "second session"
    assert second.usage.cache_source == "prefix"
    return again, second
