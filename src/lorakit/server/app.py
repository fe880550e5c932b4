"""An OpenAI-compatible HTTP API over the engine: one base in memory, an adapter per request.

`create_app` builds the FastAPI app (the only module that imports the web framework):
GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true` sends
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`), POST /v1/adapters and
DELETE /v1/adapters/{name} to load and unload adapters while serving, GET /v1/adapters (those in
the allowed folders), GET /health, and GET / (the playground page: playground.html). The request's
`model` picks the base (its name) or an adapter (its name). Every client mistake gets a 4xx with
OpenAI's error body {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lorakit.errors import LorakitError
from lorakit.inference.engine import Engine
from lorakit.inference.request import AdapterInUse, Busy, Request, UnknownAdapter
from lorakit.inference.sampling import Sampling
from lorakit.inference.stream import TextStream
from lorakit.models.chat import encode_prompt
from lorakit.server.schemas import (
    AdapterLoad,
    ApiError,
    ChatRequest,
    CompletionRequest,
    GenerateBody,
    TextPart,
    allowed_adapter_path,
    available_adapters,
    check_adapter_name,
    parse_body,
)


def _engine_error(e: LorakitError) -> ApiError:
    if isinstance(e, Busy):  # OpenAI's clients wait Retry-After seconds, then try again
        return ApiError(429, str(e), "rate_limit_error", "queue_full", headers={"Retry-After": "1"})
    if isinstance(e, UnknownAdapter):
        return ApiError(404, str(e), code="model_not_found", param="model")
    if isinstance(e, AdapterInUse):
        return ApiError(409, str(e), code="adapter_in_use")
    return ApiError(400, str(e))


class Generation:
    """One request on the engine, as an async stream of (text delta, finish reason or None)."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        prompt: list[int],
        adapter: str | None,
        sampling: Sampling,
        stop: Sequence[str],
    ) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

        self.prompt_tokens = len(prompt)
        self.text = TextStream(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stop)
        self.request = Request(prompt, sampling, emit, adapter)
        try:
            engine.submit(self.request)
        except LorakitError as e:
            raise _engine_error(e) from None

    async def deltas(self) -> AsyncIterator[tuple[str, str | None]]:
        try:
            while True:
                kind, value = await self.queue.get()
                if kind == "error":
                    raise ApiError(500, str(value), "server_error")
                if kind == "finish":
                    yield self.text.finish(), str(value)
                    return
                delta = self.text.push(value)
                if self.text.stopped:
                    yield delta, "stop"
                    return
                if delta:
                    yield delta, None
        finally:
            self.request.cancel()  # a no-op once finished; frees the row if the client left

    async def collect(self) -> tuple[str, str | None]:
        """The whole text and the finish reason."""
        parts, finish = [], None
        async for delta, reason in self.deltas():
            parts.append(delta)
            finish = reason or finish
        return "".join(parts), finish

    def usage(self) -> dict:
        prompt, done = self.prompt_tokens, len(self.text.ids)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _card(name: str, parent: str | None) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "lorakit", "parent": parent}


def _choice(chat: bool, stream: bool, text: str, finish: str | None) -> dict:
    """One entry of `choices` in OpenAI's shape for (chat or not, chunk or not)."""
    if not chat:
        body: dict = {"text": text}
    elif stream:
        body = {"delta": {"content": text} if text else {}}
    else:
        body = {"message": {"role": "assistant", "content": text}}
    return {"index": 0, **body, "logprobs": None, "finish_reason": finish}


async def _sse(gen: Generation, head: dict, chat: bool, usage: bool) -> AsyncIterator[str]:
    """Server-sent events: OpenAI's chunks, then (include_usage) a usage chunk, then [DONE]."""

    def event(choices: list, **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    nulls = {"usage": None} if usage else {}
    if chat:
        first = _choice(True, True, "", None)
        yield event([{**first, "delta": {"role": "assistant", "content": ""}}], **nulls)
    try:
        async for delta, finish in gen.deltas():
            if delta:
                yield event([_choice(chat, True, delta, None)], **nulls)
            if finish:
                yield event([_choice(chat, True, "", finish)], **nulls)
    except ApiError as e:  # the engine failed after the response began: say so, in-band
        yield f"data: {json.dumps(e.body)}\n\n"
        return
    if usage:
        yield event([], usage=gen.usage())
    yield "data: [DONE]\n\n"


class Server:
    """What the endpoints share: the engine, the tokenizer, names and limits."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        model_name: str,
        adapter_dirs: Sequence[str | Path],
        api_key: str | None,
        max_tokens: int,
    ) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.adapter_dirs, self.api_key, self.max_tokens = adapter_dirs, api_key, max_tokens

    async def check_key(self, http: HttpRequest) -> None:
        if self.api_key is None:
            return
        scheme, _, token = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "invalid or missing API key; send the header 'Authorization: Bearer KEY'",
                "authentication_error",
                "invalid_api_key",
            )

    def adapter_for(self, name: str) -> str | None:
        """The adapter the request's `model` names (None: the base), or a 404."""
        if name == self.model_name:
            return None
        if name in self.engine.adapters:
            return name
        raise ApiError(
            404,
            f"the model {name!r} does not exist; GET /v1/models lists the base and its adapters",
            code="model_not_found",
            param="model",
        )

    def sampling(self, body: GenerateBody, prompt: list[int], requested: int | None) -> Sampling:
        if body.n not in (None, 1):
            raise ApiError(400, "n > 1 is not supported; send n separate requests", param="n")
        if requested is not None and requested > self.max_tokens:
            message = f"max_tokens is {requested}; this server allows at most {self.max_tokens}"
            raise ApiError(400, message, param="max_tokens")
        context = self.engine.context
        room = context - len(prompt) if context else self.max_tokens
        wanted = requested or min(self.max_tokens, max(room, 1))  # chat: as much as fits
        if wanted > room:
            raise ApiError(
                400,
                f"prompt ({len(prompt)} tokens) + max_tokens ({wanted}) exceed the model's "
                f"context of {context} tokens; shorten the prompt or lower max_tokens",
                code="context_length_exceeded",
                param="max_tokens",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or not all(stop):
            raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        return Sampling(wanted, temperature, top_p, stop=tuple(stop), seed=body.seed)

    async def completions(self, http: HttpRequest) -> Any:
        body = await parse_body(CompletionRequest, http)
        if body.echo or body.logprobs is not None:
            raise ApiError(400, "echo and logprobs are not supported", param="echo")
        adapter = self.adapter_for(body.model)
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = self.tokenizer.encode(prompt)  # as `lorakit generate --raw`
        s = self.sampling(body, prompt, body.max_tokens or 16)  # OpenAI's default: 16
        return await self.respond(http, body, prompt, adapter, s, chat=False)

    async def chat(self, http: HttpRequest) -> Any:
        body = await parse_body(ChatRequest, http)
        if body.logprobs:
            raise ApiError(400, "logprobs is not supported", param="logprobs")
        adapter = self.adapter_for(body.model)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
            for m in body.messages
        ]
        try:
            prompt = encode_prompt(messages, self.tokenizer)  # as `lorakit chat`
        except Exception as e:  # the chat template (Jinja) refused the conversation
            message = f"the chat template rejects these messages: {e}"
            raise ApiError(400, message, param="messages") from None
        s = self.sampling(body, prompt, body.max_completion_tokens or body.max_tokens)
        return await self.respond(http, body, prompt, adapter, s, chat=True)

    async def respond(
        self,
        http: HttpRequest,
        body: GenerateBody,
        prompt: list[int],
        adapter: str | None,
        s: Sampling,
        chat: bool,
    ) -> Any:
        gen = Generation(self.engine, self.tokenizer, prompt, adapter, s, s.stop)
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.model,
        }
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            head["object"] = "chat.completion.chunk" if chat else "text_completion"
            events = _sse(gen, head, chat, usage)
            return StreamingResponse(events, media_type="text/event-stream")
        task = asyncio.ensure_future(gen.collect())
        while not task.done():  # watch for a client that hangs up while we generate
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await http.is_disconnected():
                task.cancel()  # Generation.deltas' `finally` cancels the engine row
                return Response(status_code=499)
        text, finish = task.result()
        return {**head, "choices": [_choice(chat, False, text, finish)], "usage": gen.usage()}

    async def models(self) -> dict:
        adapters = [_card(name, self.model_name) for name in sorted(self.engine.adapters)]
        return {"object": "list", "data": [_card(self.model_name, None), *adapters]}

    async def load(self, http: HttpRequest) -> dict:
        body = await parse_body(AdapterLoad, http)
        check_adapter_name(body.name, self.model_name)
        if body.name in self.engine.adapters:
            message = f"an adapter named {body.name!r} is already loaded"
            raise ApiError(409, message, code="adapter_exists", param="name")
        path = allowed_adapter_path(body.path, self.adapter_dirs)
        try:
            await asyncio.wrap_future(self.engine.load_adapter(body.name, str(path)))
        except LorakitError as e:
            raise _engine_error(e) from None
        return _card(body.name, self.model_name)

    async def unload(self, name: str) -> dict:
        if name == self.model_name:
            raise ApiError(400, "the base model cannot be unloaded", param="name")
        try:
            await asyncio.wrap_future(self.engine.unload_adapter(name))
        except LorakitError as e:
            raise _engine_error(e) from None
        return {"id": name, "object": "model", "deleted": True}

    async def available(self) -> dict:
        rows = await asyncio.to_thread(
            available_adapters, self.adapter_dirs, dict(self.engine.adapters)
        )
        return {"object": "list", "data": rows}

    async def health(self) -> dict:
        running, waiting = self.engine.load()
        return {"status": "ok", "running": running, "waiting": waiting}


def create_app(
    engine: Engine,
    tokenizer: Any,
    model_name: str,
    adapter_dirs: Sequence[str | Path] = (),
    api_key: str | None = None,
    max_tokens: int = 1024,
) -> FastAPI:
    """The app; it starts the engine's thread on start-up and stops it on shutdown.

    `adapter_dirs`: the only directories POST /v1/adapters may load from. `max_tokens`: the
    most new tokens one request may ask for. `api_key`: if set, /v1/* needs `Bearer KEY`.
    """
    server = Server(engine, tokenizer, model_name, adapter_dirs, api_key, max_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lorakit", lifespan=lifespan, openapi_url=None)
    for kind in (ApiError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, _on_error)
    app.get("/health")(server.health)
    app.get("/", response_class=HTMLResponse)(_playground)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(server.check_key)])
    v1.get("/models")(server.models)
    v1.post("/completions")(server.completions)
    v1.post("/chat/completions")(server.chat)
    v1.get("/adapters")(server.available)
    v1.post("/adapters")(server.load)
    v1.delete("/adapters/{name}")(server.unload)
    app.include_router(v1)
    return app


async def _playground() -> HTMLResponse:
    """The playground page: the base and adapters answering one prompt side by side."""
    return HTMLResponse((Path(__file__).parent / "playground.html").read_text())


async def _on_error(http: HttpRequest, e: Exception) -> JSONResponse:
    """Every error, the framework's included, as OpenAI's error body."""
    if isinstance(e, RequestValidationError):
        e = ApiError(400, f"invalid request: {e}")
    elif isinstance(e, HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        e = ApiError(e.status_code, str(e.detail), kind)
    elif not isinstance(e, ApiError):
        e = ApiError(500, f"internal error: {e}", "server_error")
    return JSONResponse(e.body, status_code=e.status, headers=e.headers)


def _text(content: str | list[TextPart] | None) -> str:
    if isinstance(content, list):
        return "".join(part.text for part in content)
    return content or ""
