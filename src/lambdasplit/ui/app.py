"""The web UI's backend: chat and image generation through the split model, streamed as server-sent
events, with what crossed the network after each answer.

One device (head + tail) and one body connection serve the page; requests take turns. Everything
the page shows about the split (bytes, timings, the hidden states the cloud saw) is read from the
device's own transfer statistics and captured frames, the same ones the audit uses.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from lambdasplit.device.body import BodyClient
from lambdasplit.device.generation import GenerationOptions
from lambdasplit.device.runtime import SplitDevice
from lambdasplit.errors import LambdaSplitError
from lambdasplit.wire.frame import Limits, MsgType, parse_frame

log = logging.getLogger(__name__)
HEATMAP_POSITIONS, HEATMAP_CHANNELS = 48, 96


class Message(BaseModel):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str = Field(max_length=20_000)


class ChatRequest(BaseModel):
    messages: list[Message] = Field(min_length=1, max_length=64)
    max_new_tokens: int = Field(default=128, ge=1, le=2048)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # 0 = greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000)
    seed: int | None = None


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


def streamed(job: Callable[[Callable[[dict], None]], None], lock: threading.Lock) -> Iterator[str]:
    """Run `job(emit)` on a worker thread (one job at a time) and yield what it emits as SSE events.

    Whatever happens, the stream ends with the job's events or an `error` event, so the page never
    waits on a request that has died."""
    events: queue.Queue[dict | None] = queue.Queue()

    def work() -> None:
        try:
            with lock:
                job(events.put)
        except LambdaSplitError as exc:
            events.put({"type": "error", "message": str(exc)})
        except Exception as exc:  # reported to the page, and logged here
            log.exception("UI request failed")
            events.put({"type": "error", "message": f"internal error: {type(exc).__name__}: {exc}"})
        finally:
            events.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (item := events.get()) is not None:
        yield _event(item)


def chat_job(
    device: SplitDevice, body: BodyClient, req: ChatRequest, speculate: str | None = None, draft_tokens: int = 8,
) -> Callable[[Callable[[dict], None]], None]:
    """Text pieces as they are generated, then one `done` with what crossed the network."""
    sampling = GenerationOptions(
        max_new_tokens=req.max_new_tokens, greedy=req.temperature == 0.0, temperature=req.temperature or 1.0,
        top_p=req.top_p, top_k=req.top_k, seed=req.seed, speculate=speculate, draft_tokens=draft_tokens,
    )

    def job(emit: Callable[[dict], None]) -> None:
        ids = device.encode_chat([m.model_dump() for m in req.messages])
        body.captured = []
        try:
            result = device.generate_ids(body, ids, None, sampling, on_text=lambda text: emit({"type": "token", "text": text}))
            emit({"type": "done", **_chat_stats(device, body, ids, result)})
        finally:
            body.captured = None

    return job


def _chat_stats(device: SplitDevice, body: BodyClient, ids: torch.Tensor, result) -> dict[str, Any]:
    stats, timings = body.stats, result.timings
    tokens = max(len(result.token_ids[0]), 1)
    limits = Limits(max_payload=1 << 31, max_elements=1 << 31)
    sent = (parse_frame(data, limits) for direction, data in body.captured or [] if direction == "to_cloud")
    uplink = next((frame for frame in sent if frame.type == MsgType.HIDDEN), None)  # the prompt's h_K
    cloud = 1000 * stats.wait_seconds / tokens
    total = 1000 * timings.total / tokens
    return {
        "text": result.text,
        "token_ids": result.token_ids[0],
        "split": device.spec.as_dict(),
        "bytes_to_cloud": stats.bytes_to_cloud,
        "bytes_from_cloud": stats.bytes_from_cloud,
        "frames": stats.frames_to_cloud + stats.frames_from_cloud,
        "tokens": len(result.token_ids[0]),
        "tokens_per_second": timings.tokens_per_second,
        "round_trips": result.round_trips,
        "tokens_per_round_trip": result.tokens_per_round_trip,
        "per_token_ms": {"device": max(total - cloud, 0.0), "cloud_network": cloud, "total": total},
        "saw": heatmap(uplink.tensor()) if uplink is not None else None,
        "kept_tokens": [device.tokenizer.decode([t]) for t in ids[0, :HEATMAP_POSITIONS].tolist()],
    }


def image_job(load: Callable[[str, int], Any], req: ImageRequest) -> Callable[[Callable[[dict], None]], None]:
    """One event per step (a preview every few steps and the tensor sent), then `done`."""

    def job(emit: Callable[[dict], None]) -> None:
        split = load(req.mode, req.k)
        link = split.unet.link
        link.start_capture()
        every = max(1, req.steps // 5)
        limits = Limits(max_payload=1 << 31, max_elements=1 << 31)

        def on_step(step: int, total: int, latents: torch.Tensor) -> None:
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
              "bytes_from_cloud": result.bytes_from_cloud, "seconds": result.seconds, "mode": req.mode})

    return job


def load_audit(spec) -> dict[str, Any] | None:
    """The shipped audit numbers (curious cloud, no defense) for this split of the embedded model."""
    data = json.loads(resources.files("lambdasplit.privacy").joinpath("data/audit-smollm2.json").read_text())
    row = data["splits"].get(f"{spec.k},{spec.m}")
    if row is None:
        return None
    return {**row, "command": data["command"], "link": "/audit"}


def create_ui(
    device: SplitDevice, body: BodyClient, info: dict[str, Any], load_image: Callable[[str, int], Any] | None = None,
    audit: dict[str, Any] | None = None, speculate: str | None = None, draft_tokens: int = 8,
) -> FastAPI:
    app = FastAPI(title="lambdasplit", version="1", docs_url=None, redoc_url=None)
    lock = threading.Lock()
    static = resources.files("lambdasplit.ui").joinpath("static")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return static.joinpath("index.html").read_text()

    @app.get("/static/{name}")
    def asset(name: str) -> Response:
        types = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in types:
            return Response(status_code=404)
        return Response(static.joinpath(name).read_text(), media_type=types[name])

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
        return {**info, "split": device.spec.as_dict(), "image": load_image is not None, "audit": audit}

    @app.post("/api/chat")
    def api_chat(req: ChatRequest) -> StreamingResponse:
        return StreamingResponse(streamed(chat_job(device, body, req, speculate, draft_tokens), lock), media_type="text/event-stream")

    @app.post("/api/image")
    def api_image(req: ImageRequest) -> StreamingResponse:
        if load_image is None:
            return StreamingResponse(iter([_event({"type": "error", "message": "image generation is not enabled"})]),
                                     media_type="text/event-stream")
        return StreamingResponse(streamed(image_job(load_image, req), lock), media_type="text/event-stream")

    return app
