"""An OpenAI-compatible HTTP API on the device: apps talk to it as to a cloud LLM API, while only
hidden states leave the machine.

Endpoints: GET /v1/models, POST /v1/chat/completions and POST /v1/completions, each with SSE
streaming (`data: ... [DONE]`) and usage counts (`stream_options.include_usage`).

Requests run concurrently: each one is its own `generate()` over the shared weights (with its own
head and tail KV caches), its own body session from the `connect` factory and its own worker thread (torch releases the GIL).
When the client goes away the generation is cancelled before its next body call and the body
session is closed. Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with the HTTP status an OpenAI client expects (see `error_status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from lambdasplit.device.body import BodyClient
from lambdasplit.device.generation import GenerationOptions, GenerationResult
from lambdasplit.device.runtime import SplitDevice
from lambdasplit.errors import (
    CapacityError,
    LambdaSplitError,
    PromptError,
    ProtocolError,
    RemoteError,
    UnavailableError,
)
from lambdasplit.security import token_matches

log = logging.getLogger(__name__)

BodyFactory = Callable[[], BodyClient]
DEFAULT_RETRY_AFTER = 1.0  # seconds, when the body server did not say


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def sampling(self, default_max: int) -> GenerationOptions:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationOptions(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max,
            greedy=self.temperature == 0.0,
            temperature=self.temperature or 1.0,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(stops[:4]),
        )


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class CompletionRequest(SamplingFields):
    prompt: str = Field(min_length=1, max_length=200_000)


class APIError(Exception):
    """An error the gateway itself answers (e.g. a wrong API key), in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param


def error_status(exc: BaseException) -> tuple[int, str, str | None, float | None]:
    """(HTTP status, OpenAI error type, code, Retry-After seconds or None) for an error.

    The body server refusing the device's token is the gateway operator's misconfiguration, not the
    API client's, hence 502 (the gateway's own API key check answers 401).
    """
    if isinstance(exc, APIError):
        return exc.status, exc.type, exc.code, None
    if isinstance(exc, CapacityError):
        return 429, "rate_limit_error", exc.code.value, exc.retry_after or DEFAULT_RETRY_AFTER
    if isinstance(exc, UnavailableError):
        return 503, "server_error", exc.code.value, exc.retry_after or DEFAULT_RETRY_AFTER
    if isinstance(exc, ProtocolError):
        return 400, "invalid_request_error", exc.code.value, None
    if isinstance(exc, RemoteError):  # AuthError, MismatchError, ComputeError
        return 502, "server_error", exc.code.value, None
    if isinstance(exc, LambdaSplitError):  # PromptError, bad sampling settings, ...
        return 400, "invalid_request_error", None, None
    return 500, "server_error", None, None


def error_body(exc: BaseException) -> dict[str, Any]:
    _, type_, code, _ = error_status(exc)
    message = str(exc) if isinstance(exc, LambdaSplitError | APIError) else f"internal error: {type(exc).__name__}"
    return {"error": {"message": message, "type": type_, "param": getattr(exc, "param", None), "code": code}}


def error_response(exc: BaseException) -> JSONResponse:
    status, _, _, retry_after = error_status(exc)
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return JSONResponse(status_code=status, content=error_body(exc), headers=headers)


class _ClientGone(Exception):
    """The HTTP client disconnected while its request was running."""


class _Piece:
    """A streamed item: new text, or the number of tokens a step added."""

    __slots__ = ("text", "tokens")

    def __init__(self, text: str = "", tokens: int = 0) -> None:
        self.text, self.tokens = text, tokens


_END = object()


class _Job:
    """One request's generation, in its own thread, with its own body session and caches.

    `work(device, body, cancel, put)` streams items with `put` or returns one result; the body
    session is closed before the result (or the end marker) is delivered.
    """

    def __init__(
        self,
        device: SplitDevice,
        connect: BodyFactory,
        work: Callable[[SplitDevice, BodyClient, threading.Event, Callable[[object], None]], object],
        jobs: set[_Job],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.cancel = threading.Event()
        self._jobs = jobs
        jobs.add(self)
        self._thread = threading.Thread(target=self._run, args=(device, connect, work), name="gateway-job", daemon=True)
        self._thread.start()

    def _run(self, device: SplitDevice, connect: BodyFactory, work: Callable[..., object]) -> None:
        try:
            body = connect()
            try:
                result = work(device, body, self.cancel, self._put)
            finally:
                try:
                    body.close()
                except Exception:  # noqa: BLE001 - closing is best effort; the server's TTL ends it too
                    log.warning("closing a body session failed", exc_info=True)
            if result is not None:
                self._put(result)
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which answers it
            self._put(exc)
        finally:
            self._put(_END)
            self._jobs.discard(self)

    def _put(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel.set()

    async def next(self, request: Request, poll: float) -> object:
        """The next item; raises _ClientGone (and cancels the job) once the client disconnects."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), poll)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel.set()
                    raise _ClientGone from None


def create_app(
    device: SplitDevice,
    connect: BodyFactory,
    model_name: str,
    api_key: str | None = None,
    default_max_tokens: int = 256,
    poll_seconds: float = 0.05,
    speculate: str | None = None,
    draft_tokens: int = 8,
) -> FastAPI:
    """The gateway app. Every completion request calls `connect()` for a body session of its own
    (closed when the request ends) and its own generate() over `device`, so requests run concurrently."""
    jobs: set[_Job] = set()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for job in list(jobs):  # shutting down: stop every generation at its next step
            job.cancel.set()

    app = FastAPI(title="lambdasplit gateway", version="1", lifespan=lifespan)

    def check_key(request: Request) -> None:
        if api_key is not None and not token_matches(request.headers.get("authorization"), api_key):
            raise APIError(401, "missing or wrong API key", "invalid_request_error", "invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(LambdaSplitError)
    async def _split_error(_: Request, exc: LambdaSplitError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        param = ".".join(str(p) for p in problems[0]["loc"][1:]) if problems else None
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in problems)
        return error_response(APIError(400, message or "invalid request", "invalid_request_error", None, param or None))

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "lambdasplit"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest, request: Request) -> Any:
        check_key(request)
        ids = device.encode_chat([m.model_dump() for m in req.messages])
        return await _respond(req, request, ids, "chat.completion")

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        check_key(request)
        if not req.prompt.strip():
            raise PromptError("the prompt is empty")
        # The tokenizer is shared by concurrent requests: no padding, so its settings never change.
        ids = device.tokenizer(req.prompt, return_tensors="pt")["input_ids"]
        return await _respond(req, request, ids, "text_completion")

    async def _respond(req: SamplingFields, request: Request, ids: torch.Tensor, kind: str) -> Any:
        sampling = dataclasses.replace(req.sampling(default_max_tokens), speculate=speculate, draft_tokens=draft_tokens)
        meta = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:
            def stream(dev: SplitDevice, body: BodyClient, cancel: threading.Event, put: Callable[[object], None]) -> object:
                return dev.generate_ids(body, ids, None, sampling, on_text=lambda text: put(_Piece(text=text)),
                                        on_tokens=lambda step: put(_Piece(tokens=len(step[0]))), cancel=cancel)

            job = _Job(device, connect, stream, jobs)
            try:
                first = await job.next(request, poll_seconds)  # errors before the first token get a status code
            except _ClientGone:
                return Response(status_code=499)
            except BaseException:  # this handler was cancelled
                job.cancel.set()
                raise
            if isinstance(first, BaseException):
                raise first
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _sse(job, first, request, kind, meta, include_usage, ids.shape[1])
            return StreamingResponse(events, media_type="text/event-stream")

        def generate(dev: SplitDevice, body: BodyClient, cancel: threading.Event, _: Callable[[object], None]) -> object:
            return dev.generate_ids(body, ids, None, sampling, cancel=cancel)

        job = _Job(device, connect, generate, jobs)
        try:
            result = await job.next(request, poll_seconds)
        except _ClientGone:
            return Response(status_code=499)
        finally:
            job.cancel.set()  # a no-op once the job is done; stops it if this handler was cancelled
        if isinstance(result, BaseException):
            raise result
        usage = _usage(ids.shape[1], len(result.token_ids[0]))
        reason = result.finish_reasons[0]
        if kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": reason, "logprobs": None}
        return {**meta, "object": kind, "choices": [choice], "usage": usage}

    async def _sse(
        job: _Job, first: object, request: Request, kind: str, meta: dict,
        include_usage: bool, prompt_tokens: int,
    ) -> AsyncIterator[str]:
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"

        def event(delta_text: str | None, reason: str | None, first: bool = False) -> str:
            if kind == "chat.completion":
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if delta_text:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": reason, "logprobs": None}
            payload = {**meta, "object": chunk_kind, "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if kind == "chat.completion":
                yield event(None, None, first=True)
            count, reason, item = 0, "length", first
            while item is not _END:
                if isinstance(item, BaseException):  # the stream has started: an error event, then the end
                    yield f"data: {json.dumps(error_body(item))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if isinstance(item, GenerationResult):
                    count, reason = len(item.token_ids[0]), item.finish_reasons[0]
                elif isinstance(item, _Piece):
                    count += item.tokens
                    if item.text:
                        yield event(item.text, None)
                item = await job.next(request, poll_seconds)
            yield event(None, reason)
            if include_usage:
                yield f"data: {json.dumps({**meta, 'object': chunk_kind, 'choices': [], 'usage': _usage(prompt_tokens, count)})}\n\n"
            yield "data: [DONE]\n\n"
        except _ClientGone:
            return
        finally:  # also runs when Starlette cancels the response because the client went away
            job.cancel.set()

    return app


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
