"""What each engine lever buys, measured side by side in one run on the bundled model (CPU, fp32).

    python scripts/levers.py

Prints the median of several repeats for each lever on and off. The bench (python -m kvchat.bench)
measures the whole engine; this isolates one mechanism at a time.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install
from kvchat import models
from kvchat.bench import hf_cache  # noqa: E402

REPEATS = 5


def median_ms(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def cold_prefill(model, ids: torch.Tensor, keep: int) -> Callable[[], object]:
    return lambda: model(input_ids=ids, cache=DynamicCache(config=model.config), logits_to_keep=keep)


def follow_up(model, cache, ids: torch.Tensor, history: int) -> Callable[[], object]:
    def run() -> None:
        model(input_ids=ids[:, history:], cache=cache, logits_to_keep=1)
        cache.crop(history - ids.shape[1])

    return run


def decode(model, make_cache: Callable[[], object], ids: torch.Tensor, steps: int) -> Callable[[], object]:
    def run() -> None:
        cache = make_cache()
        out = model(input_ids=ids, cache=cache, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            token = model(input_ids=token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)

    return run


def main() -> None:
    loaded = models.load(None, device="cpu", dtype="float32")
    model = loaded.model
    torch.manual_seed(0)
    ids = torch.randint(100, 40_000, (1, 2_030))  # 2,000 tokens of history + a 30-token follow-up
    rows = []
    with torch.inference_mode():
        short = ids[:, :1_186]
        rows.append(("cold prefill 1,186 tokens", "logits_to_keep=1", median_ms(cold_prefill(model, short, 1), 3),
                     "all logits", median_ms(cold_prefill(model, short, 0), 3)))  # fmt: skip
        for force in ("1", "0"):
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = force
            cache = hf_cache.new_cache(model, 2_100)
            model(input_ids=ids[:, :2_000], cache=cache, logits_to_keep=1)
            rows.append((f"30-token follow-up at 2,000 (native GQA={force})", "buffers",
                         median_ms(follow_up(model, cache, ids, 2_000)), "", None))  # fmt: skip
        os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
        prompt = ids[:, :2_000]
        buffers = median_ms(decode(model, lambda: hf_cache.new_cache(model, 2_100), prompt, 32), 2)
        growing = median_ms(decode(model, lambda: DynamicCache(config=model.config), prompt, 32), 2)
        rows.append(("prefill 2,000 + 32 decode steps", "preallocated buffers", buffers, "torch.cat cache", growing))
    with torch.no_grad():
        cache = hf_cache.new_cache(model, 2_100)
        model(input_ids=ids[:, :2_000], cache=cache, logits_to_keep=1)
        no_grad = median_ms(follow_up(model, cache, ids, 2_000))
    rows.append(("30-token follow-up at 2,000", "inference_mode", rows[1][2], "no_grad", no_grad))
    print(f"{'measurement':48} {'lever on':>22} {'ms':>8}   {'lever off':>18} {'ms':>8}")
    for name, on, on_ms, off, off_ms in rows:
        print(f"{name:48} {on:>22} {on_ms:8.0f}   {off:>18} {'' if off_ms is None else f'{off_ms:8.0f}'}")


if __name__ == "__main__":
    main()
