"""Tiny random models of many architecture families, as a user's own checkpoint would be served:
the family matrix of tests/test_families.py and scripts/gpu_check.py."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

# family -> (extra config, the path it must be served on). Extra config makes each family use what
# sets it apart: Granite's multipliers, OPT's projection, Falcon's multi-query, ALiBi, windows.
FAMILIES: dict[str, tuple[dict, str]] = {
    "llama": ({}, "cascade"),
    "qwen2": ({"use_sliding_window": False}, "cascade"),
    "qwen3": ({}, "cascade"),
    "mistral": ({"sliding_window": 64}, "compatible"),  # a window shorter than the system prompt
    "gemma": ({}, "cascade"),
    "gemma2": ({"sliding_window": 64, "query_pre_attn_scalar": 24}, "compatible"),  # softcap: eager only
    "gemma3_text": ({"sliding_window": 64, "query_pre_attn_scalar": 24}, "compatible"),
    "granite": ({"attention_multiplier": 0.2, "residual_multiplier": 0.5, "logits_scaling": 2.0}, "cascade"),
    "phi3": ({}, "cascade"),
    "olmo2": ({}, "cascade"),
    "gpt2": ({}, "cascade"),  # absolute position embeddings
    "gpt_neox": ({}, "cascade"),  # partial rotary
    "opt": ({"word_embed_proj_dim": 64}, "cascade"),  # scaling=1.0: queries scaled before attention
    "falcon": ({"new_decoder_architecture": False, "multi_query": True, "alibi": False}, "compatible"),
    "bloom": ({}, "compatible"),  # ALiBi
    "mpt": ({}, "compatible"),  # ALiBi
    "cohere": ({}, "cascade"),
    "starcoder2": ({}, "cascade"),
    "smollm3": ({}, "cascade"),
    "stablelm": ({}, "compatible"),
    "gptj": ({"rotary_dim": 8}, "cascade"),
    "olmo3": ({"sliding_window": 64}, "compatible"),
}
NO_HEAD_DIM = {"falcon", "bloom", "mpt", "gpt2", "opt", "gpt_neox", "gptj", "stablelm"}


def tiny_family(family: str, tokenizer: PreTrainedTokenizerBase, extra: dict) -> PreTrainedModel:
    """A 2-layer random model whose greedy reply depends on the prompt (initializer 0.25, untied)."""
    torch.manual_seed(0)
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        initializer_range=0.25, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    if family in NO_HEAD_DIM:
        settings.pop("head_dim")
    config = AutoConfig.for_model(family, **{**settings, **extra})
    return AutoModelForCausalLM.from_config(config).eval()
