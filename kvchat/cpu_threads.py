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
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

log = logging.getLogger(__name__)

SMALL_FORWARD_TOKENS = 1  # forwards feeding this many tokens or fewer may switch (see above)
TIMED_FORWARDS = 5  # per thread count, after one untimed


@dataclass(slots=True)
class CpuThreads:
    """The thread counts of this thread's forwards: one-token ones and the rest."""

    small_forward_threads: int
    default_threads: int
    timings_ms: dict[int, float] = field(default_factory=dict)  # threads -> median one-token forward
    _current: int = 0

    def use(self, tokens: int) -> None:
        """Set the calling thread's count for a forward feeding `tokens` tokens (only when it changes)."""
        wanted = self.small_forward_threads if tokens <= SMALL_FORWARD_TOKENS else self.default_threads
        if wanted != self._current:
            torch.set_num_threads(wanted)
            self._current = wanted


def choose(model: PreTrainedModel, device: torch.device) -> CpuThreads | None:
    """Time a one-token forward on 1 thread and on the default count in the calling thread; None
    off a CPU or with a single thread (nothing to choose)."""
    default = torch.get_num_threads()
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
    return CpuThreads(small, default, timings, default)
