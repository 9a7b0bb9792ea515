"""Whole-model check of the per-token W8A8 from scripts/int8_kernels.py (groundwork for issue 19).

    python scripts/int8_model.py

On the bundled model in float32, for every linear quantised and for all but the lm_head: one decode
step's time (1 and 8 rows, median of 15), greedy agreement with float32 and the perplexity ratio on 400
tokens of README text, and whether a prompt prefilled in two chunks gives the logits it gives at once
(what exact reuse needs: float32 differs by ~1e-4 there).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: python scripts/int8_model.py

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from int8_kernels import fbgemm_packed, median_ms, per_channel_int8, sentinel_row, w8a8_rows  # noqa: E402
from kvchat import models  # noqa: E402
from kvchat.config import default_home  # noqa: E402

CHUNK = 150  # the first prefill chunk, in tokens


class W8A8Rows(nn.Module):
    """int8 weights per output channel, int8 activations per row, on fbgemm's dynamic linear: each row
    is divided by its absmax and a sentinel row holds +1 and -1, so fbgemm's per-tensor activation
    scale is the same in every batch (see scripts/int8_kernels.py)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.packed = fbgemm_packed(weight, per_channel_int8(weight)[1])
        self.sentinel = sentinel_row(weight.shape[1])
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = w8a8_rows(x.reshape(-1, x.shape[-1]), self.packed, self.sentinel).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def quantized(model: nn.Module, skip: tuple[str, ...]) -> nn.Module:
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name not in skip:
                setattr(module, name, W8A8Rows(child))
    return model


@torch.no_grad()
def step_ms(model: nn.Module, rows: int) -> float:
    x = torch.randint(0, 1000, (rows, 1))
    return median_ms(lambda: model(x), repeats=15)


@torch.no_grad()
def chunked(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    cache = DynamicCache(config=model.config)
    first = model(ids[:, :CHUNK], past_key_values=cache, use_cache=True).logits[0]
    return torch.cat([first, model(ids[:, CHUNK:], past_key_values=cache, use_cache=True).logits[0]])


@torch.no_grad()
def main() -> None:
    loaded = models.load(None, device="cpu", dtype="float32", home=default_home())
    fp32 = loaded.model
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()[:3000]
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, :400]
    whole = fp32(ids).logits[0]
    nll = F.cross_entropy(whole[:-1], ids[0, 1:]).item()
    fp32_chunk = (chunked(fp32, ids) - whole).abs().max().item()
    for skip in ((), ("lm_head",)):
        model = quantized(fp32, skip)
        logits = model(ids).logits[0]
        agree = (logits.argmax(-1) == whole.argmax(-1)).float().mean().item()
        ppl_ratio = torch.exp(torch.tensor(F.cross_entropy(logits[:-1], ids[0, 1:]).item() - nll)).item()
        parts = chunked(model, ids)
        flips = (parts.argmax(-1) != logits.argmax(-1)).sum().item()
        print(f"quantised (skipping {skip or 'nothing'}): step ms 1 row fp32 {step_ms(fp32, 1):.1f} / int8 "
              f"{step_ms(model, 1):.1f}, 8 rows {step_ms(fp32, 8):.1f} / {step_ms(model, 8):.1f}; greedy agreement "
              f"{agree:.3f}; ppl ratio {ppl_ratio:.3f}; chunked vs whole: max |logit diff| "
              f"{(parts - logits).abs().max().item():.2e} ({flips}/{ids.shape[1]} argmax flips), float32 {fp32_chunk:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
