"""An ideal cache to grade reuse against: unlimited memory, today's sharing rules, no kvchat code.

For each request it serves the longest prefix of the prompt's token ids that some earlier request
in the same sharing scope fed to the model. The scopes (as the README states them):
- a session's own earlier requests, in the same cache store: everything they fed, replies included;
- any request of the same store (one engine, one salt): its system prompt, rendered alone.
At least one prompt token is always left to feed: the first reply token needs its logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase


def render_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]],
               add_generation_prompt: bool = True) -> list[int]:
    """A conversation's ids as the tokenizer's own chat template renders them (no kvchat code)."""
    text = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                         tokenize=False)  # fmt: skip
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


class Oracle:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._private: dict[tuple[str, str], list[list[int]]] = {}  # (store, session) -> fed sequences
        self._shared: dict[str, list[list[int]]] = {}  # store -> system prompts' ids

    def served(self, store: str, session: str, prompt_ids: list[int]) -> int:
        """Tokens an ideal cache could serve to this request."""
        candidates = self._private.get((store, session), []) + self._shared.get(store, [])
        best = max((_common_prefix_len(prompt_ids, fed) for fed in candidates), default=0)
        return min(best, len(prompt_ids) - 1)

    def record(self, store: str, session: str, messages: Sequence[Mapping[str, Any]], fed_ids: list[int]) -> None:
        """Remember what a request fed (prompt and fed-back reply tokens) and its shareable part."""
        self._private.setdefault((store, session), []).append(fed_ids)
        system = self._system_ids(messages, fed_ids)
        if system:
            self._shared.setdefault(store, []).append(system)

    def _system_ids(self, messages: Sequence[Mapping[str, Any]], fed_ids: list[int]) -> list[int]:
        """The system prompt rendered alone, if the whole conversation's ids start with exactly it."""
        if not messages or messages[0].get("role") != "system":
            return []
        ids = render_ids(self.tokenizer, messages[:1], add_generation_prompt=False)
        return ids if fed_ids[: len(ids)] == ids else []
