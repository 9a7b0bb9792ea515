"""The KV manager's admit / fed / commit / free seam, without a model: buffers and runs are fakes
that count tokens, and every byte is `BYTES_PER_TOKEN` per position."""

import random

from kvchat.kv.manager import CASCADE_MIN_TOKENS, Allocation, KVManager
from kvchat.kv.scope import SHARED, owner_of
from kvchat.kv.tree import KVTree
from kvchat.records import Usage

BYTES_PER_TOKEN = 10


class FakeRun:
    def __init__(self, num_tokens):
        self.num_tokens = num_tokens

    @property
    def nbytes(self):
        return self.num_tokens * BYTES_PER_TOKEN

    def split(self, at):
        return FakeRun(at), FakeRun(self.num_tokens - at)


class FakeBuffer:
    keys = values = [None, None]  # two layers

    def __init__(self, capacity_tokens):
        self.capacity_tokens, self.num_tokens = capacity_tokens, 0

    @property
    def nbytes(self):
        return self.capacity_tokens * BYTES_PER_TOKEN

    def forward(self, num_tokens):  # what a forward does: writes the fed positions
        assert self.num_tokens + num_tokens <= self.capacity_tokens, "fed past what was reserved"
        self.num_tokens += num_tokens

    def append_run(self, run, num_tokens):
        self.forward(num_tokens)

    def as_run(self):
        return FakeRun(self.num_tokens)

    def take_run(self, num_tokens, start=0):
        return FakeRun(num_tokens)

    @staticmethod
    def transient_nbytes(num_tokens, bytes_per_token, layers):
        return 0


def manager(budget_tokens=10_000, in_place=True):
    tree = KVTree(budget_tokens * BYTES_PER_TOKEN)
    return KVManager(tree, FakeBuffer, BYTES_PER_TOKEN, context_tokens=4096, reads_runs_in_place=in_place)


def request(ids, session="alice", prefix_len=0, max_new_tokens=4):
    usage = Usage(ts=0.0, session="", model="fake", prompt_tokens=len(ids))
    return Allocation("scope", owner_of(session), list(ids), prefix_len, max_new_tokens, usage)


def serve(kv_manager, kv, reply):
    """What the scheduler does with an admitted request: feed the uncached prompt (the system
    prompt's chunk first, as `_compose` cuts it), then the reply; commit; free."""
    fed = kv.reused_tokens
    while fed < len(kv.token_ids):
        end = fed + kv.publish_room_tokens if kv.publishing else len(kv.token_ids)
        chunk = kv.token_ids[fed:end]
        kv.row(chunk).buffer.forward(len(chunk))
        kv_manager.fed(kv, chunk)
        fed += len(chunk)
    for token in reply[:-1]:  # the last sampled token is never fed
        kv.row([token]).buffer.forward(1)
        kv_manager.fed(kv, [token])
    kv_manager.commit(kv)
    kv_manager.free(kv)


def test_a_follow_up_reuses_its_own_turns_and_the_budget_holds_only_what_is_kept():
    m = manager()
    first = request(range(100))
    assert m.admit(first, others_running=False)
    assert first.reused_tokens == 0 and m.tree.running_bytes == (100 + 4) * BYTES_PER_TOKEN
    serve(m, first, reply=[500, 501, 502])
    assert m.tree.running_bytes == 0 and m.tree.node_bytes == 102 * BYTES_PER_TOKEN  # prompt + fed reply
    follow_up = request([*range(100), 500, 501, 502, 7, 8])
    assert m.admit(follow_up, others_running=False)
    assert follow_up.reused_tokens == 102 and follow_up.usage.cached_tokens == 102
    assert follow_up.usage.cache_source == "session"
    assert m.tree.node_bytes == 0, "its private turns moved into its buffer: stored once"
    other = request([*range(100), 500, 501, 502, 7, 8], session="bob")
    assert not m.tree.match("scope", (SHARED, other.owner), other.token_ids, 105).nodes, "bob cannot read alice's turns"


def test_a_system_prompt_is_published_once_and_read_in_place_by_the_next_session():
    m = manager()
    system = list(range(CASCADE_MIN_TOKENS + 44))
    first = request([*system, 1, 2, 3], prefix_len=len(system))
    assert m.admit(first, others_running=False) and first.publishing
    serve(m, first, reply=[9, 10])
    second = request([*system, 4, 5], session="bob", prefix_len=len(system))
    assert m.admit(second, others_running=False)
    assert second.reused_tokens == len(system) and second.usage.cache_source == "prefix"
    assert [n.owner for n in second.nodes] == [SHARED] and not second.inline  # read by reference
    assert second.nodes[0].pins == 1
    m.free(second)
    assert second.nodes == [] and m.tree.running_bytes == 0


def test_a_short_shared_run_is_copied_into_the_buffer_and_the_compatible_path_always_copies():
    for in_place, short in ((True, True), (False, False)):
        m = manager(in_place=in_place)
        system = list(range(20 if short else CASCADE_MIN_TOKENS + 10))
        first = request([*system, 1], prefix_len=len(system))
        assert m.admit(first, others_running=False) and first.usage.cached_tokens == 0
        serve(m, first, reply=[2])
        second = request([*system, 3], session="bob", prefix_len=len(system))
        assert m.admit(second, others_running=False)
        assert second.inline and second.inline_tokens == len(system)
        assert second.row([3]).runs == [], "the row reads its own buffer only"


def test_a_request_that_does_not_fit_changes_nothing_and_waits_only_while_room_may_come():
    m = manager(budget_tokens=150)
    running = request(range(100))
    assert m.admit(running, others_running=False)
    used = m.tree.used_bytes
    waiting = request(range(200, 260), session="bob")
    assert not m.admit(waiting, others_running=True)
    assert m.tree.used_bytes == used and waiting.buffer is None and waiting.nodes == []
    assert m.room_may_come(others_running=True)
    assert not m.room_may_come(others_running=False), "alone, nothing will ever make room: refuse it"


def test_random_requests_never_exceed_the_budget_and_leave_nothing_reserved():
    rng = random.Random(3)
    m = manager(budget_tokens=600)
    system = list(range(1000, 1000 + CASCADE_MIN_TOKENS))
    histories = {name: [] for name in "abcdef"}
    admitted = reused = 0
    for step in range(200):
        name = rng.choice(list(histories))
        turn = [rng.randrange(50) for _ in range(rng.randrange(1, 40))]
        ids = [*system, *histories[name], *turn] if rng.random() < 0.5 else [*histories[name], *turn]
        kv = request(ids, session=name, prefix_len=len(system) if ids[:1] == system[:1] else 0)
        if not m.admit(kv, others_running=False):
            continue
        admitted, reused = admitted + 1, reused + kv.reused_tokens
        assert m.tree.used_bytes <= m.tree.budget_bytes
        reply = [rng.randrange(50) for _ in range(3)]
        serve(m, kv, reply)
        histories[name] = [*ids, *reply[:-1]][len(system) if ids[:1] == system[:1] else 0 :]
        assert m.tree.running_bytes == 0 and m.tree.used_bytes <= m.tree.budget_bytes
        assert all(node.pins == 0 for node in m.tree.nodes())
    assert admitted > 100 and reused > 0 and m.tree.evictions > 0, "the replay must reuse and evict"
