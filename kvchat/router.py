"""Which engine replica serves a request: by what each replica holds, with a guard on load.

Pure and torch-free: it ranks replicas from the states they publish (`ReplicaState`) and what the
front knows of the request (`RouteRequest`), so its rules are testable, and a routing simulator
can drive it with thousands of replicas and no model. Every request carries its whole conversation,
so any replica serves it exactly; routing only decides how much of it is already cached there.

In order of preference:
1. the replica that served this session last (the front remembers it): its turns are there;
2. a replica that says it holds the session's turns (in memory or on disk);
3. a replica holding its system prompt;
4. otherwise the lowest estimated cost: queue wait plus the prefill it would do there.
A preferred replica is passed over only when it is full (a new request would queue behind
`max_batch` others) and busier than the least loaded replica by more than `slack` requests (half a
batch by default). Sized to a batch: a replica decodes up to `max_batch` requests in one forward, so
a few more cost little, while moving a conversation costs a prefill of all of it. Among equals, the cheapest wins, so a
class on one shared preset, warmed everywhere, spreads over every replica instead of piling onto
one (what SGLang's cache-aware router and Ray Serve LLM's prefix affinity do by default).
A replica that joins takes no session from another unless the guard says so: the first two rules
hold wherever a session already is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

DEFAULT_SLACK = None  # None: half of the preferred replica's batch


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """What a replica publishes about itself (about once a second)."""

    replica: str
    running: int  # requests in its batch
    waiting: int  # requests in its queue
    max_batch: int
    sessions: frozenset[str] = frozenset()  # hashed owners whose turns it holds (memory or disk)
    prefixes: frozenset[str] = frozenset()  # keys of the system prompts it holds
    step_ms: float = 100.0  # one forward of its batch, recently
    prefill_ms_per_token: float = 2.0
    healthy: bool = True

    @property
    def load(self) -> int:
        return self.running + self.waiting

    def queue_ms(self) -> float:
        """About how long a new request waits for a slot: whole replies ahead of it, in steps."""
        behind = max(0, self.load + 1 - self.max_batch)
        return behind * self.step_ms


@dataclass(frozen=True, slots=True)
class RouteRequest:
    session: str  # the hashed session owner (a stateless request: a hash of its salt and first messages)
    prompt_tokens: int
    prefix: str | None = None  # its system prompt's key, when it has one
    prefix_tokens: int = 0
    cached_tokens: int = 0  # what its session's replica holds of it (the front's estimate)
    last_replica: str | None = None  # the replica that served this session last


@dataclass(frozen=True, slots=True)
class Choice:
    replica: str
    reason: str  # "last", "session", "prefix", "cost", or "<rule>, load guard" when affinity gave way
    ranking: tuple[str, ...] = field(default=())  # every healthy replica, best first (for retries)


def uncached_tokens(request: RouteRequest, state: ReplicaState) -> int:
    """Tokens the replica would prefill for `request`, from what it says it holds."""
    if request.session in state.sessions or request.last_replica == state.replica:
        return max(1, request.prompt_tokens - request.cached_tokens)
    if request.prefix is not None and request.prefix in state.prefixes:
        return request.prompt_tokens - request.prefix_tokens
    return request.prompt_tokens


def cost_ms(request: RouteRequest, state: ReplicaState) -> float:
    """Estimated time to the first token there: waiting for a slot, then the prefill."""
    return state.queue_ms() + uncached_tokens(request, state) * state.prefill_ms_per_token


def overloaded(state: ReplicaState, least_load: int, slack: int | None = DEFAULT_SLACK) -> bool:
    """Whether affinity to `state` gives way: it is full and busier than the least loaded by more
    than `slack` (None: half its batch)."""
    margin = state.max_batch // 2 if slack is None else slack
    return state.load >= state.max_batch and state.load - least_load > margin


def rank(request: RouteRequest, replicas: Sequence[ReplicaState], slack: int | None = DEFAULT_SLACK) -> Choice:
    """The replica for `request` and why, with every healthy replica ranked for a retry.
    ValueError when no replica is healthy."""
    healthy = [state for state in replicas if state.healthy]
    if not healthy:
        raise ValueError("no healthy replica")
    least = min(state.load for state in healthy)
    by_cost = sorted(healthy, key=lambda state: (cost_ms(request, state), state.load, state.replica))
    rules = (
        ("last", lambda state: state.replica == request.last_replica),
        ("session", lambda state: request.session in state.sessions),
        ("prefix", lambda state: request.prefix is not None and request.prefix in state.prefixes),
    )
    guarded = ""
    for name, holds in rules:
        candidates = [state for state in by_cost if holds(state)]
        if not candidates:
            continue
        fit = [state for state in candidates if not overloaded(state, least, slack)]
        if fit:
            return _choice(fit[0], name + guarded, by_cost)
        guarded = guarded or f", load guard passed over {name}"
    return _choice(by_cost[0], "cost" + guarded, by_cost)


def _choice(state: ReplicaState, reason: str, by_cost: list[ReplicaState]) -> Choice:
    ranking = (state.replica, *(other.replica for other in by_cost if other is not state))
    return Choice(state.replica, reason, ranking)


class Front:
    """What the front keeps between requests: the replica that served each session last, and how
    many requests it sent each replica since that replica's last published state. A state is up to
    a second old; counting what was sent since keeps a burst of new sessions from all going to the
    replica that looked least loaded a second ago."""

    def __init__(self, slack: int | None = DEFAULT_SLACK) -> None:
        self.slack = slack
        self.last: dict[str, str] = {}
        self._sent: Counter[str] = Counter()
        self._seen: dict[str, ReplicaState] = {}

    def route(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> Choice:
        """`rank` with the session's last replica filled in and the requests sent since each state."""
        adjusted = []
        for state in replicas:
            if self._seen.get(state.replica) is not state:  # a new state counts what it has itself
                self._seen[state.replica], self._sent[state.replica] = state, 0
            adjusted.append(replace(state, waiting=state.waiting + self._sent[state.replica]))
        last = self.last.get(request.session)
        alive = any(state.replica == last and state.healthy for state in replicas)
        choice = rank(replace(request, last_replica=last if alive else None), adjusted, self.slack)
        self._sent[choice.replica] += 1
        self.last[request.session] = choice.replica
        return choice
