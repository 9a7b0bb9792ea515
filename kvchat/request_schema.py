"""The chat-completions request as OpenAI's schema declares it (pydantic): types, ranges, which
fields may be null (null means the default), and the precedence of `max_completion_tokens` over
`max_tokens`. Parsing turns every refusal into one `InputError` whose `field` names the field at
fault in OpenAI's `param` spelling (`messages[0].content`), as the engine's own refusals do.

Text that cannot be encoded (a lone UTF-16 surrogate, which JSON's `\ud83d` escape allows) is
repaired in message text, as the chat page's typing is (`?` in its place), and refused by name in
every other field (`cache_salt`, `stop`, `model`, `user`, `name`), where a silent change would
change what the request means."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from kvchat.errors import InputError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Real = Annotated[float, Field(strict=True)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]


class ChatCompletionBody(BaseModel):
    """The fields kvchat reads; others OpenAI defines are checked in `openai_api.UNSUPPORTED`, and
    names OpenAI does not define are ignored, as OpenAI's SDKs send extra_body fields through."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Real | None = Field(None, ge=0.0, le=2.0)
    top_p: Real | None = Field(None, ge=0.0, le=1.0)
    seed: StrictInt | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(None, ge=1, le=1)
    response_format: ResponseFormat | None = None
    cache_salt: StrictStr | None = Field(None, min_length=1)
    user: StrictStr | None = None

    @property
    def reply_cap(self) -> int | None:
        """`max_completion_tokens` wins when set; `max_tokens` (deprecated by OpenAI) otherwise."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_body(body: Any) -> ChatCompletionBody:
    """Validate a decoded JSON body; the `InputError` names the first field at fault (`field` None:
    the whole body)."""
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    for param, text in _strings(body, ""):
        if _is_message_text(param):
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{param}: the text holds an unpaired surrogate (\\ud800-\\udfff) and cannot be "
                             "encoded as UTF-8", param) from None  # fmt: skip
    try:
        return ChatCompletionBody.model_validate(body)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        param = _param(first["loc"])
        plain = next((text for pattern, text in _PLAIN.items() if re.fullmatch(pattern, param or "")), first["msg"])
        raise InputError(f"{param or 'body'}: {plain}", param) from None


# What a refusal says where pydantic's own words would name a union branch or a bound, not the rule.
_PLAIN = {
    r"n": "only n=1 is supported",
    r"response_format(\.type)?": "only response_format {'type': 'text'} is supported",
    r"messages\[\d+\]\.role": "role must be one of system, developer, user, assistant (tool messages are not supported)",
    r"messages\[\d+\]\.content(\[\d+\].*)?": "content must be a string or a list of text parts (images and audio "
                                              "are not supported)",
    r"stop(\[\d+\])?": "stop must be a string or a list of up to 4 strings",
    r"seed": f"seed must be a whole number from {INT64_MIN} to {INT64_MAX}",
}


def _strings(value: Any, path: str) -> list[tuple[str, str]]:
    """Every string in a decoded JSON value, with its path in OpenAI's spelling."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _strings(item, f"{path}.{key}" if path else str(key))]
    if isinstance(value, list):
        return [found for i, item in enumerate(value) for found in _strings(item, f"{path}[{i}]")]
    return []


def _is_message_text(param: str) -> bool:
    """messages[i].content, or the text of one of its parts."""
    return bool(re.fullmatch(r"messages\[\d+\]\.content(\[\d+\]\.text)?", param))


def _param(loc: tuple[Any, ...]) -> str | None:
    """('messages', 0, 'content', 'str') -> 'messages[0].content': OpenAI's spelling, without the
    union branch pydantic appends."""
    path = ""
    for name in loc:
        if isinstance(name, int):
            path += f"[{name}]"
        elif name in _UNION_TAGS or "[" in str(name):  # a union branch: list[...] or a scalar type
            break
        else:
            path += f".{name}" if path else str(name)
    return path or None


_UNION_TAGS = {"str", "int", "float", "bool", "function-after", "none"}
