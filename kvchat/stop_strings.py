"""Stop strings (OpenAI's `stop`): where a reply ends, found in its text as it grows.

Text only, no torch: the HTTP API cuts what it shows with the same function the engine ends on.
"""

from __future__ import annotations

MAX_STOPS = 4  # as OpenAI allows


def stop_at(text: str, stops: tuple[str, ...], since: int = 0) -> int | None:
    """Where the reply ends: the index of the earliest stop string in `text` that ends after
    `since` (the text already checked), or None."""
    found = [i for s in stops if (i := text.find(s, max(0, since - len(s) + 1))) >= 0]
    return min(found) if found else None
