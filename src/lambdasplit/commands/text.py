"""Text commands: generate, train-draft, info, export."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lambdasplit import defaults
from lambdasplit.commands.options import (
    BlocksOpt,
    CaOpt,
    DeviceOpt,
    DraftOpt,
    DtypeOpt,
    MaxNewTokensOpt,
    ModelOpt,
    ModeOpt,
    PipelineOpt,
    QuantizeOpt,
    RangeSplitOpt,
    ReconnectOpt,
    ServerOpt,
    ShallowOpt,
    SpeculateOpt,
    SplitOpt,
    TokenOpt,
    body_client,
    check_local_body,
    check_positive,
    check_text,
    check_text_file,
    device_split,
    point,
    prompt_text,
    warn_without_chat_template,
)
from lambdasplit.errors import LambdaSplitError


def generate(
    prompt: Annotated[Optional[str], typer.Argument(
        callback=check_text, help="The prompt (the chat template is applied unless --raw); - reads it from standard input.",
    )] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="Read the prompt from this UTF-8 file.")] = None,
    model: ModelOpt = None,
    split: RangeSplitOpt = None,
    max_new_tokens: MaxNewTokensOpt = defaults.MAX_NEW_TOKENS,
    greedy: Annotated[bool, typer.Option("--greedy", help="Deterministic argmax decoding (the default).")] = False,
    temperature: Annotated[Optional[float], typer.Option(help="Sample with this temperature.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling.")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample among the k likeliest tokens (0: no top-k filter, as in transformers; alone it keeps greedy decoding).")] = None,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty")] = defaults.REPETITION_PENALTY,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop at this string (repeatable).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming text.")] = False,
    codec: Annotated[str, typer.Option(help="Wire codec for hidden states: fp32, bf16, fp16, int8 (lossy).")] = defaults.CODEC,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    allow_shallow: ShallowOpt = False,
    server: ServerOpt = None,
    token_file: TokenOpt = None,
    tls_ca: CaOpt = None,
    reconnect_window: ReconnectOpt = defaults.RECONNECT_WINDOW,
    noise: Annotated[Optional[float], typer.Option(callback=check_positive, help="Defense: Gaussian noise on h_K, sigma relative to each position's RMS (costs quality; see docs/privacy.md).")] = None,
    noise_on: Annotated[str, typer.Option("--noise-on", help="Positions that get noise: all, prompt or decode.")] = defaults.NOISE_ON,
    speculate: SpeculateOpt = None,
    draft_tokens: DraftOpt = None,
    pseudonymize: Annotated[bool, typer.Option("--pseudonymize", help="Defense: replace names, e-mails, numbers and other identifiers with stand-ins on the device and restore them in the answer (see docs/privacy.md).")] = False,
    decoys: Annotated[int, typer.Option("--decoys", min=0, help="Defense: run the prompt among N decoy rows that differ in its identifiers (every row runs to --max-new-tokens).")] = 0,
) -> None:
    """Generate text with the split model; the body runs on --server, or in this process without it."""
    from lambdasplit.device.runtime import SplitRuntime
    from lambdasplit.device.sampling import SamplingParams
    from lambdasplit.wire.codec import Codec

    prompt = prompt_text(prompt, prompt_file)
    sampling_given = _asks_to_sample(temperature, top_p, top_k)
    if greedy and sampling_given:
        raise LambdaSplitError("--greedy cannot be combined with --temperature, --top-p or --top-k K > 0")
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        greedy=not sampling_given,
        temperature=temperature if temperature is not None else 1.0,
        top_k=top_k or 0,
        top_p=top_p if top_p is not None else 1.0,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop or ()),
        speculate=speculate,
        draft_tokens=draft_tokens,
    )
    wire = Codec.parse(codec)
    check_local_body(model, server, decoys)
    parts = device_split(split, model, allow_shallow)
    runtime = SplitRuntime.load(model, parts, dtype, allow_shallow=allow_shallow, quantize=quantize)
    if not raw:
        warn_without_chat_template(runtime)
    body = body_client(runtime, model, parts, dtype, wire, allow_shallow, server, token_file, tls_ca,
                 reconnect_window=reconnect_window)
    if noise:
        from lambdasplit.privacy.defenses import GaussianNoise

        if noise_on not in ("all", "prompt", "decode"):
            raise LambdaSplitError("--noise-on must be all, prompt or decode")
        body.uplink_defense = GaussianNoise(noise, noise_on)
    on_text = None if as_json else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    protected = None
    try:
        if pseudonymize or decoys:
            from lambdasplit.privacy.protect import ProtectedChat, Protection

            if raw:
                raise LambdaSplitError("--pseudonymize and --decoys work on chat prompts; drop --raw")
            protected = ProtectedChat(runtime, Protection(pseudonymize, decoys)).generate(
                body, [{"role": "user", "content": prompt}], sampling, on_text=on_text)
            result = protected.result
            result.texts[protected.real_row] = protected.text
        else:
            result = runtime.generate(body, prompt, sampling, raw=raw, on_text=on_text)
    finally:
        body.close()
    row = protected.real_row if protected else 0
    if as_json:
        payload = {
            "text": result.texts[row],
            "prompt_token_ids": result.prompt_token_ids[row],
            "token_ids": result.token_ids[row],
            "finish_reason": result.finish_reasons[row],
            "split": runtime.spec.as_dict(),
            "codec": wire.name.lower(),
            "bytes": {"to_cloud": result.bytes_to_cloud, "from_cloud": result.bytes_from_cloud},
            "timings": result.timings.as_dict(),
            "round_trips": result.round_trips,
            "tokens_per_round_trip": result.tokens_per_round_trip,
        }
        if result.drafting is not None:
            payload["drafting"] = result.drafting
        if protected is not None:
            payload["cloud_prompt"] = protected.cloud_prompt  # what the cloud can recover of the real row
            payload["rows"] = len(protected.rows)
        typer.echo(json.dumps(payload))
    else:
        typer.echo()


def _asks_to_sample(temperature: float | None, top_p: float | None, top_k: int | None) -> bool:
    """Whether generate's options ask for sampling. --top-k 0 is no top-k filter (transformers'
    top_k=0), not a request to sample: alone it used to turn unseeded sampling on."""
    return temperature is not None or top_p is not None or bool(top_k)


def train_draft(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the head (draft_head.safetensors + draft_head.json).")],
    model: ModelOpt = None,
    split: SplitOpt = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", callback=check_text_file, help="JSON list of training prompts (default: --prompt-count generated ones).")] = None,
    prompt_count: Annotated[int, typer.Option("--prompt-count", min=1, help="Generated training prompts (without --prompts).")] = defaults.DRAFT_PROMPT_COUNT,
    epochs: Annotated[int, typer.Option("--epochs", min=1, max=1000, help="Epochs at most (--max-minutes may stop sooner).")] = defaults.DRAFT_EPOCHS,
    device: DeviceOpt = defaults.DEVICE,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Train on the first N prompts only.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=8, max=4096, help="Longest training answer.")] = defaults.DRAFT_MAX_NEW_TOKENS,
    sampled: Annotated[float, typer.Option("--sampled", min=0.0, max=1.0, help="Share of the prompts that also get an answer sampled at --temperature.")] = defaults.DRAFT_SAMPLED,
    temperature: Annotated[float, typer.Option("--temperature", min=0.01, max=2.0, help="Temperature of the sampled answers.")] = defaults.DRAFT_TEMPERATURE,
    gen_batch: Annotated[int, typer.Option("--gen-batch", min=1, help="Prompts answered at once.")] = defaults.DRAFT_GEN_BATCH,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Answers per training step.")] = defaults.DRAFT_BATCH,
    lr: Annotated[float, typer.Option("--lr", min=1e-6, max=1.0)] = defaults.DRAFT_LR,
    heldout_limit: Annotated[Optional[int], typer.Option("--heldout-limit", min=1, help="Measure on the first N held-out chat prompts only.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option("--max-minutes", min=0.1, help="Time budget of the whole run: generation, then training, stop at their share and the head is saved.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Keep the generated answers and features in this file (safetensors) and reuse them when model, prompts and generation settings match.")] = None,
) -> None:
    """Train a draft head for --speculate draft-head:DIR by self-distillation: the model answers the
    prompts, and one decoder layer learns to predict its next final feature and token (EAGLE). --model
    takes a model directory or a .gguf file."""
    from lambdasplit.device.train_draft import TrainSettings
    from lambdasplit.device.train_draft import train_draft as run

    settings = TrainSettings(epochs=epochs, limit=limit, max_new_tokens=max_new_tokens, prompt_count=prompt_count, sampled=sampled,
                             temperature=temperature, gen_batch=gen_batch, batch=batch, lr=lr, heldout_limit=heldout_limit,
                             max_minutes=max_minutes)
    meta = run(model, point(split), out, prompts, device, settings, data)
    held, trained = meta["heldout_chat"], meta["training"]
    typer.echo(f"{out}: {meta['size']['head_parameters']:,} parameters ({meta['size']['ratio']:.1%} of the device's parts); "
               f"{trained['answers']} answers, {trained['epochs']} epochs, loss {trained['epoch_losses'][0]:.3f} -> "
               f"{trained['epoch_losses'][-1]:.3f}; held-out chat {held['tokens_per_round_trip']:.2f} tokens per round trip "
               f"({held['acceptance']:.0%} of drafts accepted)")


def info(model: ModelOpt = None, split: SplitOpt = None, dtype: DtypeOpt = None, quantize: QuantizeOpt = None,
         allow_shallow: ShallowOpt = False) -> None:
    """Show the architecture, L, D, and each part's parameters, bytes and precision, as generate would
    load them with --dtype and --quantize (an exported part: its own by default; a quantized export
    keeps its scheme, a float one is quantized at load)."""
    from rich.console import Console
    from rich.table import Table

    from lambdasplit.split.inspect import part_sizes
    from lambdasplit.split.load import open_source, resolve_dtype, resolve_quantize
    from lambdasplit.split.quantize import check_dtype

    opened = open_source(model, point(split), allow_shallow)
    torch_dtype = resolve_dtype(dtype, opened)
    scheme = resolve_quantize(quantize, opened)
    check_dtype(scheme, torch_dtype)
    sizes = part_sizes(opened, torch_dtype, scheme)  # every refusal comes before the first line printed
    config = opened.config
    console = Console()
    console.print(
        f"[bold]{config.model_type}[/]  L = {config.num_hidden_layers}  D = {config.hidden_size}  "
        f"vocab = {config.vocab_size}  dtype = {str(torch_dtype).removeprefix('torch.')}"
    )
    console.print(f"source: {opened.checkpoint.path}", soft_wrap=True)
    table = Table("part", "runs on", "layers", "parameters", "bytes", "precision")
    for role, size in sizes.items():
        start, stop = opened.spec.range(role)
        where = "cloud" if role == "body" else "device"
        table.add_row(role, where, f"[{start}, {stop})", f"{size.parameters:,}", f"{size.bytes / 2**20:.1f} MiB", size.precision)
    console.print(table)


def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (gets device/ and cloud/).")],
    model: ModelOpt = None,
    split: SplitOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    allow_shallow: ShallowOpt = False,
    pipeline: PipelineOpt = None,
    mode: ModeOpt = defaults.DIFFUSION_MODE,
    k: BlocksOpt = defaults.UNET_OUTER_BLOCKS,
    force: Annotated[
        bool, typer.Option("--force", help="Delete what --out already holds first (refused for /, $HOME and the like).")
    ] = False,
) -> None:
    """Write the device part and the cloud part to separate directories: head + tail / body for a
    language model, or (with --pipeline) text encoders + VAE (+ outer UNet blocks) / the UNet part.
    --out must be new or empty; every file written is hashed in the part's manifest."""
    if pipeline is not None:
        from lambdasplit.diffusion.parts import export_pipeline
        from lambdasplit.split.manifest import dtype_named

        if model is not None or split is not None or quantize is not None:
            raise LambdaSplitError("--pipeline exports a diffusion pipeline; drop --model, --split and --quantize")
        written = export_pipeline(pipeline, mode, k, out, dtype_named(dtype), force=force)
    else:
        from lambdasplit.split.export import export_parts

        written = export_parts(model, point(split), out, dtype, allow_shallow, force=force, quantize=quantize)
    for side, directory in written.items():
        typer.echo(f"{side}: {directory}")
