"""The scheduler: one loop owns the model and serves every request at once, in token ids.

Each step:
1. drop requests whose caller left (Stop, a closed tab);
2. admit waiting requests in arrival order while a batch slot and room in the budget exist (the
   KV manager, `kv/manager.py`, pins what is cached and reserves the rest, evicting idle runs); a
   request that does not fit waits (and so does everyone behind it: first come, first served);
3. one forward for everyone: a token for each decoding request, and a chunk of prompt for the
   requests still prefilling (at most `prefill_chunk_tokens` per step while others decode, so a long
   prompt stalls running streams for about one chunk; the whole prompt at once when nobody waits);
4. sample per request (its own settings and seed); its `ReplyOutput` (`output.py`) turns the id into
   text and says whether the reply is over; finish what is done: the manager keeps its new turns
   and frees what it held.

While a system prompt nobody has cached yet is being computed, nobody behind it is admitted:
whoever is next may want it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from kvchat import cpu_threads
from kvchat.chat import Prompt
from kvchat.errors import GenerationError
from kvchat.generation import Generation
from kvchat.kv.attention import NativeForward, SegmentedForward
from kvchat.kv.manager import Allocation, KVManager
from kvchat.kv.node import Node
from kvchat.kv.runs import KVRun
from kvchat.output import ReplyOutput
from kvchat.records import Eviction, FinishReason, Usage
from kvchat.sampling import SamplingParams, next_token

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False)
class Request:
    generation: Generation
    prompt: Prompt
    params: SamplingParams
    usage: Usage
    arrived: float  # perf_counter at arrival
    kv: Allocation  # its KV, as the manager admits, feeds and frees it
    output: ReplyOutput  # its text: sampled ids in, pieces out
    prefix_only: bool = False  # warm-up: compute (or read back) the system prompt, reply nothing
    pin_prefix: bool = False  # and keep it pinned in memory afterwards
    warmup: Any = None  # the engine's record of a warm-up
    pinned: list[Node[KVRun]] = field(default_factory=list)  # what a finished warm-up left pinned
    fed: int = 0  # prompt tokens whose KV exists (cached, or computed so far)
    pending: list[int] = field(default_factory=list)  # the sampled token to feed next step
    generator: torch.Generator | None = None
    first_token_at: float = 0.0
    decode_rows: int = 0  # sum of batch sizes over this request's decode steps
    decode_steps: int = 0

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt.token_ids)

    @property
    def evictions(self) -> list[Eviction]:
        return self.kv.evictions


Finisher = Callable[[Request, BaseException | None], None]


class Scheduler:
    def __init__(
        self,
        forward: SegmentedForward | NativeForward,
        kv: KVManager,
        on_finish: Finisher,
        max_batch: int = 16,
        prefill_chunk_tokens: int = 256,
    ) -> None:
        self.forward = forward
        self.kv = kv
        self.on_finish = on_finish
        self.max_batch = max_batch
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._wake = threading.Condition()
        self._tasks: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._closing = False
        # the building thread's count is the loop's default; one-token forwards may run on fewer
        self._threads = cpu_threads.CpuThreads.for_device(forward.device, torch.get_num_threads())
        self._thread = threading.Thread(target=self._loop, name="kvchat-scheduler", daemon=True)
        self._thread.start()

    # --- any thread ---
    def submit(self, request: Request) -> None:
        with self._wake:
            if self._closing:
                raise RuntimeError("the engine is closed")
            request.usage.queued_behind = request.generation.ahead = len(self._waiting)
            self._waiting.append(request)
            self._wake.notify()

    @property
    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._wake:
            return len(self._running), len(self._waiting)

    def close(self) -> None:
        """Serve what is queued, then stop the loop."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    # --- the loop ---
    def call(self, task: Callable[[], T]) -> T:
        """Run `task` on the loop's thread between steps and return its result: changes to the tree
        from other threads (ending a session, clearing, expiring) then never race an admission
        that has matched nodes but not pinned them yet."""
        done: Future[T] = Future()
        with self._wake:
            if self._closing or not self._thread.is_alive():
                return task()  # nobody admits anymore
            self._tasks.append((task, done))
            self._wake.notify()
        return done.result()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._running and not self._tasks and not self._closing:
                    self._wake.wait()
                tasks, self._tasks = self._tasks, []
            for task, done in tasks:
                try:
                    done.set_result(task())
                except Exception as err:  # the caller gets it
                    done.set_exception(err)
            with self._wake:
                if self._closing and not self._waiting and not self._running:
                    return
                if not self._waiting and not self._running:
                    continue
            try:
                with torch.inference_mode():
                    self._step()
            except Exception:  # a bug here must not kill the loop and hang every caller
                log.exception("scheduler step failed")
                for request in list(self._running):
                    self._finish(request, "error", GenerationError("the scheduler failed", request.usage))

    def _step(self) -> None:
        for request in [r for r in self._running if r.generation.cancelled]:
            self._finish(request, "cancelled")
        self._drop_cancelled_waiting()
        self._admit()
        batch = self._compose()
        if not batch:
            if self._waiting and not self._running:
                time.sleep(0.01)  # nothing fits yet and nothing runs: only a cancel can change that
            return
        rows = [request.kv.row(ids) for request, ids in batch]
        tokens = sum(len(ids) for _, ids in batch)
        try:
            with self._threads.forward(tokens) if self._threads is not None else contextlib.nullcontext():
                logits = self.forward(rows)
        except Exception as err:
            for request, _ in batch:
                self._finish(request, "error", GenerationError(f"generation failed: {err}", request.usage))
            return
        decoding = sum(1 for request, _ in batch if request.pending)
        for (request, ids), row_logits in zip(batch, logits, strict=True):
            try:
                self._advance(request, ids, row_logits, decoding)
            except Exception as err:  # one request's sampling or text failed: it alone ends
                log.exception("a request failed after its forward")
                self._finish(request, "error", GenerationError(f"generation failed: {err}", request.usage))

    def _drop_cancelled_waiting(self) -> None:
        with self._wake:
            cancelled = [r for r in self._waiting if r.generation.cancelled]
            for request in cancelled:
                self._waiting.remove(request)
            for position, request in enumerate(self._waiting):
                request.generation.ahead = position
        for request in cancelled:
            request.usage.wait_ms = _ms_since(request.arrived)
            self._finish(request, "cancelled")

    # --- admission ---
    def _admit(self) -> None:
        while True:
            with self._wake:
                if not self._waiting or len(self._running) >= self.max_batch:
                    return
                request = self._waiting[0]
            if any(r.kv.publishing for r in self._running):
                return  # a system prompt is being computed: whoever is next may want it
            try:
                admitted = self._try_admit(request)
            except Exception as err:  # e.g. out of memory allocating its buffer: fail it, not the loop
                with self._wake:
                    self._waiting.popleft()
                self._finish(request, "error", GenerationError(f"could not start: {err}", request.usage))
                continue
            if not admitted:
                if not self.kv.room_may_come(bool(self._running)):
                    with self._wake:
                        self._waiting.popleft()
                    self._finish(request, "error", GenerationError(
                        "this request does not fit the cache budget beside the pinned presets: raise "
                        "--cache-budget, lower max new tokens, or shorten the conversation", request.usage))
                    continue
                return
            with self._wake:
                self._waiting.popleft()
                self._running.append(request)
                for position, waiting in enumerate(self._waiting):
                    waiting.generation.ahead = position
            request.usage.wait_ms = _ms_since(request.arrived)
            request.generation.admitted()
            if request.prefix_only and not request.prefilling:
                self._finish(request, "stop")  # it was cached (now in memory): nothing to compute

    def _try_admit(self, request: Request) -> bool:
        """Ask the KV manager for room; once admitted, the request feeds from what it reused."""
        if not self.kv.admit(request.kv, others_running=bool(self._running)):
            return False
        request.fed = request.kv.reused_tokens
        seed = request.params.seed
        request.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return True

    # --- one forward ---
    def _compose(self) -> list[tuple[Request, list[int]]]:
        """Who feeds what this step: decoding requests one token, prefilling ones a chunk."""
        batch = [(r, r.pending) for r in self._running if r.pending]
        decoding = bool(batch)  # nobody decodes: nobody to stall, so prompts go in whole
        budget = self.prefill_chunk_tokens
        for request in self._running:
            if not request.prefilling:
                continue
            if decoding and budget <= 0:
                break
            ids = request.prompt.token_ids
            end = len(ids)
            if request.kv.publishing:  # the system prompt's own chunk ends where it does
                end = request.fed + request.kv.publish_room_tokens
            if decoding:
                end = min(end, request.fed + budget)
            chunk = ids[request.fed : end]
            budget -= len(chunk)
            batch.append((request, chunk))
        return batch

    def _advance(self, request: Request, fed_ids: list[int], logits: torch.Tensor, decoding: int) -> None:
        """After a forward: account what was fed, publish a finished system prompt, sample."""
        self.kv.fed(request.kv, fed_ids)
        if request.prefilling:
            request.fed += len(fed_ids)
            if request.prefilling:
                return
            if request.prefix_only:
                return self._finish(request, "stop")
        else:
            request.decode_rows += decoding
            request.decode_steps += 1
        request.pending = []
        self._sample(request, logits)

    def _sample(self, request: Request, logits: torch.Tensor) -> None:
        token = next_token(logits, request.params, request.generator)
        if not request.first_token_at:
            request.first_token_at = time.perf_counter()
            request.usage.ttft_ms = (request.first_token_at - request.arrived) * 1000
        reason = request.output.push(token)
        if reason is not None:
            return self._finish(request, reason)
        if request.generation.cancelled:
            return self._finish(request, "cancelled")
        request.pending = [token]

    # --- the end of a request ---
    def _finish(self, request: Request, reason: FinishReason, error: BaseException | None = None) -> None:
        usage = request.usage
        usage.finish_reason = reason
        request.output.flush()
        if usage.new_tokens > 1 and request.first_token_at:
            usage.decode_tokens_per_s = (usage.new_tokens - 1) / (time.perf_counter() - request.first_token_at)
        if request.decode_steps:
            usage.batch_size = request.decode_rows / request.decode_steps
        if error is None:
            self.kv.commit(request.kv)
            if request.pin_prefix and reason == "stop" and request.kv.nodes:
                request.pinned = self.kv.pin_for_good(request.kv)  # a warm preset stays in memory
        self.kv.free(request.kv)
        with self._wake:
            if request in self._running:
                self._running.remove(request)
        self.on_finish(request, error)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000

