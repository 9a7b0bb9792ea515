"""The two failures a caller must tell apart: their input, or our generation."""

from __future__ import annotations


class InputError(ValueError):
    """The request cannot be served as given; the message says what to change. `field` names the
    setting at fault (messages, max_new_tokens, temperature, top_p, seed, stop, cache_salt) and
    `code` a kind a client can act on (context_length_exceeded), so a protocol never has to read
    the message to choose its reply."""

    def __init__(self, message: str, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.field, self.code = field, code


class Busy(InputError):
    """The engine's queue is full: nothing is wrong with the request, try it again shortly."""


class GenerationError(RuntimeError):
    """Generation failed part-way. `usage` holds what was measured before the failure."""

    def __init__(self, message: str, usage: object | None = None) -> None:
        super().__init__(message)
        self.usage = usage
