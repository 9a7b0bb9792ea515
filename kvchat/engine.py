"""The engine: the public API over one model, one scheduler and one budget of cached KV.

A request names its conversation (the whole history) and optionally a session. This module
validates it, renders it to token ids (`chat.py`), and hands it to the scheduler (`scheduler.py`),
which serves every request at once in batched forwards; the KV manager (`kv/manager.py`) decides
what cached KV each request reuses and what to evict; `output.py` turns sampled ids into text. The
engine also warms and pins the presets, and keeps the counters, the stats and the usage log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvchat import models, probe
from kvchat.chat import ChatTemplate, Prompt
from kvchat.config import EngineOptions, format_bytes, parse_budget, parse_bytes
from kvchat.errors import Busy, GenerationError, InputError
from kvchat.generation import Generation
from kvchat.kv.attention import kv_layout
from kvchat.kv.disk.store import FORMAT
from kvchat.kv.disk.tier import DiskTier
from kvchat.kv.eviction import policy_named
from kvchat.kv.manager import Allocation, KVManager
from kvchat.kv.node import Node, display_key
from kvchat.kv.runs import KVRun, RowBuffer, bytes_per_token
from kvchat.kv.scope import fingerprint, owner_of, scope_key, session_hash
from kvchat.kv.tree import KVTree
from kvchat.output import ReplyOutput
from kvchat.records import CachedTokens, CacheStats, Door, Reply, Usage, Warmup
from kvchat.sampling import SamplingParams
from kvchat.scheduler import Request, Scheduler
from kvchat.usage_log import UsageLog, UsageSummary

__all__ = ["CacheStats", "CachedTokens", "Engine", "EngineOptions", "Warmup"]

log = logging.getLogger(__name__)

MIB = 1024 * 1024
PIN_FRACTION = 0.25  # warm presets may pin at most this share of the memory budget


class Engine:
    def __init__(
        self,
        loaded: models.LoadedModel,
        cache_budget_bytes: int,
        usage_log: UsageLog | None = None,
        options: EngineOptions | None = None,
        **changes: Any,
    ) -> None:
        """Serve `loaded` with `cache_budget_bytes` of KV. `options` (or single options as keywords,
        which override it) are `EngineOptions`'s. InputError when the model cannot be served
        exactly, or an option is bad."""
        options = replace(options or EngineOptions(), **changes)
        probe.check_supported(loaded.model)
        probe.use_native_gqa(loaded.device)
        forward, self.attention = probe.choose_for(loaded, options.attention)
        if options.max_batch < 1:
            raise InputError("max batch must be at least 1")
        self.options = options
        self.loaded = loaded
        self.model_name = loaded.name
        self.device = loaded.device
        self.context_tokens = int(getattr(loaded.model.config, "max_position_embeddings", 2048))
        self.usage_log = usage_log
        self.max_batch = options.max_batch
        self.max_waiting = options.max_waiting  # None: unbounded
        self.eviction = options.eviction
        self._template = ChatTemplate(loaded.tokenizer)
        self._fingerprint = fingerprint([loaded.identity, str(loaded.dtype), self._template.template_text, FORMAT])
        self._salt = options.prefix_salt
        self._eos_ids = loaded.eos_ids
        layout = kv_layout(loaded.model)
        self.bytes_per_token = bytes_per_token(layout, loaded.device, loaded.dtype)
        self._tree: KVTree[KVRun] = KVTree(cache_budget_bytes, policy=policy_named(options.eviction))
        self.kv = KVManager(
            self._tree, lambda tokens: RowBuffer(layout, tokens, loaded.device, loaded.dtype), self.bytes_per_token,
            self.context_tokens, forward.reads_runs_in_place,
        )  # fmt: skip
        self._counts_lock = threading.Lock()
        self._requests = self._hits = self._prompt_tokens = self._cached_tokens = self._not_admitted = 0
        self.warmups: list[Warmup] = []
        self._listeners: list[Callable[[Usage], None]] = []
        self._pinned: list[Node[KVRun]] = []
        self.disk_restored = 0  # runs found on disk at start
        if options.disk_dir is not None and options.disk_budget_bytes > 0:
            self.disk_restored = self.kv.open_disk(
                Path(options.disk_dir), self._fingerprint, len(layout), options.disk_budget_bytes,
                options.persist_sessions, loaded.device, loaded.dtype,
            )  # fmt: skip
        self._scheduler = Scheduler(forward, self.kv, self._finish, options.max_batch, options.prefill_chunk_tokens)
        self._closed = threading.Event()
        if options.session_ttl_s:
            threading.Thread(target=self._expire_loop, args=(options.session_ttl_s,), name="kvchat-ttl",
                             daemon=True).start()  # fmt: skip

    @classmethod
    def load(
        cls,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str = "none",
        cache_budget: str | int | None = "512MiB",
        usage_db: str | Path | None = "kvchat.db",
        store_text: bool = False,
        home: Path | None = None,
        presets: Mapping[str, str] | None = None,
        options: EngineOptions | None = None,
        **changes: Any,
    ) -> Engine:
        """Load a model (None = the bundled SmolLM2), open the usage log (None = no log), start the
        engine with `options` (and keyword changes to them; `disk_budget` may be a size such as
        "2GiB"), then warm and pin `presets` (title -> system prompt) in the background.
        `cache_budget` "auto" (or None) sizes the memory tier from free memory. `quantize` (none,
        fp16, int8) replaces the linear layers on a CPU (`quantize.py`); the probe then holds the
        quantised model to the float model's rounding. InputError for a bad option, or a model
        kvchat cannot serve exactly."""
        if "disk_budget" in changes:
            changes["disk_budget_bytes"] = parse_bytes(changes.pop("disk_budget"))
        options = replace(options or EngineOptions(), **changes)
        budget = parse_budget(cache_budget)
        policy_named(options.eviction)  # a bad name fails before the slow load
        loaded = models.load(model, device=device, dtype=dtype, home=home, quantize_mode=quantize)
        if budget is None:
            budget, why = models.auto_budget_bytes(loaded.device)
            log.info("--cache-budget auto: %s (%s)", format_bytes(budget), why)
        usage_log = UsageLog(usage_db, store_text=store_text) if usage_db else None
        engine = cls(loaded, budget, usage_log=usage_log, options=options)
        if presets:
            engine.warm(presets)
        return engine

    # --- public API ---
    def stream(
        self,
        session_id: str | None,
        messages: Sequence[Mapping[str, Any]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        cache_salt: str | None = None,
        stop: str | Sequence[str] | None = None,
        door: Door = "library",
    ) -> Generation:
        """Start a reply to the whole conversation `messages`. Bad input raises InputError here,
        before any work; iterate the result for text pieces, then read `.usage`.

        `session_id` None is a stateless request (an API client resending its history): it reuses
        what earlier stateless requests and system prompts left. A named session also reuses its own
        turns, which no other session can read. `cache_salt` scopes all sharing: requests share
        cached KV only with the same salt (None: the engine's `prefix_salt`). The reply ends where a
        `stop` string first appears (the text streamed may run past it; callers cut it). `door` is
        recorded in the usage log."""
        arrived_s, arrived = time.time(), time.perf_counter()
        if session_id is not None and (not isinstance(session_id, str) or not session_id.strip()):
            raise InputError("a session id must be a non-empty string (or None for a stateless request)", "session_id")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise InputError(f"cache_salt must be a string, not {type(cache_salt).__name__}", "cache_salt")
        salt = self._salt if cache_salt is None else cache_salt
        params = SamplingParams.parse(max_new_tokens, temperature, top_p, seed, stop)
        params.validate(self.context_tokens)
        prompt = self._template.encode(messages)
        if len(prompt.token_ids) >= self.context_tokens:
            raise InputError(
                f"the conversation is {len(prompt.token_ids)} tokens but the model's context holds "
                f"{self.context_tokens} (reply included): shorten it or start a new chat",
                "messages", "context_length_exceeded",
            )
        self._check_fits(prompt, params)
        if self.max_waiting is not None and self._scheduler.counts[1] >= self.max_waiting:
            raise Busy(f"busy: {self.max_waiting} requests are already waiting; try again in a moment")
        usage = Usage(
            ts=arrived_s, session=session_hash(session_id), model=self.model_name,
            prompt_tokens=len(prompt.token_ids), door=door,
        )  # fmt: skip
        generation = Generation()
        kv = Allocation(scope_key(self._fingerprint, salt), owner_of(session_id), prompt.token_ids,
                        prompt.prefix_len, params.max_new_tokens, usage)  # fmt: skip
        self._scheduler.submit(Request(generation, prompt, params, usage, arrived, kv,
                                       self._output(generation, usage, params, prompt)))  # fmt: skip
        return generation

    def chat(self, session_id: str | None, messages: Sequence[Mapping[str, Any]], **settings: Any) -> Reply:
        """Blocking form of `stream`."""
        generation = self.stream(session_id, messages, **settings)
        for _ in generation:
            pass
        return Reply(text=generation.text, usage=generation.wait())

    def add_listener(self, listener: Callable[[Usage], None]) -> None:
        """Call `listener` with each visitor request's final usage (metrics count from it). A listener
        that fails is logged and never takes the reply down."""
        self._listeners.append(listener)

    @property
    def budget_bytes(self) -> int:
        """The memory tier's budget (as chosen by `--cache-budget auto` when it was)."""
        return self._tree.budget_bytes

    @property
    def eos_ids(self) -> frozenset[int]:
        """Token ids that end a reply."""
        return self._eos_ids

    def encode(self, messages: Sequence[Mapping[str, Any]]) -> Prompt:
        """The token ids a conversation renders to, and its shareable system-prefix length."""
        return self._template.encode(messages)

    def cached(self, session_id: str | None, messages: Sequence[Mapping[str, Any]]) -> CachedTokens:
        """What of `messages` a next request by `session_id` would find cached, counted in the tree
        as admission matches it (no reply is started, nothing is pinned). Raises InputError as
        `stream` does for a conversation that cannot be rendered."""
        ids = self._template.encode(messages).token_ids
        cached, disk = self.kv.cached(scope_key(self._fingerprint, self._salt), session_id, ids)
        return CachedTokens(len(ids), cached, disk)

    def warm(self, presets: Mapping[str, str]) -> list[Generation]:
        """Compute (or read back from disk) each preset's system prompt in the background, before
        any visitor needs it, and pin it in memory while pins stay under a quarter of the budget
        (beyond that it is warmed but may be evicted). Returns the warm-ups' handles."""
        allowance = int(self._tree.budget_bytes * PIN_FRACTION) - self.pinned_bytes
        handles = []
        for title, text in presets.items():
            if not (text or "").strip():
                continue
            rendered = self._template.encode([{"role": "system", "content": text}, {"role": "user", "content": "x"}])
            ids = rendered.token_ids[: rendered.prefix_len]
            pin = len(ids) * self.bytes_per_token <= allowance
            allowance -= len(ids) * self.bytes_per_token if pin else 0
            warmup = Warmup(title, len(ids), pin)
            self.warmups.append(warmup)
            usage = Usage(ts=time.time(), session="", model=self.model_name, prompt_tokens=len(ids))
            prompt, params, generation = Prompt(ids, len(ids), ""), SamplingParams(0), Generation()
            kv = Allocation(scope_key(self._fingerprint, self._salt), owner_of(None), ids, len(ids), 0, usage,
                            prefix_only=True)  # fmt: skip
            request = Request(generation, prompt, params, usage, time.perf_counter(), kv,
                              self._output(generation, usage, params, prompt), prefix_only=True, pin_prefix=pin,
                              warmup=warmup)  # fmt: skip
            self._scheduler.submit(request)
            handles.append(request.generation)
        return handles

    def clear_cache(self) -> int:
        """Drop every cached run no request is using, from memory and disk (warm presets stay
        pinned). Returns how many runs went."""
        return self._scheduler.call(self._tree.clear)

    def end_session(self, session_id: str) -> bool:
        """Free a session's own turns (a tab closed). Shared prefixes stay for other sessions."""
        return self._scheduler.call(lambda: self.kv.end_session(session_id)) > 0

    def has_session(self, session_id: str) -> bool:
        """Whether any of the session's own turns are cached."""
        return self.kv.has_session(session_id)

    def stats(self) -> CacheStats:
        with self._counts_lock:
            requests, hits = self._requests, self._hits
            prompt_tokens, cached_tokens = self._prompt_tokens, self._cached_tokens
        running, waiting = self._scheduler.counts
        presets = {display_key(node) for node in self._pinned}
        entries = [replace(e, preset=True) if e.key in presets else e for e in self._tree.entries()]
        return CacheStats(
            budget_bytes=self._tree.budget_bytes,
            used_bytes=self._tree.used_bytes,
            entries=entries,
            requests=requests,
            hits=hits,
            misses=requests - hits,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            evictions=self._tree.evictions,
            not_admitted=self._not_admitted,
            running=running,
            waiting=waiting,
            running_bytes=self._tree.running_bytes,
            shared_bytes=sum(e.nbytes for e in entries if e.kind != "session" and e.tier == "memory"),
            private_bytes=sum(e.nbytes for e in entries if e.kind == "session" and e.tier == "memory"),
            pinned_bytes=self.pinned_bytes,
            demotions=self._tree.demotions,
            disk_budget_bytes=self._tree.disk_budget_bytes if self.disk else 0,
            disk_bytes=self._tree.disk_bytes,
            disk_file_bytes=self.disk.store.file_nbytes if self.disk else 0,
            disk_evictions=self._tree.disk_evictions,
            disk_reads=self.disk.reads if self.disk else 0,
            disk_read_tokens=self.disk.read_tokens if self.disk else 0,
            disk_problem=self.disk_problem,
            attention=self.attention.summary(),
            warmups=list(self.warmups),
        )

    @property
    def pinned_bytes(self) -> int:
        """Bytes of warm presets pinned in memory for good (a pinned node never leaves memory)."""
        return sum(node.nbytes for node in self._pinned)

    @property
    def disk(self) -> DiskTier | None:
        """The disk tier, when there is one (`KVManager.open_disk`)."""
        return self.kv.disk

    @property
    def disk_problem(self) -> str | None:
        """Why there is no disk tier, or the latest thing that went wrong with it."""
        if self.disk is not None and self.disk.store.problems:
            return self.disk.store.problems[-1]
        return self.kv.disk_note

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
        """Finish queued requests, finish writing to disk, then flush and close the usage log."""
        self._closed.set()
        self._scheduler.close()
        if self.disk:
            self.disk.close()
        if self.usage_log:
            self.usage_log.close()

    def flush_disk(self) -> None:
        """Wait until every run queued for the disk tier is written (tests, the bench)."""
        if self.disk:
            self.disk.store.flush()

    # --- inside ---
    def _expire_loop(self, ttl_s: float) -> None:
        """Drop conversations' own turns (memory and disk) idle for longer than `ttl_s`."""
        while not self._closed.wait(min(ttl_s / 4, 30.0)):
            self._scheduler.call(lambda: self._tree.drop_idle(ttl_s))

    def _output(self, generation: Generation, usage: Usage, params: SamplingParams, prompt: Prompt) -> ReplyOutput:
        room = self.context_tokens - len(prompt.token_ids)
        return ReplyOutput(self._template, generation, usage, params.stop, self._eos_ids,
                           min(params.max_new_tokens, room))  # fmt: skip

    def _check_fits(self, prompt: Prompt, params: SamplingParams) -> None:
        """A request whose KV alone (prompt + the whole reply) exceeds the budget could never run."""
        tokens = min(len(prompt.token_ids) + params.max_new_tokens, self.context_tokens)
        need = tokens * self.bytes_per_token
        pinned = self.pinned_bytes
        room = self._tree.budget_bytes - pinned
        if need > room:
            beside = f" ({pinned / MIB:,.1f} MiB of it pinned by warm presets)" if pinned else ""
            raise InputError(
                f"this request needs {need / MIB:,.1f} MiB of KV cache ({tokens} tokens, reply included) but the "
                f"cache budget is {self._tree.budget_bytes / MIB:,.1f} MiB{beside}: raise --cache-budget, lower max "
                f"new tokens, or shorten the conversation", "messages", "context_length_exceeded",
            )

    def _finish(self, request: Request, error: BaseException | None) -> None:
        """Called by the scheduler when a request ends: counters, log, then wake the caller."""
        usage = request.usage
        usage.total_ms = (time.perf_counter() - request.arrived) * 1000
        if request.prefix_only:  # a warm-up, not a visitor: no counters, no log row
            warmup: Warmup = request.warmup
            warmup.done, warmup.ms, warmup.disk_tokens = error is None, usage.total_ms, usage.disk_tokens
            warmup.error = str(error or "")
            warmup.pinned = bool(request.pinned)
            self._pinned += request.pinned
            request.generation.finish(usage, error if error is None or isinstance(error, GenerationError)
                                      else GenerationError(str(error), usage))  # fmt: skip
            return
        usage.cache_bytes = self._tree.used_bytes
        usage.budget_bytes = self._tree.budget_bytes
        usage.evictions = len(request.evictions)
        with self._counts_lock:
            self._requests += 1
            self._hits += usage.cached_tokens > 0
            self._prompt_tokens += usage.prompt_tokens
            self._cached_tokens += usage.cached_tokens
            self._not_admitted += usage.not_admitted
        if self.usage_log is not None:
            try:
                self.usage_log.record(
                    usage, request.evictions, user_text=request.prompt.user_text, reply_text=request.generation.text
                )
            except Exception:  # the log is a side channel: it never takes a reply down
                pass
        for listener in self._listeners:
            try:
                listener(usage)
            except Exception:  # a side channel too
                log.exception("a usage listener failed")
        if error is not None and not isinstance(error, GenerationError):
            error = GenerationError(f"generation failed: {error}", usage)
        request.generation.finish(usage, error)
