"""The scheduler's thread times a one-token forward on 1 thread and on the default count, and runs
one-token forwards (a request decoding alone) on the faster; every other forward keeps the default."""

from __future__ import annotations

import threading

import torch

from kvchat import cpu_threads


def in_a_thread(run):
    out = []
    thread = threading.Thread(target=lambda: out.append(run()))
    thread.start()
    thread.join()
    return out[0]


def test_one_token_forwards_use_the_faster_count_and_the_rest_the_default(tiny_loaded):
    default = max(2, torch.get_num_threads())

    def run():
        choice = cpu_threads.choose(tiny_loaded.model, torch.device("cpu"), default)
        seen = []
        for tokens in (1, 2, 300, 1):
            with choice.forward(tokens):
                seen.append(torch.get_num_threads())
            seen.append(torch.get_num_threads())  # put back at once: threads started later begin with it
        return choice, seen

    choice, seen = in_a_thread(run)
    assert set(choice.timings_ms) == {1, default} and all(ms > 0 for ms in choice.timings_ms.values())
    assert choice.small_forward_threads == min(choice.timings_ms, key=choice.timings_ms.__getitem__)
    small = choice.small_forward_threads
    assert seen == [small, default, default, default, default, default, small, default]
    assert in_a_thread(torch.get_num_threads) == torch.get_num_threads()  # a new thread starts as before
    assert cpu_threads.choose(tiny_loaded.model, torch.device("cpu"), 1) is None  # one thread: nothing to choose


def test_one_token_gives_the_same_logits_on_one_thread_and_on_all(bundled_loaded):
    """Why the choice cannot change a reply: the thread count never splits a sum."""
    ids = torch.tensor([[504]])

    def logits(threads: int) -> torch.Tensor:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return bundled_loaded.model(input_ids=ids, use_cache=False).logits

    many, one = in_a_thread(lambda: logits(max(2, torch.get_num_threads()))), in_a_thread(lambda: logits(1))
    assert torch.equal(many, one)
