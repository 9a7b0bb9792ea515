"""The replica router's ranking (kvchat/router.py): pure, no model, no Ray."""

from dataclasses import replace

import pytest

from kvchat.router import ReplicaState, RouteRequest, rank


def replica(name, running=0, sessions=(), prefixes=(), healthy=True):
    return ReplicaState(name, running, 0, max_batch=16, sessions=frozenset(sessions), prefixes=frozenset(prefixes),
                        healthy=healthy)


def follow_up(session="s1", last=None):
    return RouteRequest(session, prompt_tokens=1_300, prefix="faq", prefix_tokens=1_169, cached_tokens=1_250,
                        last_replica=last)


def test_a_session_stays_on_the_replica_that_served_it_last_while_load_allows():
    replicas = [replica("r0", running=3, sessions={"s1"}, prefixes={"faq"}), replica("r1", prefixes={"faq"})]
    choice = rank(follow_up(last="r0"), replicas)
    assert (choice.replica, choice.reason) == ("r0", "last")
    assert choice.ranking == ("r0", "r1")


def test_after_a_crash_the_replica_that_holds_the_sessions_turns_wins():
    replicas = [replica("r0", healthy=False), replica("r1", prefixes={"faq"}), replica("r2", running=2, sessions={"s1"})]
    choice = rank(follow_up(last="r0"), replicas)
    assert (choice.replica, choice.reason) == ("r2", "session")
    assert "r0" not in choice.ranking


def test_a_new_session_goes_to_a_replica_holding_its_system_prompt_and_the_cheapest_of_them():
    replicas = [replica("r0"), replica("r1", running=5, prefixes={"faq"}), replica("r2", running=2, prefixes={"faq"})]
    choice = rank(RouteRequest("new", 1_200, prefix="faq", prefix_tokens=1_169), replicas)
    assert (choice.replica, choice.reason) == ("r2", "prefix")


def test_the_load_guard_overrides_affinity_only_for_a_full_replica_and_says_so():
    busy = replica("r0", running=17, sessions={"s1"}, prefixes={"faq"})  # a batch of 16 is full
    replicas = [busy, replica("r1"), replica("r2", running=8, prefixes={"faq"})]
    choice = rank(follow_up(last="r0"), replicas)
    assert choice.replica == "r2" and choice.reason == "prefix, load guard passed over last"
    assert rank(follow_up(last="r0"), [replace(busy, running=15), *replicas[1:]]).replica == "r0", "not full: it stays"
    near = [busy, replace(replicas[1], running=9), replace(replicas[2], running=9)]
    assert rank(follow_up(last="r0"), near).replica == "r0", "within half a batch of the least loaded: it stays"


def test_no_session_moves_when_a_replica_joins():
    before = [replica("r0", running=4, sessions={"a", "b"}, prefixes={"faq"}),
              replica("r1", running=3, sessions={"c"}, prefixes={"faq"})]  # fmt: skip
    joined = [*before, replica("r2")]
    last = {"a": "r0", "b": "r0", "c": "r1"}
    for session, where in last.items():
        assert rank(follow_up(session, last=where), joined).replica == where
    assert rank(RouteRequest("fresh", 50), joined).replica == "r2", "new work goes where it costs least"


def test_a_class_on_a_preset_warmed_everywhere_spreads_over_every_replica():
    replicas = {name: replica(name, prefixes={"faq"}) for name in ("r0", "r1", "r2")}
    for student in range(12):
        choice = rank(RouteRequest(f"student{student}", 1_200, prefix="faq", prefix_tokens=1_169), list(replicas.values()))
        state = replicas[choice.replica]
        replicas[choice.replica] = replace(state, running=state.running + 1)
    assert sorted(state.running for state in replicas.values()) == [4, 4, 4]


def test_without_a_healthy_replica_routing_refuses():
    with pytest.raises(ValueError, match="no healthy replica"):
        rank(follow_up(), [replica("r0", healthy=False)])


def test_the_routing_simulator_compares_the_routers_on_one_trace():
    from kvchat.bench import routing

    result = routing.run(replicas=8, sessions=600, prompts=3, duration_s=400)
    rows = {row["router"]: row for row in result["table"]}
    assert set(rows) == {"kvchat", "consistent-hash", "prefix-affinity"}
    assert all(row["requests"] == result["requests"] for row in rows.values())
    assert all(row["token_hit_ratio"] <= result["one_engine_hit_ratio"] for row in rows.values())
    assert rows["consistent-hash"]["moved_by_join"] > 0, "the ring takes sessions back when the replacement joins"
    assert rows["kvchat"]["moved_by_join"] == 0
    assert rows["prefix-affinity"]["imbalance_mean"] > rows["kvchat"]["imbalance_mean"], "one preset, one replica"


def test_the_front_remembers_the_last_replica_and_counts_what_it_sent_since_each_state():
    from kvchat.router import Front

    front = Front()
    states = [replica(f"r{i}", prefixes={"faq"}) for i in range(3)]  # one published state, seen 9 times
    chosen = [front.route(RouteRequest(f"s{i}", 1_200, prefix="faq", prefix_tokens=1_169), states).replica
              for i in range(9)]  # fmt: skip
    assert sorted(chosen.count(name) for name in ("r0", "r1", "r2")) == [3, 3, 3], "a burst spreads"
    again = front.route(follow_up("s4"), states)
    assert (again.replica, again.reason) == (chosen[4], "last")
    gone = [replace(state, healthy=state.replica != chosen[4]) for state in states]
    assert front.route(follow_up("s4"), gone).replica != chosen[4]
