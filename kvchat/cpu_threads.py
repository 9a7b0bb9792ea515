"""How many CPU threads a one-token forward runs on: timed on the first ones served, in the thread that runs them.

PyTorch runs every forward on its default intra-op thread count. Measured on this project's 2-core
machine (bundled model, one token through it): from the main thread, 2 threads take ~45 ms; from a
worker thread such as the scheduler's, 2 threads take ~85 ms and 1 thread ~55 ms (the second
thread's OpenMP team is the cost; fp16 linears show it most), while a 256-token prefill is still
faster on 2. A one-token forward gives bit-identical logits on 1 and 2 threads; some multi-token
shapes do not (6 and 9 tokens: 4e-5 apart), so only one-token forwards (a request decoding alone)
switch. The first `TRIALS_EACH` pairs of them alternate between the two counts, timed as they
serve (no extra forward, nothing a hook on the model would see), and the rest run on the faster.
Every other forward keeps the default count, and so its rounding.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

SMALL_FORWARD_TOKENS = 1  # forwards feeding this many tokens or fewer may switch (see above)
TRIALS_EACH = 5  # one-token forwards timed on each count before choosing


@dataclass(slots=True)
class CpuThreads:
    """The thread count of one thread's one-token forwards: tried, then chosen."""

    default_threads: int
    trials_ms: dict[int, list[float]] = field(default_factory=dict)  # threads -> one-token forward times
    chosen: int | None = None

    @classmethod
    def for_device(cls, device: torch.device, default_threads: int) -> CpuThreads | None:
        """None off a CPU or with a single thread: nothing to choose."""
        if device.type != "cpu" or default_threads < 2:
            return None
        return cls(default_threads, {default_threads: [], 1: []})

    @contextmanager
    def forward(self, tokens: int) -> Iterator[None]:
        """Run a forward feeding `tokens` tokens (in the calling thread) on its count.
        `torch.set_num_threads` also sets the count threads started later begin with, so the
        default is put back at once."""
        if tokens > SMALL_FORWARD_TOKENS:
            yield
            return
        threads = self.chosen or min(self.trials_ms, key=lambda n: len(self.trials_ms[n]))
        if threads != self.default_threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            if threads != self.default_threads:
                torch.set_num_threads(self.default_threads)
        if self.chosen is None:
            self._record(threads, elapsed_ms)

    def _record(self, threads: int, elapsed_ms: float) -> None:
        self.trials_ms[threads].append(elapsed_ms)
        if all(len(times) >= TRIALS_EACH for times in self.trials_ms.values()):
            medians = {n: statistics.median(times) for n, times in self.trials_ms.items()}
            self.chosen = min(medians, key=medians.__getitem__)
            log.info("one-token forwards on %d CPU thread(s): median %s", self.chosen,
                     ", ".join(f"{ms:.0f} ms on {n}" for n, ms in medians.items()))  # fmt: skip
