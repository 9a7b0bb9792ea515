"""`python -m kvchat.bench`: kvchat side by side with what users would run instead, in one run.

See `workloads.py` for what is measured and `systems.py` for who is compared.
"""

from __future__ import annotations

import importlib.util
import platform
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvchat.kv.attention import kv_layout
from kvchat.kv.runs import bytes_per_token
from kvchat.bench import crowd, policies, report, startup, systems, tiers, workloads
from kvchat.bench.meter import ModelMeter
from kvchat.engine import Engine
from kvchat.kv.eviction import POLICIES
from kvchat.models import LoadedModel

PEERS = ("transformers-cb", "llama-cpp")


@dataclass(frozen=True, slots=True)
class Plan:
    points: tuple[int, ...]  # history lengths (tokens) for the multi-turn workload
    follow_ups: int  # kvchat follow-ups per point (and floor repeats)
    recompute_repeats: int  # baseline and peer follow-ups per point (they are slow)
    shared_colds: int  # fresh system prompts of equal length: one cold first session each
    shared_warm: int  # sessions after the cold one on each prompt
    new_tokens: int  # reply length for TTFT and exactness checks
    decode_tokens: int
    decode_repeats: int
    pressure_sessions: int
    pressure_exact: int  # how many second turns under pressure are checked against the baseline
    long_lengths: tuple[int, ...]  # reply lengths whose decode speed is compared
    long_repeats: int
    visitor_counts: tuple[int, ...] = (1, 2, 4, 8, 16)  # sessions chatting at once on the FAQ preset
    capacity_sessions: int = 40  # sessions taking turns under CAPACITY_BUDGET
    restart_repeats: int = 3  # follow-ups answered from memory, then after a restart from disk
    restart_tokens: int = 2000  # history of the restarted conversation
    return_sessions: int = 6  # conversations that return after memory pressure evicted them
    preset_repeats: int = 2  # first visitors of a preset after a fresh start
    policy_visitors: int = 16  # visitors in the recorded workload the eviction policies replay


CAPACITY_BUDGET = 256 * 2**20
QUICK = Plan((500, 2000, 4000), 3, 2, 3, 3, 16, 32, 2, 6, 3, (32, 512), 1, (1, 4, 8), 16, 2, 2000, 4, 1, 10)
FULL = Plan((500, 1000, 2000, 4000), 5, 3, 4, 7, 16, 64, 3, 10, 10, (32, 512), 2, (1, 2, 4, 8, 16), 40, 3, 2000, 6, 2, 16)


def missing_dependencies() -> list[str]:
    """Optional packages the bench needs beyond the app's (requirements-bench.txt)."""
    return [name for name in ("matplotlib", "tqdm") if importlib.util.find_spec(name) is None]


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pressure_budget(loaded: LoadedModel) -> int:
    """Room for one running short request and about two sessions' turns (200 positions of KV,
    measured on a real buffer): fewer than the workload's sessions, so the tree must evict."""
    return 200 * bytes_per_token(kv_layout(loaded.model), loaded.device, loaded.dtype)


def make_peers(engine: Engine, wanted: list[str], gguf: str | None) -> tuple[list[Any], dict[str, str]]:
    peers, skipped = [], {}
    for name in wanted:
        why = systems.unavailable(name)
        if name == "llama-cpp" and why is None and gguf is None:
            why = "needs the bundled GGUF (run without --model)"
        if why:
            skipped[name] = why
            continue
        try:
            peers.append(systems.ContinuousBatching(engine) if name == "transformers-cb"
                         else systems.LlamaCpp(engine, gguf))  # fmt: skip
        except Exception as err:  # noqa: BLE001 - a peer that cannot start is reported, not fatal
            skipped[name] = f"failed to start: {err}"
    return peers, skipped


def run(loaded: LoadedModel, plan: Plan, peers: list[str], quick: bool, budget_bytes: int = 2**30,
        gguf: str | None = None, startup_times: Callable[[], dict[str, float | None]] = dict,
        out: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Run every workload on every system; returns what results.json holds."""
    from tqdm.auto import tqdm

    engine = Engine(loaded, budget_bytes)
    peer_systems, skipped = make_peers(engine, peers, gguf)
    others = 1 + len(peer_systems)
    shared = plan.shared_colds * (1 + plan.shared_warm) + (1 + plan.shared_warm) * others
    long = plan.long_repeats * len(plan.long_lengths) * 2
    cb = next((p for p in peer_systems if isinstance(p, systems.ContinuousBatching)), None)
    crowds = sum(plan.visitor_counts) * (2 + (cb is not None)) + max(plan.visitor_counts, default=0) + plan.capacity_sessions * 2
    planned = (len(plan.points) * (1 + 2 * plan.follow_ups + plan.recompute_repeats * others + len(peer_systems))
               + shared + 10 + plan.pressure_sessions * 2 + plan.pressure_exact + plan.decode_repeats * 2 + long
               + crowds + plan.restart_repeats * 4 + 1 + plan.return_sessions * 4 + 2 + plan.preset_repeats * 3
               + plan.policy_visitors * 2.5 * (1 + len(policies.BUDGET_FRACTIONS) * len(POLICIES)))  # fmt: skip
    bar = tqdm(total=planned, desc="kvchat bench", unit="req")
    meter = ModelMeter(loaded.model)
    bench = workloads.Bench(engine, systems.Kvchat(engine, "main"), systems.Recompute(engine), systems.Floor(engine),
                            peer_systems, plan.new_tokens, meter, tick=bar.update)  # fmt: skip
    pressure = systems.Kvchat(Engine(loaded, pressure_budget(loaded)), "pressure")
    capacity_engine = Engine(loaded, CAPACITY_BUDGET)
    rss: dict[str, float] = {}
    found: dict[str, Any] = {}
    steps = [
        ("multi_turn", lambda: workloads.multi_turn(bench, list(plan.points), plan.follow_ups, plan.recompute_repeats)),
        ("shared_prefix", lambda: workloads.shared_prefix(bench, plan.shared_colds, plan.shared_warm)),
        ("edit_regenerate", lambda: workloads.edit_regenerate(bench)),
        ("budget_pressure", lambda: workloads.budget_pressure(bench, pressure, plan.pressure_sessions,
                                                              plan.pressure_exact)),
        ("decode", lambda: workloads.decode_speed(bench, plan.decode_tokens, plan.decode_repeats)),
        ("decode_length", lambda: workloads.decode_length(bench, plan.long_lengths, plan.long_repeats)),
        ("visitors", lambda: found.update(crowds=crowd.visitors(bench, plan.visitor_counts, cb))),
        ("capacity", lambda: found.update(kept=crowd.capacity(bench, systems.Kvchat(capacity_engine, "capacity"),
                                                              plan.capacity_sessions))),
        ("restart", lambda: found.update(restart=tiers.restart(bench, plan.restart_repeats, plan.restart_tokens))),
        ("return_after_eviction", lambda: tiers.return_after_eviction(bench, plan.return_sessions)),
        ("preset_first_visitor", lambda: found.update(presets=tiers.preset_first_visitor(bench, plan.preset_repeats))),
        ("policies", lambda: found.update(policies=policies.compare(bench, plan.policy_visitors, out))),
    ]  # fmt: skip
    try:
        for name, step in steps:
            bar.set_postfix_str(name)
            step()
            rss[name] = round(peak_rss_mib(), 1)
    finally:
        bar.close()
        meter.close()
        for peer in peer_systems:
            getattr(peer, "close", lambda: None)()
        for other in (engine, pressure.engine, capacity_engine):
            other.close()
    visitors = crowd.summary(found.get("crowds", []))
    times = startup_times()
    return {
        "quick": quick, "machine": machine(), "model": loaded.name, "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."), "plan": asdict(plan), "skipped": skipped,
        "summary": report.summarize(bench.rows, list(plan.points), times, visitors, found.get("kept"),
                                    policies.best_gain(found.get("policies"))),
        "startup": times, "visitors": visitors, "restart": found.get("restart"), "presets": found.get("presets"),
        "policies": found.get("policies"),
        "flagged": report.flagged(bench.rows), "groups": report.groups(bench.rows),
        "rows": [r.as_dict() for r in bench.rows], "peak_rss_mib": rss,
    }  # fmt: skip


def measure_startup(model: str | None, device: str, dtype: str) -> dict[str, float | None]:
    """The engine alone (`startup_s`), then the whole app: first page, Gradio page, model ready."""
    return {"startup_s": startup.engine_startup_s(model, device, dtype), **startup.app_startup_s(model, device, dtype)}
