"""An OpenAI-compatible HTTP API on the device: apps talk to it as to a cloud LLM API, while only
hidden states leave the machine.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions and POST /v1/completions, each
with SSE streaming (`data: ... [DONE]`) and usage counts. Requests are validated against the
`openai` package's request TypedDicts (gateway/schema.py) and answered with its response models
(`ChatCompletion`, `ChatCompletionChunk`, `Completion`), so shapes track the API. The fields
supported, and how each differs from vLLM, are in docs/gateway.md.

Requests run concurrently: each one is its own `generate()` over the shared weights (with its own
head and tail KV caches, and its own logits processors: gateway/sampling.py), its own body session
and its own worker thread (torch releases the GIL). When the client goes away the generation is
cancelled before its next body call and the body session is closed. A finished single-sequence
request's session is kept for the conversation's next turn (gateway/conversations.py). With
`protection` (`gateway --pseudonymize`, `--decoys N`) chat requests run through their
conversation's `ProtectedChat` instead (gateway/protected.py), on a fresh session each. Errors use
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status an OpenAI
client expects (see `error_status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage, ChatCompletionTokenLogprob
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from openai.types.completion_choice import Logprobs
from openai.types.completion_usage import PromptTokensDetails
from starlette.exceptions import HTTPException
from transformers import LogitsProcessor

from lambdasplit import defaults
from lambdasplit.device.body import BodyClient
from lambdasplit.device.generation import GenerationResult
from lambdasplit.device.runtime import SplitDevice
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.device.textstream import TextStream
from lambdasplit.errors import (
    CapacityError,
    LambdaSplitError,
    ProtocolError,
    RemoteError,
    UnavailableError,
)
from lambdasplit.gateway.conversations import Conversation, ConversationPool
from lambdasplit.gateway.protected import (
    PROTECTED_CHATS,
    PROTECTED_TTL,
    ProtectedChats,
    refuse_completions,
    refuse_unprotectable,
)
from lambdasplit.gateway.sampling import JsonSchemaConstraint, LogprobRecorder, TokenLogprob
from lambdasplit.gateway.schema import (
    APIError,
    ChatRequest,
    CompletionRequest,
    SamplingDefaults,
    bad_request,
    parse_chat,
    parse_completion,
)
from lambdasplit.privacy.protect import ProtectedResult, Protection
from lambdasplit.security import token_matches

log = logging.getLogger(__name__)

BodyFactory = Callable[[], BodyClient]
MAX_REQUEST_BYTES = 4 << 20  # a request's JSON body
MAX_ROWS = defaults.MAX_BATCH  # prompts x n in one batch: what one body session accepts
DEFAULT_RETRY_AFTER = 1.0  # seconds, when the body server did not say
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
    if status == 500:
        log.error("request failed", exc_info=exc)
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return JSONResponse(status_code=status, content=error_body(exc), headers=headers)


@dataclass
class _Plan:
    """One request, ready to generate: every row's prompt ids (n rows per prompt), the options and
    what the answer must carry. A protected chat carries its `messages`: its `ProtectedChat` builds
    the rows that are sent (its one row here is the real prompt, never sent)."""

    chat: bool
    rows: list[list[int]]
    prompt_tokens: int
    options: SamplingParams
    logprobs: int | None
    json_schema: dict[str, Any] | None
    stream: bool
    include_usage: bool
    echo: list[str] = field(default_factory=list)  # per row: the prompt text to put before the answer
    messages: list[dict[str, str]] | None = None
    user: str | None = None  # a protected chat's end user (its conversations are kept apart from others')


@dataclass
class _Step:
    """A streamed item: per row, the new text and the new tokens' logprobs."""

    texts: dict[int, str]
    logprobs: dict[int, list[TokenLogprob]]


@dataclass
class _Outcome:
    """A finished generation, with what the response reports beyond the result."""

    result: GenerationResult
    logprobs: list[list[TokenLogprob]]
    cached_tokens: int
    prompt_tokens: int  # what usage reports: the prompts', or a protected request's real row's


_END = object()


class _Collector:
    """The on_tokens callback of one generation: every row's raw new ids (what a kept cache holds),
    logprobs, and, when streaming, each row's text cut at stop strings (`TextStream` per row)."""

    def __init__(self, device: SplitDevice, rows: int, stops: tuple[str, ...], recorder: LogprobRecorder | None,
                 put: Callable[[object], None] | None) -> None:
        self.eos = set(device.eos_ids)
        self.recorder, self.put = recorder, put
        self.raw: list[list[int]] = [[] for _ in range(rows)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.pending: dict[int, str] = {}
        self.streams: list[TextStream] = []
        if put is not None:
            for i in range(rows):
                self.streams.append(TextStream(device.tokenizer, lambda text, i=i: self._text(i, text), stops))

    def _text(self, row: int, text: str) -> None:
        self.pending[row] = self.pending.get(row, "") + text

    def on_tokens(self, step: list[list[int]]) -> None:
        entries = self.recorder.take([tokens[0] for tokens in step]) if self.recorder is not None else None
        new: dict[int, list[TokenLogprob]] = {}
        for i, tokens in enumerate(step):
            if self.done[i]:  # generate() pads rows that have finished
                continue
            self.raw[i].extend(tokens)
            if entries is not None:
                self.logprobs[i].append(entries[i])
                new[i] = [entries[i]]
            if self.streams:
                self.streams[i].put(tokens)
            self.done[i] = any(t in self.eos for t in tokens)
        self._flush(new)

    def finish(self) -> None:
        """Release the text each row's stream still holds back (a possible stop-string start)."""
        for stream in self.streams:
            stream.end()
        self._flush({})

    def _flush(self, logprobs: dict[int, list[TokenLogprob]]) -> None:
        if self.put is not None and (self.pending or logprobs):
            self.put(_Step(self.pending, logprobs))
        self.pending = {}


class _Job:
    """One request's generation in its own thread: `work(cancel, put)` streams items with `put`
    and returns the outcome, which is delivered last (then the end marker)."""

    def __init__(self, work: Callable[[threading.Event, Callable[[object], None]], object], jobs: set[_Job]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.cancel = threading.Event()
        self._jobs = jobs
        jobs.add(self)
        threading.Thread(target=self._run, args=(work,), name="gateway-job", daemon=True).start()

    def _run(self, work: Callable[..., object]) -> None:
        try:
            self._put(work(self.cancel, self._put))
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


class _ClientGone(Exception):
    """The HTTP client disconnected while its request was running."""


class _Generator:
    """Runs plans on the device: body sessions (fresh or a kept conversation's), processors, the call."""

    def __init__(self, device: SplitDevice, connect: BodyFactory, pool: ConversationPool, speculate: str | None,
                 protected: ProtectedChats | None = None) -> None:
        self.device, self.connect, self.pool, self.speculate, self.protected = device, connect, pool, speculate, protected
        self.constraint = JsonSchemaConstraint(device.tokenizer, device.eos_ids) if device.has_tokenizer else None

    def run(self, plan: _Plan, cancel: threading.Event, put: Callable[[object], None]) -> _Outcome:
        """Generate `plan`; a single-row plan continues a kept conversation when its prompt extends
        one, and a reused session that turns out expired is replaced by a fresh one once."""
        if plan.messages is not None:
            return self._run_protected(plan, plan.messages, cancel, put)
        single = len(plan.rows) == 1 and self.pool.enabled
        taken = self.pool.take(plan.rows[0]) if single else None
        if taken is not None:
            conv, shared = taken
            sent: list[object] = []

            def put_once(item: object) -> None:
                sent.append(item)
                put(item)

            try:
                return self._generate(plan, conv, shared, cancel, put_once)
            except UnavailableError:
                if sent:  # the client has part of an answer: a retry would repeat it
                    raise
                log.info("a kept body session was gone; starting a fresh one")
        body = self.connect()
        try:
            conv = Conversation(body, self.device.model.new_cache(body)) if single else None
        except BaseException:
            body.close()
            raise
        return self._generate(plan, conv, 0, cancel, put, body)

    def _generate(self, plan: _Plan, conv: Conversation | None, shared: int, cancel: threading.Event,
                  put: Callable[[object], None], body: BodyClient | None = None) -> _Outcome:
        body = conv.body if conv is not None else body
        assert body is not None
        keep = False
        try:
            cached = self._align(conv, plan.rows[0], shared) if conv is not None else 0
            recorder = LogprobRecorder(plan.logprobs) if plan.logprobs is not None else None
            collector = _Collector(self.device, len(plan.rows), plan.options.stop, recorder, put if plan.stream else None)
            ids, mask = _batch(plan.rows, self.device.pad_id)
            first: list[LogitsProcessor] = [recorder] if recorder is not None else []  # raw logits, before the sampler's
            if plan.json_schema is not None:
                if self.constraint is None:
                    raise bad_request("response_format needs the model's tokenizer", "response_format")
                first.append(self.constraint.processor(plan.json_schema, len(plan.rows)))
            result = self.device.generate_ids(
                body, ids, mask, plan.options, on_tokens=collector.on_tokens, cancel=cancel,
                cache=conv.cache if conv is not None else None, logits_processor=first,
            )
            collector.finish()
            if conv is not None and result.finish_reasons[0] != "cancelled":
                held = (plan.rows[0] + collector.raw[0])[: conv.cache.get_seq_length()]
                conv.tokens, conv.prompt_len = held, len(plan.rows[0])
                keep = len(held) == conv.cache.get_seq_length()
            logprobs = [entries[: len(tokens)] for entries, tokens in zip(collector.logprobs, result.token_ids, strict=True)]
            return _Outcome(result, logprobs, cached, plan.prompt_tokens)
        finally:
            if keep and conv is not None:
                self.pool.put(conv)
            else:
                _close(body)

    def _run_protected(self, plan: _Plan, messages: list[dict[str, str]], cancel: threading.Event,
                       put: Callable[[object], None]) -> _Outcome:
        """A chat through its conversation's `ProtectedChat`, on a fresh body session: a kept one
        holds a prompt the cloud never saw (the cloud holds the pseudonymised or decoy rows).
        `ProtectedChat` matches stop strings on the restored text."""
        assert self.protected is not None
        decoys = self.protected.protection.decoys > 0
        options = replace(plan.options, speculate=None if decoys else plan.options.speculate)
        on_text = (lambda text: put(_Step({0: text}, {}))) if plan.stream else None
        with self.protected.chat(messages, plan.user) as chat:
            body = self.connect()  # once the conversation's turn has begun: no session waits on its lock
            try:
                done = chat.generate(body, messages, options, on_text=on_text, cancel=cancel)
            finally:
                _close(body)
        return _real_row(done)

    def _align(self, conv: Conversation, prompt: list[int], shared: int) -> int:
        """Crop a kept sequence to what `prompt` shares with it (at least one position stays to be
        sent, whose logits start the answer); returns the positions reused. Nothing to reuse, or a
        device whose sliding-window layers cannot crop, starts a fresh cache on the same session."""
        keep = min(shared, len(prompt) - 1)
        if keep < conv.cache.get_seq_length():
            try:
                if not keep:
                    raise NotImplementedError  # crop(0) means "drop nothing" to transformers
                conv.cache.crop(keep)
            except NotImplementedError:
                conv.cache, keep = self.device.model.new_cache(conv.body), 0
        return keep


def _real_row(done: ProtectedResult) -> _Outcome:
    """The outcome as the client sees it: the real row alone, restored; usage counts its tokens."""
    row, result = done.real_row, done.result
    prompt = result.prompt_token_ids[row]
    real = replace(result, texts=[done.text], prompt_token_ids=[prompt], token_ids=[done.token_ids],
                   finish_reasons=[result.finish_reasons[row]], logits=None)
    return _Outcome(real, [[]], 0, len(prompt))


def _close(body: BodyClient) -> None:
    try:
        body.close()
    except Exception:  # noqa: BLE001 - closing is best effort; the server's TTL ends it too
        log.warning("closing a body session failed", exc_info=True)


def _batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows left-padded into one batch, with the attention mask generate() expects."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def _reason(reason: str) -> str:
    """OpenAI's finish reasons: a generation cancelled while its client still listens (the
    gateway shutting down) was cut short, as by a length limit."""
    return "length" if reason == "cancelled" else reason


def create_app(
    device: SplitDevice,
    connect: BodyFactory,
    model_name: str,
    api_key: str | None = None,
    default_max_tokens: int = 256,
    poll_seconds: float = 0.05,
    speculate: str | None = None,
    draft_tokens: int = 8,
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
    generate() over `device`, so requests run concurrently. `sampling_defaults` default to the
    model's generation_config.json. An active `protection` runs chat requests through the
    defenses (the stand-ins of at most `protected_chats` conversations are kept, each for
    `protected_ttl` idle seconds) and refuses raw completions; its `seed` is for tests only."""
    jobs: set[_Job] = set()
    pool = ConversationPool(conversations, conversation_ttl)
    protected = ProtectedChats(device, protection, protected_chats, protected_ttl) if protection is not None and protection.active else None
    generator = _Generator(device, connect, pool, speculate, protected)
    defaults = replace(sampling_defaults or SamplingDefaults.from_generation_config(device.model.generation_config),
                       max_tokens=default_max_tokens)
    vocab_size = int(device.config.get_text_config().vocab_size)
    created = _created(device)

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
        for job in list(jobs):  # shutting down: stop every generation at its next step
            job.cancel.set()
        await asyncio.to_thread(pool.close)

    app = FastAPI(title="lambdasplit gateway", version="1", lifespan=lifespan)
    app.state.conversations = pool
    app.state.protected = protected

    def check_key(request: Request) -> None:
        if api_key is not None and not token_matches(request.headers.get("authorization"), api_key):
            raise APIError(401, "missing or wrong API key", "invalid_request_error", "invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this gateway serves `{model_name}`.",
                           "invalid_request_error", "model_not_found", "model")

    async def payload(request: Request) -> Any:
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
        check_key(request)
        return {"object": "list", "data": [_model(model_name, created)]}

    @app.get("/v1/models/{name:path}")
    def model(name: str, request: Request) -> dict[str, Any]:
        check_key(request)
        check_model(name)
        return _model(model_name, created)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        check_key(request)
        req = parse_chat(await payload(request), defaults, vocab_size, max_n)
        check_model(req.model)
        if protected is not None:
            refuse_unprotectable(req, protected.protection)
        ids = device.encode_chat(req.messages)[0].tolist()
        plan = _plan(True, [ids], req, [], req.messages if protected is not None else None, req.user)
        return await _respond(plan, request)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        check_key(request)
        if protected is not None:
            raise refuse_completions(protected.protection)
        req = parse_completion(await payload(request), defaults, vocab_size, max_n)
        check_model(req.model)
        prompts = [_encode(device, p) for p in req.prompts]
        echo = [device.tokenizer.decode(p) if isinstance(p, list) else p for p in req.prompts] if req.echo else []
        return await _respond(_plan(False, prompts, req, echo), request)

    def _plan(chat: bool, prompts: list[list[int]], req: ChatRequest | CompletionRequest, echo: list[str],
              messages: list[dict[str, str]] | None = None, user: str | None = None) -> _Plan:
        """Rows (n per prompt) and options; speculation drafts one sequence at a time and would
        record logprobs of rejected drafts, so it is used only for one row without logprobs."""
        rows = [p for p in prompts for _ in range(req.n)]
        if len(rows) > MAX_ROWS:
            raise bad_request(f"{len(prompts)} prompt(s) x n={req.n} is {len(rows)} rows; at most {MAX_ROWS} run as one batch", "n")
        drafting = speculate if len(rows) == 1 and req.logprobs is None else None
        options = replace(req.sampling, speculate=drafting, draft_tokens=draft_tokens)
        return _Plan(chat, rows, sum(len(p) for p in prompts), options, req.logprobs, req.json_schema, req.stream,
                     req.include_usage, [e for e in echo for _ in range(req.n)], messages, user)

    async def _respond(plan: _Plan, request: Request) -> Any:
        meta = {"id": f"{'chatcmpl' if plan.chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        job = _Job(lambda cancel, put: generator.run(plan, cancel, put), jobs)
        try:
            first = await job.next(request, poll_seconds)  # errors before the first token get a status code
        except _ClientGone:
            return Response(status_code=499)
        except BaseException:  # this handler was cancelled
            job.cancel.set()
            raise
        if isinstance(first, BaseException):
            raise first
        if plan.stream:
            return StreamingResponse(_sse(job, first, request, plan, meta), media_type="text/event-stream")
        try:
            while not isinstance(first, _Outcome | BaseException):  # a non-streamed plan puts only its outcome
                first = await job.next(request, poll_seconds)
        except _ClientGone:
            return Response(status_code=499)
        finally:
            job.cancel.set()
        if isinstance(first, BaseException):
            raise first
        outcome = first
        headers = {"X-LambdaSplit-Bytes-To-Cloud": str(outcome.result.bytes_to_cloud),
                   "X-LambdaSplit-Cached-Tokens": str(outcome.cached_tokens)}
        return JSONResponse(_answer(device, plan, meta, outcome), headers=headers)

    async def _sse(job: _Job, first: object, request: Request, plan: _Plan, meta: dict[str, Any]) -> AsyncIterator[str]:
        def event(obj: ChatCompletionChunk | Completion) -> str:
            body = obj.model_dump(mode="json", exclude_unset=True)
            if plan.include_usage:
                body.setdefault("usage", None)
            return f"data: {json.dumps(body)}\n\n"

        def chunk(index: int, text: str | None, reason: str | None, entries: list[TokenLogprob] | None,
                  role: bool = False) -> ChatCompletionChunk | Completion:
            if plan.chat:
                delta = ChoiceDelta(role="assistant", content="") if role else ChoiceDelta(content=text) if text else ChoiceDelta()
                logprobs = ChunkLogprobs(content=_chat_logprobs(device, entries)) if entries else None
                choice = ChunkChoice(index=index, delta=delta, finish_reason=reason, logprobs=logprobs)
                return ChatCompletionChunk(**meta, object="chat.completion.chunk", choices=[choice])
            logprobs = _completion_logprobs(device, entries, plan.logprobs or 0, 0) if entries else None
            # Built unvalidated: openai's CompletionChoice has no null finish_reason, which every chunk but the last carries.
            choice = CompletionChoice.model_construct(index=index, text=text or "", finish_reason=reason, logprobs=logprobs)
            return Completion(**meta, object="text_completion", choices=[choice])

        try:
            for i in range(len(plan.rows)):
                if plan.chat:
                    yield event(chunk(i, None, None, None, role=True))
                elif plan.echo:
                    yield event(chunk(i, plan.echo[i], None, None))
            item = first
            while item is not _END:
                if isinstance(item, BaseException):  # the stream has started: an error event, then the end
                    yield f"data: {json.dumps(error_body(item))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if isinstance(item, _Step):
                    for i in sorted(set(item.texts) | set(item.logprobs)):
                        yield event(chunk(i, item.texts.get(i), None, item.logprobs.get(i)))
                elif isinstance(item, _Outcome):
                    for i, reason in enumerate(item.result.finish_reasons):
                        yield event(chunk(i, None, _reason(reason), None))
                    if plan.include_usage:
                        usage = _usage(item)
                        final = (ChatCompletionChunk(**meta, object="chat.completion.chunk", choices=[], usage=usage) if plan.chat
                                 else Completion(**meta, object="text_completion", choices=[], usage=usage))
                        yield event(final)
                item = await job.next(request, poll_seconds)
            yield "data: [DONE]\n\n"
        except _ClientGone:
            return
        finally:  # also runs when Starlette cancels the response because the client went away
            job.cancel.set()

    return app


def _model(name: str, created: int) -> dict[str, Any]:
    return Model(id=name, object="model", created=created, owned_by="lambdasplit").model_dump(mode="json", exclude_unset=True)


def _created(device: SplitDevice) -> int:
    """`created` of /v1/models: when the model's weights were written (the newest weight file's
    mtime; 0 was every model's), or now where there are none to read."""
    files = device.opened.checkpoint.files
    return int(max(f.stat().st_mtime for f in files)) if files else int(time.time())


def _encode(device: SplitDevice, prompt: str | list[int]) -> list[int]:
    """A completions prompt's ids; the tokenizer is shared by concurrent requests, so it is called
    without padding (its settings never change)."""
    if isinstance(prompt, list):
        return prompt
    if not prompt.strip():
        raise bad_request("the prompt is empty", "prompt")
    return device.tokenizer(prompt)["input_ids"]


def _usage(outcome: _Outcome) -> CompletionUsage:
    completion = sum(len(t) for t in outcome.result.token_ids)
    details = PromptTokensDetails(cached_tokens=outcome.cached_tokens) if outcome.cached_tokens else None
    return CompletionUsage(prompt_tokens=outcome.prompt_tokens, completion_tokens=completion,
                           total_tokens=outcome.prompt_tokens + completion, prompt_tokens_details=details)


def _token_text(device: SplitDevice, token: int) -> str:
    return device.tokenizer.decode([token])


def _chat_logprobs(device: SplitDevice, entries: list[TokenLogprob]) -> list[ChatCompletionTokenLogprob]:
    def top(token: int, logprob: float) -> TopLogprob:
        text = _token_text(device, token)
        return TopLogprob(token=text, bytes=list(text.encode()), logprob=logprob)

    out = []
    for e in entries:
        text = _token_text(device, e.token)
        alternatives = [top(t, p) for t, p in e.top]
        out.append(ChatCompletionTokenLogprob(token=text, bytes=list(text.encode()), logprob=e.logprob, top_logprobs=alternatives))
    return out


def _completion_logprobs(device: SplitDevice, entries: list[TokenLogprob], top: int, offset: int) -> Logprobs:
    """The legacy completions shape; each position's alternatives always include the chosen
    token (OpenAI: "up to logprobs+1 elements")."""
    tokens = [_token_text(device, e.token) for e in entries]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    tops = []
    for e, text in zip(entries, tokens, strict=True):
        alternatives = {_token_text(device, t): p for t, p in e.top[:top]}
        alternatives.setdefault(text, e.logprob)
        tops.append(alternatives)
    return Logprobs(tokens=tokens, token_logprobs=[e.logprob for e in entries], top_logprobs=tops, text_offset=offsets)


def _answer(device: SplitDevice, plan: _Plan, meta: dict[str, Any], outcome: _Outcome) -> dict[str, Any]:
    """The non-streamed response body."""
    result, usage = outcome.result, _usage(outcome)
    if plan.chat:
        choices = [
            Choice(index=i, message=ChatCompletionMessage(role="assistant", content=text), finish_reason=_reason(reason),
                   logprobs=ChoiceLogprobs(content=_chat_logprobs(device, entries)) if plan.logprobs is not None else None)
            for i, (text, reason, entries) in enumerate(zip(result.texts, result.finish_reasons, outcome.logprobs, strict=True))
        ]
        reply: ChatCompletion | Completion = ChatCompletion(**meta, object="chat.completion", choices=choices, usage=usage)
    else:
        echo = plan.echo or [""] * len(result.texts)
        choices_ = [
            CompletionChoice(index=i, text=prefix + text, finish_reason=_reason(reason),  # type: ignore[arg-type]
                             logprobs=_completion_logprobs(device, entries, plan.logprobs, len(prefix)) if plan.logprobs is not None else None)
            for i, (prefix, text, reason, entries) in enumerate(zip(echo, result.texts, result.finish_reasons, outcome.logprobs, strict=True))
        ]
        reply = Completion(**meta, object="text_completion", choices=choices_, usage=usage)
    return reply.model_dump(mode="json", exclude_unset=True)

