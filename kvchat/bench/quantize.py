"""`--quantize`, measured side by side in one run: python -m kvchat.bench.quantize [--out DIR] [--modes ...]

Modes: float32 (today), bfloat16 (`--dtype`), fp16 and int8 linears (`--quantize`), on the bundled model.

Model level (the model alone, through its own forward and a stock transformers cache; nothing of kvchat):
- quality on `assets/quality-text.md` (a self-written public-domain text): greedy agreement with
  float32 (the next-token argmax at each position) and the perplexity ratio mode / float32;
- batch invariance: a prompt's last logits alone vs. beside 15 other prompts of the same length,
  and the text's logits fed in two chunks (a stock cache between them) vs. at once; largest |difference|;
- reuse oracle: each visitor's conversation (FAQ preset + question) answered greedily with the prompt
  fed at once, and with the preset fed first and the question after it (what reuse does); replies
  compared token for token, each difference with its step and the top-2 logit gap there.
Engine level (`kvchat.bench.dtypes.measure`, for the modes kvchat serves; a refused mode keeps the
probe's reason): load and quantise time, weight bytes, cached = uncached (vs. plain `generate`),
batched = solo, single-stream decode tokens/s timed by this caller, and 8 visitors at once.
llama.cpp (llama-cpp-python, optional): one stream on the same prompt and GGUF, in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from kvchat import models
from kvchat.bench.crowd import VISITOR_NEW_TOKENS, asks
from kvchat.bench.dtypes import measure
from kvchat.bench.systems import LlamaCpp, Messages, _decode_speed, unavailable
from kvchat.chat import ChatTemplate
from kvchat.engine import Engine
from kvchat.errors import InputError

MODES = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "fp16": ("float32", "fp16"),
         "int8": ("float32", "int8")}  # fmt: skip
QUALITY_TEXT = Path(__file__).resolve().parents[2] / "assets" / "quality-text.md"
QUALITY_TOKENS = 512
BATCH_ROWS, BATCH_PROMPT_TOKENS = 16, 48
CHUNK_AT = 200  # the text's first chunk, in tokens
TARGETS = {"decode_int8_over_llama_cpp": 0.6, "throughput_8_visitors_int8_over_llama_cpp": 2.0,
           "int8_batch_invariance_max_abs": 1e-3, "int8_reuse_exact": 0.95, "int8_ppl_ratio": 1.05}  # fmt: skip


def quality(model: PreTrainedModel, ids: torch.Tensor, reference: torch.Tensor | None) -> dict[str, Any]:
    """Logits of the text [T, vocab]; agreement and perplexity ratio against `reference` (float32's logits)."""
    logits = model(input_ids=ids).logits[0].float()
    result: dict[str, Any] = {"logits": logits}
    if reference is not None:
        nll = F.cross_entropy(logits[:-1], ids[0, 1:]).item()
        reference_nll = F.cross_entropy(reference[:-1], ids[0, 1:]).item()
        result["greedy_agreement_fp32"] = round((logits.argmax(-1) == reference.argmax(-1)).float().mean().item(), 4)
        result["ppl_ratio"] = round(float(torch.exp(torch.tensor(nll - reference_nll))), 4)
    return result


def batch_invariance(model: PreTrainedModel, ids: torch.Tensor, whole: torch.Tensor) -> dict[str, float]:
    """Largest |logit difference|: a row alone vs. in a batch of 16, and the text in two chunks vs. at once."""
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (BATCH_ROWS, BATCH_PROMPT_TOKENS), generator=generator)
    together = model(input_ids=prompts).logits[:, -1].float()
    alone = torch.stack([model(input_ids=prompts[i : i + 1]).logits[0, -1].float() for i in range(BATCH_ROWS)])
    cache = DynamicCache(config=model.config)
    first = model(input_ids=ids[:, :CHUNK_AT], cache=cache, use_cache=True).logits[0]
    rest = model(input_ids=ids[:, CHUNK_AT:], cache=cache, use_cache=True).logits[0]
    chunked = torch.cat([first, rest]).float()
    return {"batch_max_abs": float((together - alone).abs().max()), "chunks_max_abs": float((chunked - whole).abs().max()),
            "chunks_argmax_flips": int((chunked.argmax(-1) != whole.argmax(-1)).sum())}  # fmt: skip


def greedy(model: PreTrainedModel, ids: list[int], split: int, new_tokens: int, eos: set[int]) -> tuple[list[int], list[float]]:
    """Greedy reply after `ids` fed in one piece (split 0) or as ids[:split] then the rest, through a
    stock cache: (reply ids, the top-2 logit gap at each step)."""
    cache = DynamicCache(config=model.config)
    pieces = [ids[:split], ids[split:]] if split else [ids]
    for piece in pieces:
        logits = model(input_ids=torch.tensor([piece]), cache=cache, use_cache=True).logits[0, -1]
    reply, gaps = [], []
    for _ in range(new_tokens):
        top = torch.topk(logits.float(), 2)
        gaps.append(float(top.values[0] - top.values[1]))
        token = int(top.indices[0])
        if token in eos:
            break
        reply.append(token)
        logits = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1]
    return reply, gaps


def reuse_oracle(loaded: models.LoadedModel, conversations: list[Messages], new_tokens: int) -> dict[str, Any]:
    """Reply with the preset fed first (as reuse does) vs. the prompt at once, per conversation."""
    template = ChatTemplate(loaded.tokenizer)
    eos = {loaded.tokenizer.eos_token_id, *torch.tensor(loaded.model.generation_config.eos_token_id).flatten().tolist()}
    differences = []
    for index, messages in enumerate(conversations):
        prompt = template.encode(messages)
        at_once, gaps = greedy(loaded.model, prompt.token_ids, 0, new_tokens, eos)
        reused, _ = greedy(loaded.model, prompt.token_ids, prompt.prefix_len, new_tokens, eos)
        if reused != at_once:
            step = next((i for i, (a, b) in enumerate(zip(reused, at_once)) if a != b), min(len(reused), len(at_once)))
            differences.append({"visitor": index, "step": step, "top2_gap": round(gaps[step], 4) if step < len(gaps) else None})
    return {"reuse_exact": round(1 - len(differences) / len(conversations), 4), "reuse_differences": differences}


def model_level(mode: str, ids: torch.Tensor, reference: torch.Tensor | None, conversations: list[Messages],
                new_tokens: int) -> tuple[dict[str, Any], torch.Tensor]:  # fmt: skip
    dtype, quantize = MODES[mode]
    loaded = models.load(None, device="cpu", dtype=dtype, quantize_mode=quantize)
    with torch.inference_mode():
        measured = quality(loaded.model, ids, reference)
        whole = measured.pop("logits")
        measured.update(batch_invariance(loaded.model, ids, whole))
        measured.update(reuse_oracle(loaded, conversations, new_tokens))
    report = loaded.quantization
    measured["weight_bytes"] = report.weight_bytes_after if report else None
    measured["quantize_s"] = round(report.seconds, 2) if report else None
    return measured, whole


def single_stream(engine: Engine, messages: Messages, new_tokens: int) -> float:
    """Decode tokens/s of one request alone, timed here: (tokens - 1) / (last piece - first piece)."""
    generation = engine.stream("single", messages, max_new_tokens=new_tokens)
    times = [time.perf_counter() for _ in generation]
    tokens = generation.wait().new_tokens
    return (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def engine_level(mode: str, visitors: int, new_tokens: int, prompt: Messages) -> dict[str, Any]:
    dtype, quantize = MODES[mode]
    started = time.perf_counter()
    try:
        measured = measure(dtype, visitors, new_tokens, "cpu", quantize)
    except InputError as err:
        return {"served": False, "refused": str(err), "load_s": round(time.perf_counter() - started, 1)}
    engine = Engine.load(dtype=dtype, quantize=quantize, usage_db=None)
    try:
        single_stream(engine, prompt, 8)  # pages the weights in
        measured["single_stream_tokens_per_s"] = round(single_stream(engine, prompt, new_tokens), 2)
        measured["load_s"] = round(engine.loaded.load_s, 1)
    finally:
        engine.close()
    return {"served": True, **measured}


def llama_cpp(prompt: Messages, new_tokens: int) -> dict[str, Any]:
    why = unavailable("llama-cpp")
    if why:
        return {"unavailable": why}
    engine = Engine.load(usage_db=None)
    try:
        llama = LlamaCpp(engine, str(models.bundled_gguf()))
        llama.reply("warm", prompt, 8)
        ids = engine.encode(prompt).token_ids
        llama.llm.reset()  # no prompt cache: the same cold prompt kvchat's single stream sees
        no_eos = {token: -1e4 for token in engine.eos_ids}  # decode all `new_tokens`, as a long reply would
        times = [time.perf_counter() for _ in llama.llm.create_completion(
            ids, max_tokens=new_tokens, temperature=0.0, stream=True, logit_bias=no_eos)]  # fmt: skip
        return {"single_stream_tokens_per_s": round(_decode_speed(times), 2), "tokens": len(times)}
    finally:
        engine.close()


def keys(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's keys (int8) and the same for fp16, from this run's figures."""
    llama = results["llama_cpp"].get("single_stream_tokens_per_s")
    out: dict[str, Any] = {}
    for mode in results["model"]:
        served, model = results["engine"][mode], results["model"][mode]
        ratio = lambda x: round(x / llama, 3) if x and llama else None  # noqa: E731
        out[f"decode_{mode}_over_llama_cpp"] = ratio(served.get("single_stream_tokens_per_s"))
        out[f"throughput_8_visitors_{mode}_over_llama_cpp"] = ratio(served.get("together_tokens_per_s"))
        out[f"{mode}_batch_invariance_max_abs"] = max(model["batch_max_abs"], model["chunks_max_abs"])
        out[f"{mode}_reuse_exact"] = model["reuse_exact"]
        if mode != "float32":
            out[f"{mode}_greedy_agreement_fp32"] = model["greedy_agreement_fp32"]
            out[f"{mode}_ppl_ratio"] = model["ppl_ratio"]
    return out


def run(visitors: int, new_tokens: int, modes: list[str]) -> dict[str, Any]:
    loaded = models.load(None, device="cpu", dtype="float32")
    ids = loaded.tokenizer(QUALITY_TEXT.read_text(), return_tensors="pt").input_ids[:, :QUALITY_TOKENS]
    conversations = asks(visitors)
    results: dict[str, Any] = {"model": {}, "engine": {}, "visitors": visitors, "new_tokens": new_tokens,
                               "threads": torch.get_num_threads()}  # fmt: skip
    reference = None
    for mode in ["float32", *(m for m in modes if m != "float32")]:  # float32 first: the reference
        results["model"][mode], whole = model_level(mode, ids, reference, conversations, new_tokens)
        reference = whole if reference is None else reference
        print(mode, "model level:", json.dumps(results["model"][mode]), flush=True)
    for mode in results["model"]:
        results["engine"][mode] = engine_level(mode, visitors, new_tokens, conversations[0])
        print(mode, "engine:", json.dumps(results["engine"][mode]), flush=True)
    results["llama_cpp"] = llama_cpp(conversations[0], new_tokens)
    results["keys"] = keys(results)
    results["targets"] = TARGETS
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visitors", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=VISITOR_NEW_TOKENS)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--modes", default=",".join(MODES), help="float32 always runs (the reference)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(set(modes) - set(MODES))}; choose from {', '.join(MODES)}")
    results = run(args.visitors, args.new_tokens, modes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results["keys"], indent=2))
    print(f"wrote {out / 'quantize.json'}")


if __name__ == "__main__":
    main()
