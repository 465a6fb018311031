"""image: a picture from a split diffusion pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lambdasplit import defaults
from lambdasplit.commands.options import (
    BlocksOpt,
    CaOpt,
    DeviceOpt,
    ModeOpt,
    PipelineOpt,
    ServerOpt,
    TokenOpt,
    check_text,
    image_size,
)

ImageDtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="float32, bfloat16 or float16: what the device's parts (text encoders, VAE and, with unet-split, the "
    "outer UNet blocks) compute in and send; the UNet server must agree. Default: an exported pipeline part's own, else float32.",
)]


def image(
    prompt: Annotated[str, typer.Argument(callback=check_text, help="What to draw.")],
    pipeline: PipelineOpt = None,
    mode: ModeOpt = defaults.DIFFUSION_MODE,
    k: BlocksOpt = defaults.UNET_OUTER_BLOCKS,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = defaults.IMAGE_STEPS,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (<= 1 turns it off).")] = defaults.IMAGE_GUIDANCE,
    seed: Annotated[int, typer.Option(help="Seed for the initial latents.")] = defaults.IMAGE_SEED,
    size: Annotated[Optional[str], typer.Option(help="WxH in pixels (default: the pipeline's).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path(defaults.IMAGE_OUT),
    codec: Annotated[str, typer.Option(help="Wire codec for per-step tensors: fp32, bf16, fp16, int8 (lossy).")] = defaults.CODEC,
    dtype: ImageDtypeOpt = None,
    device: DeviceOpt = defaults.DEVICE,
    server: ServerOpt = None,
    token_file: TokenOpt = None,
    tls_ca: CaOpt = None,
) -> None:
    """Generate an image with a split diffusion pipeline; the UNet (part) runs on --server, or in this process."""
    from rich.progress import Progress

    from lambdasplit.diffusion.device import SplitPipeline
    from lambdasplit.security import read_token
    from lambdasplit.wire.codec import Codec

    width_height = image_size(size) if size else None
    if pipeline is None or pipeline.startswith("tiny-"):
        typer.echo(
            f"note: {pipeline or 'tiny-sdxl'} has seeded random weights, so the image is noise, not a picture of the "
            "prompt; pass --pipeline DIR (a diffusers SDXL or SD pipeline) for a real one",
            err=True,
        )
    split = SplitPipeline.load(
        pipeline, mode, k, dtype, device, Codec.parse(codec), server, read_token(token_file), tls_ca
    )
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task(f"denoising ({mode})", total=steps)
            result = split.generate(prompt, steps, guidance, seed, width_height,
                                    on_step=lambda step, total, _: progress.update(task, completed=step))
    finally:
        split.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)
    per_step = result.bytes_to_cloud / max(steps, 1), result.bytes_from_cloud / max(steps, 1)
    typer.echo(
        f"wrote {out} ({result.image.width}x{result.image.height}, {steps} steps, {mode}, {result.seconds:.1f} s); "
        f"to cloud {result.bytes_to_cloud:,} B, from cloud {result.bytes_from_cloud:,} B "
        f"({per_step[0]:,.0f} / {per_step[1]:,.0f} B per step)"
    )
