"""The disk tier as a user meets it: restarts, returns after eviction, and every fault the disk can
throw. Replies must stay exactly what a memory-only engine answers, and a problem is said once."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvchat.bench.workloads import filler_history
from kvchat.engine import Engine
from kvchat.errors import InputError
from kvchat.kv.disk.store import DiskStore
from kvchat.models import weights_identity
from conftest import wait_until

SYSTEM = "You are the support assistant of Acme Cloud. Answer briefly and politely. " * 12
ROOT = Path(__file__).resolve().parent.parent


def conversation(*turns: str) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    for index, text in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return messages


def open_engine(loaded, disk: Path | None, budget: int = 2**26, **options) -> Engine:
    return Engine(loaded, cache_budget_bytes=budget, disk_dir=disk, **options)


def files_in(disk: Path) -> list[Path]:
    return sorted(disk.glob("*/*.safetensors"))


def reply_without_cache(loaded, messages, max_new_tokens=12) -> str:
    engine = open_engine(loaded, None)
    try:
        return engine.chat(None, messages, max_new_tokens=max_new_tokens).text
    finally:
        engine.close()


def grown(engine: Engine, session: str) -> list[dict]:
    """A two-turn conversation, ready for its follow-up."""
    first = engine.chat(session, conversation("How do I reset my password?"), max_new_tokens=12)
    return conversation("How do I reset my password?", first.text, "And my API key?")


def test_a_restart_continues_a_conversation_warm_from_disk_and_exactly(tiny_loaded, tmp_path):
    engine = open_engine(tiny_loaded, tmp_path, persist_sessions=True)
    follow_up = grown(engine, "alice")
    engine.close()
    engine = open_engine(tiny_loaded, tmp_path, persist_sessions=True)
    assert engine.disk_restored == 2  # the system prompt and alice's turns
    reply = engine.chat("alice", follow_up, max_new_tokens=12)
    engine.close()
    assert reply.usage.cache_tier == "disk" and reply.usage.cache_source == "session"
    assert reply.usage.disk_tokens == reply.usage.cached_tokens > len(engine.encode(conversation("x")).token_ids) - 8
    assert reply.text == reply_without_cache(tiny_loaded, follow_up)


def test_by_default_only_system_prompts_reach_the_disk_and_files_are_private(tiny_loaded, tmp_path):
    engine = open_engine(tiny_loaded, tmp_path)
    follow_up = grown(engine, "alice")
    engine.flush_disk()
    assert len(files_in(tmp_path)) == 1  # the system prompt; alice's turns stayed in memory
    private = [*files_in(tmp_path), *tmp_path.glob("*/index.db"), *tmp_path.glob("*/lock")]
    assert len(private) == 3 and all(path.stat().st_mode & 0o077 == 0 for path in private)
    engine.close()
    engine = open_engine(tiny_loaded, tmp_path)
    reply = engine.chat("alice", follow_up, max_new_tokens=12)
    engine.close()
    assert reply.usage.cache_source == "prefix" and reply.usage.cache_tier == "disk"


def test_sessions_return_warm_from_disk_after_memory_pressure_evicted_them(tiny_loaded, tmp_path):
    per_token = Engine(tiny_loaded, 2**20).bytes_per_token
    budget = per_token * 260  # the system prompt (~190 tokens), one running request and a turn or two
    engine = open_engine(tiny_loaded, tmp_path, budget=budget, persist_sessions=True)
    follow_ups = {name: grown(engine, name) for name in ("ann", "ben", "cid", "dot")}
    assert engine.stats().demotions > 0
    replies = {name: engine.chat(name, messages, max_new_tokens=12) for name, messages in follow_ups.items()}
    engine.close()
    for name, reply in replies.items():  # each came back from disk, though the one before it was still being written
        assert (reply.usage.cache_tier, reply.usage.cache_source) == ("disk", "session"), name
    for name, messages in follow_ups.items():
        assert replies[name].text == reply_without_cache(tiny_loaded, messages), name


def test_a_return_waits_for_a_write_in_flight_rather_than_recompute(tiny_loaded, tmp_path):
    """The returning run needs the room of the run just finished, which is still being written
    (so it cannot leave memory yet): the return must wait moments for the write, not recompute."""
    engine = open_engine(tiny_loaded, tmp_path, budget=Engine(tiny_loaded, 2**20).bytes_per_token * 1600,
                         persist_sessions=True)  # fmt: skip
    history = filler_history(engine, 600)
    for name in ("ann", "ben", "cid", "dot"):
        engine.chat(name, history + [{"role": "user", "content": "First question?"}], max_new_tokens=16)
    for name in ("ann", "ben", "cid", "dot"):
        reply = engine.chat(name, history + [{"role": "user", "content": "Second question?"}], max_new_tokens=16)
        assert reply.usage.cache_tier == "disk" and reply.usage.prefilled_tokens < 20, name
    engine.close()


def test_warm_presets_are_pinned_and_read_back_from_disk_after_a_restart(tiny_loaded, tmp_path):
    engine = open_engine(tiny_loaded, tmp_path)
    for handle in engine.warm({"support": SYSTEM}):
        handle.wait()
    assert engine.stats().pinned_bytes > 0 and engine.warmups[0].pinned
    assert engine.chat("zoe", conversation("Hi"), max_new_tokens=4).usage.cache_source == "prefix"
    assert engine.clear_cache() >= 1 and engine.stats().pinned_bytes > 0  # the pin outlives a clear
    engine.close()
    engine = open_engine(tiny_loaded, tmp_path)
    for handle in engine.warm({"support": SYSTEM}):
        handle.wait()
    assert engine.warmups[0].disk_tokens == engine.warmups[0].num_tokens  # read back, not computed
    engine.close()


def test_presets_past_a_quarter_of_the_budget_are_warmed_but_not_pinned(tiny_loaded):
    engine = Engine(tiny_loaded, cache_budget_bytes=Engine(tiny_loaded, 2**20).bytes_per_token * 600)
    for handle in engine.warm({"one": SYSTEM, "two": SYSTEM.upper()}):
        handle.wait()
    assert [w.pinned for w in engine.warmups] == [False, False]  # each is ~190 tokens > 150
    engine.close()


def test_a_request_that_fits_only_without_the_pins_is_refused_clearly(tiny_loaded):
    engine = Engine(tiny_loaded, cache_budget_bytes=Engine(tiny_loaded, 2**20).bytes_per_token * 800)
    for handle in engine.warm({"support": SYSTEM}):
        handle.wait()
    assert engine.warmups[0].pinned  # ~190 tokens: under a quarter of 800
    with pytest.raises(InputError, match="pinned by warm presets"):
        engine.stream("a", [{"role": "user", "content": "Hi"}], max_new_tokens=700)
    assert engine.chat("a", [{"role": "user", "content": "Hi"}], max_new_tokens=8).usage.finish_reason
    engine.close()


def test_clear_cache_empties_memory_and_disk(tiny_loaded, tmp_path):
    engine = open_engine(tiny_loaded, tmp_path, persist_sessions=True)
    grown(engine, "alice")
    engine.flush_disk()
    assert len(files_in(tmp_path)) == 2
    assert engine.clear_cache() == 2
    engine.flush_disk()
    assert files_in(tmp_path) == [] and engine.stats().used_bytes == 0
    engine.close()


# --- faults: the chat answers every time, exactly, and the problem is said once ---


def damaged_restart(tiny_loaded, tmp_path, damage) -> tuple[Engine, list[dict]]:
    engine = open_engine(tiny_loaded, tmp_path, persist_sessions=True)
    follow_up = grown(engine, "alice")
    engine.close()
    damage(files_in(tmp_path))
    return open_engine(tiny_loaded, tmp_path, persist_sessions=True), follow_up


def test_a_truncated_file_is_dropped_at_start_and_never_served(tiny_loaded, tmp_path):
    def truncate(files):
        path = min(files, key=lambda p: p.stat().st_size)  # alice's turns
        path.write_bytes(path.read_bytes()[:-100])

    engine, follow_up = damaged_restart(tiny_loaded, tmp_path, truncate)
    assert engine.disk_restored == 1 and "removed" in engine.disk_problem
    reply = engine.chat("alice", follow_up, max_new_tokens=12)
    engine.close()
    assert reply.text == reply_without_cache(tiny_loaded, follow_up)


def test_a_bit_flip_is_caught_by_the_checksum_on_read(tiny_loaded, tmp_path):
    def flip(files):
        path = min(files, key=lambda p: p.stat().st_size)  # alice's turns
        data = bytearray(path.read_bytes())
        data[-7] ^= 0x10  # inside the last value tensor: the header still parses
        path.write_bytes(bytes(data))

    engine, follow_up = damaged_restart(tiny_loaded, tmp_path, flip)
    assert engine.disk_restored == 2 and engine.disk_problem is None  # nothing looks wrong yet
    reply = engine.chat("alice", follow_up, max_new_tokens=12)
    assert "checksum" in engine.disk_problem
    assert len(engine.disk.store.problems) == 1
    engine.close()
    assert reply.usage.cache_source == "prefix"  # the system prompt's file was fine
    assert reply.text == reply_without_cache(tiny_loaded, follow_up)


def test_a_deleted_index_is_rebuilt_from_the_files(tiny_loaded, tmp_path):
    engine, follow_up = damaged_restart(tiny_loaded, tmp_path, lambda files: (files[0].parent / "index.db").unlink())
    assert engine.disk_restored == 2
    reply = engine.chat("alice", follow_up, max_new_tokens=12)
    engine.close()
    assert reply.usage.cache_tier == "disk" and reply.usage.cache_source == "session"


def test_a_file_from_another_model_or_dtype_is_never_loaded(tiny_loaded, tmp_path):
    engine = open_engine(tiny_loaded, tmp_path)
    grown(engine, "alice")
    engine.close()
    theirs = tmp_path / "another-fingerprint"  # where a model with other weights or dtype keeps its files
    theirs.mkdir()
    for path in files_in(tmp_path):
        (theirs / path.name).write_bytes(path.read_bytes())
    store = DiskStore(tmp_path, "another-fingerprint", layers=2)
    assert store.records() == [] and "foreign" in store.problems[0]
    assert list(theirs.glob("*.safetensors")) == []
    store.close()


def test_a_second_engine_on_the_same_directory_runs_without_it_and_says_why(tiny_loaded, tmp_path):
    first = open_engine(tiny_loaded, tmp_path)
    second = open_engine(tiny_loaded, tmp_path)
    assert second.disk is None and "in use by another kvchat process" in second.disk_problem
    messages = conversation("Hello")
    assert first.chat("a", messages, max_new_tokens=8).text == second.chat("b", messages, max_new_tokens=8).text
    first.close(), second.close()


def test_an_unwritable_directory_leaves_the_chat_working(tiny_loaded):
    engine = open_engine(tiny_loaded, Path("/proc"))  # not writable, even by root
    assert engine.disk is None and "cannot use" in engine.disk_problem
    assert engine.chat("a", conversation("Hello"), max_new_tokens=4).usage.finish_reason in ("stop", "length")
    engine.close()


CHILD = textwrap.dedent(
    """
    import resource, sys
    from kvchat.engine import Engine
    from kvchat import models
    limit = int(sys.argv[3])
    if limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail
    loaded = models.load(sys.argv[1], device="cpu", dtype="float32")
    engine = Engine(loaded, 2**26, usage_log=None, disk_dir=sys.argv[2], persist_sessions=True)
    system = "You are the support assistant of Acme Cloud. Answer briefly and politely. " * 12
    history = [{"role": "system", "content": system}]
    for turn in range(int(sys.argv[4])):
        history.append({"role": "user", "content": f"Question {turn}?"})
        reply = engine.chat("alice", history, max_new_tokens=12)
        history.append({"role": "assistant", "content": reply.text})
        print("REPLY", repr(reply.text), reply.usage.cache_source, flush=True)
    engine.flush_disk()
    print("PROBLEMS", len(engine.disk.store.problems), engine.disk_problem, flush=True)
    engine.close()
    """
)


def child(model_dir: Path, disk: Path, fsize_limit: int = 0, turns: int = 3) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(model_dir), str(disk), str(fsize_limit), str(turns)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def test_a_full_disk_is_said_once_and_every_reply_still_comes(tiny_model_dir, tmp_path):
    process = child(tiny_model_dir, tmp_path, fsize_limit=48 * 1024)  # smaller than one KV file
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    assert out.count("REPLY") == 3
    assert "PROBLEMS 1 cannot write" in out


def test_kill_9_in_the_middle_of_writing_leaves_a_clean_directory(tiny_model_dir, tmp_path):
    process = child(tiny_model_dir, tmp_path, turns=40)
    assert process.stdout is not None
    while not (line := process.stdout.readline()).startswith("REPLY"):  # logging comes first
        assert line, "the child died before replying"
    # one KV file is complete, so the writer has begun; the child's remaining turns keep it writing
    wait_until(lambda: files_in(tmp_path), timeout_s=60, interval_s=0.02, message="the child has written a KV file")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    (files_in(tmp_path)[0].parent / "half-written.tmp").write_bytes(b"\x00" * 100)  # as a killed write leaves it
    process = child(tiny_model_dir, tmp_path, turns=2)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    assert out.count("REPLY") == 2  # every reply comes
    # a kill can land between a file's rename and its index row, or mid-delete: either is tidied at
    # start, at most one warning says so, and nothing half-written stays
    assert "PROBLEMS 0" in out or "PROBLEMS 1" in out
    assert not list(tmp_path.glob("*/*.tmp"))


# --- options ---


def test_unknown_eviction_policy_is_a_clear_error(tiny_loaded):
    with pytest.raises(InputError, match="lru, lfu, fifo, lru-2, gdsf"):
        Engine(tiny_loaded, 2**20, eviction="random")


def test_the_fingerprint_is_the_weights_content_not_their_path(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in tiny_model_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert weights_identity(copy) == weights_identity(tiny_model_dir)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert weights_identity(copy) != weights_identity(tiny_model_dir)


def test_session_ttl_expires_idle_conversations_in_both_tiers_but_keeps_system_prompts(tiny_loaded, tmp_path):
    engine = open_engine(tiny_loaded, tmp_path, persist_sessions=True, session_ttl_s=0.3)
    grown(engine, "alice")
    assert engine.has_session("alice")
    wait_until(lambda: not engine.has_session("alice"), timeout_s=10, message="the idle conversation is expired")
    engine.flush_disk()
    assert len(files_in(tmp_path)) == 1  # the system prompt stays
    assert engine.chat("bob", conversation("Hi"), max_new_tokens=4).usage.cache_source == "prefix"
    engine.close()
