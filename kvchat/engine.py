"""The engine: the public API over one model, one scheduler and one budget of cached KV.

A request names its conversation (the whole history) and optionally a session. The scheduler
(`scheduler.py`) serves every request at once in batched forwards; the tree (`kv_tree.py`) decides
what cached KV a request may reuse and what to evict; the storage (`kv_storage.py`) holds the KV;
`attention.py` is how a forward reads it, on the path `probe.py` verified for this model at load;
the disk tier (`kv_disk.py`) keeps KV across memory pressure and restarts. This module validates
input, starts requests, warms and pins the presets, and keeps the counters, the stats and the
usage log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import torch
import xxhash

from kvchat import kv_storage, models, probe
from kvchat.chat import ChatTemplate, Prompt, TextStream
from kvchat.config import format_bytes, parse_bytes
from kvchat.errors import Busy, GenerationError, InputError
from kvchat.eviction import policy_named
from kvchat.generation import Generation
from kvchat.kv_disk import FORMAT, DiskStore, DiskTier, DiskUnavailable
from kvchat.kv_storage import KVRun, RowBuffer
from kvchat.kv_tree import KVTree, Node, NodeInfo, node_key, owner_of, owners_for
from kvchat.prefix import fingerprint, scope_key
from kvchat.sampling import SamplingParams
from kvchat.scheduler import Request, Scheduler
from kvchat.stop_strings import as_stops
from kvchat.usage import Door, Reply, Usage
from kvchat.usage_log import UsageLog, UsageSummary

log = logging.getLogger(__name__)

MIB = 1024 * 1024
PIN_FRACTION = 0.25  # warm presets may pin at most this share of the memory budget


@dataclass(slots=True)
class Warmup:
    """One system prompt warmed at start: computed, or read back from disk."""

    title: str
    num_tokens: int
    pinned: bool
    disk_tokens: int = 0  # of its tokens, read back from disk
    done: bool = False
    ms: float = 0.0
    error: str = ""


@dataclass(frozen=True, slots=True)
class CacheStats:
    budget_bytes: int
    used_bytes: int  # every byte of KV held: idle nodes, nodes in use, running buffers
    entries: list[NodeInfo]
    requests: int  # finished requests since start
    hits: int  # requests that reused at least one cached token
    misses: int
    prompt_tokens: int
    cached_tokens: int
    evictions: int
    not_admitted: int  # turns computed but not kept (no room beside what running requests hold)
    running: int  # requests in the batch (prefilling or decoding)
    waiting: int  # requests in the engine's queue
    running_bytes: int  # private buffers of running requests
    shared_bytes: int  # idle or in-use nodes readable by more than one session (system prompts, stateless)
    private_bytes: int  # nodes of one session's own turns
    pinned_bytes: int = 0  # warm presets kept in memory for good
    demotions: int = 0  # evictions from memory that kept the run on disk
    disk_budget_bytes: int = 0  # 0: no disk tier
    disk_bytes: int = 0  # KV bytes of runs on disk (complete or being written)
    disk_file_bytes: int = 0  # bytes of the complete files, headers included
    disk_evictions: int = 0
    disk_reads: int = 0  # runs read back from disk
    disk_read_tokens: int = 0
    disk_problem: str | None = None  # the disk tier's latest problem (or why there is none)
    attention: str = ""  # the attention path and why (probe.AttentionChoice.summary)
    warmups: list[Warmup] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return self.running + self.waiting > 0

    @property
    def token_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True, slots=True)
class CachedTokens:
    """How much of a conversation the cache holds for a session right now (nothing is pinned: it
    may be evicted before the next request comes)."""

    prompt_tokens: int  # tokens the conversation renders to
    cached_tokens: int  # of those, the longest cached prefix this session may read
    disk_tokens: int  # of the cached ones, held only on disk (read back when used)


class Engine:
    def __init__(
        self,
        loaded: models.LoadedModel,
        cache_budget_bytes: int,
        usage_log: UsageLog | None = None,
        prefix_salt: str = "",
        max_batch: int = 16,
        prefill_chunk_tokens: int = 256,
        max_waiting: int | None = None,
        eviction: str = "lru",
        disk_dir: str | Path | None = None,
        disk_budget_bytes: int = 2 * 2**30,
        persist_sessions: bool = False,
        session_ttl_s: float | None = None,
        attention: str = "auto",
    ) -> None:
        kv_storage.check_supported(loaded.model)
        kv_storage.use_native_gqa(loaded.device)
        forward, self.attention = _choose_path(loaded, attention)
        if max_batch < 1:
            raise InputError("max batch must be at least 1")
        self.loaded = loaded
        self.model_name = loaded.name
        self.device = loaded.device
        self.context_tokens = int(getattr(loaded.model.config, "max_position_embeddings", 2048))
        self.usage_log = usage_log
        self.max_batch = max_batch
        self.max_waiting = max_waiting  # None: unbounded
        self._template = ChatTemplate(loaded.tokenizer)
        self._fingerprint = fingerprint([loaded.identity, str(loaded.dtype), self._template.template_text, FORMAT])
        self._salt = prefix_salt
        self._eos_ids = frozenset(_eos_ids(loaded))
        self.bytes_per_token = kv_storage.bytes_per_token(loaded.model, loaded.device, loaded.dtype)
        self.eviction = eviction
        self._tree: KVTree[KVRun] = KVTree(cache_budget_bytes, policy=policy_named(eviction))
        self._counts_lock = threading.Lock()
        self._requests = self._hits = self._prompt_tokens = self._cached_tokens = self._not_admitted = 0
        self.warmups: list[Warmup] = []
        self._listeners: list[Callable[[Usage], None]] = []
        self._pinned: list[Node[KVRun]] = []
        self.disk: DiskTier | None = None
        self.disk_restored = 0  # runs found on disk at start
        self._disk_note: str | None = None
        if disk_dir is not None and disk_budget_bytes > 0:
            self._open_disk(Path(disk_dir), disk_budget_bytes, persist_sessions)
        self._scheduler = Scheduler(
            forward=forward,
            tree=self._tree,
            new_buffer=lambda tokens: RowBuffer(loaded.model, tokens, loaded.device, loaded.dtype),
            bytes_per_token=self.bytes_per_token,
            new_text=lambda: TextStream(self._template),
            eos_ids=self._eos_ids,
            context_tokens=self.context_tokens,
            on_finish=self._finish,
            max_batch=max_batch,
            prefill_chunk_tokens=prefill_chunk_tokens,
            disk=self.disk,
        )
        self._closed = threading.Event()
        if session_ttl_s:
            threading.Thread(target=self._expire_loop, args=(session_ttl_s,), name="kvchat-ttl", daemon=True).start()

    @classmethod
    def load(
        cls,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "auto",
        quantize: str = "none",
        cache_budget: str | int = "512MiB",
        usage_db: str | Path | None = "kvchat.db",
        store_text: bool = False,
        prefix_salt: str = "",
        home: Path | None = None,
        max_batch: int = 16,
        max_waiting: int | None = None,
        eviction: str = "lru",
        disk_dir: str | Path | None = None,
        disk_budget: str | int = "2GiB",
        persist_sessions: bool = False,
        session_ttl_s: float | None = None,
        presets: Mapping[str, str] | None = None,
    ) -> Engine:
        """Load a model (None = the bundled SmolLM2), open the usage log (None = no log) and the
        disk tier (None = memory only), then warm and pin `presets` (title -> system prompt) in
        the background. `cache_budget="auto"` sizes the memory tier from free memory. `attention`
        picks the path (auto, cascade, compatible; see `probe.py`): InputError when the model cannot
        be served exactly on it. `quantize` (none, fp16, int8) replaces the linear layers on a CPU
        (`quantize.py`); the probe then holds the quantised model to the float model's rounding."""
        disk_budget_bytes = parse_bytes(disk_budget)
        budget = None if str(cache_budget).strip().lower() == "auto" else parse_bytes(cache_budget)
        policy_named(eviction)  # a bad name fails before the slow load
        loaded = models.load(model, device=device, dtype=dtype, home=home, quantize_mode=quantize)
        if budget is None:
            budget, why = auto_budget_bytes(loaded.device)
            log.info("--cache-budget auto: %s (%s)", format_bytes(budget), why)
        usage_log = UsageLog(usage_db, store_text=store_text) if usage_db else None
        engine = cls(loaded, budget, usage_log=usage_log, prefix_salt=prefix_salt, max_batch=max_batch,
                     max_waiting=max_waiting, eviction=eviction, disk_dir=disk_dir,
                     disk_budget_bytes=disk_budget_bytes, persist_sessions=persist_sessions,
                     session_ttl_s=session_ttl_s, attention=attention)  # fmt: skip
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
            raise InputError("a session id must be a non-empty string (or None for a stateless request)")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise InputError(f"cache_salt must be a string, not {type(cache_salt).__name__}", "cache_salt")
        salt = self._salt if cache_salt is None else cache_salt
        params = SamplingParams(
            _whole(max_new_tokens, "max new tokens", "max_new_tokens"), _number(temperature, "temperature"),
            _number(top_p, "top-p", "top_p"), seed,
            as_stops(stop),
        )
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
            ts=arrived_s, session=_opaque(session_id), model=self.model_name,
            prompt_tokens=len(prompt.token_ids), door=door,
        )  # fmt: skip
        generation = Generation()
        scope = scope_key(self._fingerprint, salt)
        self._scheduler.submit(Request(generation, session_id, prompt, params, scope, usage, arrived))
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
        match = self._tree.match(scope_key(self._fingerprint, self._salt), owners_for(session_id), ids, len(ids))
        runs = [(node, len(node.token_ids)) for node in match.nodes]
        if match.partial is not None:
            runs.append((match.partial, match.partial_tokens))
        disk = sum(count for node, count in runs if not node.in_memory)
        return CachedTokens(len(ids), match.num_tokens + match.partial_tokens, disk)

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
            prompt = Prompt(ids, len(ids), "")
            request = Request(Generation(), None, prompt, SamplingParams(0), scope_key(self._fingerprint, self._salt),
                              usage, time.perf_counter(), prefix_only=True, pin_prefix=pin, warmup=warmup)  # fmt: skip
            self._scheduler.submit(request)
            handles.append(request.generation)
        return handles

    def clear_cache(self) -> int:
        """Drop every cached run no request is using, from memory and disk (warm presets stay
        pinned). Returns how many runs went."""
        return self._scheduler.call(self._tree.clear)

    def end_session(self, session_id: str) -> bool:
        """Free a session's own turns (a tab closed). Shared prefixes stay for other sessions."""
        return self._scheduler.call(lambda: self._tree.drop_owner(owner_of(session_id))) > 0

    def has_session(self, session_id: str) -> bool:
        """Whether any of the session's own turns are cached."""
        return self._tree.has_owner(owner_of(session_id))

    def stats(self) -> CacheStats:
        with self._counts_lock:
            requests, hits = self._requests, self._hits
            prompt_tokens, cached_tokens = self._prompt_tokens, self._cached_tokens
        running, waiting = self._scheduler.counts
        presets = {node_key(node) for node in self._pinned}
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
    def disk_problem(self) -> str | None:
        """Why there is no disk tier, or the latest thing that went wrong with it."""
        if self.disk is not None and self.disk.store.problems:
            return self.disk.store.problems[-1]
        return self._disk_note

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
    def _open_disk(self, directory: Path, budget_bytes: int, persist_sessions: bool) -> None:
        """Open the disk tier and hang what it holds in the tree; without it, say why and go on."""
        layers = len(kv_storage.kv_layout(self.loaded.model))
        try:
            store = DiskStore(directory, self._fingerprint, layers)
        except DiskUnavailable as err:
            self._disk_note = str(err)
            log.warning("disk cache off: %s", err)
            return
        self._tree.disk_budget_bytes = budget_bytes
        self.disk = DiskTier(store, self._tree, self.device, self.loaded.dtype, persist_sessions)
        self.disk_restored = self.disk.restore()
        if self.disk_restored:
            log.info("disk cache: %d cached run(s) found in %s", self.disk_restored, store.directory)

    def _expire_loop(self, ttl_s: float) -> None:
        """Drop conversations' own turns (memory and disk) idle for longer than `ttl_s`."""
        while not self._closed.wait(min(ttl_s / 4, 30.0)):
            self._scheduler.call(lambda: self._tree.drop_idle(ttl_s))

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


def auto_budget_bytes(device: torch.device) -> tuple[int, str]:
    """A memory-tier budget from what is free now, the model already loaded: on CUDA 70% of free
    device memory, on CPU half the available RAM (the rest is left for activations, the batch's
    buffers transients and everything else on the machine)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7), f"70% of {format_bytes(free)} free on {device}"
    available = psutil.virtual_memory().available
    return int(available * 0.5), f"half of {format_bytes(available)} available RAM"


def _eos_ids(loaded: models.LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


def _number(value: Any, name: str, field: str | None = None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError) as err:
        raise InputError(f"{name} must be a number, not {value!r}", field or name) from err


def _whole(value: Any, name: str, field: str) -> int:
    """Whole numbers, also as floats (a UI slider sends 256.0)."""
    number = _number(value, name, field)
    if not number.is_integer():
        raise InputError(f"{name} must be a whole number, not {value!r}", field)
    return int(number)


def _opaque(session_id: str | None) -> str:
    return "" if session_id is None else xxhash.xxh3_64_hexdigest(session_id.encode("utf-8"))


def _choose_path(loaded: models.LoadedModel, attention: str) -> tuple[probe.Forward, probe.AttentionChoice]:
    """The probe's path for this model; a quantised one is held to its float model's rounding,
    and a refusal says so."""
    report = loaded.quantization
    if report is None:
        return probe.choose(loaded.model, loaded.device, attention)
    try:
        return probe.choose(loaded.model, loaded.device, attention, float_rounding=report.float_rounding)
    except InputError as err:
        raise InputError(
            f"--quantize {report.mode} changes what reuse computes: {err}. The tolerance is the float model's own "
            f"rounding, and {report.mode} linears move a prompt's logits further when it is fed in chunks or "
            f"read from the cache than float32 does, so a cached reply could differ from a recomputed one"
            + ("; --quantize fp16 keeps activations in float32 and is served exactly" if report.mode == "int8" else "")
        ) from err
