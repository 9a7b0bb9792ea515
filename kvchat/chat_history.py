"""What the chat page keeps, and the one function that decides what the model sees of it.

The page's message list holds the conversation's turns and, under each reply, a badge (a message
with a metadata title: what the cache did). Waiting, loading and error states are shown beside
the list, never in it. A conversation saved by an older kvchat could still hold a status line as
an assistant turn ("⏳ Queued, 2 ahead…"); those are dropped here too, so no status is ever sent
to the model as something it said.

Pure: no Gradio, no torch.
"""

from __future__ import annotations

import re
from typing import Any

from kvchat.chat import content_text
from kvchat.errors import InputError

ROLES = ("user", "assistant")
Message = dict[str, Any]

# The placeholders kvchat up to wave two wrote into the reply itself while a request waited.
_OLD_STATUS = re.compile(r"⏳ (Queued, (\d+ ahead|next in line)…|Loading the model… the reply follows\.)")


def plain_text(value: Any) -> str:
    """Text of a message's content as `chat.content_text` reads it (a string or a list of parts, as
    the browser sends it). The page must draw whatever a browser saved or a Gradio API client sent,
    so content that is not text (a number) is shown as written instead of refused."""
    try:
        return content_text(value)
    except InputError:
        return str(value)


def text_message(role: str, text: str) -> Message:
    """Content as a text part: Gradio passes it through verbatim, while a plain string is run
    through `inspect.cleandoc` (leading spaces and indentation lost), which would make the next
    prompt differ from what the model actually generated."""
    return {"role": role, "content": [{"type": "text", "text": text}]}


def is_badge(message: Message) -> bool:
    """A badge is UI only: a message with a metadata title (the cache line under a reply)."""
    return bool((message.get("metadata") or {}).get("title"))


def is_status(message: Message) -> bool:
    """A status line that an older kvchat saved as if the assistant had said it."""
    return message.get("role") == "assistant" and bool(_OLD_STATUS.fullmatch(plain_text(message.get("content"))))


def is_turn(message: Any) -> bool:
    """A user or assistant turn: what the model saw or said. Badges and statuses are not."""
    return (
        isinstance(message, dict) and message.get("role") in ROLES and not is_badge(message) and not is_status(message)
    )


def model_messages(system_prompt: str, history: list[Message]) -> list[Message]:
    """The conversation the model is asked to continue: the system prompt (when not blank), then
    every turn of `history` as {"role", "content": str}. The only place the page's history becomes
    model input."""
    messages = [{"role": "system", "content": system_prompt}] if (system_prompt or "").strip() else []
    return messages + [{"role": m["role"], "content": plain_text(m.get("content"))} for m in history if is_turn(m)]


def kept_history(saved: Any) -> list[Message]:
    """A saved history as the page may show it again: turns and their badges, statuses dropped."""
    if not isinstance(saved, list):
        return []
    return [m for m in saved if isinstance(m, dict) and m.get("role") in ROLES and not is_status(m)]
