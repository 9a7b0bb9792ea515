"""Workloads of many visitors: a class on the FAQ preset at once, and 40 sessions under 256 MiB.

`visitors`: n sessions (1, 2, 4, 8, 16) open on the FAQ preset (cached beforehand) and ask their own
question. The same requests are served one after another (each then alone and warm), then all at
once (threads released together), then by transformers' continuous batching, submitted together to
its persistent manager (the preset cached there too). Times
are taken by the caller's threads (arrival to first piece), not by kvchat. Every batched greedy
reply is compared with its solo twin; for each difference, the model itself (plain forward, no
cache) gives the gap between its top two logits at the first differing step.

`capacity`: 40 sessions on the FAQ preset, one short turn each, then a follow-up in each, under a
256 MiB budget; a follow-up "kept" its session when the model was fed less than the session's
own first turn (counted at the model by the meter).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvchat.bench.report import p95
from kvchat.bench.systems import ContinuousBatching, Kvchat, Messages
from kvchat.bench.workloads import QUESTIONS, Bench, Row
from kvchat.engine import Engine
from kvchat.presets import load_presets

FAQ = "Acme cloud support faq (long)"
VISITOR_NEW_TOKENS = 96


@dataclass(slots=True)
class Served:
    """One visitor's request as its caller saw it."""

    ttft_ms: float
    new_tokens: int
    token_ids: list[int]
    text: str
    batch_size: float = 1.0


@dataclass(slots=True)
class Crowd:
    n: int
    serial_s: float
    together_s: float
    serial: list[Served]
    together: list[Served]
    cb_s: float | None = None
    cb_tokens: int | None = None
    differences: list[dict[str, Any]] = field(default_factory=list)

    def tokens_per_s(self, which: str) -> float:
        served, seconds = (self.serial, self.serial_s) if which == "serial" else (self.together, self.together_s)
        return sum(s.new_tokens for s in served) / seconds


def asks(n: int) -> list[Messages]:
    system = {"role": "system", "content": load_presets()[FAQ]}
    return [[system, {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (visitor {i + 1})"}]
            for i in range(n)]  # fmt: skip


def _serve(engine: Engine, session: str, messages: Messages, start: float) -> Served:
    generation = engine.stream(session, messages, max_new_tokens=VISITOR_NEW_TOKENS)
    first = 0.0
    for _ in generation:
        first = first or time.perf_counter()
    usage = generation.wait()
    first = first or time.perf_counter()
    return Served((first - start) * 1000, usage.new_tokens, list(generation.token_ids), generation.text,
                  usage.batch_size or 1.0)  # fmt: skip


def _together(engine: Engine, tag: str, conversations: list[Messages]) -> tuple[float, list[Served]]:
    """All requests released at once; each thread times its own request from the release."""
    gate = threading.Barrier(len(conversations) + 1)
    results: list[Served | None] = [None] * len(conversations)
    starts: list[float] = [0.0] * len(conversations)

    def visit(i: int) -> None:
        gate.wait()
        starts[i] = time.perf_counter()
        results[i] = _serve(engine, f"{tag}-{i}", conversations[i], starts[i])

    threads = [threading.Thread(target=visit, args=(i,)) for i in range(len(conversations))]
    for thread in threads:
        thread.start()
    gate.wait()
    begun = time.perf_counter()
    for thread in threads:
        thread.join()
    assert all(r is not None for r in results), "a visitor's request failed"
    return time.perf_counter() - begun, results  # type: ignore[return-value]


def first_difference(engine: Engine, messages: Messages, batched: list[int], solo: list[int]) -> dict[str, Any]:
    """Where two greedy replies part, and the model's own top-2 logit gap there (plain forward)."""
    step = next((i for i, (a, b) in enumerate(zip(batched, solo)) if a != b), min(len(batched), len(solo)))
    ids = engine.encode(messages).token_ids + solo[:step]
    with torch.inference_mode():
        logits = engine.loaded.model(input_ids=torch.tensor([ids], device=engine.device)).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return {"step": step, "top2_gap": float(top.values[0] - top.values[1]),
            "batched": batched[step] if step < len(batched) else None, "solo": solo[step] if step < len(solo) else None,
            "plain_forward_top2": [int(i) for i in top.indices]}  # fmt: skip


def visitors(bench: Bench, counts: tuple[int, ...], cb: ContinuousBatching | None) -> list[Crowd]:
    """Timed runs are unmetered (the meter's walk of the engine would slow every step); the bytes
    are sampled at every forward of one more, untimed run of the largest crowd."""
    engine = bench.engine
    engine.chat("crowd-warm", asks(1)[0], max_new_tokens=1)  # the preset is cached, as in the app
    if cb is not None:
        cb.at_once(asks(1), 1)  # and in transformers-cb's prefix cache
    crowds = []
    for n in counts:
        conversations = asks(n)
        begun = time.perf_counter()
        serial = [_serve(engine, f"solo-{n}-{i}", m, time.perf_counter()) for i, m in enumerate(conversations)]
        serial_s = time.perf_counter() - begun
        bench.tick(n)
        together_s, together = _together(engine, f"crowd-{n}", conversations)
        bench.tick(n)
        crowd = Crowd(n, serial_s, together_s, serial, together)
        for i, (b, s) in enumerate(zip(together, serial, strict=True)):
            if b.token_ids != s.token_ids:
                crowd.differences.append({"visitor": i, **first_difference(engine, conversations[i], b.token_ids,
                                                                           s.token_ids)})  # fmt: skip
        if cb is not None:
            crowd.cb_s, crowd.cb_tokens = cb.at_once(conversations, VISITOR_NEW_TOKENS)
            bench.tick(n)
        for b, s in zip(together, serial, strict=True):
            bench.rows.append(Row("visitors", "kvchat", f"{n} at once", b.ttft_ms, 0, None, new_tokens=b.new_tokens))
            bench.rows.append(Row("visitors", "kvchat", f"{n} one by one", s.ttft_ms, 0, None, new_tokens=s.new_tokens))
        crowds.append(crowd)
    if counts:
        n = max(counts)
        bench.meter.begin(engine)
        try:
            _together(engine, f"metered-{n}", asks(n))
        finally:
            measured = bench.meter.end()
        bench.rows.append(Row("visitors", "kvchat", f"{n} at once, bytes sampled", 0.0, 0, None,
                              max_held_bytes=measured.max_held_bytes, held_samples=measured.samples,
                              budget_violations=measured.violations, budget_bytes=engine.stats().budget_bytes))  # fmt: skip
        bench.tick(n)
    return crowds


def capacity(bench: Bench, kvchat: Kvchat, sessions: int, new_tokens: int = 32) -> float:
    """Fraction of `sessions` whose follow-up still found its own first turn cached."""
    system = {"role": "system", "content": load_presets()[FAQ]}
    prefix_len = kvchat.engine.encode([system, {"role": "user", "content": "?"}]).prefix_len
    conversations = {f"class-{i}": [system, {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} "
                                                                       f"(student {i + 1})"}]
                     for i in range(sessions)}  # fmt: skip
    for session, messages in conversations.items():
        reply, _ = bench.ask_kvchat("capacity", "turn1", session, messages, system=kvchat, max_new_tokens=new_tokens)
        messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "Why is that?"}]
    kept = 0
    for session, messages in conversations.items():
        _, row = bench.ask_kvchat("capacity", "follow-up", session, messages, system=kvchat, max_new_tokens=new_tokens)
        kept += (row.model_cached_tokens or 0) > prefix_len
    return kept / sessions


def summary(crowds: list[Crowd]) -> dict[str, Any]:
    """Per visitor count: tokens/s one by one, at once, and by continuous batching; TTFT p50/p95."""
    lone = [s.ttft_ms for c in crowds for s in c.serial]
    lone_p50 = statistics.median(lone) if lone else None
    table = []
    for c in crowds:
        together = [s.ttft_ms for s in c.together]
        table.append({
            "visitors": c.n, "serial_tok_s": c.tokens_per_s("serial"), "together_tok_s": c.tokens_per_s("together"),
            "throughput_ratio": c.tokens_per_s("together") / c.tokens_per_s("serial"),
            "cb_tok_s": c.cb_tokens / c.cb_s if c.cb_s else None,
            "ttft_p50_ms": statistics.median(together), "ttft_p95_ms": p95(together),
            "mean_batch": statistics.mean(s.batch_size for s in c.together),
            "exact": f"{c.n - len(c.differences)}/{c.n}", "differences": c.differences,
        })  # fmt: skip
    return {"lone_warm_ttft_p50_ms": lone_p50, "table": table}

