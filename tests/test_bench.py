"""The bench's machinery on the tiny model: its measurements must catch what they claim to catch."""

import json
import time

import pytest
import torch

from kvchat import Engine
from kvchat.kv.attention import kv_layout
from kvchat.kv.runs import bytes_per_token
from kvchat.bench import Plan, report, run, systems, workloads
from kvchat.bench import __main__ as bench_main
from kvchat.bench.meter import ModelMeter
from kvchat.bench.oracle import Oracle, render_ids

TINY = Plan(points=(150, 400), follow_ups=2, recompute_repeats=1, shared_colds=3, shared_warm=2, new_tokens=4,
            decode_tokens=6, decode_repeats=1, pressure_sessions=5, pressure_exact=2, long_lengths=(4, 24),
            long_repeats=1, visitor_counts=(1, 3), capacity_sessions=4, restart_repeats=2, restart_tokens=600, return_sessions=3,
            preset_repeats=1, policy_visitors=6)  # fmt: skip
SYSTEM = {"role": "system", "content": "You are the helpdesk of a planetarium. " * 6}


def user(text):
    return {"role": "user", "content": text}


@pytest.fixture
def bench(tiny_loaded):
    engine = Engine(tiny_loaded, cache_budget_bytes=2**26)
    meter = ModelMeter(tiny_loaded.model)
    yield workloads.Bench(engine, systems.Kvchat(engine, "main"), systems.Recompute(engine), systems.Floor(engine),
                          [], new_tokens=4, meter=meter)  # fmt: skip
    meter.close()
    engine.close()


def test_quick_bench_on_the_tiny_model_writes_consistent_results(tiny_loaded, tmp_path):
    results = run(tiny_loaded, TINY, peers=["llama-cpp"], quick=True, out=tmp_path,
                  startup_times=lambda: {"startup_s": 1.5, "first_page_s": 0.2, "app_page_s": 6.0, "app_ready_s": 9.0})
    written = report.write_all(tmp_path, results)
    assert [p.name for p in written] == ["results.json", "results.md", "ttft.png", "policies.png"]
    loaded = json.loads((tmp_path / "results.json").read_text())
    summary = loaded["summary"]
    assert set(summary) == set(report.TARGETS)
    peerless = {"visitors_8_over_llama_cpp"}  # needs the llama-cpp peer, not installed for the tests
    assert all(isinstance(v, (int, float)) for k, v in summary.items() if k not in peerless), summary
    assert summary["exact_match"] == 1.0  # greedy fp32 replies equal plain generate
    assert summary["cached_tokens_mismatches"] == 0 and loaded["flagged"] == []
    assert summary["speedup_shared_prefix"] > 1 and summary["speedup_followup_2k"] > 1
    # every workload but the evicting one reuses all an ideal cache could; under pressure, less
    by_workload = {(g["workload"], g["system"], g["point"]): g for g in loaded["groups"]}
    assert by_workload[("multi_turn", "kvchat", "400")]["oracle_ratio"] == 1.0
    assert by_workload[("shared_prefix", "kvchat", "warm")]["oracle_ratio"] == 1.0
    assert by_workload[("budget_pressure", "kvchat", "turn2")]["oracle_ratio"] < 1.0
    assert summary["hit_ratio_vs_oracle"] < 1.0
    cold = [r for r in loaded["rows"] if (r["workload"], r["system"], r["point"]) == ("shared_prefix", "kvchat", "cold")]
    # fresh variants share only their first few tokens ("<|im_start|>system\nDesk"): that much is reused
    assert len(cold) == 3 and all(r["prompt_tokens"] - r["prefilled_tokens"] == r["oracle_tokens"] < 10 for r in cold)
    for point in ("150", "400"):
        assert by_workload[("multi_turn", "kvchat", point)]["prefilled_tokens"] < \
            by_workload[("multi_turn", "recompute", point)]["prefilled_tokens"]  # fmt: skip
    # held bytes were sampled at every forward of every kvchat request
    kvchat_rows = [r for r in loaded["rows"] if r["system"] == "kvchat" and r["workload"] != "visitors"]
    assert all(r["held_samples"] >= 1 + r["new_tokens"] for r in kvchat_rows)
    crowd = loaded["visitors"]["table"]
    assert [t["visitors"] for t in crowd] == [1, 3] and crowd[1]["mean_batch"] > 1
    assert summary["budget_violations"] == 0 and 0 <= summary["sessions_kept_256mib"] <= 1
    assert any(why in loaded["skipped"]["llama-cpp"] for why in ("not installed", "needs the bundled GGUF"))
    assert "## Summary" in (tmp_path / "results.md").read_text()
    # the disk tier: a restarted engine serves the follow-up from disk, exactly, counted at the model
    assert summary["restart_exact"] == 1.0 and loaded["restart"]["same_text_memory_and_disk"]
    restarted = by_workload[("restart", "kvchat", "disk")]
    assert restarted["prefilled_tokens"] < 60 and restarted["hit_ratio"] > 0.9
    returned = by_workload[("return_after_eviction", "kvchat", "with disk")]
    assert returned["hit_ratio"] > by_workload[("return_after_eviction", "kvchat", "memory only")]["hit_ratio"]
    assert by_workload[("preset_first_visitor", "kvchat", "warmed from disk")]["hit_ratio"] > 0.9
    assert by_workload[("preset_first_visitor", "kvchat", "cold")]["prefilled_tokens"] > 1000
    policies = loaded["policies"]["table"]
    assert {t["policy"] for t in policies} == {"lru", "lfu", "fifo", "lru-2", "gdsf"}
    assert all(t["token_hit_ratio"] <= policies[0]["token_hit_ratio"] for t in policies)  # none beats no eviction
    assert (tmp_path / "policy-trace.json").is_file() and "Eviction policies" in (tmp_path / "results.md").read_text()


def test_meter_counts_reuse_at_the_model_and_flags_a_false_claim(bench):
    messages = [SYSTEM, user("When does the dome open?")]
    bench.ask_kvchat("t", "first", "alice", messages)
    _, honest = bench.ask_kvchat("t", "second", "bob", [SYSTEM, user("Is there a cafe?")])
    assert honest.model_cached_tokens == bench.engine.encode(messages).prefix_len > 20
    assert not honest.claim_differs and honest.wrong_ids == 0

    class Boasting(systems.Kvchat):
        """Claims every prompt token came from cache."""

        def reply(self, session, messages, max_new_tokens):
            turn = super().reply(session, messages, max_new_tokens)
            turn.prefilled_tokens = 0
            return turn

    _, boast = bench.ask_kvchat("t", "third", "carol", [SYSTEM, user("Can I bring a dog?")],
                                system=Boasting(bench.engine, "main"))  # fmt: skip
    assert boast.claim_differs
    assert report.flagged(bench.rows) == [{"workload": "t", "point": "third", "model_cached_tokens": honest.model_cached_tokens,
                                           "claimed_cached_tokens": boast.prompt_tokens, "wrong_ids": 0}]  # fmt: skip


def test_meter_samples_running_requests_and_catches_bytes_the_ledger_misses(tiny_loaded, bench):
    """The meter counts every tensor reachable from the engine at every forward, so running
    buffers are in its samples, and so is a stray tensor no ledger knows about."""
    per_token = bytes_per_token(kv_layout(tiny_loaded.model), tiny_loaded.device, tiny_loaded.dtype)
    messages = [SYSTEM, user("Tell me about comets.")]
    budget = per_token * (len(bench.prompt_ids(messages)) + 4)  # this request alone fills it
    small = systems.Kvchat(Engine(tiny_loaded, cache_budget_bytes=budget), "small")
    _, row = bench.ask_kvchat("t", "x", "alice", messages, system=small)
    assert row.held_samples >= 2 and row.budget_violations == 0 and row.max_held_bytes > budget // 2
    small.engine.stray = torch.zeros(budget + 1, dtype=torch.uint8)  # bytes no ledger counts
    _, row = bench.ask_kvchat("t", "x", "bob", [user("Hi")], system=small)
    assert row.budget_violations >= 1 and row.max_held_bytes > budget
    small.engine.close()


def test_oracle_serves_each_scope_its_longest_fed_prefix(tokenizer):
    oracle = Oracle(tokenizer)
    first = [SYSTEM, user("My code is 4417.")]
    ids = render_ids(tokenizer, first)
    assert oracle.served("store", "alice", ids) == 0
    oracle.record("store", "alice", first, ids + [11, 12])
    system_len = len(render_ids(tokenizer, [SYSTEM], add_generation_prompt=False))
    assert oracle.served("store", "alice", ids + [11, 12, 13]) == len(ids) + 2  # its own turns, reply included
    assert oracle.served("store", "alice", ids) == len(ids) - 1  # one token is always left to feed
    bob = render_ids(tokenizer, [SYSTEM, user("My code is 9021.")])
    assert oracle.served("store", "bob", bob) == system_len  # another session: the system prompt only
    assert oracle.served("other-store", "alice", ids) == 0  # sharing never crosses stores


def test_floor_feeds_only_what_the_ideal_cache_could_not_serve(bench, tiny_loaded):
    messages = [SYSTEM, user("What is on tonight?")]
    ids = bench.prompt_ids(messages)
    fed = []
    hook = tiny_loaded.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[-1]), with_kwargs=True)  # fmt: skip
    try:
        bench.floor.ttft_ms(messages, served_tokens=len(ids) - 7)
        bench.floor.ttft_ms(messages, served_tokens=len(ids) - 7)  # history already prepared: one forward
    finally:
        hook.remove()
    assert fed == [len(ids) - 7, 7, 7]


def test_bench_without_its_dependencies_says_so_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(bench_main, "missing_dependencies", lambda: ["matplotlib"])
    monkeypatch.setattr(bench_main.models, "load", lambda *a, **k: pytest.fail("loaded a model"))
    assert bench_main.main(["--quick"]) == 2
    assert "pip install -r requirements-bench.txt" in capsys.readouterr().err


def test_results_are_written_even_when_the_plot_cannot_be_drawn(monkeypatch, tmp_path):
    def broken(path, results):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(report, "write_plot", broken)
    results = {"quick": True, "machine": "m", "summary": {"exact_match": 1.0}, "skipped": {}, "flagged": [],
               "groups": [], "peak_rss_mib": {}}  # fmt: skip
    written = report.write_all(tmp_path, results)
    assert [p.name for p in written] == ["results.json", "results.md"]
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == {"exact_match": 1.0}


def test_held_bytes_are_deduplicated_by_storage(tiny_loaded):
    from kvchat.bench.meter import reachable_tensor_bytes

    buffer = torch.zeros(1000)
    views = {"a": buffer[:10], "b": [buffer[5:], (buffer,)]}
    assert reachable_tensor_bytes(views) == buffer.untyped_storage().nbytes() == 4000
    assert reachable_tensor_bytes(tiny_loaded.model) == 0  # weights are not KV


def test_the_meters_own_time_is_taken_out_of_kvchats_timings(bench, monkeypatch):
    from kvchat.bench import meter as meter_module

    real = meter_module.reachable_tensor_bytes

    def slow(*roots):  # a sample made 20 ms slower: a cost kvchat must not be charged for
        time.sleep(0.02)
        return real(*roots)

    monkeypatch.setattr(meter_module, "reachable_tensor_bytes", slow)
    turn, row = bench.ask_kvchat("t", "x", "alice", [SYSTEM, user("Tell me about comets.")], max_new_tokens=6)
    assert turn.new_tokens == 6
    assert row.meter_ms_ttft >= 20  # the prefill's sample, inside the TTFT kvchat measured
    assert row.meter_ms_decode >= 20 * 5  # one sample after each of the 5 decode forwards
    assert row.ttft_ms == pytest.approx(turn.ttft_ms - row.meter_ms_ttft)
    raw_decode_s = 5 / turn.decode_tokens_per_s
    assert row.decode_tokens_per_s == pytest.approx(5 / (raw_decode_s - row.meter_ms_decode / 1000))


def test_quantize_bench_oracle_and_keys(tiny_loaded):
    """The reuse oracle feeds the preset first then the rest through a stock cache, and agrees with
    the prompt fed at once on float32; the keys are ratios to llama.cpp's stream from the same run."""
    from kvchat.bench import quantize as bench_quantize
    from kvchat.bench.crowd import asks

    with torch.inference_mode():
        oracle = bench_quantize.reuse_oracle(tiny_loaded, asks(2), 8)
    assert oracle == {"reuse_exact": 1.0, "reuse_differences": []}
    model = {"batch_max_abs": 0.0, "chunks_max_abs": 2e-5, "reuse_exact": 1.0}
    results = {"llama_cpp": {"single_stream_tokens_per_s": 50.0},
               "model": {"float32": model, "fp16": {**model, "greedy_agreement_fp32": 1.0, "ppl_ratio": 1.0},
                         "int8": {**model, "chunks_max_abs": 8.9, "reuse_exact": 0.75,
                                  "greedy_agreement_fp32": 0.78, "ppl_ratio": 1.1}},
               "engine": {"float32": {"single_stream_tokens_per_s": 10.0, "together_tokens_per_s": 30.0},
                          "fp16": {"single_stream_tokens_per_s": 15.0, "together_tokens_per_s": 35.0},
                          "int8": {"served": False, "refused": "..."}}}  # fmt: skip
    keys = bench_quantize.keys(results)
    assert keys["decode_fp16_over_llama_cpp"] == 0.3 and keys["throughput_8_visitors_float32_over_llama_cpp"] == 0.6
    assert keys["decode_int8_over_llama_cpp"] is None and keys["int8_batch_invariance_max_abs"] == 8.9
    assert keys["int8_reuse_exact"] == 0.75 and keys["int8_ppl_ratio"] == 1.1
