"""What a curious cloud (or an eavesdropper without TLS) recovers of a split diffusion image.

paper mode: the cloud sees the latent model input of every step and returns every noise
prediction, so it replays the device's scheduler loop and decodes the final latents with the
public VAE. unet-split mode: it sees the K-th down block's activations and the time embedding; it
inverts the public outer blocks by gradient descent on the last step's activations (the latents
of the last step are nearly the final ones) and decodes the result with the public VAE.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from lambdasplit.diffusion import unet as cut
from lambdasplit.diffusion.device import SplitPipeline, decode_latents
from lambdasplit.diffusion.parts import load_unet, open_pipeline
from lambdasplit.diffusion.protocol import Slot
from lambdasplit.diffusion.quality import psnr, ssim
from lambdasplit.wire.frame import Limits, parse_frame

log = logging.getLogger(__name__)
_LIMITS = Limits(max_elements=1 << 31, max_payload=1 << 31)


@dataclass
class Leak:
    mode: str
    k: int
    psnr: float
    ssim: float
    seconds: float
    baseline_psnr: float  # a blind guess (the VAE's decode of all-zero latents), for scale
    baseline_ssim: float
    image: object  # what the attacker decoded (PIL)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "image"}


def captured_steps(captured: list[tuple[str, bytes]]) -> list[dict[Slot, torch.Tensor]]:
    """The frames as the observer parsed them, grouped per step (conditioning in every group)."""
    steps, cond, current = [], {}, {}
    for direction, data in captured:
        frame = parse_frame(data, _LIMITS)
        if frame.slot == 0:
            continue
        slot = Slot(frame.slot)
        if direction == "from_cloud":
            steps.append({**cond, **current, ("reply", slot): frame.tensor()})
            current = {}
        elif slot.conditioning:
            cond[slot] = frame.tensor()
        else:
            current[slot] = frame.tensor()
    return steps


def paper_attack(pipe, steps: list[dict]) -> object:
    """Replay the public scheduler with the captured inputs and noise; decode with the public VAE."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(len(steps))
    first = steps[0]
    sample = first[Slot.SAMPLE]
    half = sample.shape[0] // 2 if Slot.GUIDANCE in first else sample.shape[0]
    latents = sample[:half].float()
    t0 = first[Slot.TIMESTEP].reshape(())
    scale = scheduler.scale_model_input(torch.ones(1), t0)  # the input scaling the device applied
    latents = latents / scale
    for step in steps:
        noise = step[("reply", Slot.NOISE)].float()
        latents = scheduler.step(noise, step[Slot.TIMESTEP].reshape(()), latents).prev_sample
    return decode_latents(pipe, latents)


def unet_split_attack(pipe, unet, k: int, steps: list[dict], iterations: int = 300, lr: float = 0.05) -> object:
    """Invert conv_in + the first K down blocks on the last step's captured activations."""
    last = steps[-1]
    target, emb, text = last[Slot.HIDDEN].float(), last[Slot.EMB].float(), last[Slot.TEXT].float()
    factor = 2 ** k
    shape = (target.shape[0], unet.config.in_channels, target.shape[2] * factor, target.shape[3] * factor)
    x = torch.zeros(shape, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=lr)
    for _ in range(iterations):
        h = unet.conv_in(x)
        for block in unet.down_blocks[:k]:
            h, _ = cut.down_block(block, h, emb, text)
        loss = torch.nn.functional.mse_loss(h, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    half = x.shape[0] // 2 if x.shape[0] > 1 else 1
    return decode_latents(pipe, x.detach()[half:] if x.shape[0] > 1 else x.detach())


def measure(pipeline: str | None, mode: str, k: int, prompt: str, steps: int = 20, seed: int = 0,
            guidance: float = 5.0, iterations: int = 300) -> Leak:
    """Generate one image with capture on, attack the captured frames, score against the image."""
    split = SplitPipeline.load(pipeline, mode, k)
    split.unet.link.start_capture()
    real = split.generate(prompt, steps, guidance, seed).image
    observed = captured_steps(split.unet.link.captured)
    start = time.perf_counter()
    if mode == "paper":
        image = paper_attack(split.pipe, observed)
    else:
        opened = open_pipeline(pipeline, mode, k)
        public = load_unet(opened.unet_dir, torch.float32)  # the attacker's copy of the public UNet
        for p in public.parameters():
            p.requires_grad_(False)
        image = unet_split_attack(split.pipe, public, k, observed, iterations)
    seconds = time.perf_counter() - start
    a, b = np.asarray(image), np.asarray(real)
    blind = np.asarray(decode_latents(split.pipe, torch.zeros(1, 4, b.shape[0] // split.pipe.vae_scale_factor,
                                                              b.shape[1] // split.pipe.vae_scale_factor)))
    return Leak(mode, k, psnr(a, b), ssim(a, b), seconds, psnr(blind, b), ssim(blind, b), image)


def audit_pipeline(pipeline: str | None, prompt: str, steps: int, out, progress=lambda _: None) -> list[Leak]:
    """Every mode and K of the pipeline; writes diffusion.json, diffusion.md and the attacker's images."""
    import json
    from pathlib import Path

    opened = open_pipeline(pipeline, "paper", 0)
    blocks = cut.block_count(load_unet(opened.unet_dir, torch.float32, select=lambda _: []))
    leaks = []
    for mode, k in [("paper", 0)] + [("unet-split", k) for k in range(1, blocks)]:
        progress(f"{mode} K={k}")
        leaks.append(measure(pipeline, mode, k, prompt, steps))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for leak in leaks:
        leak.image.save(out / f"recovered-{leak.mode}-k{leak.k}.png")
    (out / "diffusion.json").write_text(json.dumps({"pipeline": str(opened.path), "prompt": prompt, "steps": steps,
                                                    "leaks": [x.as_dict() for x in leaks]}, indent=2))
    rows = [f"| {x.mode} | {x.k} | {x.psnr:.1f} | {x.ssim:.3f} | {x.baseline_psnr:.1f} / {x.baseline_ssim:.3f} | {x.seconds:.1f} |"
            for x in leaks]
    (out / "diffusion.md").write_text("\n".join([
        "# Split diffusion: what the cloud recovers of the image", "",
        f"Pipeline `{opened.path.name}`, prompt {prompt!r}, {steps} steps. PSNR (dB) and SSIM of the image the "
        "attacker decodes from the captured frames against the device's image; the blind guess is the VAE's "
        "decode of all-zero latents.", "",
        "| mode | K | PSNR | SSIM | blind guess PSNR / SSIM | attacker s |", "|---|---|---|---|---|---|", *rows, "",
    ]))
    return leaks
