"""--quantize: fp16 linears are served exactly (the probe holds them to the float model's rounding,
and replies equal plain `generate` on the same quantised weights, across families); int8 linears
are refused with the reason; each quantised layer gives a row the same output alone or in a batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_turns_match_generate, greedy_baseline, models_home, saved_family
from kvchat import Engine, InputError, models, probe
from kvchat.bench.families import FAMILIES, tiny_family
from kvchat.quantize import Fp16Linear, Int8Linear, quantize

NEW = 16
SYSTEM = {"role": "system", "content": "You answer questions for the town museum about its lighthouse "
          "collection, the old lenses and the keepers' notebooks. " * 12}  # fmt: skip


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def rows_of_many_scales(n: int, features: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, features) * torch.logspace(-2, 2, n)[:, None]


@pytest.mark.parametrize("layer_type", [Int8Linear, Fp16Linear])
def test_a_quantised_row_is_the_same_alone_or_beside_15_others(layer_type):
    """int8: bit for bit (each row rounded on its own scale); fp16: within float32 rounding, as
    `nn.Linear` itself."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 80).requires_grad_(False)
    layer = layer_type(linear)
    x = rows_of_many_scales(16, 96)
    together = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(16)])
    if layer_type is Int8Linear:
        assert torch.equal(together, alone)
    else:
        torch.testing.assert_close(together, alone)
    error = (together - linear(x)).norm(dim=1) / linear(x).norm(dim=1)
    assert float(error.max()) < 0.03  # a quantisation of the float layer: close, each row on its own scale


def test_fp16_linear_is_the_rounded_weights_in_float32_arithmetic():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    expected = F.linear(x, linear.weight.detach().half().float(), linear.bias)
    got = Fp16Linear(linear)(x)
    assert got.shape == (3, 5, 48)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(linear.weight.detach().half().float(), linear.weight.detach())  # it did round


def test_quantize_replaces_every_linear_and_counts_the_bytes(tokenizer):
    model = tiny_family("llama", tokenizer, {})
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    report = quantize(model, "fp16")
    assert report.layers == linears and not any(isinstance(m, nn.Linear) for m in model.modules())
    fp16_bytes = sum(m.weight_nbytes for m in model.modules() if isinstance(m, Fp16Linear))
    assert report.weight_bytes_before - report.weight_bytes_after == fp16_bytes  # 4 bytes a weight -> 2


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "phi3", "mistral"])
def test_fp16_linears_are_served_exactly(family, tokenizer, tmp_path):
    """Turn 1, a follow-up on the session's cached turns, and a second session on the shared system
    prompt each equal plain `generate` on the same fp16-quantised model (gpt2's Conv1D layers too;
    mistral's window takes the compatible path)."""
    engine = Engine.load(str(saved_family(family, tokenizer, tmp_path)), device="cpu", dtype="float32",
                         quantize="fp16", usage_db=None)  # fmt: skip
    loaded = engine.loaded
    try:
        assert loaded.quantization is not None and loaded.quantization.layers >= 5
        assert not any(isinstance(m, nn.Linear) for m in loaded.model.modules())
        assert engine.attention.path == FAMILIES[family][1], engine.attention.summary()
        questions = ("What did the keeper write each evening?", "And in winter?", "How often did the lenses turn?")
        assert_turns_match_generate(engine, SYSTEM, questions, NEW)
    finally:
        engine.close()


def test_int8_linears_on_the_bundled_model_are_refused_with_the_reason():
    """Rounding activations to integers turns float32's chunking differences into different values
    that grow through the bundled model's 30 layers. Held to its own (int8) rounding the probe would
    pass it; held to the float model's rounding, as the engine does, it is refused."""
    loaded = models.load(None, device="cpu", dtype="float32", home=models_home(), quantize_mode="int8")
    _, lenient = probe.choose(loaded.model, loaded.device)
    assert lenient.path == "cascade"  # what a self-scaled tolerance would have let through
    with pytest.raises(InputError, match=r"--quantize int8 changes what reuse computes.*above the tolerance.*fp16"):
        Engine(loaded, cache_budget_bytes=64 * 2**20)


def test_quantize_asks_for_a_float32_model_on_the_cpu(tiny_model_dir):
    with pytest.raises(InputError, match="--dtype float32"):
        Engine.load(str(tiny_model_dir), device="cpu", dtype="bfloat16", quantize="fp16", usage_db=None)
    with pytest.raises(InputError, match="unknown quantisation"):
        Engine.load(str(tiny_model_dir), device="cpu", quantize="int4", usage_db=None)


def test_a_quantised_model_is_another_model_to_the_cache(tiny_model_dir):
    """Its KV differs from the float model's, so it must never read the float model's disk files."""
    plain = models.load(str(tiny_model_dir), device="cpu", dtype="float32")
    fp16 = models.load(str(tiny_model_dir), device="cpu", dtype="float32", quantize_mode="fp16")
    assert plain.identity != fp16.identity and "fp16" in fp16.name
    assert fp16.quantization.weight_bytes_after < fp16.quantization.weight_bytes_before


def test_the_bundled_model_in_fp16_answers_a_cached_follow_up_as_recomputed():
    loaded = models.load(None, device="cpu", dtype="float32", home=models_home(), quantize_mode="fp16")
    engine = Engine(loaded, cache_budget_bytes=256 * 2**20)
    try:
        first = [user("Name three things a lighthouse keeper did every day.")]
        reply = engine.chat("visitor", first, max_new_tokens=24)
        assert reply.text == greedy_baseline(loaded, engine, first, 24)
        follow_up = first + [{"role": "assistant", "content": reply.text}, user("Which of them was hardest?")]
        again = engine.chat("visitor", follow_up, max_new_tokens=24)
        assert again.usage.cache_source == "session" and again.usage.cached_tokens > 20
        assert again.text == greedy_baseline(loaded, engine, follow_up, 24)
    finally:
        engine.close()
