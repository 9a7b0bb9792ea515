"""`python -m kvchat.bench.routing`: replica routers side by side on a generated trace, no model.

A class at internet scale on paper: 64 replicas, 10,000 sessions over a few shared system prompts
(Zipf-weighted), each session a few turns apart by idle gaps; a replica crashes mid-trace and its
replacement joins later with the same rank (as Ray Serve replaces a replica), then a new replica is
added. Each replica holds sessions' turns under a token budget (LRU) and the system prompts it has
served (kvchat warms every preset on every replica, so kvchat's replicas hold them all). A request
occupies its replica for a time that grows with what it prefills, so load follows the routing.

Routers, each fed the same trace:
- `kvchat`: `kvchat.router.Front` (the session's last replica, and what it sent since each state)
  over `rank`, on the states replicas publish, refreshed at most once a second;
- `consistent-hash`: a ring of the session ids (Ray Serve's ConsistentHashRouter);
- `prefix-affinity`: the replica that served the longest prefix of the prompt, load never
  overriding it (Ray Serve LLM's PrefixCacheAffinityRouter with its defaults): the replica that
  served a session's earlier prompts, else the first that served its system prompt, else the least
  loaded;
- `one engine`: a single replica with room for everything, presets warmed, never crashing: the
  ceiling on the hit ratio.

Reported per router: token hit ratio; sessions that lost their cache (a follow-up served without
the turns it had cached somewhere); follow-ups moved by a join (their replica was alive, yet they
went to one that joined); load imbalance (max over mean requests running, at every
arrival while replicas run one request or more on average: its mean and p95). The disk tier is left out (a crashed replica's sessions are lost to
every router alike), and so is the replicas' own queueing beyond this time model.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from kvchat.router import Front, ReplicaState, RouteRequest

SYSTEM_TOKENS = 1_000
TURN_TOKENS = 180  # a user message and its reply
REPLY_TOKENS = 120
STEP_S = 0.1  # one decode step of a replica's batch
PREFILL_S_PER_TOKEN = 0.002
MAX_BATCH = 16
PUBLISH_S = 1.0


@dataclass
class Replica:
    name: str
    budget_tokens: int
    sessions: OrderedDict[str, int] = field(default_factory=OrderedDict)  # session -> tokens held, LRU first
    prefixes: set[str] = field(default_factory=set)
    held_tokens: int = 0
    running: int = 0
    published: ReplicaState | None = None
    published_at: float = -1.0

    def hold(self, session: str, tokens: int) -> None:
        self.held_tokens += tokens - self.sessions.pop(session, 0)
        self.sessions[session] = tokens
        while self.held_tokens > self.budget_tokens:
            self.held_tokens -= self.sessions.popitem(last=False)[1]

    def state(self, now: float) -> ReplicaState:
        if self.published is None or now - self.published_at >= PUBLISH_S:
            self.published = ReplicaState(self.name, self.running, 0, MAX_BATCH, frozenset(self.sessions),
                                          frozenset(self.prefixes), STEP_S * 1000, PREFILL_S_PER_TOKEN * 1000)
            self.published_at = now
        return self.published


@dataclass(frozen=True)
class Arrival:
    t: float
    session: str
    prefix: str
    turn: int  # 0 for the first message


@dataclass
class Tally:
    router: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    lost_sessions: set[str] = field(default_factory=set)
    moved_by_join: int = 0
    imbalance: list[float] = field(default_factory=list)

    def row(self) -> dict:
        ordered = sorted(self.imbalance) or [1.0]
        return {"router": self.router, "requests": self.requests,
                "token_hit_ratio": round(self.cached_tokens / max(1, self.prompt_tokens), 4),
                "sessions_lost_cache": len(self.lost_sessions), "moved_by_join": self.moved_by_join,
                "imbalance_mean": round(sum(ordered) / len(ordered), 3),
                "imbalance_p95": round(ordered[int(0.95 * (len(ordered) - 1))], 3)}  # fmt: skip


def trace(sessions: int, prompts: int, duration_s: float, seed: int) -> list[Arrival]:
    """Sessions start uniformly over the first 80% of the trace; 1-6 turns each, 20 s plus an
    exponential idle gap (mean 2 min) apart."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(prompts)]
    arrivals = []
    for i in range(sessions):
        prefix = rng.choices([f"preset{p}" for p in range(prompts)], weights)[0]
        t = rng.uniform(0, duration_s * 0.8)
        for turn in range(rng.randint(1, 6)):
            arrivals.append(Arrival(t, f"s{i}", prefix, turn))
            t += 20 + rng.expovariate(1 / 120)
    return sorted(arrivals, key=lambda a: a.t)


class Ring:
    """Consistent hashing with virtual nodes, keyed by session id."""

    def __init__(self, names: list[str], points: int = 100) -> None:
        self.points = points
        self._ring: list[tuple[int, str]] = []
        for name in names:
            self.add(name)

    def add(self, name: str) -> None:
        for v in range(self.points):
            bisect.insort(self._ring, (xxhash.xxh3_64_intdigest(f"{name}#{v}".encode()), name))

    def remove(self, name: str) -> None:
        self._ring = [point for point in self._ring if point[1] != name]

    def get(self, key: str) -> str:
        i = bisect.bisect(self._ring, (xxhash.xxh3_64_intdigest(key.encode()), ""))
        return self._ring[i % len(self._ring)][1]


def simulate(router: str, arrivals: list[Arrival], replicas: int, budget_tokens: int, prompts: int,
             crash_at: float, join_at: float, scale_at: float) -> Tally:  # fmt: skip
    names = [f"r{i}" for i in range(replicas)]
    pool = {name: Replica(name, budget_tokens) for name in names}
    everyone = {f"preset{p}" for p in range(prompts)}
    warms = router in ("kvchat", "one engine")  # presets warmed on every replica at start (and at a join)
    if warms:
        for replica in pool.values():
            replica.prefixes |= everyone
    ring = Ring(names)
    front = Front()
    last: dict[str, str] = {}  # session -> replica that served it last
    history: dict[str, int] = {}  # session -> tokens of its conversation so far
    first_served: dict[str, str] = {}  # prefix-affinity: system prompt -> first replica that served it
    done: list[tuple[float, str]] = []  # (finish time, replica)
    events = [(crash_at, "crash"), (join_at, "join"), (scale_at, "scale")]
    joined: set[str] = set()
    tally = Tally(router)
    victim, newcomer = names[replicas // 2], f"r{replicas}"
    for arrival in arrivals:
        while events and events[0][0] <= arrival.t:
            _, what = events.pop(0)
            if what == "crash":
                pool.pop(victim)
                ring.remove(victim)
            else:
                name = victim if what == "join" else newcomer
                pool[name] = Replica(name, budget_tokens, prefixes=set(everyone) if warms else set())
                ring.add(name)
                joined.add(name)
        while done and done[0][0] <= arrival.t:
            _, name = heapq.heappop(done)
            if name in pool:
                pool[name].running = max(0, pool[name].running - 1)
        held = history.get(arrival.session, 0)
        prompt = (held or SYSTEM_TOKENS) + TURN_TOKENS - REPLY_TOKENS
        chosen = _route(router, arrival, pool, ring, front, last, first_served, prompt, held)
        replica = pool[chosen]
        cached = _cached(replica, arrival, held)
        if held and cached < held:
            tally.lost_sessions.add(arrival.session)
        previous = last.get(arrival.session)
        if chosen in joined and previous in pool and previous != chosen:
            tally.moved_by_join += 1  # its replica is alive, yet it went to one that joined
        running = [r.running for r in pool.values()]
        mean = sum(running) / len(running)
        if mean >= 1:  # busy: at least one request per replica on average
            tally.imbalance.append(max(running) / mean)
        tally.requests += 1
        tally.prompt_tokens += prompt
        tally.cached_tokens += cached
        replica.running += 1
        heapq.heappush(done, (arrival.t + (prompt - cached) * PREFILL_S_PER_TOKEN + REPLY_TOKENS * STEP_S, chosen))
        history[arrival.session] = prompt + REPLY_TOKENS
        replica.hold(arrival.session, history[arrival.session])
        replica.prefixes.add(arrival.prefix)
        first_served.setdefault(arrival.prefix, chosen)
        last[arrival.session] = chosen
    return tally


def _cached(replica: Replica, arrival: Arrival, held: int) -> int:
    if held and arrival.session in replica.sessions:
        return held
    return SYSTEM_TOKENS if arrival.prefix in replica.prefixes else 0


def _route(router: str, arrival: Arrival, pool: dict[str, Replica], ring: Ring, front: Front,
           last: dict[str, str], first_served: dict[str, str], prompt: int, held: int) -> str:  # fmt: skip
    if router == "one engine":
        return next(iter(pool))
    if router == "consistent-hash":
        return ring.get(arrival.session)
    if router == "prefix-affinity":
        for candidate in (last.get(arrival.session), first_served.get(arrival.prefix)):
            if candidate in pool:
                return candidate
        return min(pool.values(), key=lambda r: (r.running, r.name)).name
    request = RouteRequest(arrival.session, prompt, arrival.prefix, SYSTEM_TOKENS, held)
    return front.route(request, [replica.state(arrival.t) for replica in pool.values()]).replica


ROUTERS = ("kvchat", "consistent-hash", "prefix-affinity")


def run(replicas: int = 64, sessions: int = 10_000, prompts: int = 4, duration_s: float = 1800,
        budget_tokens: int = 400_000, seed: int = 0) -> dict:  # fmt: skip
    arrivals = trace(sessions, prompts, duration_s, seed)
    times = {"crash_at": duration_s * 0.4, "join_at": duration_s * 0.5, "scale_at": duration_s * 0.7}
    rows = [simulate(name, arrivals, replicas, budget_tokens, prompts, **times).row() for name in ROUTERS]
    never = float("inf")
    ceiling = simulate("one engine", arrivals, 1, 10**12, prompts, never, never, never)
    return {"replicas": replicas, "sessions": sessions, "requests": len(arrivals), "prompts": prompts,
            "budget_tokens_per_replica": budget_tokens, **times, "one_engine_hit_ratio": ceiling.row()["token_hit_ratio"],
            "table": rows}  # fmt: skip


def markdown(result: dict) -> str:
    lines = [f"{result['replicas']} replicas, {result['sessions']:,} sessions ({result['requests']:,} requests) over "
             f"{result['prompts']} system prompts; one engine holding everything: hit ratio "
             f"{result['one_engine_hit_ratio']:.3f}", "",
             "| router | token hit ratio | sessions that lost their cache | follow-ups moved by a join | "
             "imbalance mean | imbalance p95 |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in result["table"]:
        lines.append(f"| {row['router']} | {row['token_hit_ratio']:.3f} | {row['sessions_lost_cache']:,} | "
                     f"{row['moved_by_join']:,} | {row['imbalance_mean']:.2f} | {row['imbalance_p95']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=64)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=1800, help="sessions start in the first 80%% of it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write routing.json here")
    args = parser.parse_args()
    result = run(args.replicas, args.sessions, args.prompts, args.duration_s, seed=args.seed)
    print(markdown(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "routing.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
