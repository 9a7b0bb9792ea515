"""Smaller linear weights for a CPU: fewer bytes read per decode step (`--quantize`).

A decode step on a CPU is bound by reading the weights (the bundled model's 30 layers and its
lm_head are ~540 MB in float32, read once per step at ~10 GB/s here). Two modes replace every
`nn.Linear` of a float32 model in place, with PyTorch's fbgemm kernels (x86, AVX2 and up):

- `fp16`: float16 weights, float32 activations and accumulation
  (`torch.ops.quantized.linear_dynamic_fp16`). Half the bytes; the activations are never rounded,
  so a prompt fed in chunks, from the cache or batched with others gives what it gives at once,
  within float32 rounding, as the float32 model does. Greedy replies on a fixed text agree with
  float32 at every position measured (`python -m kvchat.bench.quantize`).
- `int8`: int8 weights with one scale per output channel and integer activations with one scale
  per row (token). fbgemm's dynamic linear (`torch.ops.quantized.linear_dynamic`) takes one
  activation scale for the whole tensor, which would make a row depend on the rest of its batch;
  each row is therefore divided by its own absmax first and a sentinel row holding +1 and -1 pins
  the tensor's range, so every row is rounded on the same grid in any batch (row alone vs. beside
  15 others: identical). Activations get 7 bits (`reduce_range`): AVX2 adds pairs of 8-bit
  products in 16 bits, which saturate with 8-bit activations (a random layer: 12-16% error instead
  of 1-2%). What no scale can fix: rounding activations turns float32's tiny differences (a prompt
  in chunks vs. at once, a cached prefix vs. a recomputed one) into different integers, and those
  grow through the layers: on the bundled model, logits move by up to ~9 between a prompt fed in
  two chunks and at once (float32: 4e-5). The probe measures this at load against the float
  model's own rounding and refuses the model: reuse would change answers.

Where the fast kernels are missing: `torch._int_mm` (torchao's per-token W8A8 on CPU) and
`_weight_int8pack_mm` with float32 activations (weight-only int8) run scalar loops on AVX2, slower
than float32 (`scripts/int8_kernels.py`). Attention and the KV stay float32 (KV bytes unchanged).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from kvchat.errors import InputError

MODES = ("none", "fp16", "int8")


@dataclass(frozen=True, slots=True)
class QuantizeReport:
    """What `quantize` did to a model."""

    mode: str  # "fp16" or "int8"
    layers: int  # linear layers replaced
    weight_bytes_before: int  # every parameter and buffer, float32, before (tied weights once)
    weight_bytes_after: int  # what the model holds after: remaining tensors plus the quantised weights
    seconds: float  # time to quantise
    float_rounding: float  # the float model's own rounding on the probe's case: the probe's yardstick

    def summary(self) -> str:
        """E.g. "weights 513 → 365 MiB (211 fp16 linears on fbgemm, quantised in 1.5 s)"."""
        return (f"weights {self.weight_bytes_before / 2**20:,.0f} → {self.weight_bytes_after / 2**20:,.0f} MiB "
                f"({self.layers} {self.mode} linears on fbgemm, quantised in {self.seconds:.1f} s)")  # fmt: skip


class _PackedLinear(nn.Module):
    """y = x @ W.T + b over a weight packed for fbgemm; x and y float32 [..., K] -> [..., N].
    Subclasses pack the weight (`weight_nbytes`: its bytes) and multiply rows [M, K] -> [M, N]."""

    weight_nbytes: int

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Fp16Linear(_PackedLinear):
    """W held as float16 in fbgemm's packed layout; float32 activations and sums."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        weight16 = linear.weight.detach().to(torch.float16)
        self.weight_nbytes = weight16.nbytes
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight16.float(), None)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(rows, self.packed)


class Int8Linear(_PackedLinear):
    """W int8 per output channel, each row of x rounded to integers with its own scale (see the
    module docstring for the sentinel row)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch; torch==2.13 is pinned
            warnings.simplefilter("ignore", UserWarning)
            zero_points = torch.zeros(len(scales), dtype=torch.long)
            quantized = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
            self.weight_nbytes = quantized.int_repr().nbytes + scales.nbytes
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.sentinel = torch.zeros(1, linear.in_features)
        self.sentinel[0, :2] = torch.tensor([1.0, -1.0])

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        absmax = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        y = torch.ops.quantized.linear_dynamic(torch.cat([rows / absmax, self.sentinel]), self.packed, True)
        return y[:-1] * absmax


_LAYERS = {"fp16": Fp16Linear, "int8": Int8Linear}


def check_mode(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """InputError unless `mode` is known and can run here (fbgemm: a CPU, a float32 model)."""
    if mode not in MODES:
        raise InputError(f"unknown quantisation {mode!r}: use none, fp16 or int8")
    if mode == "none":
        return
    if device.type != "cpu" or dtype != torch.float32:
        raise InputError(
            f"--quantize {mode} uses fbgemm's CPU kernels and a float32 model: run it with --device cpu "
            f"--dtype float32 (what auto picks on a CPU); on a GPU, --dtype bfloat16 halves the weights"
        )
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise InputError(f"--quantize {mode} needs fbgemm, which this PyTorch build lacks (x86 CPUs only)")


def weight_nbytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (each tensor once, however often it is tied) plus the
    quantised layers' weights."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    packed = sum(m.weight_nbytes for m in model.modules() if isinstance(m, _PackedLinear))
    return sum(t.nbytes for t in tensors.values()) + packed


def quantize(model: nn.Module, mode: str, float_rounding: float = 0.0) -> QuantizeReport:
    """Replace every `nn.Linear` of `model` (float32, CPU) in place with its `mode` twin, and every
    GPT-2 style `Conv1D` (the same map, its weight transposed); the lm_head too (a tied one gets its
    own copy; the embedding keeps the float one).
    `float_rounding` is recorded for the probe. Raises InputError for an unknown mode."""
    if mode not in _LAYERS:
        raise InputError(f"unknown quantisation {mode!r}: use fp16 or int8")
    started = time.perf_counter()
    before = weight_nbytes(model)
    layers = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            linear = _as_linear(child)
            if linear is not None:
                setattr(module, name, _LAYERS[mode](linear))
                layers += 1
    return QuantizeReport(mode, layers, before, weight_nbytes(model), time.perf_counter() - started, float_rounding)


def _as_linear(module: nn.Module) -> nn.Linear | None:
    """`module` as an `nn.Linear` (a Conv1D's weight [in, out] is the transpose of a Linear's); None otherwise."""
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        return linear
    return None
