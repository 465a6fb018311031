"""Split diffusion: per-step and per-image latency (unsplit vs paper vs unet-split, one process,
interleaved), bytes per step per mode and codec, and each lossy codec's PSNR/SSIM against the
exact image.

On a CPU it uses the small offline SDXL-shaped pipeline; on a GPU (`--full`) an SDXL-shaped
pipeline of the real sizes (UNet 2.6 B parameters, both CLIP text encoders, the SDXL VAE) with
seeded random weights in bf16, built on the GPU and saved once (nothing is downloaded).
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, environment, write
from lambdasplit.diffusion.device import SplitPipeline
from lambdasplit.diffusion.quality import psnr, ssim
from lambdasplit.wire.codec import Codec

PROMPT = "a lighthouse at dusk, oil painting"
MODES = [("paper", 0), ("unet-split", 1), ("unet-split", 2)]
CODECS = [Codec.FP32, Codec.FP16, Codec.BF16, Codec.INT8]

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_VAE = dict(
    block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
    scaling_factor=0.13025, force_upcast=False,
)


def build_full_sdxl(directory: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """SDXL's real shapes with seeded random weights (built on the GPU when there is one)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lambdasplit.diffusion.tiny import byte_tokenizer

    if (directory / "done").is_file():
        return directory
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
        vae = AutoencoderKL(**SDXL_VAE).to(dtype)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu",
                                              bos_token_id=0, eos_token_id=1, pad_token_id=1)).to(dtype)
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1)).to(dtype)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    tokenizer = byte_tokenizer()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=clip_g, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(directory))
    (directory / "done").write_text("ok")
    del pipe, unet, vae, clip_l, clip_g
    gc.collect()
    return directory


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(pipe, steps: int, device: str, size: tuple[int, int], **kwargs) -> dict:
    """One image; per-step times from the pipeline's step callback (synchronised)."""
    marks: list[float] = []

    def callback(_pipe, _step, _t, _kw):
        _sync(device)
        marks.append(time.perf_counter())
        return {}

    _sync(device)
    start = time.perf_counter()
    image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, width=size[0], height=size[1],
                 generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=callback, output_type="np",
                 **kwargs).images[0]
    _sync(device)
    total = time.perf_counter() - start
    step_times = np.diff([start, *marks])[1:]  # the first interval also holds text encoding
    return {"image_s": total, "step_ms": 1000 * float(np.median(step_times)), "image": image}


def run(
    pipeline: str, device: str, dtype: str, steps: int, reps: int, size: tuple[int, int], result_name: str,
    loopback: bool = False,
) -> Path:
    """With `loopback`, paper and unet-split K=2 also run against a `lambdasplit serve` process on
    this machine (same device), so the WebSocket path is in the comparison."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        servers = _servers(stack, pipeline, device, dtype) if loopback else {}
        return _run(pipeline, device, dtype, steps, reps, size, result_name, servers)


def _servers(stack, pipeline: str, device: str, dtype: str) -> dict[str, tuple[str, int, str]]:
    from lambdasplit.cloud.process import ServerProcess

    out = {}
    for mode, k in (("paper", 0), ("unet-split", 2)):
        proc = stack.enter_context(ServerProcess("--pipeline", pipeline, "--mode", mode, "--k", str(max(k, 1)),
                                                 "--device", device, "--dtype", dtype, timeout=600))
        out[f"{mode}" + (f" K={k}" if k else "") + " (loopback server)"] = (mode, k, proc.url)
    return out


def _run(
    pipeline: str, device: str, dtype: str, steps: int, reps: int, size: tuple[int, int], result_name: str,
    servers: dict[str, tuple[str, int, str]],
) -> Path:
    from diffusers import DiffusionPipeline

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    unsplit = DiffusionPipeline.from_pretrained(pipeline, dtype=torch_dtype).to(device)
    unsplit.set_progress_bar_config(disable=True)
    candidates = {"unsplit": (unsplit, None)}
    native = {"float32": Codec.FP32, "bfloat16": Codec.BF16, "float16": Codec.FP16}[dtype]  # exact for that dtype
    for mode, k in MODES:
        split = SplitPipeline.load(pipeline, mode, k, dtype, device, native)
        candidates[f"{mode}" + (f" K={k}" if k else "")] = (split.pipe, split)
    for name, (mode, k, url) in servers.items():
        split = SplitPipeline.load(pipeline, mode, k, dtype, device, native, server=url)
        candidates[name] = (split.pipe, split)
    timings: dict[str, list[dict]] = {name: [] for name in candidates}
    for pipe, split in candidates.values():  # warm-up
        _begin(split)
        _timed(pipe, steps, device, size)
    names = list(candidates)
    for rep in range(reps):  # interleaved, rotating the order
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            pipe, split = candidates[name]
            _begin(split)
            timings[name].append(_timed(pipe, steps, device, size))
    reference = timings["unsplit"][0]["image"]
    results = {"environment": environment(device), "pipeline": str(pipeline), "dtype": dtype, "steps": steps,
               "size": list(size), "reps": reps, "latency_codec": native.name.lower(), "latency": {}, "codecs": {},
               "unet_forward_ms": _unet_forward(unsplit.unet, candidates["paper"][1].unet.link.session.body.unet, device, size)}
    base = statistics.median(r["image_s"] for r in timings["unsplit"])
    for name, runs in timings.items():
        image_s = statistics.median(r["image_s"] for r in runs)
        results["latency"][name] = {
            "image_s": image_s, "step_ms": statistics.median(r["step_ms"] for r in runs), "ratio": image_s / base,
            "exact": bool(np.array_equal(runs[0]["image"], reference)),
        }
    for name, (_pipe, split) in candidates.items():
        if split is None or name in servers:
            continue
        for codec in CODECS:
            split.unet.link.codec = codec
            result = split.generate(PROMPT, steps, 5.0, 0, size, output_type="np")
            up = [s for s, _ in result.per_step]
            down = [r for _, r in result.per_step]
            results["codecs"].setdefault(name, {})[codec.name.lower()] = {
                "bytes_up_per_step": statistics.median(up), "bytes_down_per_step": statistics.median(down),
                "conditioning_bytes": max(up) - statistics.median(up),
                "psnr": psnr(result.image, reference), "ssim": ssim(result.image, reference),
            }
        split.unet.link.codec = native
    path = write(result_name, results)
    _plot(results, RESULTS / f"{result_name}.png")
    return path


def _unet_forward(unsplit_unet, cloud_unet, device: str, size: tuple[int, int], reps: int = 10) -> dict:
    """The same UNet call on the unsplit pipeline's UNet and on the cloud's copy: a check that the
    two modules run at the same speed (they hold the same weights)."""
    param = next(unsplit_unet.parameters())
    h, w = size[1] // 8, size[0] // 8
    x = torch.randn(2, unsplit_unet.config.in_channels, h, w, device=device, dtype=param.dtype)
    text = torch.randn(2, 77, unsplit_unet.config.cross_attention_dim, device=device, dtype=param.dtype)
    added = None
    if unsplit_unet.config.addition_embed_type == "text_time":
        dim = unsplit_unet.config.projection_class_embeddings_input_dim - 6 * unsplit_unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, dim, device=device, dtype=param.dtype),
                 "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=device, dtype=param.dtype)}
    out = {}
    with torch.inference_mode():
        for name, unet in (("unsplit", unsplit_unet), ("cloud", cloud_unet), ("unsplit_again", unsplit_unet)):
            unet(x, 500, text, added_cond_kwargs=added)
            _sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                unet(x, 500, text, added_cond_kwargs=added)
            _sync(device)
            out[name] = 1000 * (time.perf_counter() - start) / reps
    return out


def _begin(split: SplitPipeline | None) -> None:
    if split is not None:
        split.unet.begin_image(5.0)


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(results["latency"])
    left.bar(names, [results["latency"][n]["step_ms"] for n in names], color="#4c72b0")
    left.set_ylabel("median ms per denoising step")
    left.set_title(f"{results['environment'].get('gpu', 'CPU')}: {results['size'][0]}x{results['size'][1]}")
    left.tick_params(axis="x", rotation=20)
    for i, codec in enumerate(c.name.lower() for c in CODECS):
        modes = list(results["codecs"])
        values = [(results["codecs"][m][codec]["bytes_up_per_step"] + results["codecs"][m][codec]["bytes_down_per_step"]) / 2**20
                  for m in modes]
        right.bar(np.arange(len(modes)) + i * 0.2, values, width=0.2, label=codec)
        right.set_xticks(np.arange(len(modes)) + 0.3, modes, rotation=20)
    right.set_ylabel("MiB per step (up + down)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
