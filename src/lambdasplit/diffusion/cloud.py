"""The cloud side of split diffusion: the UNet (paper) or its inner blocks (unet-split), per session.

A DiffusionSession speaks the same frame interface as the text BodySession, so the same server,
scheduler thread, auth, TLS and limits carry both. It keeps one image's conditioning (sent once)
and answers each step.
"""

from __future__ import annotations

import logging

import torch

from lambdasplit.diffusion import unet as cut
from lambdasplit.diffusion.parts import PipelineManifest, load_unet, open_pipeline
from lambdasplit.diffusion.protocol import UPLINK, Slot
from lambdasplit.engine.scheduler import BodyScheduler, SchedulerLimits
from lambdasplit.engine.session import SessionLimits
from lambdasplit.errors import SourceError, WireError
from lambdasplit.wire.frame import Frame, MsgType, tensor_frame

log = logging.getLogger(__name__)


class UNetBody:
    """What the cloud runs for one step, given the image's conditioning and the step's tensors."""

    def __init__(self, unet, mode: str, k: int, manifest: PipelineManifest) -> None:
        self.unet, self.mode, self.k, self.manifest = unet, mode, k, manifest
        self.param = next(p for p in unet.parameters() if p.device.type != "meta")
        if mode == "unet-split":
            cut.check_k(unet, k)
        self.shapes = _expected_shapes(unet, mode, k)

    def open(self, session_id: bytes, limits: SessionLimits, pool: object = None) -> DiffusionSession:
        return DiffusionSession(self, session_id)

    def memory_probe(self) -> torch.Tensor:
        return self.param

    @torch.inference_mode()
    def step(self, cond: dict[Slot, torch.Tensor], inputs: dict[Slot, torch.Tensor]) -> tuple[Slot, torch.Tensor]:
        for slot, tensor in (*cond.items(), *inputs.items()):
            _check_shape(tensor, slot, self.shapes.get(slot))
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=self.param.device, dtype=self.param.dtype)

        text = cast(_need(cond, Slot.TEXT))
        if self.mode == "unet-split":
            h, emb = cast(_need(inputs, Slot.HIDDEN)), cast(_need(inputs, Slot.EMB))
            _same_batch(h, emb, text)
            return Slot.HIDDEN, cut.inner(self.unet, self.k, h, emb, text)
        sample = cast(_need(inputs, Slot.SAMPLE))
        timestep = _need(inputs, Slot.TIMESTEP).reshape(()).to(self.param.device)
        added = None
        if Slot.TEXT_EMBEDS in cond or self.unet.config.addition_embed_type == "text_time":
            added = {"text_embeds": cast(_need(cond, Slot.TEXT_EMBEDS)), "time_ids": cast(_need(cond, Slot.TIME_IDS))}
            _same_batch(sample, text, added["text_embeds"], added["time_ids"])
        else:
            _same_batch(sample, text)
        noise = self.unet(sample, timestep, text, added_cond_kwargs=added, return_dict=False)[0]
        guidance = cond.get(Slot.GUIDANCE)
        if guidance is not None:
            # The pipeline's own classifier-free guidance formula, so the device's result is unchanged.
            if noise.shape[0] % 2:
                raise WireError("classifier-free guidance needs an even batch (unconditional + text)")
            uncond, text_pred = noise.chunk(2)
            noise = uncond + float(guidance.reshape(())) * (text_pred - uncond)
        return Slot.NOISE, noise


def _expected_shapes(unet, mode: str, k: int) -> dict[Slot, tuple[int | None, ...]]:
    """Rank and fixed dimensions (None: any) of every tensor the mode accepts, from the UNet's
    config, so a malformed frame gets a clear error before the UNet runs."""
    cfg = unet.config
    text_dim = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else None
    shapes: dict[Slot, tuple[int | None, ...]] = {Slot.TEXT: (None, None, text_dim)}
    if mode == "unet-split":
        shapes[Slot.HIDDEN] = (None, cfg.block_out_channels[k - 1], None, None)
        shapes[Slot.EMB] = (None, unet.time_embedding.linear_2.out_features)
        return shapes
    shapes |= {Slot.SAMPLE: (None, cfg.in_channels, None, None), Slot.TIMESTEP: (1,), Slot.GUIDANCE: (1,)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        shapes |= {Slot.TEXT_EMBEDS: (None, pooled), Slot.TIME_IDS: (None, 6)}
    return shapes


def _check_shape(tensor: torch.Tensor, slot: Slot, expected: tuple[int | None, ...] | None) -> None:
    if expected is None:
        raise WireError(f"{slot.name} is not used by this UNet")
    if tensor.dim() != len(expected) or any(e is not None and d != e for d, e in zip(tensor.shape, expected, strict=False)):
        want = " x ".join("*" if e is None else str(e) for e in expected)
        raise WireError(f"{slot.name} must have shape {want}, got {tuple(tensor.shape)}")


def _need(tensors: dict[Slot, torch.Tensor], slot: Slot) -> torch.Tensor:
    if slot not in tensors:
        raise WireError(f"the step is missing its {slot.name} tensor")
    return tensors[slot]


def _same_batch(*tensors: torch.Tensor) -> None:
    if len({t.shape[0] for t in tensors}) != 1:
        raise WireError(f"batch sizes differ between the step's tensors: {[tuple(t.shape) for t in tensors]}")


class DiffusionSession:
    """One device's image in progress: conditioning kept, steps answered."""

    def __init__(self, body: UNetBody, session_id: bytes, max_steps: int = 1000) -> None:
        self.body = body
        self.session_id = session_id
        self.max_steps = max_steps
        self.cond: dict[Slot, torch.Tensor] = {}
        self.inputs: dict[Slot, torch.Tensor] = {}
        self.steps = 0
        self.tokens = 0  # the scheduler counts "tokens"; for images, one per step and sample

    def new_bytes(self, frame: Frame) -> int:
        return 0  # a step's activations are transient; the session keeps only its conditioning

    def batch_key(self, frame: Frame) -> int | None:
        return None  # UNet steps of several devices are not batched yet

    def close(self) -> None:
        self.cond.clear()
        self.inputs.clear()

    def handle(self, frame: Frame) -> Frame | None:
        if frame.type == MsgType.RESET:
            self.cond.clear()
            self.inputs.clear()
            self.steps = 0
            return None
        if frame.type != MsgType.TENSOR:
            raise WireError(f"unexpected {frame.type.name} frame in a diffusion session")
        try:
            slot = Slot(frame.slot)
        except ValueError:
            raise WireError(f"unknown tensor slot {frame.slot}") from None
        if slot not in UPLINK[self.body.mode]:
            raise WireError(f"{slot.name} is not sent in {self.body.mode} mode")
        (self.cond if slot.conditioning else self.inputs)[slot] = frame.tensor()
        if not slot.expects_reply:
            return None
        if self.steps >= self.max_steps:
            raise WireError(f"more than {self.max_steps} steps in one image")
        inputs, self.inputs = self.inputs, {}
        try:
            out_slot, out = self.body.step(self.cond, inputs)
        except RuntimeError as exc:  # e.g. spatial sizes the UNet cannot pair up, or out of memory
            raise WireError(f"the UNet could not run this step: {str(exc).splitlines()[0]}") from None
        self.steps += 1
        self.tokens += out.shape[0]
        return tensor_frame(MsgType.TENSOR, out, frame.codec, self.session_id, frame.seq, slot=out_slot)


def load_unet_body(
    pipeline: str | None, mode: str, k: int, dtype: str | None = None, device: str = "cpu"
) -> UNetBody:
    """The cloud's UNet part of `pipeline` (a diffusers directory or an exported cloud part)."""
    opened = open_pipeline(pipeline, mode, k)
    if opened.exported and opened.exported.role != "cloud":
        raise SourceError(f"{opened.path} holds the {opened.exported.role} part; the cloud side needs DIR/cloud")
    torch_dtype = opened.dtype(dtype)
    select = None
    if mode == "unet-split":
        def select(skeleton) -> list[str]:
            cut.check_k(skeleton, k)
            return cut.inner_keys(skeleton, k)
    unet = load_unet(opened.unet_dir, torch_dtype, device, select)
    return UNetBody(unet, mode, k, opened.manifest("cloud", mode, k, torch_dtype))


def load_diffusion_scheduler(
    pipeline: str | None, mode: str, k: int, dtype: str | None = None, device: str = "cpu",
    limits: SchedulerLimits = SchedulerLimits(),
) -> BodyScheduler:
    body = load_unet_body(pipeline, mode, k, dtype, device)
    log.info("serving the %s UNet in %s mode (K=%d)", body.manifest.family, mode, k)
    return BodyScheduler([body], limits)
