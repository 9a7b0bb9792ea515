"""Eviction policies compared on one recorded multi-user workload, at several memory budgets.

The workload is recorded once (seeded, written to `policy-trace.json` beside the results): visitors
arrive over half an hour, pick one of three system prompts by popularity, and come back for more
turns after idle gaps. It is replayed in arrival order, one request at a time, against a fresh
memory-only engine per (policy, budget); greedy replies are the same whatever the policy, so every
replay sees the same conversations. The token hit ratio is counted at the model (`meter.py`), TTFT
is the engine's own, and the budgets are fractions of what the whole workload holds when nothing
is evicted (measured by a first LRU replay with a budget large enough for everything).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvchat.bench.systems import Kvchat, Messages
from kvchat.bench.workloads import QUESTIONS, Bench
from kvchat.engine import Engine
from kvchat.kv.eviction import POLICIES
from kvchat.presets import load_presets

NEW_TOKENS = 6
BUDGET_FRACTIONS = (0.35, 0.5, 0.7)  # of the bytes the workload holds when nothing is evicted


@dataclass(frozen=True, slots=True)
class Visit:
    at_s: float  # seconds since the recording started
    visitor: int
    system: str  # which system prompt (a key of `system_prompts()`)
    question: int  # index into QUESTIONS


def system_prompts() -> dict[str, str]:
    """Three system prompts of different lengths: two parts of the FAQ and the Socratic tutor."""
    faq = load_presets()["Acme cloud support faq (long)"]
    return {"faq-a": faq[:1500], "faq-b": faq[1500:2700], "tutor": load_presets()["Socratic tutor"]}


def record_trace(visitors: int, seed: int = 7) -> list[Visit]:
    """Arrivals over 30 minutes; 1-4 turns each, 10 s to 10 min apart; popular prompts first."""
    rng = random.Random(seed)
    visits = []
    for visitor in range(visitors):
        at_s = rng.uniform(0, 1800)
        system = rng.choices(list(system_prompts()), weights=(5, 3, 2))[0]
        for _ in range(rng.randint(1, 4)):
            visits.append(Visit(round(at_s, 1), visitor, system, rng.randrange(len(QUESTIONS))))
            at_s += rng.choice((rng.uniform(10, 60), rng.uniform(120, 600)))  # a quick reply or a return
    return sorted(visits, key=lambda visit: visit.at_s)


def replay(bench: Bench, trace: list[Visit], policy: str, budget_bytes: int, label: str) -> Engine:
    """Serve the trace in order on a fresh engine; returns it (still open) for its counters."""
    engine = Engine(bench.engine.loaded, budget_bytes, eviction=policy)
    system = Kvchat(engine, f"policy-{policy}-{label}")
    prompts = system_prompts()
    conversations: dict[int, Messages] = {}
    for visit in trace:
        messages = conversations.setdefault(visit.visitor, [{"role": "system", "content": prompts[visit.system]}])
        messages.append({"role": "user", "content": QUESTIONS[visit.question]})
        turn, _ = bench.ask_kvchat("policies", f"{policy}@{label}", f"visitor-{visit.visitor}", messages,
                                   system=system, max_new_tokens=NEW_TOKENS)  # fmt: skip
        messages.append({"role": "assistant", "content": turn.text})
    return engine


def compare(bench: Bench, visitors: int, out: Path | None) -> dict[str, Any]:
    """Every policy at every budget; returns the table (and writes the trace to `out`)."""
    trace = record_trace(visitors)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "policy-trace.json").write_text(json.dumps([asdict(v) for v in trace], indent=1), encoding="utf-8")
    reference = replay(bench, trace, "lru", 2**31, "unlimited")
    held_bytes = reference.stats().used_bytes
    largest = max(r.prompt_tokens for r in bench.rows if r.point == "lru@unlimited") + NEW_TOKENS
    reference.close()
    table = [_line(bench, "lru", "unlimited", 2**31, 0)]
    for fraction in BUDGET_FRACTIONS:
        budget = max(int(held_bytes * fraction), int(largest * 1.1) * bench.engine.bytes_per_token)
        label = f"{fraction:.0%}"
        for policy in POLICIES:
            engine = replay(bench, trace, policy, budget, label)
            table.append(_line(bench, policy, label, budget, engine.stats().evictions))
            engine.close()
    return {"visits": len(trace), "visitors": visitors, "held_bytes_unlimited": held_bytes, "table": table}


def _line(bench: Bench, policy: str, label: str, budget: int, evictions: int) -> dict[str, Any]:
    rows = [r for r in bench.rows if r.workload == "policies" and r.point == f"{policy}@{label}"]
    prompt = sum(r.prompt_tokens for r in rows)
    cached = sum(r.prompt_tokens - (r.prefilled_tokens or 0) for r in rows)
    return {"policy": policy, "budget": label, "budget_bytes": budget, "requests": len(rows),
            "token_hit_ratio": cached / prompt if prompt else None,
            "mean_ttft_ms": sum(r.ttft_ms for r in rows) / len(rows) if rows else None,
            "evictions": evictions}  # fmt: skip


def best_gain(found: dict[str, Any] | None) -> float | None:
    """The best policy's token hit ratio over LRU's at the tightest budget."""
    if not found:
        return None
    tightest = f"{min(BUDGET_FRACTIONS):.0%}"
    lines = [t for t in found["table"] if t["budget"] == tightest and t["token_hit_ratio"] is not None]
    lru = next((t["token_hit_ratio"] for t in lines if t["policy"] == "lru"), None)
    return max(t["token_hit_ratio"] for t in lines) / lru if lines and lru else None
