"""Stop strings (OpenAI's `stop`): where a reply ends, found in its text as it grows.

Text only, no torch: the HTTP API cuts what it shows with the same function the engine ends on.
"""

from __future__ import annotations

from typing import Any

from kvchat.errors import InputError

MAX_STOPS = 4  # as OpenAI allows


def as_stops(value: Any) -> tuple[str, ...]:
    """`stop` as OpenAI takes it (a string, a list of strings, or nothing) as a checked tuple."""
    if not value and not isinstance(value, str):
        return ()
    stops = (value,) if isinstance(value, str) else value
    if not isinstance(stops, list | tuple) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise InputError(f"stop must be a string or a list of up to {MAX_STOPS} non-empty strings", "stop")
    return tuple(stops)


def stop_at(text: str, stops: tuple[str, ...], since: int = 0) -> int | None:
    """Where the reply ends: the index of the earliest stop string in `text` that ends after
    `since` (the text already checked), or None."""
    found = [i for s in stops if (i := text.find(s, max(0, since - len(s) + 1))) >= 0]
    return min(found) if found else None
