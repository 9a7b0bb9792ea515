"""The OpenAI chat-completions protocol, served beside the UI by the same engine under one budget.

Requests are stateless: a client resends the whole conversation and the engine reuses whatever
earlier requests in the same `cache_salt` scope left (system prompts, earlier turns). What it
reused is reported where OpenAI clients look for it, `usage.prompt_tokens_details.cached_tokens`:
always present, 0 included, and in the final chunk of a stream that asked for usage.

Parsing (`request_schema.py`, pydantic) and the response bodies are plain functions (testable
without a server); `add_routes` puts them on Gradio's FastAPI app. No input gets a 5xx: every
refusal is a 400 in OpenAI's shape with `param` naming the field, and an unexpected failure is
still an OpenAI-shaped `server_error`, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvchat.chat import content_text
from kvchat.errors import Busy, GenerationError, InputError
from kvchat.request_schema import ChatCompletionBody, parse_body
from kvchat.stop_strings import as_stops, stop_at

if TYPE_CHECKING:
    from kvchat.engine import Engine
    from kvchat.generation import Generation
    from kvchat.startup import BackgroundEngine
    from kvchat.records import Usage

log = logging.getLogger(__name__)

BUNDLED_ID = "SmolLM2-135M-Instruct"
DEFAULT_MAX_TOKENS = 512  # when a request names none (OpenAI's own default is "up to the context")
DONE_POLL_S = 0.02  # how soon a finished reply is sent
DISCONNECT_POLL_S = 0.5  # how soon a client that hung up is noticed
KEEPALIVE_S = 5.0  # a streamed request waiting in the queue sends a comment this often
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


def refusal(err: InputError, max_tokens_param: str = "max_tokens") -> APIError:
    """A refused request in OpenAI's shape, from the error's kind and its `field` and `code` alone
    (the message is never read): a 429 `rate_limit_error` when the engine is busy, else a 400
    `invalid_request_error` whose `param` is the field in the request's spelling (the engine's
    `max_new_tokens` is whichever of `max_tokens`/`max_completion_tokens` the client set)."""
    if isinstance(err, Busy):
        return APIError(429, str(err), kind="rate_limit_error", code="busy")
    param = max_tokens_param if err.field == "max_new_tokens" else err.field
    return APIError(400, str(err), param=param, code=err.code)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int
    max_tokens_param: str  # which field set it, named in a refusal
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    cache_salt: str | None


def parse_request(body: Any, served_id: str) -> ChatRequest:
    """Validate a chat-completions body; anything we cannot honour is a 400 naming the field."""
    try:
        chat = parse_body(body)
    except InputError as err:
        raise refusal(err) from None
    if chat.model != served_id:
        raise APIError(404, f"the model {chat.model!r} does not exist: this server serves {served_id!r}",
                       param="model", code="model_not_found")  # fmt: skip
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise APIError(400, f"{name} is not supported by kvchat", param=name, code="unsupported_parameter")
    options = chat.stream_options
    try:
        stops = as_stops(chat.stop)
    except InputError as err:
        raise refusal(err) from None
    return ChatRequest(
        messages=_messages(chat),
        max_tokens=chat.reply_cap or DEFAULT_MAX_TOKENS,
        max_tokens_param="max_completion_tokens" if chat.max_completion_tokens is not None else "max_tokens",
        temperature=1.0 if chat.temperature is None else chat.temperature,
        top_p=1.0 if chat.top_p is None else chat.top_p,
        seed=chat.seed,
        stop=stops,
        stream=bool(chat.stream),
        include_usage=bool(options is not None and options.include_usage),
        cache_salt=chat.cache_salt,
    )  # fmt: skip


def _messages(chat: ChatCompletionBody) -> list[dict[str, str]]:
    """OpenAI's roles and content parts as the engine's conversation: developer is system."""
    messages = []
    for index, message in enumerate(chat.messages):
        text = content_text(message.model_dump(include={"content"})["content"], f"messages[{index}].content")
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": text})
    return messages


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
        try:
            engine = _ready_engine(holder)
        except APIError as err:
            return err.response({"Retry-After": "5"} if err.status == 503 else None)
        card = {"id": served_id, "object": "model", "created": int(holder.started_s), "owned_by": "kvchat",
                "max_model_len": engine.context_tokens}  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        """200 once the model serves; 503 with Retry-After while it loads; 500 when it failed
        (as llama.cpp's server). Open without the API key, as an orchestrator's probe is."""
        if holder.peek() is not None:
            return JSONResponse({"status": "ok"})
        if holder.error is not None:
            return JSONResponse({"status": "error", "error": str(holder.error)}, status_code=500)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})

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
        except Exception as err:  # a bug, not the input: still OpenAI's shape, never a bare 500 page
            log.exception("chat completion failed")
            return APIError(500, f"internal error: {type(err).__name__}", kind="server_error").response()
        reply = _Reply(served_id, chat.stop)
        if chat.stream:
            return StreamingResponse(_stream(generation, reply, chat.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        return await _complete(request, generation, reply)

    app.add_api_route("/health", health, methods=["GET"], include_in_schema=False)
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
    except InputError as err:
        raise refusal(err, chat.max_tokens_param) from err


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
        except Exception as err:  # noqa: BLE001 - the stream has begun: the error goes in it, as OpenAI's
            if not isinstance(err, GenerationError):
                log.exception("streamed completion failed")
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
