"""The guarantee per dtype, measured on the bundled model: python -m kvchat.bench.dtypes

For each dtype (float32, bfloat16), one engine on the bundled model and n visitors on the FAQ preset:
- reference: plain `model.generate` on each conversation (no kvchat, no cache);
- cached, solo: the visitors one after another, each reading the preset cached by the first;
- batched: the same visitors all at once (decoded together).
Every greedy reply is compared token by token with the reference (cached vs uncached) and with its
solo twin (batched vs solo). For each difference: the first differing step and the model's own
top-2 logit gap there (plain forward), so a near-tie is told from a wrong path.
Speed, side by side in this run: prefill tokens/s of the cold preset (the probe's own engine,
cache empty) and decode tokens/s of one visitor alone.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from kvchat import models
from kvchat.bench.crowd import VISITOR_NEW_TOKENS, _serve, _together, asks, first_difference
from kvchat.bench.systems import Messages
from kvchat.engine import Engine


def generate_ids(engine: Engine, messages: Messages, max_new_tokens: int) -> list[int]:
    """Plain `generate`, greedy, on the whole conversation: the reply's token ids (eos dropped)."""
    ids = engine.encode(messages).token_ids
    with torch.inference_mode():
        out = engine.loaded.model.generate(
            torch.tensor([ids], device=engine.device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
            device=engine.device), max_new_tokens=max_new_tokens, do_sample=False,
        )  # fmt: skip
    new = out[0, len(ids) :].tolist()
    return new[:-1] if new and new[-1] in engine.eos_ids else new


def measure(dtype: str, visitors: int, new_tokens: int, device: str = "cpu", quantize: str = "none") -> dict[str, Any]:
    """One engine on the bundled model in `dtype` (linears quantised by `quantize`): see the module docstring."""
    loaded = models.load(None, device=device, dtype=dtype, quantize_mode=quantize)
    engine = Engine(loaded, cache_budget_bytes=1024 * 2**20)
    try:
        conversations = asks(visitors)
        begun = time.perf_counter()
        cold = engine.chat("cold", conversations[0], max_new_tokens=1)  # the preset, computed cold
        prefill_tps = cold.usage.prompt_tokens / (time.perf_counter() - begun)
        reference = [generate_ids(engine, m, new_tokens) for m in conversations]
        solo = [_serve(engine, f"solo-{i}", m, time.perf_counter()) for i, m in enumerate(conversations)]
        decode_tps = engine.chat("speed", conversations[0], max_new_tokens=new_tokens).usage.decode_tokens_per_s
        together_s, together = _together(engine, "crowd", conversations)
        cached = _differences(engine, conversations, [s.token_ids for s in solo], reference)
        batched = _differences(engine, conversations, [t.token_ids for t in together], [s.token_ids for s in solo])
        return {
            "device": device, "dtype": dtype, "quantize": quantize, "path": engine.attention.path, "probe_ms": round(engine.attention.probe_ms),
            "visitors": visitors, "new_tokens": new_tokens,
            "cached_vs_uncached_equal": visitors - len(cached), "cached_vs_uncached": cached,
            "batched_vs_solo_equal": visitors - len(batched), "batched_vs_solo": batched,
            "prefill_tokens_per_s": round(prefill_tps, 1), "decode_tokens_per_s": round(decode_tps or 0.0, 1),
            "together_tokens_per_s": round(sum(t.new_tokens for t in together) / together_s, 1),
        }  # fmt: skip
    finally:
        engine.close()


def _differences(engine: Engine, conversations: list[Messages], got: list[list[int]],
                 expected: list[list[int]]) -> list[dict[str, Any]]:  # fmt: skip
    """Each reply that differs from its expected twin: where, the two tokens there, the model's top-2 gap."""
    differences = []
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a != b:
            where = first_difference(engine, conversations[i], a, b)
            differences.append({"visitor": i, "step": where["step"], "top2_gap": where["top2_gap"], "got": where["batched"],
                                "expected": where["solo"], "plain_forward_top2": where["plain_forward_top2"]})  # fmt: skip
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--visitors", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    results = [measure(dtype, args.visitors, VISITOR_NEW_TOKENS, args.device) for dtype in args.dtypes.split(",")]
    for r in results:
        print(f"{r['dtype']:>9}: path {r['path']} (probe {r['probe_ms']} ms); cached = uncached "
              f"{r['cached_vs_uncached_equal']}/{r['visitors']}, batched = solo {r['batched_vs_solo_equal']}/"
              f"{r['visitors']}; prefill {r['prefill_tokens_per_s']} tok/s, decode {r['decode_tokens_per_s']} tok/s")
        for kind in ("cached_vs_uncached", "batched_vs_solo"):
            for d in r[kind]:
                print(f"           {kind}: visitor {d['visitor']} first differs at step {d['step']}, "
                      f"top-2 gap {d['top2_gap']:.4f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
