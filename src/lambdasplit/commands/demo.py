"""demo: a body server in a child process, the device against it, and what crossed."""

from __future__ import annotations

from typing import Annotated

import typer

from lambdasplit import defaults
from lambdasplit.commands.options import (
    MaxNewTokensOpt,
    ModelOpt,
    SplitOpt,
    check_text,
    point,
    warn_without_chat_template,
)


def demo(
    prompt: Annotated[str, typer.Argument(callback=check_text, help="What to ask.")] = defaults.DEMO_PROMPT,
    model: ModelOpt = None,
    split: SplitOpt = None,
    max_new_tokens: MaxNewTokensOpt = defaults.DEMO_MAX_NEW_TOKENS,
    codec: Annotated[str, typer.Option(help="Wire codec: fp32 (exact), bf16, fp16, int8 (lossy).")] = defaults.CODEC,
) -> None:
    """Start a body server on loopback in a child process, run the device against it, show what crossed."""
    from rich.console import Console

    from lambdasplit.cloud.process import ServerProcess
    from lambdasplit.device.connect import BodyConfig, connect_body
    from lambdasplit.device.runtime import SplitRuntime
    from lambdasplit.device.sampling import SamplingParams
    from lambdasplit.wire.codec import Codec

    console = Console()
    parts = point(split) or defaults.SPLIT
    wire = Codec.parse(codec)
    server_args = ["--split", f"{parts[0]},{parts[1]}"] + (["--model", model] if model else [])
    with console.status("starting the body server (cloud) in a child process..."):
        server = ServerProcess(*server_args)
    try:
        with console.status("loading the head and tail (device)..."):
            runtime = SplitRuntime.load(model, parts)
        warn_without_chat_template(runtime)
        body = connect_body(BodyConfig(server.url, codec=wire, capture=True), runtime.manifest)
        console.print(f"[dim]cloud: {server.url}  device: head + tail of {runtime.config.model_type}[/]")
        console.print(f"[bold]> {prompt}[/]")
        result = runtime.generate(
            body, prompt, SamplingParams(max_new_tokens=max_new_tokens),
            on_text=lambda text: console.out(text, end="", highlight=False),
        )
        console.out("")
        body.close()
    finally:
        server.stop()
    _demo_table(console, runtime, body, result, prompt, wire)


def _demo_table(console, runtime, body, result, prompt, wire) -> None:
    """Where layers ran, what crossed per token, where the time went, and a plaintext check."""
    from statistics import median

    from rich.table import Table

    from lambdasplit.device.leakcheck import plaintext_found

    spec = runtime.spec
    layers = Table("part", "layers", "ran on", title="Split")
    for role, where in (("head", "device"), ("body", "cloud"), ("tail", "device")):
        start, stop = spec.range(role)
        extra = {"head": " + embeddings", "tail": " + norm + LM head", "body": ""}[role]
        layers.add_row(role, f"{start}..{stop - 1}{extra}" if stop > start else f"none{extra}", where)
    console.print(layers)
    steps = body.stats.per_step
    decode = result.timings.steps[1:] or result.timings.steps
    ms = lambda values: f"{1000 * median(values):.2f} ms"  # noqa: E731
    traffic = Table("", "value", title=f"Per token ({len(result.token_ids[0])} generated, codec {wire.name.lower()})")
    traffic.add_row("prefill bytes to / from cloud", f"{steps[0][0]:,} / {steps[0][1]:,}")
    if len(steps) > 1:
        traffic.add_row("decode bytes per token to / from cloud", f"{steps[1][0]:,} / {steps[1][1]:,}")
    traffic.add_row("latency: head (device)", ms([s[0] for s in decode]))
    traffic.add_row("latency: network + body (cloud)", ms([s[1] for s in decode]))
    traffic.add_row("latency: tail (device)", ms([s[2] for s in decode]))
    traffic.add_row("decode tokens/s", f"{result.timings.tokens_per_second:.1f}")
    console.print(traffic)
    found = plaintext_found(body.captured or [], [prompt, result.text], result.prompt_token_ids + result.token_ids)
    frames = len(body.captured or [])
    for what, hit in found.items():
        verdict = "[red]FOUND[/]" if hit else "[green]not found[/]"
        console.print(f"plaintext check, {what} of prompt and answer in {frames} captured frames: {verdict}")
    console.print(
        "[yellow]Note:[/] hidden states of a public model can still be inverted by the cloud; "
        "measured in docs/privacy.md (lambdasplit audit)."
    )
