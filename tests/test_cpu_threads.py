"""One-token forwards (a request decoding alone) alternate between 1 thread and the default count
while they are timed, then run on the faster; every other forward keeps the default."""

from __future__ import annotations

import threading
import time

import torch

from kvchat import cpu_threads


def in_a_thread(run):
    out = []
    thread = threading.Thread(target=lambda: out.append(run()))
    thread.start()
    thread.join()
    return out[0]


def served(choice: cpu_threads.CpuThreads, slow_on: int, forwards: int) -> list[int]:
    """The thread count each one-token forward ran on, the ones on `slow_on` threads taking 20 ms longer."""
    seen = []
    for _ in range(forwards):
        with choice.forward(1):
            seen.append(torch.get_num_threads())
            time.sleep(0.02 if seen[-1] == slow_on else 0.0)
        assert torch.get_num_threads() == choice.default_threads  # put back at once
    return seen


def test_one_token_forwards_are_timed_on_both_counts_then_run_on_the_faster():
    default = max(2, torch.get_num_threads())
    trials = 2 * cpu_threads.TRIALS_EACH
    for slow_on, fast in ((default, 1), (1, default)):
        choice = cpu_threads.CpuThreads.for_device(torch.device("cpu"), default)
        seen = in_a_thread(lambda: served(choice, slow_on, trials + 3))
        assert sorted(seen[:trials]) == sorted([1, default] * cpu_threads.TRIALS_EACH)
        assert choice.chosen == fast and seen[trials:] == [fast] * 3


def test_bigger_forwards_and_other_threads_keep_the_default():
    default = max(2, torch.get_num_threads())
    choice = cpu_threads.CpuThreads.for_device(torch.device("cpu"), default)
    choice.chosen = 1

    def run():
        with choice.forward(2):
            inside = torch.get_num_threads()
        return inside, in_a_thread(torch.get_num_threads)

    assert in_a_thread(run) == (default, torch.get_num_threads())
    assert cpu_threads.CpuThreads.for_device(torch.device("cpu"), 1) is None  # one thread: nothing to choose


def test_one_token_gives_the_same_logits_on_one_thread_and_on_all(bundled_loaded):
    """Why the choice cannot change a reply: on one token the thread count never splits a sum."""
    ids, default = torch.tensor([[504]]), torch.get_num_threads()

    def logits(threads: int) -> torch.Tensor:
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return bundled_loaded.model(input_ids=ids, use_cache=False).logits
        finally:
            torch.set_num_threads(default)  # threads started later begin with the last count set

    many, one = in_a_thread(lambda: logits(max(2, default))), in_a_thread(lambda: logits(1))
    assert torch.equal(many, one)
