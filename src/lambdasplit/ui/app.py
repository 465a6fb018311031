"""The web UI's backend: chat and image generation through the split model, streamed as server-sent
events, with what crossed the network after each answer.

Each conversation of the page holds its own body session and `SplitCache` between turns, so a turn
that extends the previous one sends only its new positions (edit and retry crop the cache to the
common token prefix). A request whose page goes away (the Stop button aborts the fetch) is cancelled
before its next body call, and its session is closed. Everything the page shows about the split
(bytes, timings, the hidden states the cloud saw) is read from the device's own transfer statistics
and captured frames, the same ones the audit uses.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import logging
import string
import threading
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from lambdasplit.device.body import BodyClient
from lambdasplit.device.generation import GenerationCancelled, GenerationResult
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.errors import LambdaSplitError
from lambdasplit.privacy.protect import ProtectedChat, Protection
from lambdasplit.web.bridge import END, ClientGone, Workers
from lambdasplit.web.conversation import Conversation
from lambdasplit.web.pool import SessionPool
from lambdasplit.wire.frame import Limits, MsgType, parse_frame

log = logging.getLogger(__name__)
HEATMAP_POSITIONS, HEATMAP_CHANNELS = 48, 96
MAX_CONVERSATIONS = 8  # body sessions kept for follow-up turns; the least recently used is closed first
DISCONNECT_POLL = 0.05  # seconds between checks that the page is still listening
Emit = Callable[[dict], None]
PageJob = Callable[[Emit, threading.Event], None]
STATIC_TYPES = {"app.js": "text/javascript", "style.css": "text/css", "vendor/marked.umd.js": "text/javascript",
                "vendor/purify.min.js": "text/javascript", "favicon.svg": "image/svg+xml"}


class Message(BaseModel):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str = Field(max_length=20_000)


class PageChat(BaseModel):
    messages: list[Message] = Field(min_length=1, max_length=64)
    conversation: str | None = Field(default=None, pattern="^[A-Za-z0-9_-]{1,64}$")  # keeps the body session
    max_new_tokens: int = Field(default=128, ge=1, le=2048)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # 0 = greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000)
    seed: int | None = None
    # None: as the UI was started (--speculate); a mode: prompt-lookup, draft-head, draft-tree or the UI's own --speculate
    speculate: bool | str | None = None


class ImageRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=2_000)
    steps: int = Field(default=20, ge=1, le=100)
    seed: int = 0
    guidance: float = Field(default=5.0, ge=0.0, le=30.0)
    mode: str = Field(default="paper", pattern="^(paper|unet-split)$")
    k: int = Field(default=1, ge=1, le=4)


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def heatmap(hidden: torch.Tensor) -> dict:
    """The first positions x channels of one row's states, each position scaled to [-1, 1] (a few
    positions carry far larger values than the rest and would otherwise wash the picture out)."""
    block = hidden[0, :HEATMAP_POSITIONS, :HEATMAP_CHANNELS].float()
    scale = block.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    return {"positions": block.shape[0], "channels": block.shape[1], "of": list(hidden.shape),
            "values": [[round(v, 3) for v in row] for row in (block / scale).tolist()]}


def tensor_picture(tensor: torch.Tensor, size: int = 160):
    """A grey-scale picture of a (B, C, H, W) frame: mean |activation| over channels, first row."""
    from PIL import Image

    plane = tensor[0].float().abs().mean(0)
    plane = (plane - plane.min()) / (plane.max() - plane.min()).clamp(min=1e-12)
    image = Image.fromarray((plane.numpy() * 255).astype("uint8"), mode="L")
    return image.resize((size, size), Image.NEAREST)


def friendly_validation(errors: list[dict[str, Any]]) -> str:
    """FastAPI's 422 detail as one sentence per field, named as the page labels them."""
    parts = []
    for error in errors:
        field = " ".join(str(p) for p in error.get("loc", ()) if p != "body").replace("_", " ") or "request"
        message = str(error.get("msg", "is invalid"))
        parts.append(f"{field}: {message[:1].lower()}{message[1:]}")
    return "; ".join(parts)


class _Stopped(Exception):
    """The page went away; the job ends quietly."""


async def streamed(workers: Workers, job: PageJob, request: Request) -> AsyncIterator[str]:
    """Run `job(emit, cancel)` on a worker thread and yield what it emits as SSE events.

    Whatever happens, the stream ends with the job's events or an `error` event, so the page never
    waits on a request that has died; once the page disconnects, `cancel` is set."""

    def work(cancel: threading.Event, put: Emit) -> None:
        try:
            job(put, cancel)
        except (_Stopped, GenerationCancelled):
            pass
        except LambdaSplitError as exc:
            put({"type": "error", "message": str(exc)})
        except Exception as exc:  # reported to the page, and logged here
            log.exception("UI request failed")
            put({"type": "error", "message": f"internal error: {type(exc).__name__}: {exc}"})

    running = workers.start(work)
    try:
        while (item := await running.next(request, DISCONNECT_POLL)) is not END:
            if isinstance(item, dict):
                yield _event(item)
    except ClientGone:
        return
    finally:  # also runs when Starlette cancels the response because the page went away
        running.cancel.set()


def chat_params(req: PageChat, speculate: str | None, draft_tokens: int | None) -> SamplingParams:
    """The request's sampling; its speculation switch turns the UI's drafting mode (or prompt lookup) on or off,
    or names the mode: prompt-lookup, draft-head or draft-tree (the shipped head) or the one the UI was started with."""
    mode = speculate
    if isinstance(req.speculate, str):
        if req.speculate not in ("prompt-lookup", "draft-head", "draft-tree", speculate):
            raise LambdaSplitError(f"speculate must be prompt-lookup, draft-head, draft-tree{f' or {speculate}' if speculate else ''}")
        if req.speculate != speculate:  # --draft-tokens was given for the UI's own mode: a chain's 3 is not a tree's size
            draft_tokens = None
        mode = req.speculate
    elif req.speculate is not None:
        mode = (speculate or "prompt-lookup") if req.speculate else None
    return SamplingParams(
        max_new_tokens=req.max_new_tokens, greedy=req.temperature == 0.0, temperature=req.temperature or 1.0,
        top_p=req.top_p, top_k=req.top_k, seed=req.seed, speculate=mode, draft_tokens=draft_tokens,
    )


def chat_job(runtime: SplitRuntime, pool: SessionPool[str, Conversation], connect: Callable[[], BodyClient], key: str | None,
             messages: list[dict[str, str]], params: SamplingParams, protection: Protection | None = None) -> PageJob:
    """Text pieces as they are generated, then one `done` with what crossed the network. The
    conversation `key` keeps its session for the next turn (None: a one-turn conversation), unless
    the turn was cancelled or failed. Under `protection` the conversation is pseudonymised (and
    hidden among decoy rows) on the device, and `done` also carries the real row's prompt as the
    cloud can recover it."""

    def job(emit: Emit, cancel: threading.Event) -> None:
        if key is None:
            conversation = Conversation(connect)
            try:
                _turn(runtime, conversation, messages, params, protection, emit, cancel)
            finally:
                conversation.close()
            return
        with pool.use(key, lambda: Conversation(connect)) as conversation:
            ok = False
            try:
                _turn(runtime, conversation, messages, params, protection, emit, cancel)
                ok = True
            finally:
                if not ok:
                    conversation.close()

    return job


def _turn(runtime: SplitRuntime, conversation: Conversation, messages: list[dict[str, str]], params: SamplingParams,
          protection: Protection | None, emit: Emit, cancel: threading.Event) -> None:
    """One turn on the conversation's session, whose frames are captured for the panel meanwhile."""
    on_text = lambda text: emit({"type": "token", "text": text})  # noqa: E731
    body = conversation.session()
    body.captured = []
    try:
        if protection is not None and protection.active:
            emit({"type": "done", **_protected_turn(runtime, conversation, messages, params, protection, on_text, cancel)})
            return
        ids = runtime.encode_chat(messages)[0].tolist()
        body, cache, reused = conversation.prepare(runtime.model, ids)
        result = runtime.generate_ids(body, torch.tensor([ids]), None, params, cancel=cancel, cache=cache, on_text=on_text)
        if cancel.is_set():
            raise _Stopped
        conversation.finished(ids, result.token_ids[0])
        emit({"type": "done", **_chat_stats(runtime, body, ids, reused, result, params)})
    finally:
        body.captured = None


def _protected_turn(runtime: SplitRuntime, conversation: Conversation, messages: list[dict[str, str]], options: SamplingParams,
                    protection: Protection, on_text: Callable[[str], None], cancel: threading.Event) -> dict[str, Any]:
    """One turn through `ProtectedChat`: the whole (pseudonymised) history is sent each turn, since
    the cache holds stand-ins and decoy rows, not the page's text."""
    if conversation.protected is None:
        conversation.protected = ProtectedChat(runtime, protection)
    body = conversation.session()
    protected = conversation.protected.generate(body, messages, options, on_text=on_text, cancel=cancel)
    if cancel.is_set():
        raise _Stopped
    row = protected.real_row
    ids = protected.result.prompt_token_ids[row]
    stats = _chat_stats(runtime, body, ids, 0, protected.result, options, row)
    return {**stats, "text": protected.text, "cloud_prompt": protected.cloud_prompt, "rows": len(protected.rows),
            "protection": {"pseudonymize": protection.pseudonymize, "decoys": protection.decoys}}


def _chat_stats(runtime: SplitRuntime, body: BodyClient, ids: list[int], reused: int, result: GenerationResult,
                options: SamplingParams, row: int = 0) -> dict[str, Any]:
    """The panel's numbers for one turn (row `row` of the batch); the heatmap is this turn's first
    uplink frame (its new positions)."""
    stats, timings = body.stats, result.timings
    tokens = max(len(result.token_ids[row]), 1)
    limits = Limits(max_payload=1 << 31, max_elements=1 << 31)
    sent = (parse_frame(data, limits) for direction, data in body.captured or [] if direction == "to_cloud")
    uplink = next((frame for frame in sent if frame.type == MsgType.HIDDEN), None)
    cloud = 1000 * stats.wait_seconds / tokens
    total = 1000 * timings.total / tokens
    return {
        "text": result.texts[row],
        "token_ids": result.token_ids[row],
        "finish_reason": result.finish_reasons[row],
        "split": runtime.spec.as_dict(),
        "bytes_to_cloud": stats.bytes_to_cloud,
        "bytes_from_cloud": stats.bytes_from_cloud,
        "frames": stats.frames_to_cloud + stats.frames_from_cloud,
        "prompt_positions": len(ids),
        "reused_positions": reused,
        "tokens": len(result.token_ids[row]),
        "tokens_per_second": timings.tokens_per_second,
        "speculate": options.speculate,
        "round_trips": result.round_trips,
        "tokens_per_round_trip": result.tokens_per_round_trip,
        "per_token_ms": {"device": max(total - cloud, 0.0), "cloud_network": cloud, "total": total},
        "saw": heatmap(uplink.tensor()) if uplink is not None else None,
        "kept_tokens": [runtime.tokenizer.decode([t]) for t in ids[reused:reused + HEATMAP_POSITIONS]],
    }


def image_job(load: Callable[[str, int], Any], req: ImageRequest, lock: threading.Lock) -> PageJob:
    """One event per step (a preview every few steps and the tensor sent), then `done`; a page that
    goes away stops the pipeline at its next step."""

    def job(emit: Emit, cancel: threading.Event) -> None:
        with lock:
            split = load(req.mode, req.k)
            link = split.unet.link
            link.start_capture()
            every = max(1, req.steps // 5)
            limits = Limits(max_payload=1 << 31, max_elements=1 << 31)

            def on_step(step: int, total: int, latents: torch.Tensor) -> None:
                if cancel.is_set():
                    raise _Stopped
                sent = [data for direction, data in link.captured if direction == "to_cloud"]
                link.captured.clear()
                picture = _png(tensor_picture(parse_frame(sent[-1], limits).tensor())) if sent else None
                preview = _png(split.decode_latents(latents[:1])) if step % every == 0 or step == total else None
                emit({"type": "step", "step": step, "total": total, "preview": preview, "tensor": picture})

            try:
                result = split.generate(req.prompt, req.steps, req.guidance, req.seed, on_step=on_step)
            finally:
                link.captured = None
        emit({"type": "done", "image": _png(result.image), "bytes_to_cloud": result.bytes_to_cloud,
              "bytes_from_cloud": result.bytes_from_cloud, "seconds": result.seconds, "mode": req.mode,
              "prompt": req.prompt, "seed": req.seed, "steps": req.steps})

    return job


def audit_html(template: str) -> str:
    """The /audit page: the shipped audit's numbers (curious cloud, no defense) in `template` (ui/static/audit.html)."""
    data = json.loads(resources.files("lambdasplit.privacy").joinpath("data/audit-smollm2.json").read_text())
    rows = "".join(
        f"<tr><td>{r['k']},{r['m']}</td><td>{r['prompt_token_accuracy']:.0%}</td><td>{r['prompt_pii_recovered']:.0%}</td>"
        f"<td>{r['output_token_accuracy']:.0%}</td></tr>" for r in data["splits"].values())
    return string.Template(template).substitute(model=html.escape(data["model"]), date=html.escape(data["date"]),
                                                command=html.escape(data["command"]), rows=rows)


def load_audit(spec) -> dict[str, Any] | None:
    """The shipped audit numbers (curious cloud, no defense) for this split of the embedded model."""
    data = json.loads(resources.files("lambdasplit.privacy").joinpath("data/audit-smollm2.json").read_text())
    row = data["splits"].get(f"{spec.k},{spec.m}")
    if row is None:
        return None
    return {**row, "command": data["command"], "link": "/audit"}


def create_ui(
    runtime: SplitRuntime, connect: Callable[[], BodyClient], info: dict[str, Any],
    load_image: Callable[[str, int], Any] | None = None, audit: dict[str, Any] | None = None,
    speculate: str | None = None, draft_tokens: int | None = None, protection: Protection | None = None,
) -> FastAPI:
    """The UI app; `connect()` opens a body session (one per conversation, kept between its turns).
    `protection` pseudonymises every conversation (and hides it among decoy rows) on the device."""
    conversations: SessionPool[str, Conversation] = SessionPool(MAX_CONVERSATIONS, None, Conversation.close)
    workers = Workers("ui")
    image_lock = threading.Lock()  # one pipeline: images take turns
    static = resources.files("lambdasplit.ui").joinpath("static")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        workers.shutdown()
        conversations.close()

    app = FastAPI(title="lambdasplit", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": friendly_validation(list(exc.errors()))})

    @app.exception_handler(LambdaSplitError)
    async def _refused(_: Request, exc: LambdaSplitError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": str(exc)})

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return static.joinpath("index.html").read_text()

    @app.get("/static/{name:path}")
    def asset(name: str) -> Response:
        if name not in STATIC_TYPES:
            return Response(status_code=404)
        return Response(static.joinpath(name).read_text(), media_type=STATIC_TYPES[name])

    @app.get("/favicon.ico")
    def favicon() -> Response:
        """Browsers ask for /favicon.ico whatever the page links (the /audit page links none): the SVG, not a 404."""
        return asset("favicon.svg")

    @app.get("/audit", response_class=HTMLResponse)
    def audit_page() -> str:
        return audit_html(static.joinpath("audit.html").read_text())

    @app.get("/api/info")
    def api_info() -> dict[str, Any]:
        return {**info, "split": runtime.spec.as_dict(), "image": load_image is not None, "audit": audit,
                "speculate": speculate, "protection": None if protection is None else
                {"pseudonymize": protection.pseudonymize, "decoys": protection.decoys}}

    @app.post("/api/chat")
    async def api_chat(req: PageChat, request: Request) -> StreamingResponse:
        params = chat_params(req, speculate, draft_tokens)  # a bad setting is a 400 before anything runs
        job = chat_job(runtime, conversations, connect, req.conversation, [m.model_dump() for m in req.messages], params, protection)
        return StreamingResponse(streamed(workers, job, request), media_type="text/event-stream")

    @app.delete("/api/conversations/{key}", status_code=204)
    def forget(key: str) -> Response:
        """The page cleared this conversation: close its body session now (or when its turn ends) rather than at eviction."""
        conversations.drop(key)
        return Response(status_code=204)

    @app.post("/api/image")
    async def api_image(req: ImageRequest, request: Request) -> StreamingResponse:
        if load_image is None:
            return StreamingResponse(iter([_event({"type": "error", "message": "image generation is not enabled"})]),
                                     media_type="text/event-stream")
        return StreamingResponse(streamed(workers, image_job(load_image, req, image_lock), request), media_type="text/event-stream")

    return app
