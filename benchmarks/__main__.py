"""`python -m benchmarks cpu [--quick]`, `python -m benchmarks gpu`, `python -m benchmarks report`."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command()
def cpu(
    quick: Annotated[bool, typer.Option(help="Fewer tokens and repetitions: under two minutes.")] = False,
    reps: Annotated[int, typer.Option(help="Repetitions per candidate (alternating).")] = 0,
    new_tokens: Annotated[int, typer.Option("--new-tokens")] = 0,
    split: Annotated[str, typer.Option(help="K,M")] = "2,2",
) -> None:
    """Embedded SmolLM2 on this CPU: unsplit generate() vs split in-process vs split over loopback."""
    from benchmarks.cpu import run_cpu

    k, m = (int(x) for x in split.split(","))
    path = run_cpu(quick=quick, reps=reps or (3 if quick else 5), new_tokens=new_tokens or (32 if quick else 128), split=(k, m))
    typer.echo(f"wrote {path}")


@app.command()
def gpu(
    models: Annotated[str, typer.Option(help="Comma-separated: llama2-7b, smollm2")] = "llama2-7b,smollm2",
    reps: Annotated[int, typer.Option()] = 3,
    new_tokens: Annotated[int, typer.Option("--new-tokens")] = 128,
) -> None:
    """One CUDA GPU: random-weight models of real shapes, unsplit vs split (body on the GPU)."""
    from benchmarks.gpu import run_gpu

    typer.echo(f"wrote {run_gpu(models.split(','), reps, new_tokens)}")


@app.command()
def diffusion(
    full: Annotated[bool, typer.Option(help="SDXL's real sizes (2.6 B UNet) with random bf16 weights, 1024x1024; for a GPU.")] = False,
    steps: Annotated[int, typer.Option()] = 0,
    reps: Annotated[int, typer.Option()] = 3,
    device: Annotated[str, typer.Option()] = "",
) -> None:
    """Split diffusion: unsplit vs paper vs unet-split latency, bytes per step and codec PSNR/SSIM."""
    import os
    from pathlib import Path

    import torch

    from benchmarks.diffusion import build_full_sdxl, run
    from lambdasplit.diffusion.tiny import default_pipeline_dir

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if full:
        work = Path(os.environ.get("LAMBDASPLIT_BENCH_DIR", "/tmp/lambdasplit-bench"))
        pipeline = build_full_sdxl(work / "sdxl-full")
        path = run(str(pipeline), device, "bfloat16", steps or 30, reps, (1024, 1024), "diffusion-gpu", loopback=True)
    else:
        path = run(str(default_pipeline_dir("sdxl")), device, "float32", steps or 20, reps, (64, 64), "diffusion-cpu",
                   loopback=True)
    typer.echo(f"wrote {path}")


@app.command()
def report() -> None:
    """Plots and docs/benchmarks.md tables from benchmarks/results/*.json."""
    from benchmarks.report import write_report

    typer.echo(f"wrote {write_report()}")


if __name__ == "__main__":
    app()
