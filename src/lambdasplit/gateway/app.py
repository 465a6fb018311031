"""An OpenAI-compatible HTTP API on the device: apps talk to it as to a cloud LLM API, while only
hidden states leave the machine.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions and POST /v1/completions, each
with SSE streaming (`data: ... [DONE]`) and usage counts. Requests are validated against the
`openai` package's request TypedDicts (gateway/schema.py) and answered with its response models
(gateway/responses.py), so shapes track the API. The fields supported, and how each differs from
vLLM, are in docs/gateway.md.

Requests run concurrently, each its own generation (gateway/generator.py) on one of the app's
bounded worker threads (web/bridge.py). When the client goes away the generation is cancelled
before its next body call and its body session is closed. A finished single-sequence request's
session is kept for the conversation's next turn (a `SessionPool` of `Conversation`s, web/). With
`protection` (`gateway --pseudonymize`, `--decoys N`) chat requests run through their
conversation's `ProtectedChat` instead (gateway/protected.py). Errors use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the HTTP status an OpenAI client expects
(`responses.error_status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lambdasplit import defaults
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.errors import LambdaSplitError
from lambdasplit.gateway import responses
from lambdasplit.gateway.generator import BodyFactory, Generator, Outcome, Plan, plan
from lambdasplit.gateway.protected import PROTECTED_CHATS, PROTECTED_TTL, ProtectedChats, refuse_completions, refuse_unprotectable
from lambdasplit.gateway.responses import error_response, error_status
from lambdasplit.gateway.schema import (
    APIError,
    ChatRequest,
    CompletionRequest,
    SamplingDefaults,
    bad_request,
    parse_chat,
    parse_completion,
)
from lambdasplit.privacy.protect import Protection
from lambdasplit.security import token_matches
from lambdasplit.web.bridge import ClientGone, Workers
from lambdasplit.web.conversation import Conversation
from lambdasplit.web.pool import SessionPool

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4 << 20  # a request's JSON body
MAX_ROWS = defaults.MAX_BATCH  # prompts x n in one batch: what one body session accepts
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the embedded default model
CONVERSATION_TTL = 240.0  # idle seconds a kept conversation lives: below the body server's SESSION_TTL (300)

__all__ = ["APIError", "create_app", "default_model_name", "error_status"]


def default_model_name(source: str | None, exported: bool = False) -> str:
    """The model id clients see, from the source the user named: a GGUF file's stem, a directory's
    name (an exported part, `DIR/device`, is named after DIR), never a raw path."""
    if source is None or source == "default":
        return DEFAULT_MODEL_NAME
    path = Path(source)
    if path.suffix == ".gguf":
        return path.stem
    path = path.resolve()
    return (path.parent.name if exported else path.name) or DEFAULT_MODEL_NAME


@dataclass
class _Gateway:
    """What the routes share: the runtime, the model's name, the generator and its worker threads."""

    runtime: SplitRuntime
    model_name: str
    api_key: str | None
    generator: Generator
    workers: Workers
    sampling: SamplingDefaults
    vocab_size: int
    max_n: int
    speculate: str | None
    draft_tokens: int | None
    poll_seconds: float
    created: int

    def check_key(self, request: Request) -> None:
        if self.api_key is not None and not token_matches(request.headers.get("authorization"), self.api_key):
            raise APIError(401, "missing or wrong API key", "invalid_request_error", "invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this gateway serves `{self.model_name}`.",
                           "invalid_request_error", "model_not_found", "model")

    def plan(self, chat: bool, prompts: list[list[int]], req: ChatRequest | CompletionRequest, echo: list[str],
             messages: list[dict[str, str]] | None = None) -> Plan:
        return plan(chat, prompts, req, echo, MAX_ROWS, self.speculate, self.draft_tokens, messages)

    async def respond(self, plan: Plan, request: Request) -> Any:
        """Run `plan` on a worker thread; errors before its first item get a status code."""
        meta = {"id": f"{'chatcmpl' if plan.chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        job = self.workers.start(lambda cancel, put: self.generator.run(plan, cancel, put))
        try:
            first = await job.next(request, self.poll_seconds)
        except ClientGone:
            return Response(status_code=499)
        except BaseException:  # this handler was cancelled
            job.cancel.set()
            raise
        if isinstance(first, BaseException):
            raise first
        if plan.stream:
            return StreamingResponse(responses.stream(self.runtime, job, first, request, plan, meta, self.poll_seconds),
                                     media_type="text/event-stream")
        try:
            while not isinstance(first, Outcome | BaseException):  # a non-streamed plan puts only its outcome
                first = await job.next(request, self.poll_seconds)
        except ClientGone:
            return Response(status_code=499)
        finally:
            job.cancel.set()
        if isinstance(first, BaseException):
            raise first
        headers = {"X-LambdaSplit-Bytes-To-Cloud": str(first.result.bytes_to_cloud),
                   "X-LambdaSplit-Cached-Tokens": str(first.cached_tokens)}
        return JSONResponse(responses.answer(self.runtime, plan, meta, first), headers=headers)


async def _payload(request: Request) -> Any:
    """The request's JSON, read up to MAX_REQUEST_BYTES."""
    if int(request.headers.get("content-length") or 0) > MAX_REQUEST_BYTES:
        raise APIError(413, f"the request body is over {MAX_REQUEST_BYTES >> 20} MiB", "invalid_request_error")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            raise APIError(413, f"the request body is over {MAX_REQUEST_BYTES >> 20} MiB", "invalid_request_error")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # json.loads nests one C call per level; the body was short enough to be read
        raise bad_request("the request body is nested too deeply") from None


def _encode(runtime: SplitRuntime, prompt: str | list[int]) -> list[int]:
    """A completions prompt's ids; the tokenizer is shared by concurrent requests, so it is called
    without padding (its settings never change)."""
    if isinstance(prompt, list):
        return prompt
    if not prompt.strip():
        raise bad_request("the prompt is empty", "prompt")
    return runtime.tokenizer(prompt)["input_ids"]


def create_app(
    runtime: SplitRuntime,
    connect: BodyFactory,
    model_name: str,
    api_key: str | None = None,
    default_max_tokens: int = 256,
    poll_seconds: float = 0.05,
    speculate: str | None = None,
    draft_tokens: int | None = None,
    conversations: int = 16,
    conversation_ttl: float = CONVERSATION_TTL,
    max_n: int = 16,
    sampling_defaults: SamplingDefaults | None = None,
    protection: Protection | None = None,
    protected_chats: int = PROTECTED_CHATS,
    protected_ttl: float = PROTECTED_TTL,
) -> FastAPI:
    """The gateway app. Every completion request runs on a body session of its own (`connect()`,
    or a kept conversation's: at most `conversations` are kept, 0 turns reuse off) and its own
    generate() over `runtime`, so requests run concurrently. `sampling_defaults` default to the
    model's generation_config.json. An active `protection` runs chat requests through the
    defenses (the stand-ins of at most `protected_chats` conversations are kept, each for
    `protected_ttl` idle seconds) and refuses raw completions; its `seed` is for tests only."""
    pool: SessionPool[int, Conversation] = SessionPool(conversations, conversation_ttl, Conversation.close)
    protected = ProtectedChats(runtime, protection, protected_chats, protected_ttl) if protection is not None and protection.active else None
    sampling = replace(sampling_defaults or SamplingDefaults.from_generation_config(runtime.model.generation_config),
                       max_tokens=default_max_tokens)
    gw = _Gateway(runtime, model_name, api_key, Generator(runtime, connect, pool, protected), Workers("gateway"), sampling,
                  int(runtime.config.get_text_config().vocab_size), max_n, speculate, draft_tokens, poll_seconds,
                  responses.created(runtime))

    async def reap() -> None:
        while True:
            await asyncio.sleep(max(1.0, conversation_ttl / 4))
            await asyncio.to_thread(pool.expire)
            if protected is not None:
                protected.expire()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        reaper = asyncio.create_task(reap())
        yield
        reaper.cancel()
        gw.workers.shutdown()  # every generation stops at its next step
        await asyncio.to_thread(pool.close)

    app = FastAPI(title="lambdasplit gateway", version="1", lifespan=lifespan)
    app.state.conversations = pool
    app.state.protected = protected
    _routes(app, gw, protected)
    return app


def _routes(app: FastAPI, gw: _Gateway, protected: ProtectedChats | None) -> None:
    """The endpoints and error handlers."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(LambdaSplitError)
    async def _split_error(_: Request, exc: LambdaSplitError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _no_route(request: Request, exc: HTTPException) -> JSONResponse:
        """An unknown path or method, in OpenAI's shape ("Invalid URL (GET /v1/x)"), not FastAPI's {"detail": ...}."""
        what = "Invalid URL" if exc.status_code == 404 else str(exc.detail)
        response = error_response(APIError(exc.status_code, f"{what} ({request.method} {request.url.path})"))
        response.headers.update(exc.headers or {})  # 405's Allow
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return error_response(exc)  # a 500 in OpenAI's shape, without the exception's text

    @app.get("/health")
    def health() -> Response:
        """Liveness, without the API key (as vLLM's): the gateway answers; the body is reached per request."""
        return Response(status_code=200)

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        gw.check_key(request)
        return {"object": "list", "data": [responses.model_card(gw.model_name, gw.created)]}

    @app.get("/v1/models/{name:path}")
    def model(name: str, request: Request) -> dict[str, Any]:
        gw.check_key(request)
        gw.check_model(name)
        return responses.model_card(gw.model_name, gw.created)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        gw.check_key(request)
        req = parse_chat(await _payload(request), gw.sampling, gw.vocab_size, gw.max_n)
        gw.check_model(req.model)
        if protected is not None:
            refuse_unprotectable(req, protected.protection)
        ids = gw.runtime.encode_chat(req.messages)[0].tolist()
        return await gw.respond(gw.plan(True, [ids], req, [], req.messages if protected is not None else None), request)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        gw.check_key(request)
        if protected is not None:
            raise refuse_completions(protected.protection)
        req = parse_completion(await _payload(request), gw.sampling, gw.vocab_size, gw.max_n)
        gw.check_model(req.model)
        prompts = [_encode(gw.runtime, p) for p in req.prompts]
        echo = [gw.runtime.tokenizer.decode(p) if isinstance(p, list) else p for p in req.prompts] if req.echo else []
        return await gw.respond(gw.plan(False, prompts, req, echo), request)
