"""Shared prefix read in place (cascade attention) vs a copy of it per request: bytes and step time.

    python scripts/cascade.py

On the bundled model (CPU, fp32), B requests decode on top of the 1,165-token FAQ preset plus a
50-token private tail each. "shared": one KV run of the preset, read by every row in one attention
call per layer, merged with each row's own part by log-sum-exp (what the engine does). "copied":
each row holds its own copy of the preset in its buffer, one attention call per row (what a cache
that copies shared prefixes into each request, as kvchat did before, would run). Same forward,
same rows; the median step time of several decode steps and the KV bytes each way.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install
from kvchat import models
from kvchat.kv import attention
from kvchat.kv.runs import RowBuffer  # noqa: E402
from kvchat.chat import ChatTemplate  # noqa: E402
from kvchat.presets import load_presets  # noqa: E402

STEPS = 8


def step_ms(forward: attention.SegmentedForward, rows: list[attention.Row]) -> float:
    times = []
    for _ in range(STEPS):
        for row in rows:
            row.token_ids = [42]
        started = time.perf_counter()
        forward(rows)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    loaded = models.load(None, device="cpu", dtype="float32")
    model, device, dtype = loaded.model, loaded.device, loaded.dtype
    forward = attention.SegmentedForward(model, device)
    messages = [{"role": "system", "content": load_presets()["Acme cloud support faq (long)"]},
                {"role": "user", "content": "?"}]  # fmt: skip
    prompt = ChatTemplate(loaded.tokenizer).encode(messages)
    prefix, tail = prompt.token_ids[: prompt.prefix_len], list(range(500, 550))
    new = lambda tokens: RowBuffer(attention.kv_layout(model), tokens, device, dtype)  # noqa: E731
    with torch.inference_mode():
        buffer = new(len(prefix))
        forward([attention.Row([], buffer, prefix)])
        shared = buffer.take_run()
        print(f"prefix {len(prefix)} tokens; per row {len(tail)} private tokens; median of {STEPS} decode steps")
        print("rows | shared: step ms, tok/s, KV MiB | copied: step ms, tok/s, KV MiB")
        for count in (1, 4, 8, 16):
            rows_shared = [attention.Row([shared], new(len(tail) + STEPS + 1), tail) for _ in range(count)]
            forward(rows_shared)
            rows_copied = []
            for _ in range(count):
                own = new(len(prefix) + len(tail) + STEPS + 1)
                own.append_run(shared, len(prefix))
                rows_copied.append(attention.Row([], own, tail))
            forward(rows_copied)
            shared_ms, copied_ms = step_ms(forward, rows_shared), step_ms(forward, rows_copied)
            shared_mib = (shared.nbytes + sum(r.buffer.nbytes for r in rows_shared)) / 2**20
            copied_mib = sum(r.buffer.nbytes for r in rows_copied) / 2**20
            print(f"{count:>4} | {shared_ms:7.1f} {count / shared_ms * 1000:6.1f} {shared_mib:7.1f} | "
                  f"{copied_ms:7.1f} {count / copied_ms * 1000:6.1f} {copied_mib:7.1f}")


if __name__ == "__main__":
    main()
