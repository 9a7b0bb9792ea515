"""From sampled token ids to what the caller sees: text pieces, stop strings, and why a reply ended.

The scheduler's loop speaks token ids only; after sampling it hands each request's new id to that
request's `ReplyOutput`, which decodes it, streams the text, and says whether the reply is over
(the end-of-turn token, a stop string, the length limit). It runs on the loop's thread right after
the sample, so a reply ends at exactly the token it ends at (checking later would compute tokens
nobody asked for and count them). As vLLM's output processor, it is the only place text exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvchat.generation import Generation
from kvchat.records import FinishReason, Usage
from kvchat.stop_strings import stop_at


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int]) -> str: ...


class ReplyOutput:
    """One reply's text: fed one sampled id at a time."""

    def __init__(self, decoder: Decoder, generation: Generation, usage: Usage, stops: tuple[str, ...],
                 eos_ids: frozenset[int], max_tokens: int) -> None:  # fmt: skip
        self.text = TextStream(decoder)
        self.generation = generation
        self.usage = usage
        self.stops = stops
        self.eos_ids = eos_ids
        self.max_tokens = max_tokens  # new tokens allowed: max new tokens, or what the context has left

    def push(self, token_id: int) -> FinishReason | None:
        """Take one sampled id: stream its text; the reason the reply ends here, or None."""
        if token_id in self.eos_ids:
            return "stop"
        self.generation.token_ids.append(token_id)
        if piece := self.text.push(token_id):
            self.generation.emit(piece)
        self.usage.new_tokens += 1
        text = self.generation.text
        if piece and self.stops and stop_at(text, self.stops, len(text) - len(piece)) is not None:
            return "stop"
        if self.usage.new_tokens >= self.max_tokens:
            return "length"
        return None

    def flush(self) -> None:
        """The reply ended: emit what the decoder held back (an incomplete character)."""
        if piece := self.text.flush():
            self.generation.emit(piece)


class TextStream:
    """Turns generated ids into text pieces with constant work per token.

    Decoding the whole reply at every token is quadratic in its length. Instead only a small
    window is decoded: the ids since the last emitted boundary (`_start`), compared with the same
    window without the newest ids. Starting a window a few ids back keeps tokenizers that join
    pieces with spaces or merge bytes correct; an incomplete UTF-8 character (U+FFFD at the end)
    is held back until its last byte arrives.
    """

    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder
        self.token_ids: list[int] = []
        self._start = 0  # the window's first id: it reaches back one emitted piece
        self._emitted = 0  # ids whose text is already out

    def push(self, token_id: int) -> str:
        """Add one token; returns the new text it completes (may be empty)."""
        self.token_ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        window = self.token_ids[self._start :]
        before = self._decoder.decode(self.token_ids[self._start : self._emitted])
        text = self._decoder.decode(window)
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self._start, self._emitted = self._emitted, len(self.token_ids)
        return text[len(before) :]
