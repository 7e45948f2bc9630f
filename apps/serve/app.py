"""The OpenAI-compatible ASGI app of `elm serve` (Starlette), in front of `elm_mlx.serving.Engine`.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, and the
chat page at /. Every refused request gets a 4xx with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`; a full queue gets 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from apps.serve.protocol import ChatRequest, CompletionRequest, Sampling
from elm_mlx.generate import encode_messages
from elm_mlx.grammar import JsonConstraint, compile_schema, schema_of
from elm_mlx.serving import Engine, EngineBusy, Event, Request
from elm_mlx.serving import Sampling as EngineSampling
from elm_spec import ElmError

DISCONNECT_POLL_S = 0.25
STATIC = Path(__file__).parent / "static"
# The page loads nothing from elsewhere; the browser is told to refuse anything that would.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 512
    default_temp: float = 0.0


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers


def error_response(error: APIError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param,
                      "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)


class Server:
    """Request parsing, prompt encoding and OpenAI response shapes around one Engine."""

    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.created = int(time.time())

    # --- request handling ------------------------------------------------------------

    def check_auth(self, request: HTTPRequest) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", kind="authentication_error")

    async def read_body(self, request: HTTPRequest, schema: type[Sampling]) -> Any:
        declared = request.headers.get("content-length")
        limit = self.settings.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body over the {limit}-byte limit", code="too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body over the {limit}-byte limit", code="too_large")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise APIError(400, f"body is not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise APIError(400, "body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as error:
            raise _validation_error(error) from None

    def model_name(self, body: Sampling) -> str:
        name = body.adapter or body.model
        if name is None or name == "default":
            return self.engine.default_model
        if name not in self.engine.models:
            raise APIError(404, f"model {name!r} is not served here; GET /v1/models lists them",
                           param="adapter" if body.adapter else "model", code="model_not_found")
        return name

    def engine_request(self, body: Sampling, name: str, prompt: list[int],
                       top_logprobs: int) -> Request:
        served = self.engine.models[name]
        context = served.model.spec.max_context_length
        max_tokens = body.max_completion_tokens or body.max_tokens or \
            min(self.settings.default_max_tokens, max(1, context - len(prompt)))
        if len(prompt) + max_tokens > context:
            raise APIError(400, f"{len(prompt)} prompt tokens + max_tokens {max_tokens} exceed "
                           f"the model's {context}-token context", param="max_tokens",
                           code="context_length_exceeded")
        try:
            stops = body.stop_strings()
        except ValueError as error:
            raise APIError(400, str(error), param="stop") from None
        processors = []
        if body.response_format is not None:
            try:
                schema = schema_of(body.response_format)
                if schema is not None:
                    self.check_speculative("response_format", "a grammar mask needs one token "
                                           "at a time")
                    processors.append(JsonConstraint(compile_schema(schema), served.tokenizer,
                                                     served.model.spec.vocab_size))
            except ElmError as error:
                raise APIError(400, str(error), param="response_format") from None
        if body.repetition_penalty is not None:
            self.check_speculative("repetition_penalty", "mlx-lm's speculative decoding would "
                                   "penalise only the generated tokens")
        temp = self.settings.default_temp if body.temperature is None else float(body.temperature)
        sampling = EngineSampling(temp=temp, top_p=float(body.top_p), top_k=body.top_k,
                                  min_p=float(body.min_p), seed=body.seed,
                                  repetition_penalty=None if body.repetition_penalty is None
                                  else float(body.repetition_penalty))
        return Request(prompt, max_tokens, sampling, stops, top_logprobs, name, processors)

    def check_speculative(self, param: str, why: str) -> None:
        if self.engine.speedups.draft_model is not None:
            raise APIError(400, f"{param} is not available on this server: it decodes "
                           f"speculatively (elm serve --draft-model) and {why}", param=param)

    def completion_prompt(self, body: CompletionRequest, name: str) -> list[int]:
        tokenizer = self.engine.models[name].tokenizer
        vocab = self.engine.models[name].model.spec.vocab_size
        if isinstance(body.prompt, list):
            if not body.prompt or any(not 0 <= t < vocab for t in body.prompt):
                raise APIError(400, f"prompt: token ids must be a non-empty list within [0, {vocab})",
                               param="prompt")
            return list(body.prompt)
        if not body.prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        return list(tokenizer.encode(body.prompt, add_special_tokens=True))

    def chat_prompt(self, body: ChatRequest, name: str) -> list[int]:
        tokenizer = self.engine.models[name].tokenizer
        try:
            return encode_messages(tokenizer, [m.as_template_message() for m in body.messages])
        except ElmError as error:
            raise APIError(400, f"{error}, or use /v1/completions", param="messages") from None

    async def run(self, http: HTTPRequest, request: Request) -> AsyncIterator[Event]:
        """The request's events as they come; cancels its work if the client goes away."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            ticket = self.engine.submit(request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except EngineBusy:
            raise APIError(503, "the server is busy; retry shortly", code="server_busy",
                           kind="server_error", headers={"Retry-After": "1"}) from None
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if event.error is not None:
                    raise APIError(500, f"generation failed: {event.error}", kind="server_error")
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            ticket.cancel()

    # --- responses -------------------------------------------------------------------

    def token_text(self, name: str, token: int) -> str:
        return self.engine.models[name].tokenizer.decode([token])

    def usage(self, first: Event, completion_tokens: int) -> dict[str, Any]:
        return {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": first.prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}

    def chat_logprobs(self, name: str, events: list[Event]) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(name, token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(e.token, e.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs]}
                            for e in events if e.token is not None]}

    def alternatives_by_text(self, name: str, top: list[tuple[int, float]]) -> dict[str, float]:
        """The legacy format keys alternatives by text: of tokens that decode alike, the most
        likely (listed first) keeps the key."""
        by_text: dict[str, float] = {}
        for token, logprob in top:
            by_text.setdefault(self.token_text(name, token), logprob)
        return by_text

    def completion_logprobs(self, name: str, events: list[Event], offset: int) -> dict[str, Any]:
        tokens, offsets = [], []
        for e in events:
            offsets.append(offset)
            tokens.append(self.token_text(name, e.token))
            offset += len(e.text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [self.alternatives_by_text(name, e.top_logprobs) for e in events],
                "text_offset": offsets}

    async def completions(self, http: HTTPRequest) -> Response:
        self.check_auth(http)
        body = await self.read_body(http, CompletionRequest)
        name = self.model_name(body)
        prompt = self.completion_prompt(body, name)
        top = body.logprobs or 0
        request = self.engine_request(body, name, prompt, top)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": name}

        def choice(events: list[Event], text: str, offset: int) -> dict[str, Any]:
            logprobs = None if body.logprobs is None else self.completion_logprobs(name, events, offset)
            return {"index": 0, "text": text, "logprobs": logprobs,
                    "finish_reason": events[-1].finish_reason if events else None}

        return await self.respond(http, body, request, meta, choice)

    async def chat_completions(self, http: HTTPRequest) -> Response:
        self.check_auth(http)
        body = await self.read_body(http, ChatRequest)
        name = self.model_name(body)
        prompt = self.chat_prompt(body, name)
        top = (body.top_logprobs or 0) if body.logprobs else 0
        request = self.engine_request(body, name, prompt, top)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "model": name, "created": int(time.time())}

        def choice(events: list[Event], text: str, offset: int) -> dict[str, Any]:
            logprobs = self.chat_logprobs(name, events) if body.logprobs else None
            key = "delta" if body.stream else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": events[-1].finish_reason if events else None}

        return await self.respond(http, body, request, meta, choice, chat=True)

    async def respond(self, http: HTTPRequest, body: Sampling, request: Request,
                      meta: dict[str, Any], choice: Any, chat: bool = False) -> Response:
        events = self.run(http, request)
        first = await anext(events, None)  # submit now, so a busy server answers 503 before 200
        if first is None:
            return Response(status_code=499)
        if not body.stream:
            collected = [first] + [e async for e in events]
            text = "".join(e.text for e in collected)
            return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion",
                                 "choices": [choice(collected, text, 0)],
                                 "usage": self.usage(first, len(collected))})

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def stream() -> AsyncIterator[str]:
            count, offset = 0, 0
            try:
                async for event in _prepend(first, events):
                    count += 1
                    chunk = {**meta, "object": kind, "choices": [choice([event], event.text, offset)]}
                    offset += len(event.text)
                    yield f"data: {json.dumps(chunk)}\n\n"
            except APIError as error:
                yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.kind}})}\n\n"
            if include_usage:
                usage = {**meta, "object": kind, "choices": [], "usage": self.usage(first, count)}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def list_models(self, http: HTTPRequest) -> Response:
        self.check_auth(http)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "elm",
             "parent": served.parent} for name, served in self.engine.models.items()]})

    async def health(self, http: HTTPRequest) -> Response:
        if not self.engine.healthy:
            return JSONResponse({"status": "error", "detail": self.engine.failure}, status_code=503)
        return JSONResponse({"status": "ok", "in_flight": self.engine.in_flight})

    async def page(self, http: HTTPRequest) -> Response:
        """The chat page; it holds no data, so it needs no key (its API calls do)."""
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


async def _prepend(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    yield first
    async for event in rest:
        yield event


def build_app(engine: Engine, settings: ServerSettings | None = None) -> Starlette:
    server = Server(engine, settings or ServerSettings())

    def guarded(handler: Any) -> Any:
        async def endpoint(request: HTTPRequest) -> Response:
            try:
                return await handler(request)
            except APIError as error:
                return error_response(error)
        return endpoint

    async def http_error(request: HTTPRequest, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return error_response(APIError(error.status_code, str(error.detail), code="not_found"
                                       if error.status_code == 404 else None))

    routes = [
        Route("/", server.page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/health", guarded(server.health), methods=["GET"]),
        Route("/v1/models", guarded(server.list_models), methods=["GET"]),
        Route("/v1/completions", guarded(server.completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(server.chat_completions), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
