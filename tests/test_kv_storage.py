import torch

from kvchat import attention, kv_storage


def fill(loaded, cache, num_tokens, start=5):
    ids = torch.arange(start, start + num_tokens).unsqueeze(0)  # [1, n]
    with torch.inference_mode():
        return loaded.model(input_ids=ids, cache=cache, use_cache=True).logits


def test_buffer_cache_gives_the_same_logits_as_dynamic_cache(tiny_loaded):
    from transformers import DynamicCache

    ours, theirs = kv_storage.new_cache(tiny_loaded.model), DynamicCache(config=tiny_loaded.model.config)
    for start, n in [(5, 40), (60, 1), (61, 300)]:  # prefill, one decode step, then a regrow
        assert torch.equal(fill(tiny_loaded, ours, n, start), fill(tiny_loaded, theirs, n, start))
    assert kv_storage.num_tokens_of(ours) == 341


def test_clone_is_independent_and_truncate_crops(tiny_loaded):
    cache = kv_storage.new_cache(tiny_loaded.model)
    fill(tiny_loaded, cache, 50)
    copy = kv_storage.clone(tiny_loaded.model, cache, num_tokens=20, reserve_tokens=10)
    assert kv_storage.num_tokens_of(copy) == 20
    before = cache.layers[0].keys[:, :, 20:25].clone()
    fill(tiny_loaded, copy, 5, start=900)  # writes positions 20..24 of the copy only
    assert torch.equal(cache.layers[0].keys[:, :, 20:25], before)
    kv_storage.truncate_to(cache, 10)
    assert kv_storage.num_tokens_of(cache) == 10
    exact = kv_storage.clone(tiny_loaded.model, cache)  # a shared prefix never grows: no spare room
    assert exact.layers[0].capacity_tokens == 10


def test_nbytes_counts_allocated_storage(tiny_loaded):
    cache = kv_storage.new_cache(tiny_loaded.model, reserve_tokens=100)
    assert kv_storage.kv_nbytes(cache) == 0
    fill(tiny_loaded, cache, 10)
    layer = cache.layers[0]
    per_layer = 2 * layer._kbuf.numel() * layer._kbuf.element_size()
    assert kv_storage.kv_nbytes(cache) == per_layer * len(cache.layers)
    assert layer.capacity_tokens == kv_storage.GROWTH_TOKENS  # 100 reserved, rounded up


def _prefill(loaded, forward, ids, capacity=None):
    buffer = kv_storage.RowBuffer(loaded.model, capacity or len(ids), loaded.device, loaded.dtype)
    forward([attention.Row([], buffer, list(ids))])
    return buffer


def test_rows_reading_a_shared_run_get_the_logits_of_a_plain_forward(tiny_loaded):
    forward = attention.SegmentedForward(tiny_loaded.model, tiny_loaded.device)
    prefix, tails = list(range(100, 160)), [list(range(200, 200 + n)) for n in (1, 5, 17)]
    shared = _prefill(tiny_loaded, forward, prefix).take_run()
    rows = [attention.Row([shared], kv_storage.RowBuffer(tiny_loaded.model, 40, tiny_loaded.device,
                                                           tiny_loaded.dtype), tail) for tail in tails]  # fmt: skip
    with torch.inference_mode():
        logits = forward(rows)
        for tail, row_logits in zip(tails, logits, strict=True):
            plain = tiny_loaded.model(input_ids=torch.tensor([prefix + tail])).logits[0, -1]
            torch.testing.assert_close(row_logits, plain, rtol=1e-4, atol=1e-4)
        for row in rows:  # one decode step each, rows of different lengths in one forward
            row.token_ids = [7]
        logits = forward(rows)
        for tail, row_logits in zip(tails, logits, strict=True):
            plain = tiny_loaded.model(input_ids=torch.tensor([prefix + tail + [7]])).logits[0, -1]
            torch.testing.assert_close(row_logits, plain, rtol=1e-4, atol=1e-4)
    assert shared.num_tokens == 60  # read in place, never written


def test_the_portable_kernel_equals_the_cpu_flash_kernel(tiny_loaded):
    """CUDA runs the portable path (plain attention with its log-sum-exp); check it here on CPU."""
    flash = attention.SegmentedForward(tiny_loaded.model, tiny_loaded.device)
    portable = attention.SegmentedForward(tiny_loaded.model, tiny_loaded.device)
    portable.use_flash_cpu = False
    ids = list(range(300, 340))
    with torch.inference_mode():
        a = flash([attention.Row([], kv_storage.RowBuffer(tiny_loaded.model, 40, tiny_loaded.device,
                                                             tiny_loaded.dtype), ids)])  # fmt: skip
        b = portable([attention.Row([], kv_storage.RowBuffer(tiny_loaded.model, 40, tiny_loaded.device,
                                                                tiny_loaded.dtype), ids)])  # fmt: skip
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_split_copies_the_smaller_side_and_counts_the_storage_it_keeps(tiny_loaded):
    forward = attention.SegmentedForward(tiny_loaded.model, tiny_loaded.device)
    with torch.inference_mode():
        run = _prefill(tiny_loaded, forward, list(range(100))).take_run()
    per_token = run.nbytes // 100
    head, tail = run.split(10)  # the 10-token head is copied; the tail is a view of the old storage
    assert (head.num_tokens, tail.num_tokens) == (10, 90)
    assert head.nbytes == 10 * per_token and tail.nbytes == 100 * per_token
    head, tail = run.split(90)
    assert head.nbytes == 100 * per_token and tail.nbytes == 10 * per_token
    assert torch.equal(torch.cat([head.keys[0], tail.keys[0]], dim=1), run.keys[0])


def test_take_run_leaves_an_exact_run_and_an_empty_buffer(tiny_loaded):
    forward = attention.SegmentedForward(tiny_loaded.model, tiny_loaded.device)
    with torch.inference_mode():
        buffer = _prefill(tiny_loaded, forward, list(range(30)), capacity=64)
    expected = buffer.keys[1][:, :30].clone()
    run = buffer.take_run(30)
    assert run.nbytes == 30 * kv_storage.bytes_per_token(tiny_loaded.model, tiny_loaded.device, tiny_loaded.dtype)
    assert buffer.nbytes == 0 and torch.equal(run.keys[1], expected)
