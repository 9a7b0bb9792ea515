"""Messages -> token ids with the model's own chat template, and the shareable system prefix.

The engine speaks token ids; this module is where text becomes ids. Everything a user can get
wrong about a conversation is checked here and reported as `InputError`.

Text stays text: a message that spells one of the tokenizer's control tokens (`<|im_end|>`) is
encoded as the characters it is, so no message can forge a turn; only the chat template's own
markup yields control tokens. Conversations keep every shape OpenAI accepts: system messages
anywhere, several messages of one role in a row, and a final assistant message, which the reply
continues (as vLLM's `continue_final_message`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError

from kvchat.errors import InputError

if TYPE_CHECKING:  # the page and the API import `content_text` on their way up: no transformers then
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
_MARK = "\ue000"  # a private-use character: marks where a message's text sits in a render
Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class Prompt:
    token_ids: list[int]  # the whole conversation plus the assistant-turn header
    prefix_len: int  # leading ids that render the system prompt alone (shareable); 0 if none
    user_text: str  # the last user message as plain text (logged only with --store-text)


def content_text(content: Any, field: str = "content") -> str:
    """The text of one message's content, the one reading of it that the engine, the API and the
    page share.

    Content is a string, None (no text), or a list of parts as browsers and OpenAI clients send it
    (`[{"type": "text", "text": ...}]`): the parts' texts are joined, a bare string part counts as
    text, and any other part (an image, a number, a `text` that is not a string) adds nothing.
    Anything else (a number, a mapping, bytes) raises `InputError` naming `field`. A lone UTF-16
    surrogate (a browser or a JSON escape can send one) cannot be encoded: it becomes "?".
    """
    if content is None:
        return ""
    if isinstance(content, str):
        text = content
    elif isinstance(content, list | tuple):
        text = "".join(_part_text(part) for part in content)
    else:
        raise InputError(f"{field} must be a string or a list of text parts, not {type(content).__name__}", field)
    return text.encode("utf-8", errors="replace").decode("utf-8")


def _part_text(part: Any) -> str:
    text = part.get("text", "") if isinstance(part, Mapping) else part
    return text if isinstance(text, str) else ""


def normalise(messages: Sequence[Mapping[str, Any]]) -> list[Message]:
    """Validate a conversation and flatten content to text (`content_text`).

    The conversation ends with a user message (answered) or an assistant message (continued); it
    must hold at least one non-system message. Each refusal names its field in OpenAI's spelling
    (`messages`, `messages[2].role`), which the API passes on as `param`.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InputError("the conversation is empty: send at least one user message", "messages")
    result: list[Message] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"message {index} is not a {{'role', 'content'}} mapping", f"messages[{index}]")
        role = message.get("role")
        if role not in ROLES:
            raise InputError(f"message {index} has role {role!r}; use one of {', '.join(ROLES)}",
                             f"messages[{index}].role")  # fmt: skip
        text = content_text(message.get("content"), f"messages[{index}].content")
        result.append({"role": role, "content": text})
    if result[-1]["role"] == "system":
        raise InputError("the conversation must end with a user message (answered) or an assistant message "
                         "(continued)", "messages")  # fmt: skip
    if result[-1]["role"] == "user" and not result[-1]["content"].strip():
        raise InputError("the message is empty: type something to send", f"messages[{len(result) - 1}].content")
    return result


class ChatTemplate:
    """Renders conversations to token ids and finds the system-prompt prefix."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("the tokenizer has no chat template; kvchat needs an instruct/chat model")
        self.tokenizer = tokenizer

    @property
    def template_text(self) -> str:
        return str(self.tokenizer.chat_template)

    def encode(self, messages: Sequence[Mapping[str, Any]]) -> Prompt:
        conversation = normalise(messages)
        token_ids = self._ids(conversation, add_generation_prompt=True)
        prefix_len = self._system_prefix_len(conversation, token_ids)
        user_text = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
        return Prompt(token_ids=token_ids, prefix_len=prefix_len, user_text=user_text)

    def _ids(self, conversation: list[Message], add_generation_prompt: bool) -> list[int]:
        """The template's render, tokenised so that message text never becomes control tokens."""
        text = self._render(conversation, add_generation_prompt)
        if not any(self._control_tokens.search(m["content"]) for m in conversation):
            return self._tokenise(text, split_special=False)
        # Where each message's text sits: render with a marker in its place, then check that
        # putting the texts back gives the same render (a template may trim or rewrite text).
        markers = [f"{_MARK}{i}{_MARK}" for i in range(len(conversation))]
        marked = self._render([{**m, "content": k} for m, k in zip(conversation, markers)], add_generation_prompt)
        pieces = re.split(f"({_MARK}\\d+{_MARK})", marked)
        contents = {k: m["content"] for m, k in zip(conversation, markers)}
        if "".join(contents.get(p, p) for p in pieces) != text:
            raise InputError("this model's chat template rewrites message text, so a message may not spell "
                             "its control tokens (such as <|im_end|>)", "messages")  # fmt: skip
        ids: list[int] = []
        for piece in pieces:
            if piece in contents:
                ids += self._tokenise(contents[piece], split_special=True)
            else:
                ids += self._tokenise(piece, split_special=False)
        return ids

    def _render(self, conversation: list[Message], add_generation_prompt: bool) -> str:
        continued = add_generation_prompt and conversation[-1]["role"] == "assistant"
        try:
            return str(self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt and not continued,
                continue_final_message=continued, tokenize=False,
            ))  # fmt: skip
        except (TemplateError, ValueError) as err:
            raise InputError(f"this model's chat template cannot render this conversation: {err}", "messages") from err

    def _tokenise(self, text: str, split_special: bool) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=split_special)["input_ids"])

    @cached_property
    def _control_tokens(self) -> re.Pattern[str]:
        """Any spelling the tokenizer turns into one atomic added token (control tokens)."""
        spellings = sorted({t.content for t in self.tokenizer.added_tokens_decoder.values()}, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, spellings)) or r"(?!)")

    def _system_prefix_len(self, conversation: list[Message], token_ids: list[int]) -> int:
        """Length of the system prompt rendered alone, when the full render starts with exactly it.

        Templates that weave the system prompt into the first user turn fail the check and share
        nothing, which is safe.
        """
        if conversation[0]["role"] != "system":
            return 0
        system_ids = self._ids(conversation[:1], add_generation_prompt=False)
        if len(system_ids) < len(token_ids) and token_ids[: len(system_ids)] == system_ids:
            return len(system_ids)
        return 0

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
