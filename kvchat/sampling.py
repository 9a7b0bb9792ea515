"""Choosing the next token: greedy at temperature 0, else temperature + nucleus (top-p)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kvchat.errors import InputError
from kvchat.stop_strings import as_stops


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy, bit-exact with `model.generate(do_sample=False)`
    top_p: float = 1.0
    seed: int | None = None  # fixes the sampled reply when temperature > 0
    stop: tuple[str, ...] = ()  # the reply ends where one of these first appears (checked by `as_stops`)

    def validate(self, context_tokens: int) -> None:
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool):
            raise InputError("max new tokens must be a whole number", "max_new_tokens")
        if not 1 <= self.max_new_tokens <= context_tokens:
            raise InputError(f"max new tokens must be between 1 and {context_tokens} (the model's context)",
                             "max_new_tokens")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError("temperature must be 0 (greedy) or a positive number", "temperature")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError("top-p must be greater than 0 and at most 1", "top_p")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):  # fmt: skip
            raise InputError(f"seed must be a whole number from {SEED_MIN} to {SEED_MAX}", "seed")

    @classmethod
    def parse(cls, max_new_tokens: Any, temperature: Any, top_p: Any, seed: Any, stop: Any) -> SamplingParams:
        """The settings as callers send them (a UI slider sends 256.0; `stop` as OpenAI takes it);
        InputError naming the field when one is not a number. Ranges are `validate`'s."""
        return cls(_whole(max_new_tokens, "max new tokens", "max_new_tokens"), _number(temperature, "temperature"),
                   _number(top_p, "top-p", "top_p"), seed, as_stops(stop))  # fmt: skip

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from the logits of the last position ([vocab])."""
    if params.greedy:
        return int(torch.argmax(logits))
    # Shifted so the largest logit is 0, and the temperature kept above float32's smallest normal: a
    # temperature like 1e-170 (0 in float32) then sends every other logit to -inf, as greedy, not NaN.
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    probs = torch.softmax((logits.float() - logits.max().float()) / temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest set whose mass reaches top_p (the first token always stays)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def _number(value: Any, name: str, field: str | None = None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError) as err:
        raise InputError(f"{name} must be a number, not {value!r}", field or name) from err


def _whole(value: Any, name: str, field: str) -> int:
    """Whole numbers, also as floats (a UI slider sends 256.0)."""
    number = _number(value, name, field)
    if not number.is_integer():
        raise InputError(f"{name} must be a whole number, not {value!r}", field)
    return int(number)
