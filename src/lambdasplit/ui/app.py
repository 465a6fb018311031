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

import asyncio
import base64
import contextlib
import io
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from lambdasplit.device.body import BodyClient
from lambdasplit.device.generation import GenerationResult
from lambdasplit.device.runtime import SplitDevice
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.errors import LambdaSplitError
from lambdasplit.privacy.protect import ProtectedChat, Protection
from lambdasplit.wire.frame import Limits, MsgType, parse_frame

if TYPE_CHECKING:
    from lambdasplit.device.model import SplitCache, SplitModelForCausalLM

log = logging.getLogger(__name__)
HEATMAP_POSITIONS, HEATMAP_CHANNELS = 48, 96
MAX_CONVERSATIONS = 8  # body sessions kept for follow-up turns; the least recently used is closed first
DISCONNECT_POLL = 0.05  # seconds between checks that the page is still listening
Emit = Callable[[dict], None]
Job = Callable[[Emit, threading.Event], None]
STATIC_TYPES = {"app.js": "text/javascript", "style.css": "text/css", "vendor/marked.umd.js": "text/javascript",
                "vendor/purify.min.js": "text/javascript", "favicon.svg": "image/svg+xml"}


class Message(BaseModel):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str = Field(max_length=20_000)


class ChatRequest(BaseModel):
    messages: list[Message] = Field(min_length=1, max_length=64)
    conversation: str | None = Field(default=None, pattern="^[A-Za-z0-9_-]{1,64}$")  # keeps the body session
    max_new_tokens: int = Field(default=128, ge=1, le=2048)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # 0 = greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000)
    seed: int | None = None
    # None: as the UI was started (--speculate); a mode: prompt-lookup, draft-head or the UI's own --speculate
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


async def streamed(job: Job, request: Request) -> AsyncIterator[str]:
    """Run `job(emit, cancel)` on a worker thread and yield what it emits as SSE events.

    Whatever happens, the stream ends with the job's events or an `error` event, so the page never
    waits on a request that has died; once the page disconnects, `cancel` is set."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict | None] = asyncio.Queue()
    cancel = threading.Event()

    def put(item: dict | None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(events.put_nowait, item)

    def work() -> None:
        try:
            job(put, cancel)
        except _Stopped:
            pass
        except LambdaSplitError as exc:
            put({"type": "error", "message": str(exc)})
        except Exception as exc:  # reported to the page, and logged here
            log.exception("UI request failed")
            put({"type": "error", "message": f"internal error: {type(exc).__name__}: {exc}"})
        finally:
            put(None)

    threading.Thread(target=work, name="ui-job", daemon=True).start()
    try:
        while True:
            try:
                item = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if item is None:
                return
            yield _event(item)
    finally:  # also runs when Starlette cancels the response because the page went away
        cancel.set()


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Conversation:
    """One conversation's body session and cache, kept between turns so a follow-up sends only what
    the body has not seen; `tokens` are the ids whose positions the cache holds."""

    def __init__(self, connect: Callable[[], BodyClient]) -> None:
        self.connect = connect
        self.lock = threading.Lock()  # one turn at a time: a cache cannot serve two generations
        self.body: BodyClient | None = None
        self.cache: SplitCache | None = None
        self.tokens: list[int] = []
        self.protected: ProtectedChat | None = None  # its stand-ins stay the same across the turns
        self.evicted = False  # dropped from the kept set: whoever still holds it closes it when done

    def prepare(self, model: SplitModelForCausalLM, ids: list[int]) -> tuple[BodyClient, SplitCache, int]:
        """The body session and a cache for the prompt `ids`, holding the longest cached prefix of it
        (cropped back from an edited or retried turn); returns how many positions are reused."""
        if self.body is None:
            self.body = self.connect()
        reused = min(common_prefix(self.tokens, ids), len(ids) - 1) if self.cache is not None else 0
        if reused and reused < self.cache.get_seq_length():
            try:
                self.cache.crop(reused)
            except NotImplementedError:  # sliding-window layers on the device: start over
                reused = 0
        if not reused:
            self.cache = model.new_cache(self.body)
        self.tokens = ids[:reused]
        return self.body, self.cache, reused

    def finished(self, ids: list[int], result: GenerationResult) -> None:
        """Remember which ids the cache now holds (the prompt and the answer but its last token)."""
        self.tokens = (ids + result.token_ids[0])[: self.cache.get_seq_length()]

    def close(self) -> None:
        """Close the body session (best effort: the server's TTL ends a lost one too)."""
        body, self.body, self.cache, self.tokens = self.body, None, None, []
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001
                log.warning("closing a body session failed", exc_info=True)


class Conversations:
    """The kept conversations by the page's id, at most `limit` (least recently used closed first)."""

    def __init__(self, connect: Callable[[], BodyClient], limit: int = MAX_CONVERSATIONS) -> None:
        self.connect = connect
        self.limit = limit
        self._items: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str | None) -> Conversation:
        """The conversation `key` (made if new); None gives a one-turn conversation nobody keeps."""
        if key is None:
            return Conversation(self.connect)
        with self._lock:
            conversation = self._items.pop(key, None) or Conversation(self.connect)
            self._items[key] = conversation
            idle = [k for k, c in self._items.items() if k != key and not c.lock.locked()]
            evicted = [self._items.pop(k) for k in idle[: max(0, len(self._items) - self.limit)]]
        for old in evicted:
            old.evicted = True
            with old.lock:
                old.close()
        return conversation

    def drop(self, key: str) -> None:
        with self._lock:
            conversation = self._items.pop(key, None)
        if conversation is not None:
            conversation.evicted = True
            with conversation.lock:
                conversation.close()

    def close_all(self) -> None:
        for key in list(self._items):
            self.drop(key)


def chat_options(req: ChatRequest, speculate: str | None, draft_tokens: int) -> SamplingParams:
    """The request's sampling; its speculation switch turns the UI's drafting mode (or prompt lookup) on or off,
    or names the mode: prompt-lookup, draft-head (the shipped head) or the one the UI was started with."""
    mode = speculate
    if isinstance(req.speculate, str):
        if req.speculate not in ("prompt-lookup", "draft-head", speculate):
            raise LambdaSplitError(f"speculate must be prompt-lookup, draft-head{f' or {speculate}' if speculate else ''}")
        mode = req.speculate
    elif req.speculate is not None:
        mode = (speculate or "prompt-lookup") if req.speculate else None
    return SamplingParams(
        max_new_tokens=req.max_new_tokens, greedy=req.temperature == 0.0, temperature=req.temperature or 1.0,
        top_p=req.top_p, top_k=req.top_k, seed=req.seed, speculate=mode, draft_tokens=draft_tokens,
    )


def chat_job(device: SplitDevice, conversation: Conversation, messages: list[dict[str, str]], options: SamplingParams,
             keep: bool, protection: Protection | None = None) -> Job:
    """Text pieces as they are generated, then one `done` with what crossed the network. The session
    stays open for the next turn when `keep`, unless the turn was cancelled or failed. Under
    `protection` the conversation is pseudonymised (and hidden among decoy rows) on the device, and
    `done` also carries the real row's prompt as the cloud can recover it."""

    def job(emit: Emit, cancel: threading.Event) -> None:
        on_text = lambda text: emit({"type": "token", "text": text})  # noqa: E731
        with conversation.lock:
            ok = False
            try:
                if protection is not None and protection.active:
                    emit({"type": "done", **_protected_turn(device, conversation, messages, options, protection, on_text, cancel)})
                    ok = True
                    return
                ids = device.encode_chat(messages)[0].tolist()
                body, cache, reused = conversation.prepare(device.model, ids)
                body.captured = []
                result = device.generate_ids(body, torch.tensor([ids]), None, options, cancel=cancel, cache=cache, on_text=on_text)
                if cancel.is_set():
                    raise _Stopped
                conversation.finished(ids, result)
                emit({"type": "done", **_chat_stats(device, body, ids, reused, result, options)})
                ok = True
            finally:
                if conversation.body is not None:
                    conversation.body.captured = None
                if not (ok and keep) or conversation.evicted:
                    conversation.close()

    return job


def _protected_turn(device: SplitDevice, conversation: Conversation, messages: list[dict[str, str]], options: SamplingParams,
                    protection: Protection, on_text: Callable[[str], None], cancel: threading.Event) -> dict[str, Any]:
    """One turn through `ProtectedChat`: the whole (pseudonymised) history is sent each turn, since
    the cache holds stand-ins and decoy rows, not the page's text."""
    if conversation.protected is None:
        conversation.protected = ProtectedChat(device, protection)
    if conversation.body is None:
        conversation.body = conversation.connect()
    body = conversation.body
    body.captured = []
    protected = conversation.protected.generate(body, messages, options, on_text=on_text, cancel=cancel)
    if cancel.is_set():
        raise _Stopped
    row = protected.real_row
    ids = protected.result.prompt_token_ids[row]
    stats = _chat_stats(device, body, ids, 0, protected.result, options, row)
    return {**stats, "text": protected.text, "cloud_prompt": protected.cloud_prompt, "rows": len(protected.rows),
            "protection": {"pseudonymize": protection.pseudonymize, "decoys": protection.decoys}}


def _chat_stats(device: SplitDevice, body: BodyClient, ids: list[int], reused: int, result: GenerationResult,
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
        "split": device.spec.as_dict(),
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
        "kept_tokens": [device.tokenizer.decode([t]) for t in ids[reused:reused + HEATMAP_POSITIONS]],
    }


def image_job(load: Callable[[str, int], Any], req: ImageRequest, lock: threading.Lock) -> Job:
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


def load_audit(spec) -> dict[str, Any] | None:
    """The shipped audit numbers (curious cloud, no defense) for this split of the embedded model."""
    data = json.loads(resources.files("lambdasplit.privacy").joinpath("data/audit-smollm2.json").read_text())
    row = data["splits"].get(f"{spec.k},{spec.m}")
    if row is None:
        return None
    return {**row, "command": data["command"], "link": "/audit"}


def create_ui(
    device: SplitDevice, connect: Callable[[], BodyClient], info: dict[str, Any],
    load_image: Callable[[str, int], Any] | None = None, audit: dict[str, Any] | None = None,
    speculate: str | None = None, draft_tokens: int = 8, protection: Protection | None = None,
) -> FastAPI:
    """The UI app; `connect()` opens a body session (one per conversation, kept between its turns).
    `protection` pseudonymises every conversation (and hides it among decoy rows) on the device."""
    conversations = Conversations(connect)
    image_lock = threading.Lock()  # one pipeline: images take turns
    static = resources.files("lambdasplit.ui").joinpath("static")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        conversations.close_all()

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
        data = json.loads(resources.files("lambdasplit.privacy").joinpath("data/audit-smollm2.json").read_text())
        rows = "".join(
            f"<tr><td>{r['k']},{r['m']}</td><td>{r['prompt_token_accuracy']:.0%}</td><td>{r['prompt_pii_recovered']:.0%}</td>"
            f"<td>{r['output_token_accuracy']:.0%}</td></tr>" for r in data["splits"].values())
        return (f"<!doctype html><title>lambdasplit audit</title><link rel=stylesheet href=/static/style.css>"
                f"<main style='padding:1.2rem'><h1>What a curious cloud recovers: {data['model']}</h1>"
                f"<p>No defense, measured {data['date']} with <code>{data['command']}</code>; every defense and both threat "
                f"models are in docs/privacy.md.</p><table border=1 cellpadding=6><tr><th>K,M</th><th>prompt tokens</th>"
                f"<th>planted personal data</th><th>generated tokens</th></tr>{rows}</table><p><a href='/'>back</a></p></main>")

    @app.get("/api/info")
    def api_info() -> dict[str, Any]:
        return {**info, "split": device.spec.as_dict(), "image": load_image is not None, "audit": audit,
                "speculate": speculate, "protection": None if protection is None else
                {"pseudonymize": protection.pseudonymize, "decoys": protection.decoys}}

    @app.post("/api/chat")  # not async: opening or evicting a conversation may wait on a body
    def api_chat(req: ChatRequest, request: Request) -> StreamingResponse:
        options = chat_options(req, speculate, draft_tokens)  # a bad setting is a 400 before anything runs
        conversation = conversations.get(req.conversation)
        job = chat_job(device, conversation, [m.model_dump() for m in req.messages], options, keep=req.conversation is not None,
                       protection=protection)
        return StreamingResponse(streamed(job, request), media_type="text/event-stream")

    @app.delete("/api/conversations/{key}", status_code=204)
    def forget(key: str) -> Response:
        """The page cleared this conversation: close its body session now rather than at eviction."""
        conversations.drop(key)
        return Response(status_code=204)

    @app.post("/api/image")
    def api_image(req: ImageRequest, request: Request) -> StreamingResponse:
        if load_image is None:
            return StreamingResponse(iter([_event({"type": "error", "message": "image generation is not enabled"})]),
                                     media_type="text/event-stream")
        return StreamingResponse(streamed(image_job(load_image, req, image_lock), request), media_type="text/event-stream")

    return app
