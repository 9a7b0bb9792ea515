"""Which int8 matmul is fast on this CPU, and which keeps a row's output independent of its batch?

    python scripts/int8_kernels.py

A measurement for "--quantize int8" (issue 19), before building anything: every linear shape of the
bundled model (SmolLM2-135M: hidden 576, MLP 1536, k/v 192, vocab 49,152), at 1, 4, 16 and 128 rows,
median of repeated runs on the threads torch uses here. Kernels:
  fp32       F.linear, today's path
  w8 fp32    torch.ops.aten._weight_int8pack_mm, int8 weights with per-channel scales, fp32 activations
  w8 bf16    the same with bf16 activations and scales
  w8a8 fbgemm torch.ops.quantized.linear_dynamic (per-tensor activation scale: for reference only;
              7-bit activations, `reduce_range`, as AVX2's 16-bit pair sums saturate with 8 bits)
  w8a8 rows   the same kernel made per-token: each row divided by its own absmax, plus a sentinel row
              holding +1 and -1, so the tensor's min/max (hence fbgemm's activation scale and zero
              point) are the same in every batch and a row's int8 values depend on that row alone
  _int_mm    torch._int_mm on int8 activations (the op torchao's per-token W8A8 calls on CPU)
Batch invariance: the largest difference between a row computed inside a 16-row batch and alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = {"q/o (576x576)": (576, 576), "k/v (192x576)": (192, 576), "gate/up (1536x576)": (1536, 576),
          "down (576x1536)": (576, 1536), "lm_head (49152x576)": (49152, 576)}  # fmt: skip
ROWS = (1, 4, 16, 128)


def median_ms(run: Callable[[], object], repeats: int = 20) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (int8 [N, K], fp32 scales [N])."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def fbgemm_packed(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`weight` [N, K] as fbgemm's packed int8 weight, one scale per output channel."""
    zero_points = torch.zeros(len(scales), dtype=torch.long)
    return torch.ops.quantized.linear_prepack(
        torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8), None)


def sentinel_row(in_features: int) -> torch.Tensor:
    row = torch.zeros(1, in_features)
    row[0, :2] = torch.tensor([1.0, -1.0])
    return row


def w8a8_rows(x: torch.Tensor, packed: torch.Tensor, sentinel: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T with int8 activations per row: each row scaled to absmax 1, and the sentinel
    row (+1 and -1) fixes the tensor's min/max, so fbgemm's activation scale is the same in any batch."""
    absmax = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.ops.quantized.linear_dynamic(torch.cat([x / absmax, sentinel]), packed, True)[:-1] * absmax


def kernels(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    w8, scales = per_channel_int8(weight)
    scales_bf16 = scales.to(torch.bfloat16)
    packed = fbgemm_packed(weight, scales)
    sentinel = sentinel_row(weight.shape[1])
    w8_t = w8.t().contiguous()

    def int_mm(x: torch.Tensor) -> torch.Tensor:
        x_scales = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        x8 = torch.round(x / x_scales).clamp(-127, 127).to(torch.int8)
        return torch._int_mm(x8, w8_t).float() * x_scales * scales

    return {
        "fp32": lambda x: F.linear(x, weight),
        "w8 fp32": lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, scales),
        "w8 bf16": lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w8, scales_bf16).float(),
        "w8a8 fbgemm": lambda x: torch.ops.quantized.linear_dynamic(x, packed, True),
        "w8a8 rows": lambda x: w8a8_rows(x, packed, sentinel),
        "_int_mm": int_mm,
    }


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    print("ms per call (median); 'invariance' = max |row in a 16-row batch - same row alone|")
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k) * 0.05
        print(f"\n{name}")
        for label, run in kernels(weight).items():
            cells = []
            for rows in ROWS:
                x = torch.randn(rows, k)
                if label == "_int_mm" and (rows < 17 or n * k > 2_000_000):
                    cells.append("   -   ")  # needs more than 16 rows; the lm_head would take minutes
                    continue
                cells.append(f"{median_ms(lambda: run(x), 5 if label == '_int_mm' else 20):7.3f}")
            batch = torch.randn(16, k)
            drift = "-" if label == "_int_mm" else f"{max((run(batch)[i] - run(batch[i:i + 1])[0]).abs().max().item() for i in range(16)):.2e}"
            print(f"  {label:12s} " + " ".join(cells) + f"   invariance {drift}")


if __name__ == "__main__":
    main()
