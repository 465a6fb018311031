"""An OpenAI-compatible HTTP API on the device: apps talk to it as to a cloud LLM API, while only
hidden states leave the machine.

Endpoints: GET /v1/models, POST /v1/chat/completions and POST /v1/completions, each with SSE
streaming (`data: ... [DONE]`) and usage counts (`stream_options.include_usage`).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from lambdasplit.security import token_matches
from lambdasplit.device.body import BodyClient
from lambdasplit.device.runtime import SplitDevice
from lambdasplit.device.sampling import SamplingConfig
from lambdasplit.errors import LambdaSplitError


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

    def sampling(self, default_max: int) -> SamplingConfig:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingConfig(
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


def create_app(
    device: SplitDevice, body: BodyClient, model_name: str, api_key: str | None = None, default_max_tokens: int = 256
) -> FastAPI:
    """The gateway app; one device and one body connection, used by one request at a time."""
    app = FastAPI(title="lambdasplit gateway", version="1")
    lock = threading.Lock()

    def check_key(request: Request) -> None:
        if api_key is not None and not token_matches(request.headers.get("authorization"), api_key):
            raise HTTPException(status_code=401, detail="missing or wrong API key")

    @app.exception_handler(LambdaSplitError)
    async def _split_error(_: Request, exc: LambdaSplitError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": {"message": str(exc), "type": "invalid_request_error"}})

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "lambdasplit"}]}

    @app.post("/v1/chat/completions", response_model=None)
    def chat(req: ChatRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        check_key(request)
        ids = device.encode_chat([m.model_dump() for m in req.messages])
        return _respond(req, ids, "chat.completion")

    @app.post("/v1/completions", response_model=None)
    def completions(req: CompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
        check_key(request)
        ids, _ = device.encode(req.prompt, raw=True)
        return _respond(req, ids, "text_completion")

    def _respond(req: SamplingFields, ids: torch.Tensor, kind: str) -> dict[str, Any] | StreamingResponse:
        sampling = req.sampling(default_max_tokens)
        meta = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(ids, sampling, kind, meta, include_usage), media_type="text/event-stream")
        with lock:
            result = device.generate_ids(body, ids, None, sampling)
        usage = _usage(ids.shape[1], len(result.token_ids[0]))
        reason = result.finish_reasons[0]
        if kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": reason, "logprobs": None}
        return {**meta, "object": kind, "choices": [choice], "usage": usage}

    def _sse(ids: torch.Tensor, sampling: SamplingConfig, kind: str, meta: dict, include_usage: bool) -> Iterator[str]:
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

        with lock:
            if kind == "chat.completion":
                yield event(None, None, first=True)
            count, reason = 0, "length"
            try:
                for chunk in device.stream_ids(body, ids, None, sampling):
                    count += 1
                    if chunk.token_ids[0] in device.eos_ids:
                        reason = "stop"
                    if chunk.text:
                        yield event(chunk.text, None)
                if count < sampling.max_new_tokens:
                    reason = "stop"
            except LambdaSplitError as exc:
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
                yield "data: [DONE]\n\n"
                return
        yield event(None, reason)
        if include_usage:
            yield f"data: {json.dumps({**meta, 'object': chunk_kind, 'choices': [], 'usage': _usage(ids.shape[1], count)})}\n\n"
        yield "data: [DONE]\n\n"

    return app


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
