"""The gateway's answers in OpenAI's shapes: errors (`{"error": {...}}` with the status an OpenAI
client expects), the non-streamed body (`ChatCompletion`, `Completion`), the SSE stream of chunks
(`ChatCompletionChunk`, `Completion`) and the pieces they share (usage, logprobs, finish reasons).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage, ChatCompletionTokenLogprob
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from openai.types.completion_choice import Logprobs
from openai.types.completion_usage import PromptTokensDetails
from starlette.requests import Request

from lambdasplit.device.generation import GenerationCancelled
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.errors import CapacityError, LambdaSplitError, ProtocolError, RemoteError, UnavailableError
from lambdasplit.gateway.generator import Outcome, Plan, Step
from lambdasplit.gateway.sampling import TokenLogprob
from lambdasplit.gateway.schema import APIError
from lambdasplit.web.bridge import END, ClientGone, Job

log = logging.getLogger(__name__)
DEFAULT_RETRY_AFTER = 1.0  # seconds, when the body server did not say


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
    if isinstance(exc, GenerationCancelled):  # the gateway stopped while the request waited for a worker thread
        return 503, "server_error", None, DEFAULT_RETRY_AFTER
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


def finish_reason(reason: str) -> str:
    """OpenAI's finish reasons: a generation cancelled while its client still listens (the
    gateway shutting down) was cut short, as by a length limit."""
    return "length" if reason == "cancelled" else reason


async def stream(runtime: SplitRuntime, job: Job, first: object, request: Request, plan: Plan, meta: dict[str, Any],
                 poll_seconds: float) -> AsyncIterator[str]:
    """The SSE events of a streamed plan, from the job's first item to `data: [DONE]`; an error once
    the stream has started is an error event (the status line has gone)."""
    def event(obj: ChatCompletionChunk | Completion) -> str:
        body = obj.model_dump(mode="json", exclude_unset=True)
        if plan.include_usage:
            body.setdefault("usage", None)
        return f"data: {json.dumps(body)}\n\n"

    def chunk(index: int, text: str | None, reason: str | None, entries: list[TokenLogprob] | None,
              role: bool = False) -> ChatCompletionChunk | Completion:
        if plan.chat:
            delta = ChoiceDelta(role="assistant", content="") if role else ChoiceDelta(content=text) if text else ChoiceDelta()
            logprobs = ChunkLogprobs(content=chat_logprobs(runtime, entries)) if entries else None
            choice = ChunkChoice(index=index, delta=delta, finish_reason=reason, logprobs=logprobs)
            return ChatCompletionChunk(**meta, object="chat.completion.chunk", choices=[choice])
        logprobs = completion_logprobs(runtime, entries, plan.logprobs or 0, 0) if entries else None
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
        while item is not END:
            if isinstance(item, BaseException):  # the stream has started: an error event, then the end
                yield f"data: {json.dumps(error_body(item))}\n\n"
                yield "data: [DONE]\n\n"
                return
            if isinstance(item, Step):
                for i in sorted(set(item.texts) | set(item.logprobs)):
                    yield event(chunk(i, item.texts.get(i), None, item.logprobs.get(i)))
            elif isinstance(item, Outcome):
                for i, reason in enumerate(item.result.finish_reasons):
                    yield event(chunk(i, None, finish_reason(reason), None))
                if plan.include_usage:
                    usage = usage_of(item)
                    final = (ChatCompletionChunk(**meta, object="chat.completion.chunk", choices=[], usage=usage) if plan.chat
                             else Completion(**meta, object="text_completion", choices=[], usage=usage))
                    yield event(final)
            item = await job.next(request, poll_seconds)
        yield "data: [DONE]\n\n"
    except ClientGone:
        return
    finally:  # also runs when Starlette cancels the response because the client went away
        job.cancel.set()


def model_card(name: str, created: int) -> dict[str, Any]:
    return Model(id=name, object="model", created=created, owned_by="lambdasplit").model_dump(mode="json", exclude_unset=True)


def created(runtime: SplitRuntime) -> int:
    """`created` of /v1/models: when the model's weights were written (the newest weight file's
    mtime; 0 was every model's), or now where there are none to read."""
    files = runtime.opened.checkpoint.files
    return int(max(f.stat().st_mtime for f in files)) if files else int(time.time())


def usage_of(outcome: Outcome) -> CompletionUsage:
    completion = sum(len(t) for t in outcome.result.token_ids)
    details = PromptTokensDetails(cached_tokens=outcome.cached_tokens) if outcome.cached_tokens else None
    return CompletionUsage(prompt_tokens=outcome.prompt_tokens, completion_tokens=completion,
                           total_tokens=outcome.prompt_tokens + completion, prompt_tokens_details=details)


def _token_text(runtime: SplitRuntime, token: int) -> str:
    return runtime.tokenizer.decode([token])


def chat_logprobs(runtime: SplitRuntime, entries: list[TokenLogprob]) -> list[ChatCompletionTokenLogprob]:
    def top(token: int, logprob: float) -> TopLogprob:
        text = _token_text(runtime, token)
        return TopLogprob(token=text, bytes=list(text.encode()), logprob=logprob)

    out = []
    for e in entries:
        text = _token_text(runtime, e.token)
        alternatives = [top(t, p) for t, p in e.top]
        out.append(ChatCompletionTokenLogprob(token=text, bytes=list(text.encode()), logprob=e.logprob, top_logprobs=alternatives))
    return out


def completion_logprobs(runtime: SplitRuntime, entries: list[TokenLogprob], top: int, offset: int) -> Logprobs:
    """The legacy completions shape; each position's alternatives always include the chosen
    token (OpenAI: "up to logprobs+1 elements")."""
    tokens = [_token_text(runtime, e.token) for e in entries]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    tops = []
    for e, text in zip(entries, tokens, strict=True):
        alternatives = {_token_text(runtime, t): p for t, p in e.top[:top]}
        alternatives.setdefault(text, e.logprob)
        tops.append(alternatives)
    return Logprobs(tokens=tokens, token_logprobs=[e.logprob for e in entries], top_logprobs=tops, text_offset=offsets)


def answer(runtime: SplitRuntime, plan: Plan, meta: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    """The non-streamed response body."""
    result, usage = outcome.result, usage_of(outcome)
    if plan.chat:
        choices = [
            Choice(index=i, message=ChatCompletionMessage(role="assistant", content=text), finish_reason=finish_reason(reason),
                   logprobs=ChoiceLogprobs(content=chat_logprobs(runtime, entries)) if plan.logprobs is not None else None)
            for i, (text, reason, entries) in enumerate(zip(result.texts, result.finish_reasons, outcome.logprobs, strict=True))
        ]
        reply: ChatCompletion | Completion = ChatCompletion(**meta, object="chat.completion", choices=choices, usage=usage)
    else:
        echo = plan.echo or [""] * len(result.texts)
        choices_ = [
            CompletionChoice(index=i, text=prefix + text, finish_reason=finish_reason(reason),  # type: ignore[arg-type]
                             logprobs=completion_logprobs(runtime, entries, plan.logprobs, len(prefix)) if plan.logprobs is not None else None)
            for i, (prefix, text, reason, entries) in enumerate(zip(echo, result.texts, result.finish_reasons, outcome.logprobs, strict=True))
        ]
        reply = Completion(**meta, object="text_completion", choices=choices_, usage=usage)
    return reply.model_dump(mode="json", exclude_unset=True)
