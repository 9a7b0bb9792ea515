"""The systems the bench compares, behind one interface: answer a whole conversation, say how fast.

- kvchat: our engine.
- recompute: plain `model.generate` on the whole conversation every turn (the usual demo).
- floor: the cheapest way to answer a follow-up with the model alone: tokenise, one forward over
  only the tokens an ideal cache could not serve, on KV prepared beforehand in place.
- transformers-cb: transformers' continuous batching (paged cache, block-hash prefix sharing),
  with a persistent manager.
- llama-cpp: llama-cpp-python on the same GGUF file, keeping its prompt cache (one slot).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from kvchat.bench import hf_cache
from kvchat.bench.oracle import render_ids
from kvchat.engine import Engine

Messages = list[dict[str, Any]]

# It warns on every call with a persistent manager; the bench keeps one on purpose (prefix sharing).
logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)


@dataclass(slots=True)
class Turn:
    text: str
    ttft_ms: float
    prompt_tokens: int
    prefilled_tokens: int | None  # None where the system does not say
    new_tokens: int
    decode_tokens_per_s: float
    finish_reason: str = ""  # kvchat only: "length" means the last token was never fed


class System(Protocol):
    name: str

    def reply(self, session: str, messages: Messages, max_new_tokens: int) -> Turn: ...


class Kvchat:
    name = "kvchat"

    def __init__(self, engine: Engine, scope: str) -> None:
        self.engine = engine
        self.scope = scope  # names the engine's cache store for the oracle: sharing never crosses it

    def reply(self, session: str, messages: Messages, max_new_tokens: int) -> Turn:
        reply = self.engine.chat(session, messages, max_new_tokens=max_new_tokens)
        u = reply.usage
        return Turn(reply.text, u.ttft_ms, u.prompt_tokens, u.prefilled_tokens, u.new_tokens,
                    u.decode_tokens_per_s, u.finish_reason)  # fmt: skip


class _TokenClock(BaseStreamer):
    """Timestamps each token `generate` emits (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self._seen_prompt:
            self.times.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


def _decode_speed(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


class Recompute:
    name = "recompute"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model = engine.loaded.model
        self.eos = engine.eos_ids

    def reply(self, session: str, messages: Messages, max_new_tokens: int) -> Turn:
        started = time.perf_counter()
        ids = self.engine.encode(messages).token_ids
        clock = _TokenClock()
        with torch.inference_mode():
            out = self.model.generate(
                torch.tensor([ids], device=self.engine.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.engine.device),
                max_new_tokens=max_new_tokens, do_sample=False, streamer=clock,
            )  # fmt: skip
        new = out[0, len(ids) :].tolist()
        if new and new[-1] in self.eos:
            new = new[:-1]
        text = self.engine.loaded.tokenizer.decode(new, skip_special_tokens=True)
        ttft_ms = (clock.times[0] - started) * 1000
        return Turn(text, ttft_ms, len(ids), len(ids), len(new), _decode_speed(clock.times))


class Floor:
    """Not a chat system: the cheapest way to get a follow-up's first token with the model alone,
    as the bound kvchat's TTFT is held to.

    Prepared beforehand, untimed: the KV of the tokens an ideal cache holds (the oracle's count) in
    preallocated buffers written in place (`hf_cache.BufferLayer`, the cheapest we know here; a stock
    `DynamicCache` copies the whole history at every forward). Timed, as kvchat's TTFT is: render
    and tokenise the conversation, one forward over the tokens left, the argmax. No queue, lookup or
    bookkeeping, so kvchat can only match it or lose to it, noise aside. Measured right after each
    kvchat follow-up, so both see the same machine load.
    """

    name = "floor"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model = engine.loaded.model
        self.tokenizer = engine.loaded.tokenizer
        self._cache: DynamicCache | None = None
        self._held: list[int] = []

    def ttft_ms(self, messages: Messages, served_tokens: int) -> float:
        ids = render_ids(self.tokenizer, messages)
        self._prepare(ids[:served_tokens], reserve_tokens=len(ids))
        assert self._cache is not None
        with torch.inference_mode():
            started = time.perf_counter()
            ids = render_ids(self.tokenizer, messages)
            input_ids = torch.tensor([ids[served_tokens:]], device=self.engine.device)
            out = self.model(input_ids=input_ids, cache=self._cache, use_cache=True, logits_to_keep=1)
            int(torch.argmax(out.logits[0, -1]))
            elapsed_ms = (time.perf_counter() - started) * 1000
        hf_cache.truncate_to(self._cache, served_tokens)
        return elapsed_ms

    def _prepare(self, held: list[int], reserve_tokens: int) -> None:
        """KV of `held` in buffers with room for the whole prompt (built once per history)."""
        if self._cache is not None and held == self._held and hf_cache.capacity_tokens(self._cache) >= reserve_tokens:
            return
        self._cache, self._held = hf_cache.new_cache(self.model, reserve_tokens), held
        if not held:
            return
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([held], device=self.engine.device), cache=self._cache,
                       use_cache=True, logits_to_keep=1)  # fmt: skip


class ContinuousBatching:
    name = "transformers-cb"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model = engine.loaded.model

    def reply(self, session: str, messages: Messages, max_new_tokens: int) -> Turn:
        started = time.perf_counter()
        ids = self.engine.encode(messages).token_ids
        (out,) = self._generate([ids], max_new_tokens, record_timestamps=True)
        new = self._new_tokens(out)
        text = self.engine.loaded.tokenizer.decode(new, skip_special_tokens=True)
        stamps = list(out.timestamps or [])
        ttft_ms = (stamps[0] - started) * 1000 if stamps else (time.perf_counter() - started) * 1000
        return Turn(text, ttft_ms, len(ids), None, len(new), _decode_speed(stamps))

    def at_once(self, conversations: list[Messages], max_new_tokens: int) -> tuple[float, int]:
        """All conversations submitted together to the same persistent manager; (seconds, new tokens)."""
        inputs = [self.engine.encode(m).token_ids for m in conversations]
        started = time.perf_counter()
        outputs = self._generate(inputs, max_new_tokens)
        return time.perf_counter() - started, sum(len(self._new_tokens(out)) for out in outputs)

    def _generate(self, inputs: list[list[int]], max_new_tokens: int, record_timestamps: bool = False) -> list[Any]:
        """Greedy replies from the persistent manager (its prefix cache kept between calls); a
        request that failed inside it raises instead of coming back empty."""
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=sorted(self.engine.eos_ids), pad_token_id=2)  # fmt: skip
        outputs = self.model.generate_batch(inputs=inputs, generation_config=config, record_timestamps=record_timestamps,
                                            persistent_manager=True, progress_bar=False)  # fmt: skip
        failed = [out.error for out in outputs.values() if getattr(out, "error", None)]
        if failed or len(outputs) != len(inputs):
            raise RuntimeError(f"transformers-cb failed {len(failed)} of {len(inputs)} requests: {failed[:1]}")
        return list(outputs.values())

    def _new_tokens(self, out: Any) -> list[int]:
        return [t for t in out.generated_tokens if t not in self.engine.eos_ids]

    def close(self) -> None:
        self.model.destroy_cached_continuous_batching_manager()


class LlamaCpp:
    """llama-cpp-python on the bundled GGUF; one model instance, i.e. one server slot, whose
    prompt cache reuses the longest common prefix with whatever it processed last."""

    name = "llama-cpp"

    def __init__(self, engine: Engine, gguf_path: str) -> None:
        from llama_cpp import Llama

        self.engine = engine
        self.llm = Llama(model_path=gguf_path, n_ctx=8192, verbose=False, seed=0)

    def reply(self, session: str, messages: Messages, max_new_tokens: int) -> Turn:
        started = time.perf_counter()
        ids = self.engine.encode(messages).token_ids
        times: list[float] = []
        pieces: list[str] = []
        for chunk in self.llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, stream=True):
            times.append(time.perf_counter())
            pieces.append(chunk["choices"][0]["text"])
        ttft_ms = (times[0] - started) * 1000 if times else 0.0
        return Turn("".join(pieces), ttft_ms, len(ids), None, len(times), _decode_speed(times))


def unavailable(name: str) -> str | None:
    """Why an optional peer cannot run here, or None if it can."""
    if name == "llama-cpp" and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install llama-cpp-python; builds in ~6 min on 2 cores)"
    if name == "transformers-cb" and not hasattr(torch.nn.Module, "generate_batch") and not _has_cb():
        return "this transformers has no continuous batching (generate_batch)"
    return None


def _has_cb() -> bool:
    from transformers import GenerationMixin

    return hasattr(GenerationMixin, "generate_batch")
