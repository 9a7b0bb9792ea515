"""Bring your own model: every architecture is served exactly (against plain `generate` on the same
weights) or refused with the reason. Tiny random configs of many families, each saved and loaded
as a user's local model directory; a system prompt long enough to take the shared path."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from conftest import assert_turns_match_generate, greedy_baseline, saved_family
from kvchat import Engine, InputError, models, probe
from kvchat.kv.attention import SegmentedForward
from kvchat.bench.families import FAMILIES, tiny_family

NEW = 16
SYSTEM = {"role": "system", "content": "You help the astronomy club plan its observing nights and answer "
          "questions about telescopes, star charts and the weather. " * 16}  # fmt: skip

def user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_is_served_exactly_on_its_verified_path(family, tokenizer, tmp_path):
    engine = Engine.load(str(saved_family(family, tokenizer, tmp_path)), device="cpu", dtype="float32", usage_db=None)
    loaded = engine.loaded
    try:
        assert engine.attention.path == FAMILIES[family][1], engine.attention.summary()
        _, second = assert_turns_match_generate(engine, SYSTEM, ("What is a comet?", "And a meteor?", "Tell me about Mars."), NEW)
        assert second.usage.cached_tokens >= 300
        crowd = [[SYSTEM, user(f"Question {i}: which planet has the most moons?")] for i in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda i: engine.chat(f"s{i}", crowd[i], max_new_tokens=NEW), range(4)))
        for messages, got in zip(crowd, replies, strict=True):
            assert got.text == greedy_baseline(loaded, engine, messages, NEW), "4 at once"
    finally:
        engine.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_in_bfloat16_each_family_is_verified_on_the_same_path(family, tokenizer):
    """bf16 rounding is not a wrong result: the probe's tolerance (the model's own rounding, at
    least a few bf16 units) passes the path float32 chose, and the float32 twin confirms it."""
    extra, path = FAMILIES[family]
    model = tiny_family(family, tokenizer, extra).to(torch.bfloat16)
    _, choice = probe.choose(model, torch.device("cpu"))
    assert choice.path == path, [c.describe() for c in choice.checks]
    assert [c.dtype for c in choice.checks if c.exact] == ["bfloat16", "float32"]


def test_a_model_with_linear_attention_layers_is_refused_with_the_reason(tokenizer):
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2)).eval()
    loaded = models.LoadedModel(model, tokenizer, "tiny-mamba", "tiny:mamba", torch.device("cpu"), torch.float32, 0.0)
    with pytest.raises(InputError, match="mamba"):
        Engine(loaded, cache_budget_bytes=2**20)


def test_the_probe_catches_an_attention_one_scaling_factor_off(tiny_loaded, monkeypatch):
    honest = SegmentedForward._kernel

    def off_by_five_percent(self, q, k, v, mask, scale, softcap):
        return honest(self, q, k, v, mask, scale * 1.05, softcap)

    monkeypatch.setattr(SegmentedForward, "_kernel", off_by_five_percent)
    engine = Engine(tiny_loaded, cache_budget_bytes=16 * 2**20)
    try:
        assert engine.attention.path == "compatible"  # the broken cascade is not served
        assert "above the tolerance" in engine.attention.reason
        assert engine.stats().attention.startswith("compatible")
    finally:
        engine.close()
    with pytest.raises(InputError, match=r"llama model exactly.*cascade \(float32\): logits differ"):
        Engine(tiny_loaded, cache_budget_bytes=16 * 2**20, attention="cascade")


def test_a_16_bit_model_is_also_verified_in_float32_where_its_rounding_could_hide_an_error(tiny_loaded, monkeypatch):
    import copy

    half = copy.deepcopy(tiny_loaded.model).to(torch.bfloat16)
    _, honest_choice = probe.choose(half, tiny_loaded.device)
    assert honest_choice.path == "cascade"
    assert [c.dtype for c in honest_choice.checks] == ["bfloat16", "float32"]  # the float32 twin too
    kernel = SegmentedForward._kernel
    monkeypatch.setattr(SegmentedForward, "_kernel", lambda self, q, k, v, mask, scale, softcap:
                        kernel(self, q, k, v, mask, scale * 1.05, softcap))  # fmt: skip
    _, choice = probe.choose(half, tiny_loaded.device)
    assert choice.path == "compatible", choice.checks


def test_the_probe_refuses_when_no_path_reproduces_the_model(tiny_loaded, monkeypatch):
    from kvchat.kv.attention import NativeForward

    honest = NativeForward._forward
    monkeypatch.setattr(NativeForward, "_forward", lambda self, row: honest(self, row) * 1.01)
    monkeypatch.setattr(SegmentedForward, "__call__", lambda self, rows: (_ for _ in ()).throw(ValueError("broken")))
    with pytest.raises(InputError, match=r"cannot serve this llama model exactly.*cascade \(float32\): ValueError: broken.*compatible \(float32\): logits differ"):
        Engine(tiny_loaded, cache_budget_bytes=16 * 2**20)


def test_the_probe_is_quick_and_passes_on_the_bundled_model(bundled_loaded):
    _, choice = probe.choose(bundled_loaded.model, bundled_loaded.device)
    assert choice.path == "cascade", choice.summary()
    assert choice.checks[0].error is not None and choice.checks[0].error <= choice.checks[0].tolerance


def smollm2_as_qwen2(loaded: models.LoadedModel) -> models.LoadedModel:
    """The bundled SmolLM2 weights re-expressed as a Qwen2 checkpoint: the same layers, plus the
    q/k/v biases Qwen2 always has, set to zero. The same function, run by another family's code."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    source = loaded.model.config
    config = Qwen2Config(
        vocab_size=source.vocab_size, hidden_size=source.hidden_size, intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers, num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads, max_position_embeddings=source.max_position_embeddings,
        rope_parameters=dict(source.rope_parameters), rms_norm_eps=source.rms_norm_eps,
        tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id, pad_token_id=source.pad_token_id,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(loaded.model.state_dict(), strict=False)
    assert not unexpected and all(name.endswith(("_proj.bias",)) for name in missing), (missing, unexpected)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in missing:
                parameter.zero_()
    return models.LoadedModel(model, loaded.tokenizer, "smollm2-as-qwen2", "test:smollm2-as-qwen2",
                              loaded.device, loaded.dtype, 0.0)  # fmt: skip


def test_real_weights_as_a_second_family_give_the_same_replies_on_the_shared_path(bundled_loaded):
    qwen2 = smollm2_as_qwen2(bundled_loaded)
    system = {"role": "system", "content": "You are a patient tutor for a beginners' astronomy class. "
              "Answer in two short sentences, with one fact a student can check tonight. " * 10}  # fmt: skip
    replies: dict[str, list[str]] = {}
    for loaded in (bundled_loaded, qwen2):
        engine = Engine(loaded, cache_budget_bytes=256 * 2**20)
        try:
            assert engine.attention.path == "cascade"
            texts = []
            for session, question in (("a", "Why is Mars red?"), ("b", "What is a light year?")):
                reply = engine.chat(session, [system, user(question)], max_new_tokens=24)
                texts.append(reply.text)
            assert reply.usage.cache_source == "prefix" and reply.usage.cached_tokens >= 256  # read in place
            replies[loaded.name] = texts
        finally:
            engine.close()
    assert replies["smollm2-as-qwen2"] == replies[bundled_loaded.name]
    assert all(len(text) > 20 for text in replies["smollm2-as-qwen2"])
