"""The bench's floor cache (`kvchat.bench.hf_cache`): a DynamicCache over preallocated buffers."""

import torch

from kvchat.bench import hf_cache


def fill(loaded, cache, num_tokens, start=5):
    ids = torch.arange(start, start + num_tokens).unsqueeze(0)  # [1, n]
    with torch.inference_mode():
        return loaded.model(input_ids=ids, cache=cache, use_cache=True).logits


def test_buffer_cache_gives_the_same_logits_as_dynamic_cache(tiny_loaded):
    from transformers import DynamicCache

    ours, theirs = hf_cache.new_cache(tiny_loaded.model), DynamicCache(config=tiny_loaded.model.config)
    for start, n in [(5, 40), (60, 1), (61, 300)]:  # prefill, one decode step, then a regrow
        assert torch.equal(fill(tiny_loaded, ours, n, start), fill(tiny_loaded, theirs, n, start))
    assert hf_cache.num_tokens_of(ours) == 341


def test_clone_is_independent_and_truncate_crops(tiny_loaded):
    cache = hf_cache.new_cache(tiny_loaded.model)
    fill(tiny_loaded, cache, 50)
    copy = hf_cache.clone(tiny_loaded.model, cache, num_tokens=20, reserve_tokens=10)
    assert hf_cache.num_tokens_of(copy) == 20
    before = cache.layers[0].keys[:, :, 20:25].clone()
    fill(tiny_loaded, copy, 5, start=900)  # writes positions 20..24 of the copy only
    assert torch.equal(cache.layers[0].keys[:, :, 20:25], before)
    hf_cache.truncate_to(cache, 10)
    assert hf_cache.num_tokens_of(cache) == 10
    exact = hf_cache.clone(tiny_loaded.model, cache)  # a shared prefix never grows: no spare room
    assert exact.layers[0].capacity_tokens == 10


def test_nbytes_counts_allocated_storage(tiny_loaded):
    cache = hf_cache.new_cache(tiny_loaded.model, reserve_tokens=100)
    assert hf_cache.kv_nbytes(cache) == 0
    fill(tiny_loaded, cache, 10)
    layer = cache.layers[0]
    batch, kv_heads, _, head_dim = layer.keys.shape
    per_layer = 2 * batch * kv_heads * layer.capacity_tokens * head_dim * layer.keys.element_size()
    assert hf_cache.kv_nbytes(cache) == per_layer * len(cache.layers)
    assert layer.capacity_tokens == hf_cache.GROWTH_TOKENS  # 100 reserved, rounded up
