"""The device side of split diffusion: a stand-in UNet for diffusers' own pipeline.

SplitPipeline loads the real StableDiffusionXLPipeline / StableDiffusionPipeline (text encoders,
VAE, scheduler, latents and guidance stay diffusers' code) and replaces its UNet by SplitUNet, which
sends each call to the cloud: the whole call in paper mode, only the inner blocks in unet-split mode
(the outer blocks run here). The pipeline cannot tell the difference, so the image is the unsplit
pipeline's image.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lambdasplit.device.body import BodyClient
from lambdasplit.device.connect import BodyConfig, connect_body
from lambdasplit.device.remote import RemoteBody
from lambdasplit.diffusion import unet as cut
from lambdasplit.diffusion.parts import PipelineManifest, PipelineSource, load_unet, open_pipeline
from lambdasplit.diffusion.protocol import Slot
from lambdasplit.errors import LambdaSplitError, SplitError
from lambdasplit.split.manifest import DTYPE_NAMES
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import Frame, MsgType, tensor_frame

if TYPE_CHECKING:
    from lambdasplit.engine.scheduler import BodyScheduler

log = logging.getLogger(__name__)


class SplitUNet(nn.Module):
    """Looks like the pipeline's UNet (config, dtype, add_embedding...) but runs through `link`.

    The wrapped UNet is kept outside the module tree: in paper mode all its weights are on the meta
    device, in unet-split mode only the outer blocks are real, and neither must be moved or counted.
    """

    def __init__(self, unet, mode: str, k: int, link: BodyClient, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        object.__setattr__(self, "_unet", unet)
        self.config = unet.config
        self.mode, self.k, self.link = mode, k, link
        self._dtype, self._device = dtype, torch.device(device)
        self.guidance: float | None = None
        self._conditioned = False
        self.device_seconds = 0.0  # outer blocks run on the device (unet-split)
        self.step_seconds: list[float] = []

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_unet"), name)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def begin_image(self, guidance: float | None) -> None:
        """A new image: the cloud drops the last image's conditioning; CFG runs there if `guidance`."""
        self.guidance = guidance
        self._conditioned = False
        self.device_seconds = 0.0
        self.step_seconds = []
        self.link.reset()

    def forward(
        self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
        added_cond_kwargs=None, return_dict: bool = True, **unsupported,
    ):
        extras = [name for name, value in {"cross_attention_kwargs": cross_attention_kwargs, **unsupported}.items() if value is not None]
        if extras:
            raise SplitError(f"the split UNet does not carry {', '.join(extras)}")
        start = time.perf_counter()
        if self.mode == "paper":
            out = self._paper(sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs or {})
        else:
            out = self._unet_split(sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs)
        self.step_seconds.append(time.perf_counter() - start)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def _conditioning(self, tensors: dict[Slot, torch.Tensor]) -> list[Frame]:
        """Frames sent once per image, always in fp32 so the conditioning is exact."""
        self._conditioned = True
        return [tensor_frame(MsgType.TENSOR, t, Codec.FP32, slot=slot) for slot, t in tensors.items()]

    def _paper(self, sample, timestep, text, timestep_cond, added) -> torch.Tensor:
        if timestep_cond is not None:
            raise SplitError("paper mode does not carry timestep_cond (guidance-embedding UNets)")
        frames = []
        if not self._conditioned:
            cond = {Slot.TEXT: text}
            if added:
                cond |= {Slot.TEXT_EMBEDS: added["text_embeds"], Slot.TIME_IDS: added["time_ids"]}
            if self.guidance is not None:
                cond[Slot.GUIDANCE] = torch.tensor([self.guidance], dtype=torch.float32)
            frames = self._conditioning(cond)
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(1)
        frames += [
            tensor_frame(MsgType.TENSOR, t, Codec.FP32, slot=Slot.TIMESTEP),
            tensor_frame(MsgType.TENSOR, sample, self.link.codec, slot=Slot.SAMPLE),
        ]
        noise = self.link.exchange(frames).to(device=sample.device, dtype=sample.dtype)
        # The cloud already applied guidance; handing the pipeline [g, g] makes its own CFG step
        # compute g + s * (g - g) = g exactly.
        return torch.cat([noise, noise]) if self.guidance is not None else noise

    def _unet_split(self, sample, timestep, text, timestep_cond, added) -> torch.Tensor:
        unet = object.__getattribute__(self, "_unet")
        start = time.perf_counter()
        with torch.inference_mode():
            h, emb, text, state = cut.outer_in(unet, self.k, sample, timestep, text, added, timestep_cond)
        self.device_seconds += time.perf_counter() - start
        frames = [
            *([] if self._conditioned else self._conditioning({Slot.TEXT: text})),
            tensor_frame(MsgType.TENSOR, emb, self.link.codec, slot=Slot.EMB),
            tensor_frame(MsgType.TENSOR, h, self.link.codec, slot=Slot.HIDDEN),
        ]
        inner = self.link.exchange(frames).to(device=h.device, dtype=h.dtype)
        start = time.perf_counter()
        with torch.inference_mode():
            out = cut.outer_out(unet, self.k, inner, state)
        self.device_seconds += time.perf_counter() - start
        return out


@dataclass
class ImageResult:
    image: object  # PIL.Image, or a numpy array for output_type="np"
    seconds: float
    bytes_to_cloud: int
    bytes_from_cloud: int
    per_step: list[tuple[int, int]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    device_unet_seconds: float = 0.0


class SplitPipeline:
    """A diffusers pipeline whose UNet is split between this device and a body (local or remote)."""

    def __init__(self, pipe, unet: SplitUNet, manifest: PipelineManifest) -> None:
        self.pipe, self.unet, self.manifest = pipe, unet, manifest

    @classmethod
    def load(
        cls, pipeline: str | Path | None = None, mode: str = "paper", k: int = 1, dtype: str | None = None,
        device: str = "cpu", codec: Codec = Codec.FP32, server: str | None = None, token: str | None = None,
        tls_ca: str | Path | None = None,
    ) -> SplitPipeline:
        """The device part of `pipeline`; the cloud part runs on `server`, or in this process."""
        from diffusers import DiffusionPipeline

        opened = open_pipeline(pipeline, mode, k)
        if opened.exported and opened.exported.role != "device":
            raise LambdaSplitError(f"{opened.path} holds the {opened.exported.role} part; the device needs DIR/device")
        torch_dtype = opened.dtype(dtype)

        def outer(skeleton) -> list[str]:
            if mode != "unet-split":
                return []
            cut.check_k(skeleton, k)
            return cut.outer_keys(skeleton, k)

        unet = load_unet(opened.unet_dir, torch_dtype, device, outer)
        manifest = opened.manifest("device", mode, k, torch_dtype)
        config = BodyConfig(server, token=token, tls_ca=tls_ca, codec=codec, timeout=600.0)
        link = connect_body(config, manifest, RemoteUNet, lambda: _local_scheduler(opened, mode, k, torch_dtype, device))
        split_unet = SplitUNet(unet, mode, k, link, torch_dtype, torch.device(device))
        base = DiffusionPipeline.from_pretrained(str(opened.path), unet=None, dtype=torch_dtype)
        # Rebuild the pipeline around the split UNet: its __init__ reads sizes from the UNet config.
        extra = {"requires_safety_checker": False} if "requires_safety_checker" in base.config else {}
        pipe = type(base)(**{**base.components, "unet": split_unet}, **extra)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, split_unet, manifest)

    def generate(
        self, prompt: str, steps: int = 20, guidance: float = 5.0, seed: int = 0, size: tuple[int, int] | None = None,
        on_step: Callable[[int, int, torch.Tensor], None] | None = None, output_type: str = "pil",
    ) -> ImageResult:
        """One image (PIL, or a float array with output_type="np"); `on_step(step, total, latents)`
        after every denoising step."""
        if steps < 1:  # diffusers divides by the step count (0) or quietly runs none (negative)
            raise LambdaSplitError(f"steps must be at least 1, not {steps}")
        width, height = size or (None, None)
        do_cfg = guidance > 1 and self.unet.config.time_cond_proj_dim is None
        self.unet.begin_image(guidance if do_cfg else None)
        self.unet.link.stats.reset()

        def callback(pipe, step, timestep, kwargs):
            if on_step is not None:
                on_step(step + 1, steps, kwargs["latents"])
            return {}

        start = time.perf_counter()
        try:
            image = self.pipe(
                prompt, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=callback, output_type=output_type,
            ).images[0]
        except ValueError as exc:  # diffusers' input checks (sizes, step counts)
            raise LambdaSplitError(f"the pipeline refused the request: {exc}") from None
        stats = self.unet.link.stats
        return ImageResult(
            image, time.perf_counter() - start, stats.bytes_to_cloud, stats.bytes_from_cloud, list(stats.per_step),
            list(self.unet.step_seconds), self.unet.device_seconds,
        )

    def decode_latents(self, latents: torch.Tensor):
        """The VAE's picture of intermediate latents (for previews and the leakage audit)."""
        return decode_latents(self.pipe, latents)

    def close(self) -> None:
        self.unet.link.close()



class SplitPipelines:
    """The split pipelines of one source, loaded on first use per (mode, K) and kept: the UI's
    image tab asks for any mode and K, and loading one takes seconds."""

    def __init__(self, pipeline: str | None, server: str | None, token: str | None, tls_ca: str | Path | None,
                 codec: Codec) -> None:
        self.pipeline, self.server, self.token, self.tls_ca, self.codec = pipeline, server, token, tls_ca, codec
        self._loaded: dict[tuple[str, int], SplitPipeline] = {}
        self._lock = threading.Lock()  # two requests for one (mode, K) load it once

    def __call__(self, mode: str, k: int) -> SplitPipeline:
        with self._lock:
            if (mode, k) not in self._loaded:
                self._loaded[(mode, k)] = SplitPipeline.load(self.pipeline, mode, k, codec=self.codec, server=self.server,
                                                             token=self.token, tls_ca=self.tls_ca)
            return self._loaded[(mode, k)]

    @property
    def note(self) -> str:
        """Which pipeline, and where its UNet part runs, in words."""
        name = self.pipeline or "tiny-sdxl (small offline SDXL-shaped pipeline with random weights: expect noise-like pictures)"
        return f"pipeline: {name}; UNet part {'at ' + self.server if self.server else 'in this process'}"


def decode_latents(pipe, latents: torch.Tensor):
    vae = pipe.vae
    with torch.inference_mode():
        latents = latents.to(device=vae.device, dtype=vae.dtype)
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]


def _local_scheduler(opened: PipelineSource, mode: str, k: int, dtype: torch.dtype, device: str) -> BodyScheduler:
    """The cloud part in this process, reached through the same frames and scheduler as a server
    (imported only here: a device with a server never loads the cloud side or the engine)."""
    if opened.exported:
        raise LambdaSplitError(f"{opened.path} is an exported device part; give --server to reach its cloud part")
    from lambdasplit.diffusion.cloud import load_unet_body
    from lambdasplit.engine.scheduler import BodyScheduler

    return BodyScheduler([load_unet_body(str(opened.path), mode, k, DTYPE_NAMES[dtype], device)])


class RemoteUNet(RemoteBody):
    """RemoteBody for diffusion sessions: a step's last frame is answered; a reconnect resends only
    the image's conditioning (the cloud keeps nothing else between steps)."""

    def expects_reply(self, frame: Frame) -> bool:
        return frame.type == MsgType.TENSOR and Slot(frame.slot).expects_reply

    def kept_for_replay(self, frame: Frame) -> bool:
        return frame.type == MsgType.TENSOR and Slot(frame.slot).conditioning
