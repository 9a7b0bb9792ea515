"""The four workloads, run with the same prompts for every system; each returns result rows.

A row is one measured request: workload, system, point (history tokens, "cold"/"warm", ...),
TTFT, tokens prefilled, and whether the greedy reply equals the recompute baseline's. For kvchat,
reuse and bytes are measured at the model (`meter.py`) and graded by an ideal cache (`oracle.py`);
what kvchat says of itself is kept beside them, and any difference is flagged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kvchat.bench.meter import ModelMeter
from kvchat.bench.oracle import Oracle, render_ids
from kvchat.bench.systems import Floor, Kvchat, Messages, System, Turn
from kvchat.engine import Engine
from kvchat.presets import load_presets

FOLLOW_UPS = [
    "Thanks. In two sentences, what happens to my backups and invoices if my team downgrades its plan?",
    "One more thing: can a viewer in my workspace restore a deleted project from the trash by themselves?",
    "Understood. If my card fails twice this month, when exactly does the workspace become read-only?",
    "Next question, please: which plans include single sign-on, and how is the price billed each year?",
    "Finally, how long does a certificate take for a new custom domain, and what might block it for me?",
]
QUESTIONS = [
    "How much does the Team plan cost?", "Do you refund yearly plans?", "What is error ACME-413?",
    "How do I add a custom domain?", "Who can restore backups?", "What happens if my payment fails?",
    "Is single sign-on included in Team?", "How long is deleted data kept?", "Do schools get a discount?",
    "What uptime does Enterprise get?", "Can I upload a 6 GB file?", "How do I report a security issue?",
]  # fmt: skip


@dataclass(slots=True)
class Row:
    workload: str
    system: str
    point: str
    ttft_ms: float
    prompt_tokens: int
    prefilled_tokens: int | None  # kvchat: measured at the model; others: what they say, if anything
    oracle_tokens: int | None = None  # tokens an unlimited ideal cache could have served
    claimed_cached_tokens: int | None = None  # kvchat: `cached_tokens` in its usage record
    wrong_ids: int | None = None  # kvchat: fed prompt positions whose id differs from the prompt's
    new_tokens: int = 0
    decode_tokens_per_s: float = 0.0
    exact: bool | None = None  # greedy reply equals the recompute baseline's
    meter_ms_ttft: float | None = None  # kvchat: the meter's own time, taken out of ttft_ms
    meter_ms_decode: float | None = None  # kvchat: the same, taken out of the decode time
    max_held_bytes: int | None = None  # kvchat: largest sample of held KV bytes while it ran
    held_samples: int | None = None
    budget_violations: int | None = None  # samples over the budget
    budget_bytes: int | None = None

    @classmethod
    def of(cls, workload: str, system: str, point: str, turn: Turn, **extra: Any) -> Row:
        fields = {"prefilled_tokens": turn.prefilled_tokens, **extra}
        return cls(workload, system, point, turn.ttft_ms, turn.prompt_tokens, new_tokens=turn.new_tokens,
                   decode_tokens_per_s=turn.decode_tokens_per_s, **fields)  # fmt: skip

    @property
    def model_cached_tokens(self) -> int | None:
        return None if self.prefilled_tokens is None else self.prompt_tokens - self.prefilled_tokens

    @property
    def claim_differs(self) -> bool:
        return self.claimed_cached_tokens is not None and self.claimed_cached_tokens != self.model_cached_tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Bench:
    """What every workload needs: the systems, the meter and oracle, sizes, a progress callback."""

    engine: Engine
    kvchat: Kvchat
    recompute: System
    floor: Floor
    peers: list[System]
    new_tokens: int
    meter: ModelMeter
    tick: Callable[[int], None] = lambda n: None
    rows: list[Row] = field(default_factory=list)
    oracle: Oracle = field(init=False)
    kvchat_texts: dict[tuple[str, str], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.oracle = Oracle(self.engine.loaded.tokenizer)

    def prompt_ids(self, messages: Messages) -> list[int]:
        """The conversation's ids, rendered with the tokenizer's own template (not kvchat's code)."""
        return render_ids(self.engine.loaded.tokenizer, messages)

    def ask_kvchat(self, workload: str, point: str, session: str, messages: Messages, system: Kvchat | None = None,
                   max_new_tokens: int | None = None, key: str | None = None) -> tuple[Turn, Row]:  # fmt: skip
        """One kvchat request, counted at the model and graded against the oracle."""
        system = system or self.kvchat
        prompt_ids = self.prompt_ids(messages)
        served = self.oracle.served(system.scope, session, prompt_ids)
        self.meter.begin(system.engine)
        try:
            turn = system.reply(session, messages, max_new_tokens or self.new_tokens)
        finally:
            measured = self.meter.end()
        self.oracle.record(system.scope, session, messages, measured.fed_sequence(prompt_ids))
        model_cached = measured.cached_tokens(prompt_ids)
        prefill_s, decode_s = measured.sample_s(len(prompt_ids))
        row = Row.of(workload, "kvchat", point, without_meter(turn, prefill_s, decode_s),
                     prefilled_tokens=len(prompt_ids) - model_cached,
                     meter_ms_ttft=prefill_s * 1000, meter_ms_decode=decode_s * 1000,
                     oracle_tokens=served, claimed_cached_tokens=turn.prompt_tokens - (turn.prefilled_tokens or 0),
                     wrong_ids=measured.wrong_ids(prompt_ids), max_held_bytes=measured.max_held_bytes,
                     held_samples=measured.samples, budget_violations=measured.violations,
                     budget_bytes=system.engine.stats().budget_bytes)  # fmt: skip
        self.rows.append(row)
        if key is not None:
            self.kvchat_texts[(workload, key)] = turn.text
        self.tick(1)
        return turn, row

    def ask_other(self, system: System, workload: str, point: str, session: str, messages: Messages,
                  key: str | None = None, record: bool = True, max_new_tokens: int | None = None) -> Turn:  # fmt: skip
        turn = system.reply(session, messages, max_new_tokens or self.new_tokens)
        exact = None
        if system.name == "recompute" and key is not None and (workload, key) in self.kvchat_texts:
            exact = self.kvchat_texts[(workload, key)] == turn.text
        if record:
            self.rows.append(Row.of(workload, system.name, point, turn, exact=exact))
        self.tick(1)
        return turn


def without_meter(turn: Turn, prefill_s: float, decode_s: float) -> Turn:
    """kvchat's timings less the meter's own sampling time inside them, so the meter costs kvchat
    nothing the baseline does not pay (the baseline runs unmetered)."""
    decode_tokens_per_s = turn.decode_tokens_per_s
    if decode_tokens_per_s and turn.new_tokens > 1:
        decode_s_total = (turn.new_tokens - 1) / decode_tokens_per_s
        decode_tokens_per_s = (turn.new_tokens - 1) / (decode_s_total - decode_s)
    return replace(turn, ttft_ms=turn.ttft_ms - prefill_s * 1000, decode_tokens_per_s=decode_tokens_per_s)


def filler_history(engine: Engine, min_tokens: int) -> Messages:
    """A deterministic conversation of at least `min_tokens`, ending with an assistant turn."""
    paragraphs = [p for p in load_presets()["Acme cloud support faq (long)"].split("\n") if len(p) > 200]
    messages: Messages = [{"role": "system", "content": load_presets()["Helpful assistant"]}]
    turn = 0
    while True:
        text = paragraphs[turn % len(paragraphs)]
        messages += [
            {"role": "user", "content": f"Note {turn + 1}. Please keep this in mind: {text[: len(text) // 2]}"},
            {"role": "assistant", "content": f"Noted. In short: {text[len(text) // 2 :]}"},
        ]  # fmt: skip
        turn += 1
        probe = messages + [{"role": "user", "content": "?"}]
        if len(engine.encode(probe).token_ids) >= min_tokens:
            return messages


def multi_turn(bench: Bench, points: list[int], follow_ups: int, recompute_repeats: int) -> None:
    """One conversation grown to each history length; ~30-token follow-ups on top."""
    for point in points:
        label = str(point)
        history = filler_history(bench.engine, point)
        warm = history + [{"role": "user", "content": "Please greet me in one short sentence."}]
        greeting, _ = bench.ask_kvchat("warmup", label, "multi", warm)
        base = warm + [{"role": "assistant", "content": greeting.text}]
        asks = [base + [{"role": "user", "content": FOLLOW_UPS[j % len(FOLLOW_UPS)]}] for j in range(follow_ups)]
        for j, messages in enumerate(asks):
            _, row = bench.ask_kvchat("multi_turn", label, "multi", messages, key=f"{point}/{j}")
            # right after it, the floor feeds only what the ideal cache could not serve
            served = row.oracle_tokens or 0
            bench.rows.append(Row("multi_turn", "floor", label, bench.floor.ttft_ms(messages, served),
                                  row.prompt_tokens, row.prompt_tokens - served))  # fmt: skip
            bench.tick(1)
        for j, messages in enumerate(asks[:recompute_repeats]):
            bench.ask_other(bench.recompute, "multi_turn", label, "multi", messages, key=f"{point}/{j}")
        for peer in bench.peers:
            bench.ask_other(peer, "multi_turn", label, "multi", warm, record=False)
            for messages in asks[:recompute_repeats]:
                bench.ask_other(peer, "multi_turn", label, "multi", messages)


def fresh_system_prompts(bench: Bench, text: str, count: int) -> list[str]:
    """`count` variants of `text` with the same token length, none seen before: each opens on its
    own desk letter, so nothing any cache holds matches past the first few tokens."""
    variants = [f"Desk {letter}. {text}" for letter in "QRSTUVWXYZ"]
    lengths = [len(bench.prompt_ids([{"role": "system", "content": v}, {"role": "user", "content": "?"}]))
               for v in variants]  # fmt: skip
    common = max(set(lengths), key=lengths.count)
    chosen = [v for v, n in zip(variants, lengths) if n == common]
    if len(chosen) < count:
        raise RuntimeError(f"only {len(chosen)} equal-length variants of the system prompt; {count} needed")
    return chosen[:count]


def shared_prefix(bench: Bench, colds: int, warm_per_cold: int) -> None:
    """New sessions open on the 1,165-token FAQ: on each of `colds` fresh variants of equal length,
    the first session is cold (nothing cached) and the next `warm_per_cold` find it cached."""
    faq = load_presets()["Acme cloud support faq (long)"]
    first_asks: list[Messages] = []
    for c, text in enumerate(fresh_system_prompts(bench, faq, colds)):
        system = {"role": "system", "content": text}
        asks = [[system, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(1 + warm_per_cold)]
        first_asks = first_asks or asks
        for i, messages in enumerate(asks):
            point = "cold" if i == 0 else "warm"
            bench.ask_kvchat("shared_prefix", point, f"shared-{c}-{i}", messages, key=f"{c}/{i}")
    for i, messages in enumerate(first_asks):
        bench.ask_other(bench.recompute, "shared_prefix", "cold", f"shared-{i}", messages, key=f"0/{i}")
    for peer in bench.peers:
        for i, messages in enumerate(first_asks):
            bench.ask_other(peer, "shared_prefix", "cold" if i == 0 else "warm", f"shared-{i}", messages)


def edit_regenerate(bench: Bench) -> None:
    """Three turns on the long FAQ, then Retry of the last turn and an Edit of the second-to-last question."""
    system = {"role": "system", "content": load_presets()["Acme cloud support faq (long)"]}
    messages: Messages = [system]
    for question in QUESTIONS[:3]:
        messages.append({"role": "user", "content": question})
        reply, _ = bench.ask_kvchat("warmup", "edit", "edit", messages)
        messages.append({"role": "assistant", "content": reply.text})
    retry = messages[:-1]
    edited = messages[:3] + [{"role": "user", "content": "Do you refund monthly plans?"}]
    for point, asked in (("retry", retry), ("edit", edited)):
        bench.ask_kvchat("edit_regenerate", point, "edit", asked, key=point)
        bench.ask_other(bench.recompute, "edit_regenerate", point, "edit", asked, key=point)


def budget_pressure(bench: Bench, kvchat: Kvchat, sessions: int, check_exact: int) -> None:
    """More sessions than the budget holds, two turns each, round-robin: LRU must evict and every
    request must still be answered (and answered exactly)."""
    conversations = {f"pressure-{i}": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
                     for i in range(sessions)}  # fmt: skip
    for turn in range(2):
        for session, messages in conversations.items():
            key = f"{session}/{turn}"
            reply, _ = bench.ask_kvchat("budget_pressure", f"turn{turn + 1}", session, messages, system=kvchat, key=key)
            if turn == 1 and check_exact > 0:
                check_exact -= 1
                bench.ask_other(bench.recompute, "budget_pressure", "turn2", session, messages, key=key)
            messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "Why is that?"}]


def decode_speed(bench: Bench, decode_tokens: int, repeats: int) -> None:
    """Decode tokens/s of kvchat and plain generate on the same ~500-token prompt and length."""
    messages = filler_history(bench.engine, 500) + [{"role": "user", "content": "Summarise all my notes in detail."}]
    for r in range(repeats):
        bench.ask_kvchat("decode", "500", f"decode-{r}", messages, max_new_tokens=decode_tokens, key=str(r))
        bench.ask_other(bench.recompute, "decode", "500", f"decode-{r}", messages, key=str(r),
                        max_new_tokens=decode_tokens)  # fmt: skip


LONG_REPLY = "Write a very long, detailed story about a lighthouse keeper, at least 1000 words."  # 512+ tokens, greedy


def decode_length(bench: Bench, lengths: tuple[int, ...], repeats: int) -> None:
    """Decode tokens/s at a short and a long reply, kvchat and plain generate side by side: any
    per-token work of kvchat that grows with the reply shows as a falling ratio."""
    messages = [{"role": "user", "content": LONG_REPLY}]
    for r in range(repeats):
        for length in lengths:
            key = f"{length}/{r}"
            bench.ask_kvchat("decode_length", str(length), f"long-{key}", messages, max_new_tokens=length, key=key)
            bench.ask_other(bench.recompute, "decode_length", str(length), f"long-{key}", messages, key=key,
                            max_new_tokens=length)  # fmt: skip
