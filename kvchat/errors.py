"""The two failures a caller must tell apart: their input, or our generation."""

from __future__ import annotations


class InputError(ValueError):
    """The request cannot be served as given; the message says what to change (for a person).

    `field` names the request field at fault, in OpenAI's `param` spelling where the request has
    one (`messages` for the conversation as a whole, `messages[2].content`, `temperature`, `top_p`,
    `seed`, `stop`, `cache_salt`, `n`), else the engine's argument (`max_new_tokens`); None when no
    field is at fault (a server setting, the body as a whole). `code` is a kind a client can act on
    (`context_length_exceeded`: shorten the conversation), None otherwise. A protocol builds its
    reply from these two and the class, never from the message."""

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
