import torch

from kvchat.kv import attention
from kvchat.kv.runs import RowBuffer, bytes_per_token


def _prefill(loaded, forward, ids, capacity=None):
    buffer = RowBuffer(attention.kv_layout(loaded.model), capacity or len(ids), loaded.device, loaded.dtype)
    forward([attention.Row([], buffer, list(ids))])
    return buffer


def test_rows_reading_a_shared_run_get_the_logits_of_a_plain_forward(tiny_loaded):
    forward = attention.SegmentedForward(tiny_loaded.model, tiny_loaded.device)
    prefix, tails = list(range(100, 160)), [list(range(200, 200 + n)) for n in (1, 5, 17)]
    shared = _prefill(tiny_loaded, forward, prefix).take_run()
    rows = [attention.Row([shared], RowBuffer(attention.kv_layout(tiny_loaded.model), 40, tiny_loaded.device,
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
        a = flash([attention.Row([], RowBuffer(attention.kv_layout(tiny_loaded.model), 40, tiny_loaded.device,
                                                             tiny_loaded.dtype), ids)])  # fmt: skip
        b = portable([attention.Row([], RowBuffer(attention.kv_layout(tiny_loaded.model), 40, tiny_loaded.device,
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
    assert run.nbytes == 30 * bytes_per_token(attention.kv_layout(tiny_loaded.model), tiny_loaded.device, tiny_loaded.dtype)
    assert buffer.nbytes == 0 and torch.equal(run.keys[1], expected)
