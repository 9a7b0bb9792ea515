"""The OpenAI chat-completions protocol, served beside the UI by the same engine under one budget.

Requests are stateless: a client resends the whole conversation and the engine reuses whatever
earlier requests in the same `cache_salt` scope left (system prompts, earlier turns). What it
reused is reported where OpenAI clients look for it, `usage.prompt_tokens_details.cached_tokens`:
always present, 0 included, and in the final chunk of a stream that asked for usage.

Parsing and the response bodies are plain functions (testable without a server); `add_routes`
puts them on Gradio's FastAPI app.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvchat.errors import Busy, GenerationError, InputError
from kvchat.stop_strings import as_stops, stop_at

if TYPE_CHECKING:
    from kvchat.engine import Engine
    from kvchat.generation import Generation
    from kvchat.startup import BackgroundEngine
    from kvchat.usage import Usage

BUNDLED_ID = "SmolLM2-135M-Instruct"
DEFAULT_MAX_TOKENS = 512  # when a request names none (OpenAI's own default is "up to the context")
DONE_POLL_S = 0.02  # how soon a finished reply is sent
DISCONNECT_POLL_S = 0.5  # how soon a client that hung up is noticed
KEEPALIVE_S = 5.0  # a streamed request waiting in the queue sends a comment this often
ROLES = {"system", "developer", "user", "assistant"}
# Fields that change what the reply means; refused unless set to their no-op value.
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,),
}  # fmt: skip


def model_id(model: str | None) -> str:
    """The id clients send as `model`: the bundled model's name, a hub id as given, or a local
    directory's name."""
    if model is None:
        return BUNDLED_ID
    path = Path(model).expanduser()
    return path.name if path.exists() else model


class APIError(Exception):
    """An error in OpenAI's shape: HTTP status plus {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=dict(headers or {}))


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    cache_salt: str | None


def parse_request(body: Any, served_id: str) -> ChatRequest:
    """Validate a chat-completions body; anything we cannot honour is a 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "you must provide a model parameter", param="model")
    if model != served_id:
        raise APIError(404, f"the model {model!r} does not exist: this server serves {served_id!r}",
                       param="model", code="model_not_found")  # fmt: skip
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise APIError(400, f"{name} is not supported by kvchat", param=name, code="unsupported_parameter")
    if body.get("n", 1) not in (1, None):
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise APIError(400, "cache_salt must be a non-empty string", param="cache_salt")
    return ChatRequest(
        messages=_messages(body.get("messages")),
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else _integer(max_tokens, "max_tokens", 1),
        temperature=_real(body.get("temperature", 1.0), "temperature", 0.0, 2.0),
        top_p=_real(body.get("top_p", 1.0), "top_p", 0.0, 1.0),
        seed=None if body.get("seed") is None else _integer(body["seed"], "seed", -(2**63)),
        stop=_stops(body.get("stop")),
        stream=_flag(body.get("stream", False), "stream"),
        include_usage=_flag(stream_options.get("include_usage", False), "stream_options.include_usage"),
        cache_salt=salt,
    )  # fmt: skip


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    messages = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"{param}: role must be one of system, developer, user, assistant "
                           "(tool messages are not supported)", param=param)  # fmt: skip
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": _text(message.get("content"), param)})
    return messages


def _text(content: Any, param: str) -> str:
    """A message's content: a string, or a list of text parts (images and audio are refused)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{param}.content: only text parts are supported", param=f"{param}.content")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{param}.content must be a string or a list of text parts", param=f"{param}.content")


def _integer(value: Any, param: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise APIError(400, f"{param} must be a whole number of at least {low}", param=param)
    return value


def _real(value: Any, param: str, low: float, high: float) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise APIError(400, f"{param} must be a number from {low:g} to {high:g}", param=param)
    return float(value)


def _flag(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise APIError(400, f"{param} must be true or false", param=param)
    return value


def _stops(value: Any) -> tuple[str, ...]:
    try:
        return as_stops(value)
    except InputError as err:
        raise APIError(400, str(err), param="stop") from err


# --- response bodies ---
def usage_body(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage object, `cached_tokens` always present. `kvchat` carries what OpenAI has no
    field for (where reuse came from, disk reads, time to first token)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.new_tokens,
        "total_tokens": usage.prompt_tokens + usage.new_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "kvchat": {"cache_source": usage.cache_source, "cache_tier": usage.cache_tier,
                   "disk_tokens": usage.disk_tokens, "wait_ms": round(usage.wait_ms, 1),
                   "ttft_ms": round(usage.ttft_ms, 1), "total_ms": round(usage.total_ms, 1)},
    }  # fmt: skip


def _finish_reason(usage: Usage) -> str:
    return "length" if usage.finish_reason == "length" else "stop"


class _Reply:
    """One completion's identity and the text clients may see: what precedes a stop string, and
    while streaming, nothing that might still turn out to be the start of one."""

    def __init__(self, served_id: str, stops: tuple[str, ...]) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = served_id
        self.stops = stops
        self.text = ""
        self.shown = 0
        self.stopped = False  # a stop string was met: what the engine still sends is not shown

    def add(self, piece: str) -> str:
        """Append a piece; return the new text that is safe to show."""
        if self.stopped:
            return ""
        before = len(self.text)
        self.text += piece
        cut = stop_at(self.text, self.stops, before)
        if cut is not None:
            self.text, self.stops, self.stopped = self.text[:cut], (), True
        safe = len(self.text) - _held_back(self.text, self.stops)
        new, self.shown = self.text[self.shown : safe], max(self.shown, safe)
        return new

    def rest(self) -> str:
        new, self.shown = self.text[self.shown :], len(self.text)
        return new

    def completion(self, usage: Usage) -> dict[str, Any]:
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text},
                         "logprobs": None, "finish_reason": _finish_reason(usage)}],
            "usage": usage_body(usage),
        }  # fmt: skip

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, with_usage: bool = False) -> str:
        body: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }  # fmt: skip
        if with_usage:
            body["usage"] = None
        return _event(body)

    def usage_chunk(self, usage: Usage) -> str:
        return _event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.model, "choices": [], "usage": usage_body(usage)})  # fmt: skip


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# --- the routes ---
def add_routes(app: FastAPI, holder: BackgroundEngine, served_id: str, api_key: str | None,
               metrics: Callable[[], Response] | None = None) -> None:  # fmt: skip
    """/v1/models, /v1/chat/completions and (when given) /metrics, behind `api_key` when set."""

    def refused(request: Request) -> JSONResponse | None:
        if api_key is None:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode()):
            return None
        return APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>' with the key "
                        "given to --api-key", code="invalid_api_key").response()  # fmt: skip

    async def models(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        engine = holder.peek()
        card = {"id": served_id, "object": "model", "created": int(holder.started_s), "owned_by": "kvchat"}
        if engine is not None:
            card["max_model_len"] = engine.context_tokens
        return JSONResponse({"object": "list", "data": [card]})

    async def chat_completions(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        try:
            try:
                body = await request.json()
            except ValueError as err:
                raise APIError(400, f"the body is not valid JSON ({err})") from err
            chat = parse_request(body, served_id)
            engine = _ready_engine(holder)
            generation = await asyncio.to_thread(_start, engine, chat)
        except APIError as err:
            return err.response({"Retry-After": "5"} if err.status in (429, 503) else None)
        reply = _Reply(served_id, chat.stop)
        if chat.stream:
            return StreamingResponse(_stream(generation, reply, chat.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        return await _complete(request, generation, reply)

    app.add_api_route("/v1/models", models, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], include_in_schema=False)
    if metrics is not None:

        async def scrape(request: Request) -> Response:
            if (denied := refused(request)) is not None:
                return denied
            return await asyncio.to_thread(metrics)

        app.add_api_route("/metrics", scrape, methods=["GET"], include_in_schema=False)


def _ready_engine(holder: BackgroundEngine) -> Engine:
    engine = holder.peek()
    if engine is not None:
        return engine
    if holder.error is not None:
        raise APIError(500, f"the model failed to load: {holder.error}", kind="server_error")
    waited_s = time.time() - holder.started_s
    raise APIError(503, f"the model is still loading ({waited_s:.0f} s so far); retry in a few seconds",
                   kind="server_error", code="model_loading")  # fmt: skip


def _start(engine: Engine, chat: ChatRequest) -> Generation:
    try:
        return engine.stream(
            None, chat.messages, max_new_tokens=chat.max_tokens, temperature=chat.temperature, top_p=chat.top_p,
            seed=chat.seed, cache_salt=chat.cache_salt, stop=chat.stop, door="api",
        )  # fmt: skip
    except Busy as err:
        raise APIError(429, str(err), kind="rate_limit_error", code="busy") from err
    except InputError as err:
        code = "context_length_exceeded" if "context" in str(err) or "budget" in str(err) else None
        raise APIError(400, str(err), param="messages" if code else None, code=code) from err


async def _complete(request: Request, generation: Generation, reply: _Reply) -> Response:
    """Wait for the whole reply; a client that hangs up stops the request."""
    try:
        checked = time.monotonic()
        while not generation.done:
            await asyncio.sleep(DONE_POLL_S)
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    generation.cancel()
                    return Response(status_code=499)
        usage = generation.wait()
    except GenerationError as err:
        return APIError(500, str(err), kind="server_error").response()
    reply.add(generation.text)
    return JSONResponse(reply.completion(usage))


async def _stream(generation: Generation, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content chunks, a finish chunk, the usage chunk when asked,
    then [DONE]. Leaving early (the client closed the stream) cancels the request."""
    try:
        yield reply.chunk({"role": "assistant", "content": ""}, with_usage=include_usage)
        waited_s = 0.0
        while generation.waiting:  # in the engine's queue: an SSE comment now and then keeps proxies from
            await asyncio.sleep(DONE_POLL_S)  # closing the idle stream, and finds a client that left
            waited_s += DONE_POLL_S
            if waited_s >= KEEPALIVE_S:
                waited_s = 0.0
                yield f": queued, {generation.ahead} ahead\n\n"
        try:
            async for piece in generation.pieces():
                if text := reply.add(piece):
                    yield reply.chunk({"content": text}, with_usage=include_usage)
        except GenerationError as err:
            yield _event(APIError(500, str(err), kind="server_error").body())
            yield "data: [DONE]\n\n"
            return
        usage = generation.wait()
        if text := reply.rest():
            yield reply.chunk({"content": text}, with_usage=include_usage)
        yield reply.chunk({}, _finish_reason(usage), with_usage=include_usage)
        if include_usage:
            yield reply.usage_chunk(usage)
        yield "data: [DONE]\n\n"
    finally:
        generation.cancel()  # a client gone before the first piece, too (a no-op once finished)
