"""The disk tier's workloads: a restart, visitors returning after eviction, a preset's first visitor.

Every kvchat request goes through `Bench.ask_kvchat`, so reuse is counted at the model and graded
by the oracle (which knows nothing of tiers: for it a restart changes nothing, so any reuse lost
to the restart shows as a gap). Files read back after a restart are first dropped from the OS page
cache (`posix_fadvise(DONTNEED)`), so "disk" means the disk, not RAM; the same follow-up is also
timed with the files still cached by the OS ("disk-os-cached"), which is what a restarted app on a
machine that did not reboot sees.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from kvchat.bench.systems import Kvchat, Messages
from kvchat.bench.workloads import FOLLOW_UPS, QUESTIONS, Bench, filler_history
from kvchat.engine import Engine
from kvchat.presets import load_presets

MEMORY_BYTES = 2**30


def drop_os_cache(directory: Path) -> None:
    """Ask the kernel to forget the files' cached pages, so the next read comes from the device."""
    for path in directory.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _engine(bench: Bench, directory: Path | None, budget: int = MEMORY_BYTES, persist_sessions: bool = True) -> Engine:
    return Engine(bench.engine.loaded, budget, disk_dir=directory, persist_sessions=persist_sessions)


def restart(bench: Bench, repeats: int, history_tokens: int = 2000) -> dict[str, Any]:
    """A conversation grown to `history_tokens` (~2,000 in the real runs); each follow-up is
    answered from memory by the engine that built it, then by a new engine started on the same
    directory (a restart), then recomputed. Needs two follow-ups at least (see below)."""
    if repeats < 2:
        raise ValueError("the restart workload needs at least two follow-ups")
    with tempfile.TemporaryDirectory(prefix="kvchat-bench-disk-") as name:
        directory = Path(name)
        history = filler_history(bench.engine, history_tokens)
        warm = history + [{"role": "user", "content": "Please greet me in one short sentence."}]
        first = Kvchat(_engine(bench, directory), "restart")
        greeting, _ = bench.ask_kvchat("warmup", "restart", "restart", warm, system=first)
        base = warm + [{"role": "assistant", "content": greeting.text}]
        asks = [base + [{"role": "user", "content": FOLLOW_UPS[j % len(FOLLOW_UPS)]}] for j in range(repeats)]
        texts: dict[str, list[str]] = {"memory": [], "disk": [], "disk-os-cached": []}
        for messages in asks:
            texts["memory"].append(bench.ask_kvchat("restart", "memory", "restart", messages, system=first)[0].text)
        first.engine.close()  # finishes writing
        # Each pass asks every follow-up once, each after a restart. A follow-up's turns replace the
        # conversation's stored run, so within a pass the run on disk always holds another follow-up
        # than the one asked (as in memory): both prefill the same tokens.
        for point in ("disk", "disk-os-cached"):
            for j, messages in enumerate(asks):
                if point == "disk":
                    drop_os_cache(directory)
                restarted = Kvchat(_engine(bench, directory), "restart")
                turn, _ = bench.ask_kvchat("restart", point, "restart", messages, system=restarted,
                                           key=f"{point}/{j}")  # fmt: skip
                texts[point].append(turn.text)
                restarted.engine.close()
        for j, messages in enumerate(asks):
            bench.ask_other(bench.recompute, "restart", "disk", "restart", messages, key=f"disk/{j}")
        return {"same_text_memory_and_disk": texts["memory"] == texts["disk"] == texts["disk-os-cached"]}


def return_after_eviction(bench: Bench, sessions: int) -> None:
    """`sessions` conversations of ~600 tokens under a memory budget that holds about two: by the
    time each returns, it was evicted. With a disk tier it was demoted and comes back from disk;
    the memory-only engine beside it (same budget, same requests) recomputes it."""
    per_token = bench.engine.bytes_per_token
    budget = per_token * 1_600
    with tempfile.TemporaryDirectory(prefix="kvchat-bench-return-") as name:
        tiered = Kvchat(_engine(bench, Path(name), budget), "return-disk")
        memory_only = Kvchat(_engine(bench, None, budget), "return-memory")
        conversations = {f"return-{i}": filler_history(bench.engine, 500 + 20 * i) for i in range(sessions)}
        for system in (tiered, memory_only):
            for session, history in conversations.items():
                ask = history + [{"role": "user", "content": QUESTIONS[0]}]
                bench.ask_kvchat("warmup", "return", session, ask, system=system)
        for system, point in ((tiered, "with disk"), (memory_only, "memory only")):
            for session, history in conversations.items():
                ask = history + [{"role": "user", "content": QUESTIONS[1]}]
                bench.ask_kvchat("return_after_eviction", point, session, ask, system=system, key=f"{point}/{session}")
        for session, history in list(conversations.items())[:2]:
            ask = history + [{"role": "user", "content": QUESTIONS[1]}]
            bench.ask_other(bench.recompute, "return_after_eviction", "with disk", session, ask,
                            key=f"with disk/{session}")  # fmt: skip
        for system in (tiered, memory_only):
            system.engine.close()


def preset_first_visitor(bench: Bench, repeats: int) -> dict[str, Any]:
    """The FAQ preset's first visitor after a fresh start: with presets warmed at start (computed,
    then read back from disk on a second start) and without (the cold prefill)."""
    faq = load_presets()["Acme cloud support faq (long)"]
    found: dict[str, Any] = {"warmup_ms": {}}
    with tempfile.TemporaryDirectory(prefix="kvchat-bench-presets-") as name:
        for r in range(repeats):
            messages: Messages = [{"role": "system", "content": faq}, {"role": "user", "content": QUESTIONS[r]}]
            cold = Kvchat(_engine(bench, None), f"preset-cold-{r}")
            bench.ask_kvchat("preset_first_visitor", "cold", f"first-{r}", messages, system=cold)
            cold.engine.close()
            for point in ("warmed", "warmed from disk"):  # computed at start; read back on the next start
                directory = Path(name) if point == "warmed from disk" or r == 0 else None
                engine = _engine(bench, directory, persist_sessions=False)  # the default: system prompts only
                started = time.perf_counter()
                for handle in engine.warm({"faq": faq}):
                    handle.wait()
                found["warmup_ms"].setdefault(point, []).append((time.perf_counter() - started) * 1000)
                bench.ask_kvchat("preset_first_visitor", point, f"first-{r}-{point}", messages,
                                 system=Kvchat(engine, f"preset-{point}-{r}"))  # fmt: skip
                engine.close()
    return found
