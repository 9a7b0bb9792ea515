"""How many CPU threads a one-token forward runs on: timed, at start, in the thread that runs it.

PyTorch runs every forward on its default intra-op thread count. Measured on this project's 2-core
machine (bundled model, one token through it): from the main thread, 2 threads take ~45 ms; from a
worker thread such as the scheduler's, 2 threads take ~85 ms and 1 thread ~55 ms (the second
thread's OpenMP team is the cost; fp16 linears show it most), while a 256-token prefill is still
faster on 2. A one-token forward gives bit-identical logits on 1 and 2 threads; some multi-token
shapes do not (6 and 9 tokens: 4e-5 apart), so only one-token forwards (a request decoding alone)
switch: the scheduler's thread times a one-token forward both ways before it serves, and runs
them on the faster count. Every other forward keeps the default, and so its rounding.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

log = logging.getLogger(__name__)

SMALL_FORWARD_TOKENS = 1  # forwards feeding this many tokens or fewer may switch (see above)
TIMED_FORWARDS = 5  # per thread count, after one untimed


@dataclass(frozen=True, slots=True)
class CpuThreads:
    """The thread count for this thread's one-token forwards, and the default for the rest."""

    small_forward_threads: int
    default_threads: int
    timings_ms: dict[int, float] = field(default_factory=dict)  # threads -> median one-token forward

    @contextmanager
    def forward(self, tokens: int) -> Iterator[None]:
        """Run a forward feeding `tokens` tokens on its thread count. `torch.set_num_threads` also
        sets the count threads started later begin with, so the default is put back at once."""
        if tokens > SMALL_FORWARD_TOKENS or self.small_forward_threads == self.default_threads:
            yield
            return
        torch.set_num_threads(self.small_forward_threads)
        try:
            yield
        finally:
            torch.set_num_threads(self.default_threads)


def choose(model: PreTrainedModel, device: torch.device, default: int) -> CpuThreads | None:
    """Time a one-token forward on 1 thread and on `default` threads (the count the engine was
    built with) in the calling thread; None off a CPU or with a single thread (nothing to choose)."""
    if device.type != "cpu" or default < 2:
        return None
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    timings = {}
    with torch.inference_mode():
        for threads in (default, 1):
            torch.set_num_threads(threads)
            model(input_ids=token, use_cache=False)
            times = []
            for _ in range(TIMED_FORWARDS):
                started = time.perf_counter()
                model(input_ids=token, use_cache=False)
                times.append((time.perf_counter() - started) * 1000)
            timings[threads] = statistics.median(times)
    torch.set_num_threads(default)
    small = min(timings, key=timings.__getitem__)
    log.info("one-token forwards on %d CPU thread(s): one token %s", small,
             ", ".join(f"{ms:.0f} ms on {n}" for n, ms in timings.items()))  # fmt: skip
    return CpuThreads(small, default, timings)
