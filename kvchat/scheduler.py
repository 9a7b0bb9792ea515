"""The scheduler: one loop owns the model and serves every request at once.

Each step:
1. drop requests whose caller left (Stop, a closed tab);
2. admit waiting requests in arrival order while a batch slot and room in the budget exist:
   find the longest cached prefix the request may read (`kv_tree`), pin it, and reserve its
   private buffer (uncached prompt + the whole reply) under the budget, evicting idle leaves;
   a request that does not fit waits (and so does everyone behind it: first come, first served);
3. one forward for everyone: a token for each decoding request, and a chunk of prompt for the
   requests still prefilling (at most `prefill_chunk_tokens` per step while others decode, so a long
   prompt stalls running streams for about one chunk; the whole prompt at once when nobody waits);
4. sample per request (its own settings and seed), stream the text, finish what is done: its new
   turns become a node of the tree (exact size), its pins and reservation are released.

A system prompt nobody has cached yet is prefilled alone into an exact-size buffer and published as
a shared node the moment it is complete, so requests behind it with the same prompt reuse it.

With a disk tier (`kv_disk`), every node the tier wants is written through in the background as it
is made, and a matched node whose KV is only on disk is read back (verified) at admission, before
anything else: it then serves like any node in memory.

Shared runs are read in place (cascade attention, see `attention.py`) when they are long. When all a
request reads by reference is shorter than `CASCADE_MIN_TOKENS`, it copies them to the front of its
own buffer instead (`inline`): a few MiB at most, and its attention is then one plain call, which
is faster for a lone request (scripts/cascade.py measures both ways; vLLM has the same threshold).
On the compatible path (a model the cascade cannot reproduce, see `probe.py`) every request copies
them: it reads nothing but its own buffer.
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
from kvchat.chat import Prompt, TextStream
from kvchat.errors import GenerationError
from kvchat.generation import Generation
from kvchat.kv_disk import DiskTier
from kvchat.attention import NativeForward, Row, SegmentedForward
from kvchat.kv_storage import KVRun, RowBuffer
from kvchat.kv_tree import SHARED, STATELESS, Eviction, KVTree, Match, Node, owner_of, owners_for
from kvchat.sampling import SamplingParams, next_token
from kvchat.stop_strings import stop_at
from kvchat.usage import CacheSource, FinishReason, Usage

log = logging.getLogger(__name__)

T = TypeVar("T")

CASCADE_MIN_TOKENS = 256  # shared runs shorter than this are copied into the request's buffer


@dataclass(eq=False)
class Request:
    generation: Generation
    session_id: str | None
    prompt: Prompt
    params: SamplingParams
    scope: str
    usage: Usage
    arrived: float  # perf_counter at arrival
    prefix_only: bool = False  # warm-up: compute (or read back) the system prompt, reply nothing
    pin_prefix: bool = False  # and keep it pinned in memory afterwards
    warmup: Any = None  # the engine's record of a warm-up
    pinned: list[Node[KVRun]] = field(default_factory=list)  # what a finished warm-up left pinned
    # set when admitted
    nodes: list[Node[KVRun]] = field(default_factory=list)  # cached runs it builds on (pinned)
    inline: bool = False  # `nodes` are copied to the front of `buffer` instead of read in place
    inline_tokens: int = 0  # how many leading buffer positions are that copy
    buffer: RowBuffer | None = None  # private KV: uncached prompt tail, then the reply
    buffer_ids: list[int] = field(default_factory=list)  # ids whose KV `buffer` holds
    publish: RowBuffer | None = None  # an uncached system prompt, published when complete
    reserved_bytes: int = 0
    fed: int = 0  # prompt tokens whose KV exists (nodes + buffers)
    pending: list[int] = field(default_factory=list)  # the sampled token to feed next step
    text: TextStream | None = None
    generator: torch.Generator | None = None
    first_token_at: float = 0.0
    decode_rows: int = 0  # sum of batch sizes over this request's decode steps
    decode_steps: int = 0
    evictions: list[Eviction] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt.token_ids)

    def row(self, token_ids: list[int]) -> Row:
        if self.publish is not None:
            return Row([node.payload for node in self.nodes], self.publish, token_ids)  # type: ignore[misc]
        assert self.buffer is not None
        runs = [] if self.inline else [node.payload for node in self.nodes]
        return Row(runs, self.buffer, token_ids)  # type: ignore[misc]


@dataclass(slots=True)
class _Layout:
    """Where an admitted request's KV comes from and goes: what `_plan` decided."""

    nodes: list[Node[KVRun]]  # whole cached runs it builds on (pinned while it runs)
    detached: list[tuple[Node[KVRun], int]]  # its own private runs (and how much of each) to move in
    publish_tokens: int  # an uncached system prompt's length, computed into its own buffer
    buffer_tokens: int  # its private buffer's capacity
    inline: bool  # `nodes` are copied to the front of the buffer
    evicted: list[Eviction]  # what making room for it evicted

    @property
    def held_tokens(self) -> int:
        return sum(len(node.token_ids) for node in self.nodes)


Finisher = Callable[[Request, BaseException | None], None]


class Scheduler:
    def __init__(
        self,
        forward: SegmentedForward | NativeForward,
        tree: KVTree[KVRun],
        new_buffer: Callable[[int], RowBuffer],
        bytes_per_token: int,
        new_text: Callable[[], TextStream],
        eos_ids: frozenset[int],
        context_tokens: int,
        on_finish: Finisher,
        max_batch: int = 16,
        prefill_chunk_tokens: int = 256,
        disk: DiskTier | None = None,
    ) -> None:
        self.forward = forward
        self.disk = disk
        self.tree = tree
        self.new_buffer = new_buffer
        self.bytes_per_token = bytes_per_token
        self.new_text = new_text
        self.eos_ids = eos_ids
        self.context_tokens = context_tokens
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
        rows = [request.row(ids) for request, ids in batch]
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
            if any(r.publish is not None for r in self._running):
                return  # a system prompt is being computed: whoever is next may want it
            try:
                admitted = self._try_admit(request)
            except Exception as err:  # e.g. out of memory allocating its buffer: fail it, not the loop
                with self._wake:
                    self._waiting.popleft()
                self._finish(request, "error", GenerationError(f"could not start: {err}", request.usage))
                continue
            if not admitted:
                if not self._room_may_come():
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
        """Pin what is cached, reserve the rest; False (nothing changed) when it does not fit yet."""
        ids = request.prompt.token_ids
        owner = owner_of(request.session_id)
        owners = owners_for(request.session_id)
        limit = len(ids) if request.prefix_only else len(ids) - 1  # a reply needs one id fed
        while True:
            found = self.tree.match(request.scope, owners, ids, limit)
            match = self._promote(request, found)
            if match is False:
                return False
            if match is not None:
                break
        if self._split_shared(request, match, owner):
            match = self.tree.match(request.scope, owners, ids, limit)
        # cheapest to run first; the compatible path always copies runs in, so it has only two to try
        tries = ((True, True), (True, False), (False, False)) if self.forward.reads_runs_in_place else \
            ((True, True), (False, True))
        for detach, inline in tries:
            if not detach and self.tree.writing_bytes:
                return False  # runs being written free their memory within moments: wait, reuse more
            layout = self._plan(request, match, owner, detach, inline)
            if layout is not None:
                break
        else:
            return False
        request.evictions += layout.evicted
        self.tree.touch(layout.nodes)
        self.tree.pin(layout.nodes)
        request.nodes = layout.nodes
        if layout.publish_tokens:
            request.publish = self.new_buffer(layout.publish_tokens)
        request.buffer = self.new_buffer(layout.buffer_tokens)
        request.reserved_bytes = request.buffer.nbytes + (request.publish.nbytes if request.publish else 0)
        self.tree.reserve(request.reserved_bytes)
        request.inline = layout.inline
        if layout.inline and not layout.publish_tokens:
            self._copy_inline(request)
        for node, num_tokens in layout.detached:  # move private turns into the buffer, then free them
            request.buffer.append_run(node.payload, num_tokens)  # type: ignore[arg-type]
            request.buffer_ids += node.token_ids[:num_tokens]
        for node, _ in reversed(layout.detached):
            self.tree.remove(node)
        reused = layout.held_tokens + len(request.buffer_ids)
        request.fed = reused
        request.usage.cached_tokens = reused
        request.usage.cache_source = _source([*layout.nodes, *(n for n, _ in layout.detached)], owner)
        request.usage.disk_tokens = min(request.usage.disk_tokens, reused)
        request.usage.cache_tier = "disk" if request.usage.disk_tokens else "memory" if reused else "none"
        request.text = self.new_text()
        seed = request.params.seed
        request.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return True

    def _promote(self, request: Request, match: Match[KVRun]) -> Match[KVRun] | bool | None:
        """Read back the matched nodes whose KV is only on disk, root first; returns the match to
        use. False: no room in memory yet (wait); None: a file proved bad and its node is gone
        (match again). A node that cannot fit even when nothing else runs is not used: the match
        ends before it and the request computes the rest."""
        for node in match.on_disk_only:
            assert self.disk is not None, "a node on disk only without a disk tier"
            evicted = self.tree.make_room(node.nbytes, keep=match.nodes)
            if evicted is None:
                if self._room_may_come():
                    return False
                kept = match.nodes[: match.nodes.index(node)] if node in match.nodes else match.nodes
                return Match(kept, sum(len(n.token_ids) for n in kept))
            request.evictions += evicted
            run = self.disk.load(node)
            if run is None:
                return None
            self.tree.promote(node, run)
            request.usage.disk_tokens += match.partial_tokens if node is match.partial else len(node.token_ids)
        return match

    def _room_may_come(self) -> bool:
        """Whether waiting can free memory: running requests finish, runs being written may leave."""
        return bool(self._running or self.tree.writing_bytes)

    def _persist(self, node: Node[KVRun]) -> None:
        if self.disk is not None:
            self.disk.persist(node)

    def _split_shared(self, request: Request, match: Match[KVRun], owner: str) -> bool:
        """A run we share only the start of (two system prompts that begin alike, stateless
        histories that branch) is cut in two, so the common start is read by both, stored once.
        Only idle runs are cut, and only when the budget has room for the copy it takes."""
        node = match.partial
        if node is None or node.pins or _detachable(node, owner, []):
            return False
        length, at = len(node.token_ids), match.partial_tokens
        copied_nbytes = -(-node.nbytes * min(at, length - at) // length)  # the smaller side is copied
        evicted = self.tree.make_room(copied_nbytes, keep=[*match.nodes, node])
        if evicted is None:
            return False
        request.evictions += evicted

        def halves(run: KVRun) -> tuple[KVRun, int, KVRun, int]:
            head, tail = run.split(at)
            return head, head.nbytes, tail, tail.nbytes

        head = self.tree.split(node, at, halves)
        self._persist(head)
        self._persist(node)
        return True

    def _copy_inline(self, request: Request) -> None:
        """Copy the runs the request builds on to the front of its (still empty) buffer."""
        assert request.buffer is not None and request.buffer.num_tokens == 0
        for node in request.nodes:
            request.buffer.append_run(node.payload, len(node.token_ids))  # type: ignore[arg-type]
        request.inline_tokens = request.buffer.num_tokens

    def _plan(
        self, request: Request, match: Match[KVRun], owner: str, detach: bool, inline: bool
    ) -> _Layout | None:
        """Which matched nodes to build on, which private ones to move into the buffer, whether to
        copy short shared runs into it too, and the buffers to allocate; None when the bytes
        cannot be found now."""
        ids, prefix_len = request.prompt.token_ids, request.prompt.prefix_len
        nodes = list(match.nodes)
        whole = [(node, len(node.token_ids)) for node in nodes]
        if match.partial is not None:
            whole.append((match.partial, match.partial_tokens))
        detached: list[tuple[Node[KVRun], int]] = []
        if detach:
            while whole and _detachable(whole[-1][0], owner, [n for n, _ in detached]):
                detached.insert(0, whole.pop())
        nodes = [node for node, num_tokens in whole if num_tokens == len(node.token_ids)]
        held = sum(len(node.token_ids) for node in nodes)
        if held < prefix_len and any(node.owner != SHARED for node in nodes):
            nodes, held, detached = [], 0, []  # never read someone's turns as our system prompt
        detached_tokens = sum(num_tokens for _, num_tokens in detached)
        publish_tokens = max(0, prefix_len - held) if not detached else 0
        end = min(len(ids) + request.params.max_new_tokens, self.context_tokens)
        buffer_tokens = end - held - publish_tokens
        short = held + publish_tokens < CASCADE_MIN_TOKENS
        copy_runs = not self.forward.reads_runs_in_place or (inline and short)  # compatible: its own buffer only
        inline = copy_runs and not request.prefix_only and held + publish_tokens > 0
        if inline:
            buffer_tokens += held + publish_tokens
        need = (publish_tokens + buffer_tokens) * self.bytes_per_token
        keep = nodes + [node for node, _ in detached]
        evicted = self.tree.make_room(need, keep=keep)
        if evicted is None:
            return None
        assert detached_tokens <= buffer_tokens
        return _Layout(nodes, detached, publish_tokens, buffer_tokens, inline, evicted)

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
            if request.publish is not None:  # the system prompt's own chunk ends where it does
                end = request.fed + request.publish.capacity_tokens - request.publish.num_tokens
            if decoding:
                end = min(end, request.fed + budget)
            chunk = ids[request.fed : end]
            budget -= len(chunk)
            batch.append((request, chunk))
        return batch

    def _advance(self, request: Request, fed_ids: list[int], logits: torch.Tensor, decoding: int) -> None:
        """After a forward: account what was fed, publish a finished system prompt, sample."""
        if request.prefilling:
            if request.publish is not None:
                request.fed += len(fed_ids)
                if request.publish.num_tokens == request.publish.capacity_tokens:
                    self._publish(request)
            else:
                request.fed += len(fed_ids)
                request.buffer_ids += fed_ids
            if request.prefilling:
                return
            if request.prefix_only:
                return self._finish(request, "stop")
        else:
            request.buffer_ids += fed_ids
            request.decode_rows += decoding
            request.decode_steps += 1
        request.pending = []
        self._sample(request, logits)

    def _publish(self, request: Request) -> None:
        """The system prompt's buffer is full: it becomes a shared node (no copy)."""
        buffer = request.publish
        assert buffer is not None
        run = KVRun(buffer.keys, buffer.values)
        parent = request.nodes[-1] if request.nodes else None
        ids = request.prompt.token_ids[request.fed - buffer.num_tokens : request.fed]
        self.tree.release(buffer.nbytes)
        node = self.tree.insert(request.scope, SHARED, parent, ids, run, run.nbytes)
        self._persist(node)
        self.tree.pin([node])
        request.nodes.append(node)
        request.reserved_bytes -= buffer.nbytes
        request.publish = None
        if request.inline:
            self._copy_inline(request)

    def _sample(self, request: Request, logits: torch.Tensor) -> None:
        usage, params = request.usage, request.params
        token = next_token(logits, params, request.generator)
        if not request.first_token_at:
            request.first_token_at = time.perf_counter()
            usage.ttft_ms = (request.first_token_at - request.arrived) * 1000
        if token in self.eos_ids:
            return self._finish(request, "stop")
        request.generation.token_ids.append(token)
        assert request.text is not None
        if piece := request.text.push(token):
            request.generation.emit(piece)
        usage.new_tokens += 1
        text = request.generation.text
        if piece and params.stop and stop_at(text, params.stop, len(text) - len(piece)) is not None:
            return self._finish(request, "stop")
        total = len(request.prompt.token_ids) + usage.new_tokens
        if usage.new_tokens >= params.max_new_tokens or total >= self.context_tokens:
            return self._finish(request, "length")
        if request.generation.cancelled:
            return self._finish(request, "cancelled")
        request.pending = [token]

    # --- the end of a request ---
    def _finish(self, request: Request, reason: FinishReason, error: BaseException | None = None) -> None:
        usage = request.usage
        usage.finish_reason = reason
        if request.text is not None and (piece := request.text.flush()):
            request.generation.emit(piece)
        if usage.new_tokens > 1 and request.first_token_at:
            usage.decode_tokens_per_s = (usage.new_tokens - 1) / (time.perf_counter() - request.first_token_at)
        if request.decode_steps:
            usage.batch_size = request.decode_rows / request.decode_steps
        if error is None:
            self._keep_turns(request)
            if request.pin_prefix and reason == "stop" and request.nodes:
                self.tree.pin(request.nodes)  # a warm preset stays in memory: `_release` unpins once
                request.pinned = list(request.nodes)
        self._release(request)
        with self._wake:
            if request in self._running:
                self._running.remove(request)
        self.on_finish(request, error)

    def _keep_turns(self, request: Request) -> None:
        """Store what the buffer computed (prompt tail and reply) as an exact-size node."""
        buffer = request.buffer
        if buffer is None or not request.buffer_ids or request.publish is not None:
            return
        n = len(request.buffer_ids)
        # the exact run fits in what the buffer reserved; the copy needs one layer's worth more
        transient = RowBuffer.transient_nbytes(n, self.bytes_per_token, len(buffer.keys))
        exact = n * self.bytes_per_token
        evicted = self.tree.make_room(transient + max(0, exact - request.reserved_bytes), keep=request.nodes)
        if evicted is None:
            request.usage.not_admitted += 1
            return
        request.evictions += evicted
        run = buffer.take_run(n, start=request.inline_tokens)
        self.tree.release(request.reserved_bytes)
        request.reserved_bytes = 0
        parent = request.nodes[-1] if request.nodes else None
        owner = owner_of(request.session_id)
        node = self.tree.insert(request.scope, owner, parent, request.buffer_ids, run, run.nbytes)
        self._persist(node)

    def _release(self, request: Request) -> None:
        if request.nodes:
            self.tree.unpin(request.nodes)
            request.nodes = []
        if request.reserved_bytes:
            self.tree.release(request.reserved_bytes)
            request.reserved_bytes = 0
        request.buffer = request.publish = None


def _detachable(node: Node[KVRun], owner: str, below: list[Node[KVRun]]) -> bool:
    """A private node only this request needs: its owner's, unused, with no other branch below."""
    if node.owner == SHARED or node.owner != owner or node.pins:
        return False
    return all(child in below for child in node.children)


def _source(nodes: list[Node[KVRun]], owner: str) -> CacheSource:
    owners = {node.owner for node in nodes}
    if owner in owners and owner != SHARED:
        return "stateless" if owner == STATELESS else "session"
    return "prefix" if owners else "none"


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000

