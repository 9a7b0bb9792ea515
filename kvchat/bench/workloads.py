"""The four workloads, run with the same prompts for every system; each returns result rows.

A row is one measured request: workload, system, point (history tokens, "cold"/"warm", ...),
TTFT, tokens prefilled, tokens an ideal cache could have served (kvchat only), and whether the
greedy reply equals the recompute baseline's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kvchat.bench.systems import Floor, Messages, System, Turn
from kvchat.chat import Prompt
from kvchat.engine import Engine
from kvchat.prefix import common_prefix_len
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
    prefilled_tokens: int | None
    oracle_tokens: int | None = None  # tokens an unlimited ideal cache could have served
    new_tokens: int = 0
    decode_tokens_per_s: float = 0.0
    exact: bool | None = None  # greedy reply equals the recompute baseline's
    used_bytes: int | None = None  # kvchat: bytes held after the request
    budget_bytes: int | None = None

    @classmethod
    def of(cls, workload: str, system: str, point: str, turn: Turn, **extra: Any) -> Row:
        return cls(workload, system, point, turn.ttft_ms, turn.prompt_tokens, turn.prefilled_tokens,
                   new_tokens=turn.new_tokens, decode_tokens_per_s=turn.decode_tokens_per_s, **extra)  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Oracle:
    """Counts what an ideal cache with unlimited memory could have served: per session, the longest
    prefix shared with everything that session fed before; across sessions of one store, a system
    prompt seen before. Independent of kvchat's own bookkeeping."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.fed: dict[tuple[int, str], list[int]] = {}
        self.prefixes: set[tuple[int, tuple[int, ...]]] = set()

    def served(self, scope: int, session: str, prompt: Prompt) -> int:
        best = common_prefix_len(prompt.token_ids, self.fed.get((scope, session), []))
        if prompt.prefix_len and (scope, tuple(prompt.token_ids[: prompt.prefix_len])) in self.prefixes:
            best = max(best, prompt.prefix_len)
        return min(best, len(prompt.token_ids) - 1)

    def record(self, scope: int, session: str, prompt: Prompt, turn: Turn) -> None:
        reply_ids = self.engine.loaded.tokenizer(turn.text, add_special_tokens=False)["input_ids"]
        fed_reply = turn.new_tokens - (1 if turn.finish_reason == "length" else 0)
        self.fed[(scope, session)] = prompt.token_ids + reply_ids[: max(0, fed_reply)]
        if prompt.prefix_len:
            self.prefixes.add((scope, tuple(prompt.token_ids[: prompt.prefix_len])))


@dataclass
class Bench:
    """What every workload needs: the systems, the oracle, sizes, and a progress callback."""

    engine: Engine
    kvchat: System
    recompute: System
    floor: Floor
    peers: list[System]
    new_tokens: int
    tick: Callable[[int], None] = lambda n: None
    rows: list[Row] = field(default_factory=list)
    oracle: Oracle = field(init=False)
    kvchat_texts: dict[tuple[str, str], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.oracle = Oracle(self.engine)

    def ask_kvchat(self, workload: str, point: str, session: str, messages: Messages, system: System | None = None,
                   max_new_tokens: int | None = None, key: str | None = None) -> Turn:  # fmt: skip
        system = system or self.kvchat
        prompt = self.engine.encode(messages)
        served = self.oracle.served(id(system), session, prompt)  # scope: one cache store
        turn = system.reply(session, messages, max_new_tokens or self.new_tokens)
        self.oracle.record(id(system), session, prompt, turn)
        engine = getattr(system, "engine", self.engine)
        stats = engine.stats()
        self.rows.append(Row.of(workload, "kvchat", point, turn, oracle_tokens=served,
                                used_bytes=stats.used_bytes, budget_bytes=stats.budget_bytes))  # fmt: skip
        if key is not None:
            self.kvchat_texts[(workload, key)] = turn.text
        self.tick(1)
        return turn

    def ask_other(self, system: System, workload: str, point: str, session: str, messages: Messages,
                  key: str | None = None, record: bool = True) -> Turn:  # fmt: skip
        turn = system.reply(session, messages, self.new_tokens)
        exact = None
        if system.name == "recompute" and key is not None and (workload, key) in self.kvchat_texts:
            exact = self.kvchat_texts[(workload, key)] == turn.text
        if record:
            self.rows.append(Row.of(workload, system.name, point, turn, exact=exact))
        self.tick(1)
        return turn


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
        greeting = bench.ask_kvchat("warmup", label, "multi", warm).text
        base = warm + [{"role": "assistant", "content": greeting}]
        asks = [base + [{"role": "user", "content": FOLLOW_UPS[j % len(FOLLOW_UPS)]}] for j in range(follow_ups)]
        for j, messages in enumerate(asks):
            turn = bench.ask_kvchat("multi_turn", label, "multi", messages, key=f"{point}/{j}")
            # the floor feeds exactly the tokens kvchat just prefilled, right after it
            prompt_ids = bench.engine.encode(messages).token_ids
            num_new = max(1, turn.prefilled_tokens or 1)
            bench.rows.append(Row("multi_turn", "floor", label, bench.floor.ttft_ms(prompt_ids, num_new),
                                  len(prompt_ids), num_new))  # fmt: skip
            bench.tick(1)
        for j, messages in enumerate(asks[:recompute_repeats]):
            bench.ask_other(bench.recompute, "multi_turn", label, "multi", messages, key=f"{point}/{j}")
        for peer in bench.peers:
            bench.ask_other(peer, "multi_turn", label, "multi", warm, record=False)
            for messages in asks[:recompute_repeats]:
                bench.ask_other(peer, "multi_turn", label, "multi", messages)


def shared_prefix(bench: Bench, make_kvchat: Callable[[], System], sessions: int, rounds: int) -> None:
    """`sessions` new sessions open with the same 1,165-token system prompt; each round starts cold."""
    system = {"role": "system", "content": load_presets()["Acme cloud support faq (long)"]}
    asks = [[system, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(sessions)]
    for r in range(rounds):
        kvchat = make_kvchat()  # a fresh store: the first session is cold again
        for i, messages in enumerate(asks):
            point = "cold" if i == 0 else "warm"
            bench.ask_kvchat("shared_prefix", point, f"shared-{r}-{i}", messages, system=kvchat, key=str(i))
    for i, messages in enumerate(asks):
        bench.ask_other(bench.recompute, "shared_prefix", "cold", f"shared-{i}", messages, key=str(i))
    for peer in bench.peers:
        for i, messages in enumerate(asks):
            bench.ask_other(peer, "shared_prefix", "cold" if i == 0 else "warm", f"shared-{i}", messages)


def edit_regenerate(bench: Bench) -> None:
    """Three turns on the long FAQ, then Retry of the last turn and an Edit of the second-to-last question."""
    system = {"role": "system", "content": load_presets()["Acme cloud support faq (long)"]}
    messages: Messages = [system]
    for question in QUESTIONS[:3]:
        messages.append({"role": "user", "content": question})
        reply = bench.ask_kvchat("warmup", "edit", "edit", messages)
        messages.append({"role": "assistant", "content": reply.text})
    retry = messages[:-1]
    edited = messages[:3] + [{"role": "user", "content": "Do you refund monthly plans?"}]
    for point, asked in (("retry", retry), ("edit", edited)):
        bench.ask_kvchat("edit_regenerate", point, "edit", asked, key=point)
        bench.ask_other(bench.recompute, "edit_regenerate", point, "edit", asked, key=point)


def budget_pressure(bench: Bench, make_kvchat: Callable[[int], System], sessions: int, budget_bytes: int,
                    check_exact: int) -> None:  # fmt: skip
    """More sessions than the budget holds, two turns each, round-robin: LRU must evict and every
    request must still be answered (and answered exactly)."""
    kvchat = make_kvchat(budget_bytes)
    conversations = {f"pressure-{i}": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
                     for i in range(sessions)}  # fmt: skip
    for turn in range(2):
        for session, messages in conversations.items():
            key = f"{session}/{turn}"
            reply = bench.ask_kvchat("budget_pressure", f"turn{turn + 1}", session, messages, system=kvchat, key=key)
            if turn == 1 and check_exact > 0:
                check_exact -= 1
                bench.ask_other(bench.recompute, "budget_pressure", "turn2", session, messages, key=key)
            messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "Why is that?"}]


def decode_speed(bench: Bench, decode_tokens: int, repeats: int) -> None:
    """Decode tokens/s of kvchat and plain generate on the same ~500-token prompt and length."""
    messages = filler_history(bench.engine, 500) + [{"role": "user", "content": "Summarise all my notes in detail."}]
    for r in range(repeats):
        bench.ask_kvchat("decode", "500", f"decode-{r}", messages, max_new_tokens=decode_tokens, key=str(r))
        turn = bench.recompute.reply(f"decode-{r}", messages, decode_tokens)
        bench.rows.append(Row.of("decode", "recompute", "500", turn,
                                 exact=bench.kvchat_texts[("decode", str(r))] == turn.text))  # fmt: skip
        bench.tick(1)
