"""The engine owns the model: it prefills only what no cache holds, decodes, and keeps caches.

Each request finds the longest run of leading token ids it can take from a cache: the session's
own cache (cropped to where the conversation changed), or the shared cache of its system prompt.
Only the rest is prefilled. All model work runs on one long-lived model thread, in arrival order,
so the caller can stream and cancel (see `generation.py`) and PyTorch keeps one warm thread pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from transformers import DynamicCache

from kvchat import hf_cache, models
from kvchat.cache_store import CachedKV, CacheStore, EntryInfo
from kvchat.chat import ChatTemplate, Prompt, TextStream
from kvchat.config import parse_bytes
from kvchat.errors import GenerationError, InputError
from kvchat.generation import Generation
from kvchat.lru import Admission, Eviction
from kvchat.prefix import PrefixKey, common_prefix_len, fingerprint, prefix_key
from kvchat.sampling import SamplingParams, next_token
from kvchat.usage import Reply, Usage
from kvchat.usage_log import UsageLog, UsageSummary


@dataclass(frozen=True, slots=True)
class CacheStats:
    budget_bytes: int
    used_bytes: int
    entries: list[EntryInfo]
    requests: int  # finished requests since start
    hits: int  # requests that reused at least one cached token
    misses: int
    prompt_tokens: int
    cached_tokens: int
    evictions: int
    not_admitted: int  # caches too big to keep beside the pinned ones (they evicted nothing)
    collisions: int  # prefix hash matches whose token ids differed (served nothing)
    busy: bool  # a generation holds the model right now

    @property
    def token_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(slots=True)
class _Start:
    """Where a request's prefill starts: a cache already holding `token_ids`."""

    cache: DynamicCache
    token_ids: list[int]
    source: str  # "session" | "prefix" | "none"
    cached_tokens: int  # served from cache (0 when the prefix was computed by this request)
    published: Admission | None = None  # storing the prefix this request computed for others


class Engine:
    def __init__(
        self,
        loaded: models.LoadedModel,
        cache_budget_bytes: int,
        usage_log: UsageLog | None = None,
        prefix_salt: str = "",
    ) -> None:
        hf_cache.check_supported(loaded.model)
        hf_cache.use_native_gqa(loaded.device)
        self.loaded = loaded
        self.model_name = loaded.name
        self.device = loaded.device
        self.context_tokens = int(getattr(loaded.model.config, "max_position_embeddings", 2048))
        self.usage_log = usage_log
        self._model = loaded.model
        self._template = ChatTemplate(loaded.tokenizer)
        self._store: CacheStore[DynamicCache] = CacheStore(cache_budget_bytes)
        self._fingerprint = fingerprint([loaded.identity, str(loaded.dtype), self._template.template_text])
        self._salt = prefix_salt
        self._eos_ids = frozenset(_eos_ids(loaded))
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvchat-model")
        self._busy = threading.Event()  # set while a generation owns the model (`stats().busy`)
        self._counts_lock = threading.Lock()
        self._requests = self._hits = self._prompt_tokens = self._cached_tokens = 0

    @classmethod
    def load(
        cls,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        cache_budget: str | int = "512MiB",
        usage_db: str | Path | None = "kvchat.db",
        store_text: bool = False,
        prefix_salt: str = "",
        home: Path | None = None,
    ) -> Engine:
        """Load a model (None = the bundled SmolLM2) and open the usage log (None = no log)."""
        budget = parse_bytes(cache_budget)
        loaded = models.load(model, device=device, dtype=dtype, home=home)
        usage_log = UsageLog(usage_db, store_text=store_text) if usage_db else None
        return cls(loaded, budget, usage_log=usage_log, prefix_salt=prefix_salt)

    # --- public API ---
    def stream(
        self,
        session_id: str,
        messages: Sequence[Mapping[str, Any]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        cache_salt: str | None = None,
    ) -> Generation:
        """Start a reply to the whole conversation `messages`. Bad input raises InputError here,
        before any work; iterate the result for text pieces, then read `.usage`.

        `cache_salt` scopes sharing: system-prompt caches are shared only between requests with the
        same salt (None: the engine's `prefix_salt`)."""
        arrived_s, arrived = time.time(), time.perf_counter()
        if not isinstance(session_id, str) or not session_id.strip():
            raise InputError("a session id (non-empty string) is required")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise InputError(f"cache_salt must be a string, not {type(cache_salt).__name__}")
        salt = self._salt if cache_salt is None else cache_salt
        params = SamplingParams(
            _whole(max_new_tokens, "max new tokens"), _number(temperature, "temperature"), _number(top_p, "top-p"), seed
        )
        params.validate(self.context_tokens)
        prompt = self._template.encode(messages)
        if len(prompt.token_ids) >= self.context_tokens:
            raise InputError(
                f"the conversation is {len(prompt.token_ids)} tokens but the model's context holds "
                f"{self.context_tokens} (reply included): shorten it or start a new chat"
            )
        usage = Usage(
            ts=arrived_s, session=_opaque(session_id), model=self.model_name,
            prompt_tokens=len(prompt.token_ids),
        )  # fmt: skip
        def work(generation: Generation) -> Usage:
            return self._serve(generation, session_id, prompt, params, salt, usage, arrived)

        return Generation(work, self._model_thread).start()

    def chat(self, session_id: str, messages: Sequence[Mapping[str, Any]], **settings: Any) -> Reply:
        """Blocking form of `stream`."""
        generation = self.stream(session_id, messages, **settings)
        for _ in generation:
            pass
        return Reply(text=generation.text, usage=generation.wait())

    @property
    def eos_ids(self) -> frozenset[int]:
        """Token ids that end a reply."""
        return self._eos_ids

    def encode(self, messages: Sequence[Mapping[str, Any]]) -> Prompt:
        """The token ids a conversation renders to, and its shareable system-prefix length."""
        return self._template.encode(messages)

    def end_session(self, session_id: str) -> bool:
        """Free a session's cache (a tab closed). Shared prefixes stay for other sessions."""
        return self._store.drop_session(session_id)

    def stats(self) -> CacheStats:
        with self._counts_lock:
            requests, hits = self._requests, self._hits
            prompt_tokens, cached_tokens = self._prompt_tokens, self._cached_tokens
        return CacheStats(
            budget_bytes=self._store.budget_bytes,
            used_bytes=self._store.used_bytes,
            entries=self._store.entries(),
            requests=requests,
            hits=hits,
            misses=requests - hits,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            evictions=self._store.evictions,
            not_admitted=self._store.not_admitted,
            collisions=self._store.collisions,
            busy=self._busy.is_set(),
        )

    def usage_summary(self) -> UsageSummary | None:
        """History from the usage log (None without a log or when it cannot be read)."""
        return self.usage_log.summary() if self.usage_log else None

    def recent_requests(self, limit: int = 10) -> list[dict] | None:
        return self.usage_log.recent(limit) if self.usage_log else None

    def usage_timeline(self, limit: int = 300) -> list[dict] | None:
        return self.usage_log.timeline(limit) if self.usage_log else None

    @property
    def log_warning(self) -> str | None:
        return self.usage_log.warning if self.usage_log else None

    def close(self) -> None:
        """Finish queued generations, then flush and close the usage log."""
        self._model_thread.shutdown(wait=True)
        if self.usage_log:
            self.usage_log.close()

    # --- one request, on the model thread ---
    def _serve(
        self, generation: Generation, session_id: str, prompt: Prompt, params: SamplingParams, salt: str,
        usage: Usage, arrived: float,
    ) -> Usage:  # fmt: skip
        evictions: list[Eviction] = []
        self._busy.set()
        try:
            usage.wait_ms = _ms_since(arrived)
            session_kv = self._store.checkout_session(session_id)
            try:
                with torch.inference_mode():
                    start = self._start_for(session_kv, prompt, params, salt)
                    _account(start.published, usage, evictions)
                    usage.cached_tokens, usage.cache_source = start.cached_tokens, start.source
                    cache_ids = self._generate(generation, start, prompt, params, usage, arrived)
            except BaseException as err:
                # A forward pass may have written part of the cache: drop it rather than trust it.
                self._store.release_session(session_id)
                usage.finish_reason, usage.total_ms = "error", _ms_since(arrived)
                self._finish(usage, evictions, prompt.user_text, generation.text)
                raise GenerationError(f"generation failed: {err}", usage) from err
            kv = CachedKV(cache_ids, start.cache)
            _account(self._store.checkin_session(session_id, kv, hf_cache.kv_nbytes(start.cache)), usage, evictions)
        finally:
            self._busy.clear()
        usage.total_ms = _ms_since(arrived)
        self._finish(usage, evictions, prompt.user_text, generation.text)
        return usage

    def _start_for(self, session_kv: CachedKV | None, prompt: Prompt, params: SamplingParams, salt: str) -> _Start:
        """Pick the cache that covers the most leading tokens; at least one token is left to feed,
        because the reply's first token needs the logits of the last prompt position."""
        ids = prompt.token_ids
        needed = len(ids) + params.max_new_tokens
        reusable = 0
        if session_kv is not None:
            reusable = min(common_prefix_len(session_kv.token_ids, ids), len(ids) - 1)
        if prompt.prefix_len > reusable:
            return self._start_from_prefix(ids[: prompt.prefix_len], needed, salt)
        if session_kv is not None and reusable > 0:
            hf_cache.truncate_to(session_kv.cache, reusable)
            hf_cache.reserve(session_kv.cache, needed)
            return _Start(session_kv.cache, ids[:reusable], "session", reusable)
        return _Start(hf_cache.new_cache(self._model, needed), [], "none", 0)

    def _start_from_prefix(self, prefix_ids: list[int], needed: int, salt: str) -> _Start:
        key = prefix_key(self._fingerprint, prefix_ids, salt)
        with self._store.using_prefix(key, prefix_ids) as shared:
            if shared is not None:
                cache = hf_cache.clone(self._model, shared.cache, reserve_tokens=needed - len(prefix_ids))
                return _Start(cache, list(prefix_ids), "prefix", len(prefix_ids))
        cache = hf_cache.new_cache(self._model, needed)
        self._forward(cache, prefix_ids)
        return _Start(cache, list(prefix_ids), "none", 0, self._publish_prefix(key, prefix_ids, cache))

    def _publish_prefix(self, key: PrefixKey, prefix_ids: list[int], cache: DynamicCache) -> Admission:
        """Store an exact-size copy of the just-computed system prefix for other sessions."""
        copy = hf_cache.clone(self._model, cache, num_tokens=len(prefix_ids))
        return self._store.put_prefix(key, CachedKV(list(prefix_ids), copy), hf_cache.kv_nbytes(copy))

    def _generate(
        self, generation: Generation, start: _Start, prompt: Prompt, params: SamplingParams,
        usage: Usage, arrived: float,
    ) -> list[int]:  # fmt: skip
        """Prefill the uncached tail, then decode. Returns the ids whose KV the cache now holds."""
        cache_ids = list(start.token_ids)
        if generation.cancelled:  # stopped while waiting for the model
            usage.finish_reason = "cancelled"
            return cache_ids
        tail = prompt.token_ids[len(cache_ids) :]
        logits = self._forward(start.cache, tail)
        cache_ids += tail
        text = TextStream(self._template)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        first_token_at = 0.0
        while True:
            token = next_token(logits, params, generator)
            if not first_token_at:
                first_token_at = time.perf_counter()
                usage.ttft_ms = (first_token_at - arrived) * 1000
            if token in self._eos_ids:
                usage.finish_reason = "stop"
                break
            if piece := text.push(token):
                generation.emit(piece)
            usage.new_tokens += 1
            if usage.new_tokens >= params.max_new_tokens or len(cache_ids) + 1 >= self.context_tokens:
                usage.finish_reason = "length"
                break
            if generation.cancelled:
                usage.finish_reason = "cancelled"
                break
            logits = self._forward(start.cache, [token])
            cache_ids.append(token)
        if piece := text.flush():
            generation.emit(piece)
        if usage.new_tokens > 1:
            usage.decode_tokens_per_s = (usage.new_tokens - 1) / (time.perf_counter() - first_token_at)
        return cache_ids

    def _forward(self, cache: DynamicCache, token_ids: list[int]) -> torch.Tensor:
        """Feed `token_ids` after what `cache` holds; returns the last position's logits [vocab]."""
        input_ids = torch.tensor([token_ids], device=self.device)  # [1, n]
        out = self._model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    def _finish(self, usage: Usage, evictions: list[Eviction], user_text: str, reply_text: str) -> None:
        usage.cache_bytes = self._store.used_bytes
        usage.budget_bytes = self._store.budget_bytes
        usage.evictions = len(evictions)
        with self._counts_lock:
            self._requests += 1
            self._hits += usage.cached_tokens > 0
            self._prompt_tokens += usage.prompt_tokens
            self._cached_tokens += usage.cached_tokens
        if self.usage_log is not None:
            self.usage_log.record(usage, evictions, user_text=user_text, reply_text=reply_text)


def _account(admission: Admission | None, usage: Usage, evictions: list[Eviction]) -> None:
    """Add what storing a cache cost (evictions) or failed to do (not admitted) to the request."""
    if admission is not None:
        evictions += admission.evicted
        usage.not_admitted += not admission.admitted


def _eos_ids(loaded: models.LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} must be a number, not {value!r}") from err


def _whole(value: Any, name: str) -> int:
    """Whole numbers, also as floats (a UI slider sends 256.0)."""
    number = _number(value, name)
    if not number.is_integer():
        raise InputError(f"{name} must be a whole number, not {value!r}")
    return int(number)


def _opaque(session_id: str) -> str:
    return xxhash.xxh3_64_hexdigest(session_id.encode("utf-8"))


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000
