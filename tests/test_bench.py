"""The bench's --quick machinery on the tiny model: the JSON shape and a consistent summary."""

import json

from kvchat.bench import PEERS, Plan, report, run

TINY = Plan(points=(150, 400), follow_ups=2, recompute_repeats=1, shared_sessions=3, shared_rounds=1,
            new_tokens=4, decode_tokens=6, decode_repeats=1, pressure_sessions=5, pressure_exact=2)  # fmt: skip


def test_quick_bench_on_the_tiny_model_writes_consistent_results(tiny_loaded, tmp_path):
    results = run(tiny_loaded, TINY, peers=["llama-cpp"], quick=True, startup=lambda: 1.5)
    report.write_all(tmp_path, results)
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert set(loaded["summary"]) == set(report.TARGETS)
    summary = loaded["summary"]
    assert all(isinstance(v, (int, float)) for v in summary.values()), summary
    assert summary["exact_match"] == 1.0  # greedy fp32 replies equal plain generate
    assert summary["budget_violations"] == 0
    assert summary["speedup_shared_prefix"] > 1 and summary["speedup_followup_2k"] > 1
    assert 0.9 <= summary["hit_ratio_vs_oracle"] <= 1.0
    multi = {(g["system"], g["point"]): g for g in loaded["groups"] if g["workload"] == "multi_turn"}
    for point in ("150", "400"):
        assert multi[("kvchat", point)]["prefilled_tokens"] < multi[("recompute", point)]["prefilled_tokens"]
    pressure = [r for r in loaded["rows"] if r["workload"] == "budget_pressure"]
    assert len(pressure) == 2 * 5 + 2 and all(r["used_bytes"] <= r["budget_bytes"] for r in pressure if r["used_bytes"])
    # the tiny model has no GGUF file, so llama-cpp is reported as skipped, with the reason
    assert any(why in loaded["skipped"]["llama-cpp"] for why in ("not installed", "needs the bundled GGUF"))
    assert "## Summary" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "ttft.png").read_bytes().startswith(b"\x89PNG")
    assert set(PEERS) == {"transformers-cb", "llama-cpp"}
