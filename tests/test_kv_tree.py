"""The tree's rules, without a model: payloads are strings, bytes are given."""

import random

import pytest

from kvchat.kv.scope import SHARED, STATELESS, owner_of, owners_for
from kvchat.kv.node import display_key
from kvchat.kv.tree import KVTree


def tree(budget=1_000, clock=None):
    ticks = iter(range(1, 10**6))
    return KVTree(budget, clock=clock or (lambda: next(ticks)))


def test_match_walks_whole_nodes_and_reports_a_partial_one():
    t = tree()
    system = t.insert("s", SHARED, None, [1, 2, 3], "sys", 30)
    turn = t.insert("s", owner_of("alice"), system, [4, 5, 6], "turn", 30)
    match = t.match("s", owners_for("alice"), [1, 2, 3, 4, 5, 9], limit=6)
    assert match.nodes == [system] and match.num_tokens == 3
    assert (match.partial, match.partial_tokens) == (turn, 2)
    assert t.match("s", owners_for("alice"), [1, 2, 3, 4, 5, 6, 7], limit=5).partial_tokens == 2  # limit holds
    assert t.match("s", owners_for("alice"), [7, 1], limit=2).num_tokens == 0


def test_owners_and_scopes_decide_who_reads_what():
    t = tree()
    system = t.insert("s", SHARED, None, [1, 2], "sys", 20)
    t.insert("s", owner_of("alice"), system, [3, 4], "alice's turn", 20)
    t.insert("s", STATELESS, system, [3, 4], "an API client's turn", 20)
    assert t.match("s", owners_for("alice"), [1, 2, 3, 4, 5], 5).nodes[-1].payload == "alice's turn"
    assert t.match("s", owners_for("bob"), [1, 2, 3, 4, 5], 5).num_tokens == 2  # only the system prompt
    assert t.match("s", owners_for(None), [1, 2, 3, 4, 5], 5).nodes[-1].payload == "an API client's turn"
    assert t.match("other-salt", owners_for("alice"), [1, 2, 3, 4, 5], 5).num_tokens == 0


def test_an_identical_run_is_stored_once():
    t = tree()
    first = t.insert("s", SHARED, None, [1, 2, 3], "a", 30)
    again = t.insert("s", SHARED, None, [1, 2, 3], "b", 30)
    assert again is first and t.node_bytes == 30


def test_eviction_takes_least_recently_used_unpinned_leaves_first():
    t = tree(budget=100)
    system = t.insert("s", SHARED, None, [1], "sys", 40)
    old = t.insert("s", owner_of("alice"), system, [2], "old", 20)
    new = t.insert("s", owner_of("bob"), system, [3], "new", 20)
    t.touch([old])  # alice's turn is now more recent than bob's
    evicted = t.make_room(30)
    assert [e.key for e in evicted] == [f"session:{id(new) & 0xFFFFFF:06x}"]
    t.pin([system, old])
    assert t.make_room(50) is None  # 60 pinned + 50 > 100: nothing is evicted
    assert t.node_bytes == 60 and t.evictions == 1 and t.refused == 1
    t.unpin([old])
    assert [e.nbytes for e in t.make_room(50)] == [20]  # the leaf goes; the pinned parent stays
    assert t.match("s", owners_for("alice"), [1, 2], 2).num_tokens == 1


def test_a_parent_is_evicted_only_after_its_children():
    t = tree(budget=100)
    system = t.insert("s", SHARED, None, [1], "sys", 50)
    t.touch([system])
    t.insert("s", owner_of("alice"), system, [2], "turn", 50)  # newer than the system prompt, yet its child
    evicted = t.make_room(60)
    assert [e.key.split(":")[0] for e in evicted] == ["session", "prefix"]


def test_running_reservations_count_against_the_budget():
    t = tree(budget=100)
    t.insert("s", SHARED, None, [1], "sys", 40)
    assert t.make_room(60) == []
    t.reserve(60)
    assert t.used_bytes == 100
    assert [e.nbytes for e in t.make_room(10)] == [40]  # idle nodes make way for a running request
    assert t.make_room(50) is None
    t.release(60)
    assert t.used_bytes == 0


def test_split_keeps_the_children_under_the_tail():
    t = tree()
    node = t.insert("s", SHARED, None, [1, 2, 3, 4], "abcd", 40)
    child = t.insert("s", owner_of("alice"), node, [5], "e", 10)
    head = t.split(node, 2, lambda payload: (payload[:2], 20, payload[2:], 20))
    match = t.match("s", owners_for("alice"), [1, 2, 3, 4, 5, 6], 6)
    assert [n.payload for n in match.nodes] == ["ab", "cd", "e"] and match.nodes[0] is head
    assert match.nodes[2] is child and t.node_bytes == 50


def test_drop_owner_removes_only_that_sessions_unpinned_turns():
    t = tree()
    system = t.insert("s", SHARED, None, [1], "sys", 10)
    first = t.insert("s", owner_of("alice"), system, [2], "a1", 10)
    t.insert("s", owner_of("alice"), first, [3], "a2", 10)
    t.insert("s", owner_of("bob"), system, [2], "b1", 10)
    assert t.drop_owner(owner_of("alice")) == 2
    assert {info.kind for info in t.entries()} == {"prefix", "session"} and t.node_bytes == 20
    assert not t.has_owner(owner_of("alice")) and t.has_owner(owner_of("bob"))


def test_entries_count_the_sessions_under_each_prefix():
    t = tree()
    system = t.insert("s", SHARED, None, [1], "sys", 10)
    for name in ("alice", "bob", "carol"):
        t.insert("s", owner_of(name), system, [2], name, 10)
    t.insert("s", STATELESS, system, [3], "api", 10)
    prefix = next(info for info in t.entries() if info.kind == "prefix")
    assert prefix.sessions == 4 and prefix.depth_tokens == 1


def test_random_operations_never_exceed_the_budget_or_evict_a_pinned_node():
    rng = random.Random(7)
    t = tree(budget=1_000)
    pinned = []
    for step in range(3_000):
        action = rng.random()
        if action < 0.5:
            match = t.match("s", owners_for("x"), [rng.randrange(4) for _ in range(4)], 4)
            parent = match.nodes[-1] if match.nodes else None
            size = rng.randrange(1, 300)
            if t.make_room(size, keep=match.nodes) is not None:  # the parent must survive
                t.insert("s", owner_of("x"), parent, [rng.randrange(4)], step, size)
        elif action < 0.7 and len(pinned) < 3:
            nodes = t.nodes()
            if nodes:
                node = rng.choice(nodes)
                t.pin([node])
                pinned.append(node)
        elif action < 0.9 and pinned:
            t.unpin([pinned.pop(rng.randrange(len(pinned)))])
        else:
            size = rng.randrange(1, 200)
            if t.make_room(size) is not None:
                t.reserve(size)
                t.release(size)
        assert t.used_bytes <= t.budget_bytes
        live = {id(n) for n in t.nodes()}
        assert all(id(node) in live for node in pinned)  # never evicted under a running request
        assert t.node_bytes == sum(n.nbytes for n in t.nodes() if n.in_memory)


def test_inserting_under_an_evicted_node_is_refused():
    t = tree(budget=100)
    system = t.insert("s", SHARED, None, [1], "sys", 60)
    t.make_room(60)
    with pytest.raises(ValueError, match="left the tree"):
        t.insert("s", owner_of("alice"), system, [2], "turn", 10)


def test_no_session_id_can_name_the_shared_or_stateless_owner():
    assert owner_of("") != SHARED and owner_of(STATELESS) != STATELESS
    assert owners_for(None) == (SHARED, STATELESS)


def test_bad_budget_is_refused():
    with pytest.raises(ValueError):
        KVTree(-1)


# --- two tiers: memory and disk ---


def stored(t, node, key="k"):
    """What the disk tier does once a node's file is complete."""
    assert t.make_disk_room(node.nbytes) is not None
    assert t.start_write(node, f"{key}{id(node)}")
    t.write_done(node, ok=True)


def test_memory_eviction_demotes_a_stored_run_which_stays_matchable_and_comes_back():
    forgotten = []
    t = KVTree(100, clock=iter(range(1, 10**6)).__next__, disk_budget_bytes=1_000, on_forget=forgotten.append)
    system = t.insert("s", SHARED, None, [1, 2], "sys", 60)
    stored(t, system)
    evicted = t.make_room(80)
    assert [(e.demoted, e.tier) for e in evicted] == [(True, "memory")]
    assert t.node_bytes == 0 and t.disk_bytes == 60 and not system.in_memory
    match = t.match("s", owners_for("alice"), [1, 2, 3], 3)
    assert match.nodes == [system] and match.on_disk_only == [system]
    t.promote(system, "sys again")
    assert t.node_bytes == 60 and system.in_memory and forgotten == []


def test_a_run_still_being_written_is_not_demoted_and_an_unstored_one_is_dropped():
    t = KVTree(100, clock=iter(range(1, 10**6)).__next__, disk_budget_bytes=1_000)
    system = t.insert("s", SHARED, None, [1], "sys", 60)
    assert t.start_write(system, "key")
    assert t.make_room(80) is None  # its bytes are still needed by the writer
    t.write_done(system, ok=False)  # disk full: no copy
    assert t.disk_bytes == 0
    assert [e.demoted for e in t.make_room(80)] == [False]
    assert t.match("s", owners_for(None), [1, 2], 2).num_tokens == 0


def test_disk_budget_drops_disk_leaves_first_and_forgets_their_files():
    forgotten = []
    t = KVTree(1_000, clock=iter(range(1, 10**6)).__next__, disk_budget_bytes=100, on_forget=forgotten.append)
    system = t.insert("s", SHARED, None, [1], "sys", 40)
    turn = t.insert("s", owner_of("alice"), system, [2], "turn", 40)
    stored(t, system), stored(t, turn)
    t.touch([turn])  # the leaf is newer, yet the parent's copy must outlive it
    evicted = t.make_disk_room(50)
    assert [e.tier for e in evicted] == ["disk"] and forgotten == [f"k{id(turn)}"]
    assert turn.in_memory and turn.disk == "" and system.disk == "stored"
    assert t.make_disk_room(200) is None  # more than the whole budget: nothing dropped
    assert system.disk == "stored"


def test_a_run_only_on_disk_leaves_the_tree_when_its_copy_goes():
    t = KVTree(50, clock=iter(range(1, 10**6)).__next__, disk_budget_bytes=50, on_forget=lambda key: None)
    system = t.insert("s", SHARED, None, [1], "sys", 40)
    stored(t, system)
    t.make_room(50)  # demoted
    t.make_disk_room(50)
    assert t.match("s", owners_for(None), [1, 2], 2).num_tokens == 0 and t.disk_bytes == 0


def test_split_and_removal_forget_stale_copies():
    forgotten = []
    t = KVTree(1_000, clock=iter(range(1, 10**6)).__next__, disk_budget_bytes=1_000, on_forget=forgotten.append)
    system = t.insert("s", SHARED, None, [1, 2, 3, 4], "abcd", 40)
    stored(t, system)
    t.split(system, 2, lambda p: (p[:2], 20, p[2:], 20))
    assert forgotten == [f"k{id(system)}"] and t.disk_bytes == 0  # neither half matches the old file
    turn = t.insert("s", owner_of("alice"), system, [5], "turn", 10)
    stored(t, turn)
    t.remove(turn)
    assert forgotten[-1] == f"k{id(turn)}" and t.disk_bytes == 0


def test_restored_runs_hang_under_their_parents_on_disk_only():
    t = KVTree(1_000, disk_budget_bytes=1_000)
    system = t.insert_stored("s", SHARED, None, [1, 2], 20, "a", created_s=1.0, last_used_s=5.0, hits=3)
    t.insert_stored("s", owner_of("alice"), system, [3], 10, "b", created_s=2.0, last_used_s=6.0, hits=1)
    match = t.match("s", owners_for("alice"), [1, 2, 3, 4], 4)
    assert match.num_tokens == 3 and len(match.on_disk_only) == 2
    assert t.node_bytes == 0 and t.disk_bytes == 30


def test_idle_conversations_expire_but_system_prompts_and_pins_stay():
    now = [0.0]
    t = KVTree(1_000, clock=lambda: now[0])
    system = t.insert("s", SHARED, None, [1], "sys", 10)
    t.insert("s", owner_of("alice"), system, [2], "old turn", 10)
    pinned = t.insert("s", owner_of("bob"), system, [3], "running", 10)
    t.pin([pinned])
    now[0] = 100.0
    fresh = t.insert("s", owner_of("carol"), system, [4], "new turn", 10)
    assert t.drop_idle(50.0) == 1
    assert {n.payload for n in t.nodes()} == {"sys", "running", "new turn"} and fresh.parent is system
    assert t.clear() == 1 and {n.payload for n in t.nodes()} == {"sys", "running"}  # system: above a pin


# --- eviction policies ---


def policy_tree(name, budget=100):
    from kvchat.kv.eviction import policy_named

    return KVTree(budget, clock=iter(range(1, 10**6)).__next__, policy=policy_named(name))


def first_victim(t, nbytes=20):
    return [e.key for e in t.make_room(nbytes)][0]


def key_of(node):
    return f"{node.kind}:{id(node) & 0xFFFFFF:06x}"


def test_lfu_fifo_and_lru_2_choose_their_own_victims():
    for name, expected in (("lru", "b"), ("lfu", "a"), ("fifo", "a"), ("lru-2", "a")):
        t = policy_tree(name)
        a = t.insert("s", owner_of("a"), None, [1], "a", 45)  # oldest, used once more early on
        b = t.insert("s", owner_of("b"), None, [2], "b", 45)
        t.touch([b]), t.touch([b]), t.touch([a])  # b: 2 hits, a: 1 hit but used last
        victim = {key_of(a): "a", key_of(b): "b"}[first_victim(t)]
        assert victim == expected, name


def test_gdsf_keeps_deep_runs_whose_recompute_costs_more_per_byte():
    t = policy_tree("gdsf", budget=1_000_000)
    system = t.insert("s", SHARED, None, list(range(2_000)), "sys", 200_000)
    t.pin([system])
    deep = t.insert("s", owner_of("a"), system, list(range(2_000, 2_100)), "deep", 10_000)
    shallow = t.insert("s", owner_of("b"), None, list(range(5_000, 5_100)), "shallow", 10_000)
    t.touch([deep]), t.touch([shallow])
    assert first_victim(t, 800_000) == key_of(shallow)  # LRU would take `deep`, the older one
    assert t.inflation > 0  # the clock rose to the victim's value: old value fades


class WalkingTree(KVTree):
    """The oracle: each victim found by a walk over the whole tree, the lowest `policy` among the
    nodes eviction may take once the ones chosen before it are gone (what the tree did before its
    heap)."""

    def _choose(self, victims, need, verdict, above):
        chosen, gone = [], set()
        while need > 0:
            candidates = [node for node in self.nodes() if verdict(node, gone) == "victim"]
            if not candidates:
                return None
            chosen.append(min(candidates, key=self.policy))
            gone.add(id(chosen[-1]))
            need -= chosen[-1].nbytes
        for node in chosen:
            self.inflation = max(self.inflation, self.policy(node)[0])
        return chosen


@pytest.mark.parametrize("name", ["lru", "lfu", "fifo", "lru-2", "gdsf"])
def test_the_victim_heap_evicts_exactly_what_a_walk_of_the_whole_tree_would(name):
    from kvchat.kv.eviction import policy_named

    def replay(kind):
        rng, ticks = random.Random(7), iter(range(1, 10**6))
        t = kind(600, clock=lambda: next(ticks), policy=policy_named(name), disk_budget_bytes=400,
                 on_forget=lambda key: None)
        states, pinned, writing = [], [], []
        for step in range(1500):
            action = rng.random()
            match = t.match("s", owners_for("x"), [rng.randrange(3) for _ in range(5)], 5)
            if action < 0.1:
                t.touch(match.nodes + ([match.partial] if match.partial is not None else []))  # reused, nothing new
            elif action < 0.45:
                parent = match.nodes[-1] if match.nodes else None
                size = rng.randrange(1, 120)
                t.touch(match.nodes)
                if t.make_room(size, keep=match.nodes) is not None:
                    node = t.insert("s", owner_of("x"), parent, [rng.randrange(3), step], f"run {step}", size)
                    if rng.random() < 0.5 and t.make_disk_room(size, keep=[node]) is not None:
                        if t.start_write(node, f"key {step}"):
                            writing.append(node)  # the writer finishes it (or fails) later
            elif action < 0.52 and writing:
                t.write_done(writing.pop(rng.randrange(len(writing))), ok=rng.random() < 0.8)
            elif action < 0.55:
                t.make_disk_room(rng.randrange(1, 300))
            elif action < 0.62 and match.partial is not None and match.partial.in_memory and not match.partial.pins:
                t.split(match.partial, match.partial_tokens, lambda p: (p + " head", 1, p + " tail", 1))
            elif action < 0.7 and len(pinned) < 3:
                nodes = [n for n in t.nodes() if n.in_memory]
                if nodes:
                    pinned.append(rng.choice(nodes))
                    t.pin([pinned[-1]])
            elif action < 0.8 and pinned:
                t.unpin([pinned.pop(rng.randrange(len(pinned)))])
            elif action < 0.85:
                t.drop_idle(rng.randrange(50, 400))
            else:
                t.make_room(rng.randrange(1, 400))
            states.append(sorted((n.payload or "", n.disk) for n in t.nodes()))
        return states, t.evictions, t.disk_evictions, t.refused

    heap, walk = replay(KVTree), replay(WalkingTree)
    assert heap[1] > 50 and heap[2] > 5 and heap[3] > 5, "the replay must evict from both tiers, and refuse"
    assert heap == walk


def test_a_stored_run_becomes_a_disk_victim_again_when_the_copies_below_it_go():
    """A run the disk heap passed over (a copy below it) is found again when that copy fails to
    be written, or leaves with a run dropped from memory."""
    t = KVTree(10_000, clock=iter(range(1, 10**6)).__next__, disk_budget_bytes=300, on_forget=lambda key: None)

    def stored(parent, ids, nbytes):
        node = t.insert("s", SHARED, parent, ids, f"run {ids}", nbytes)
        assert t.start_write(node, f"key {ids}")
        t.write_done(node, ok=True)
        return node

    old, newer = stored(None, [1], 100), stored(None, [9], 100)
    below = t.insert("s", SHARED, old, [2], "being written", 100)
    assert t.start_write(below, "key [2]")
    assert [e.key for e in t.make_disk_room(100)] == [display_key(newer)]  # `old` is passed over
    t.write_done(below, ok=False)
    assert [e.key for e in t.make_disk_room(250)] == [display_key(old)]

    t = KVTree(10_000, clock=iter(range(1, 10**6)).__next__, disk_budget_bytes=300, on_forget=lambda key: None)
    top, other = stored(None, [1], 100), stored(None, [9], 100)
    middle = t.insert("s", SHARED, t.insert("s", SHARED, top, [2], "no copy", 10), [3], "no copy either", 10)
    deep = stored(middle, [4], 100)
    assert [e.key for e in t.make_disk_room(100)] == [display_key(other)]  # `top` is passed over
    t.budget_bytes = t.node_bytes  # room in memory now means evicting
    t.make_room(110, keep=[top, other])  # `deep` is demoted, then `middle` dropped: `deep`'s copy goes
    assert deep.parent is None and not top.children[0].children
    assert [e.key for e in t.make_disk_room(250)] == [display_key(top)]
