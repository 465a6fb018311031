"""The `lambdasplit` command line: export, info, generate, demo."""

from __future__ import annotations

import errno
import functools
import json
import logging
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lambdasplit import defaults
from lambdasplit.errors import LambdaSplitError

app = typer.Typer(
    help="Split inference: head and tail on this device, the body in the cloud; only hidden states cross.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_SPLIT = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*$")
_RANGE_SPLIT = re.compile(r"^\s*(\d+)\s*(-\s*(\d+)\s*)?,\s*(\d+)\s*$")


def _check_split(value):
    """--split K,M: two non-negative integers (range checks against L come later, with the model)."""
    for text in value if isinstance(value, list) else [value]:
        if text is not None and not _SPLIT.match(text):
            raise typer.BadParameter(f"{text!r}: expected K,M with two non-negative integers, e.g. 2,2")
    return value


def _check_range_split(value: str | None) -> str | None:
    if value is not None and not _RANGE_SPLIT.match(value):
        raise typer.BadParameter(
            f"{value!r}: expected K,M or KMIN-KMAX,M with non-negative integers, e.g. 2,2 or 1-4,2"
        )
    return value


def _check_server(value: str | None) -> str | None:
    """--server ws://HOST:PORT or wss://HOST:PORT, checked before any model is loaded."""
    if value is None:
        return value
    from urllib.parse import urlsplit

    try:
        url = urlsplit(value)
        url.port  # noqa: B018  (raises ValueError for a port out of range or not a number)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is not a valid URL ({exc}); expected ws://HOST:PORT or wss://HOST:PORT") from None
    if url.scheme not in ("ws", "wss") or not url.hostname:
        raise typer.BadParameter(f"{value!r}: expected ws://HOST:PORT or wss://HOST:PORT")
    return value


def _check_text_file(value: Path | None) -> Path | None:
    """A token or key file: readable and UTF-8 (read_token checks its length)."""
    if value is None:
        return value
    try:
        value.read_bytes().decode("utf-8")
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {value}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise typer.BadParameter(f"{value} is not UTF-8 text; a token file holds one line of text") from None
    return value


def _check_text(value: str | None) -> str | None:
    """A prompt from the command line: bytes that are not UTF-8 reach Python as lone surrogates."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise typer.BadParameter("the text is not valid UTF-8; check the terminal's or the file's encoding") from None
    return value


def _check_positive(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value:g} is not a positive number")
    return value


def _check_device(value: str) -> str:
    """cpu, cuda or cuda:N (mps where torch has it), and only a GPU that is there."""
    if value == "cpu":
        return value
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise typer.BadParameter(f"{value!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise typer.BadParameter(f"{value!r}: no CUDA GPU is available here (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise typer.BadParameter(f"{value!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise typer.BadParameter(f"{value!r}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise typer.BadParameter(f"{value!r}: expected cpu, cuda or cuda:N")
    return value


ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model directory, .gguf file or exported part; default: embedded SmolLM2-135M-Instruct."),
]
SplitOpt = Annotated[
    Optional[str],
    typer.Option("--split", callback=_check_split, help="K,M: K layers in the head, M in the tail (default 2,2)."),
]
RangeSplitOpt = Annotated[
    Optional[str],
    typer.Option(
        "--split",
        callback=_check_range_split,
        help="K,M: K layers in the head, M in the tail (default 2,2). KMIN-KMAX,M randomises the split: "
        "the device draws K per session with `secrets`, and the server hosts every body in the range.",
    ),
]
ShallowOpt = Annotated[
    bool, typer.Option("--allow-shallow", help="Allow K=0 or M=0, which expose the prompt or the output trivially.")
]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16: what the parts compute in and send; device and server must agree. Default: an exported part's own, else float32 (export from a .gguf: bfloat16).")]
QuantizeOpt = Annotated[Optional[str], typer.Option("--quantize", help="int8, int4 or gguf-exact: the device's head, tail, LM head and embeddings stored quantized (CPU); the body is unchanged. A quantized export loads quantized. gguf-exact keeps a GGUF's own 4-bit/8-bit grids (Q4_0, Q4_1, Q8_0 blocks of 32; other sources are refused) and gives the float32 split's tokens exactly, computing in float32: slower than float32, int8 and int4.")]
ServerOpt = Annotated[
    Optional[str],
    typer.Option("--server", callback=_check_server, help="Body server URL, ws://HOST:PORT or wss://HOST:PORT."),
]
PipelineOpt = Annotated[
    Optional[str],
    typer.Option(
        "--pipeline",
        help="Diffusers SDXL or SD pipeline directory, an exported part, or tiny-sdxl / tiny-sd "
        "(small offline pipelines with seeded random weights).",
    ),
]
ModeOpt = Annotated[
    str, typer.Option("--mode", help="paper: the cloud runs the whole UNet; unet-split: only its inner blocks.")
]
BlocksOpt = Annotated[int, typer.Option("--k", help="unet-split: outer down/up blocks kept on the device.")]
CodecOpt = Annotated[str, typer.Option(help="Wire codec: fp32, bf16, fp16, int8 (lossy).")]
TokenOpt = Annotated[
    Optional[Path], typer.Option("--token-file", callback=_check_text_file, help="File holding the bearer token.")
]
DeviceOpt = Annotated[str, typer.Option("--device", callback=_check_device, help="cpu or cuda.")]
PortOpt = Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0 picks a free one).")]
CaOpt = Annotated[Optional[Path], typer.Option("--tls-ca", help="CA certificate that signed the server's (wss://).")]
def _check_speculate(value: str | None) -> str | None:
    if value is None or value in ("prompt-lookup", "self", "draft-head"):
        return value
    if value.startswith("draft-head:"):
        if not Path(value.partition(":")[2]).expanduser().is_dir():
            raise typer.BadParameter(f"{value!r}: {value.partition(':')[2]!r} is not a directory (a draft head from train-draft)")
        return value
    if not Path(value).expanduser().exists():
        raise typer.BadParameter(f"{value!r}: expected prompt-lookup, draft-head[:DIR], self, or the path of a draft model")
    return value


SpeculateOpt = Annotated[Optional[str], typer.Option(
    "--speculate", callback=_check_speculate,
    help="Speculative decoding (same output, fewer round trips): prompt-lookup drafts from n-grams of the prompt; "
    "draft-head drafts with the trained head shipped for the embedded model (draft-head:DIR: one from train-draft); "
    "PATH is a small draft model with the same tokenizer; self is refused with its measured acceptance.",
)]
DraftOpt = Annotated[int, typer.Option(
    "--draft-tokens", min=1, max=64, help="First draft length; it then grows after accepted drafts and shrinks after rejections."
)]
ReconnectOpt = Annotated[float, typer.Option(
    "--reconnect-window", min=0, help="Seconds to keep reconnecting (and replaying) after losing the body server."
)]


def _body(device, model, parts, dtype, codec, allow_shallow, server, token_file, tls_ca, **options):
    """The BodyClient: a session on --server, else on the body in this process."""
    from lambdasplit.device.connect import BodyConfig, connect_body

    config = BodyConfig.from_options(
        server, token_file, tls_ca=tls_ca, codec=codec, source=model, split=parts, dtype=dtype,
        allow_shallow=allow_shallow, **options,
    )
    return connect_body(config, device.manifest)


def _check_in_process(model: str | None, server: str | None, decoys: int) -> None:
    """Without --server the body runs in this process: refuse, before anything loads, what cannot
    run there (a device part has no body; decoy rows beyond the in-process --max-batch)."""
    if server is not None:
        return
    if model is not None and Path(model).expanduser().is_dir():
        from lambdasplit.split.manifest import PartManifest

        exported = PartManifest.read(Path(model).expanduser())
        if exported is not None and exported.role == "device":
            raise LambdaSplitError(
                f"{model} is an exported device part (head and tail only): its body runs on a server, so pass "
                "--server ws://HOST:PORT of `lambdasplit serve --part DIR/cloud`"
            )
    if decoys + 1 > defaults.MAX_BATCH:
        raise LambdaSplitError(
            f"--decoys {decoys}: {decoys + 1} rows exceed the {defaults.MAX_BATCH} rows the body in this process runs "
            f"per session; use --decoys {defaults.MAX_BATCH - 1} or fewer, or a --server started with a larger --max-batch"
        )


def _prompt_text(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt: the argument, standard input for `-`, or --prompt-file's text (a long prompt does
    not fit a shell argument comfortably); the final newline a file or pipe ends with is dropped."""
    if (prompt is None) == (prompt_file is None):
        raise LambdaSplitError("give the prompt as an argument, as - (read from standard input) or with --prompt-file F: one of them")
    if prompt_file is not None:
        try:
            data, source = prompt_file.read_bytes(), str(prompt_file)
        except OSError as exc:
            raise LambdaSplitError(f"cannot read the prompt file {prompt_file}: {exc.strerror}") from None
    elif prompt == "-":
        data, source = sys.stdin.buffer.read(), "standard input"
    else:
        return prompt
    try:
        return data.decode("utf-8").removesuffix("\n")
    except UnicodeDecodeError:
        raise LambdaSplitError(f"the prompt in {source} is not UTF-8 text") from None


def _warn_without_chat_template(device) -> None:
    """SplitDevice falls back to the raw prompt when the tokenizer has no chat template (e.g. a GGUF
    without one); an instruction-tuned model then answers worse, so say it once."""
    tokenizer = getattr(device, "_tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None) is None:
        typer.echo(
            f"warning: the tokenizer of {device.opened.checkpoint.path.name} has no chat template; "
            "prompts are sent raw, as with --raw",
            err=True,
        )


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = logging.getLogger("lambdasplit.progress")  # what long work is doing, shown without -v
    if not progress.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lambdasplit: %(message)s"))
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import diffusers
    except ImportError:
        return
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _split(text: str | None) -> tuple[int, int] | None:
    from lambdasplit.split.spec import parse_split

    return parse_split(text) if text else None


def _random_split(text: str | None) -> tuple[int, int] | None:
    """K,M as given, or a K drawn with `secrets` from KMIN-KMAX (the cloud still learns K: it runs
    layers K..L-M; this hides K from an eavesdropper and varies it across sessions)."""
    from lambdasplit.privacy.defenses import random_split_point
    from lambdasplit.split.spec import parse_split_range

    if not text:
        return None
    k_min, k_max, m = parse_split_range(text)
    return random_split_point(k_min, k_max), m


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False) -> None:
    if not _asks_for_help():  # quieting transformers imports it: seconds that `COMMAND --help` does not need
        _quiet_libraries(verbose)


def _asks_for_help(argv: list[str] | None = None) -> bool:
    """`--help` before any `--`: click prints the help and runs nothing else."""
    args = sys.argv[1:] if argv is None else argv
    return "--help" in (args[:args.index("--")] if "--" in args else args)


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(
        callback=_check_text, help="The prompt (the chat template is applied unless --raw); - reads it from standard input.",
    )] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="Read the prompt from this UTF-8 file.")] = None,
    model: ModelOpt = None,
    split: RangeSplitOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 128,
    greedy: Annotated[bool, typer.Option("--greedy", help="Deterministic argmax decoding (the default).")] = False,
    temperature: Annotated[Optional[float], typer.Option(help="Sample with this temperature.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling.")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample among the k likeliest tokens.")] = None,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop at this string (repeatable).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming text.")] = False,
    codec: Annotated[str, typer.Option(help="Wire codec for hidden states: fp32, bf16, fp16, int8 (lossy).")] = "fp32",
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    allow_shallow: ShallowOpt = False,
    server: ServerOpt = None,
    token_file: TokenOpt = None,
    tls_ca: CaOpt = None,
    reconnect_window: ReconnectOpt = defaults.RECONNECT_WINDOW,
    noise: Annotated[Optional[float], typer.Option(callback=_check_positive, help="Defense: Gaussian noise on h_K, sigma relative to each position's RMS (costs quality; see docs/privacy.md).")] = None,
    noise_on: Annotated[str, typer.Option("--noise-on", help="Positions that get noise: all, prompt or decode.")] = "all",
    speculate: SpeculateOpt = None,
    draft_tokens: DraftOpt = 8,
    pseudonymize: Annotated[bool, typer.Option("--pseudonymize", help="Defense: replace names, e-mails, numbers and other identifiers with stand-ins on the device and restore them in the answer (see docs/privacy.md).")] = False,
    decoys: Annotated[int, typer.Option("--decoys", min=0, help="Defense: run the prompt among N decoy rows that differ in its identifiers (every row runs to --max-new-tokens).")] = 0,
) -> None:
    """Generate text with the split model; the body runs on --server, or in this process without it."""
    from lambdasplit.device.generation import GenerationOptions
    from lambdasplit.device.runtime import SplitDevice
    from lambdasplit.wire.codec import Codec

    prompt = _prompt_text(prompt, prompt_file)
    sampling_given = temperature is not None or top_p is not None or top_k is not None
    if greedy and sampling_given:
        raise LambdaSplitError("--greedy cannot be combined with --temperature, --top-p or --top-k")
    sampling = GenerationOptions(
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
    _check_in_process(model, server, decoys)
    parts = _random_split(split)
    device = SplitDevice.load(model, parts, dtype, allow_shallow=allow_shallow, quantize=quantize)
    if not raw:
        _warn_without_chat_template(device)
    body = _body(device, model, parts, dtype, wire, allow_shallow, server, token_file, tls_ca,
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
            protected = ProtectedChat(device, Protection(pseudonymize, decoys)).generate(
                body, [{"role": "user", "content": prompt}], sampling, on_text=on_text)
            result = protected.result
            result.texts[protected.real_row] = protected.text
        else:
            result = device.generate(body, prompt, sampling, raw=raw, on_text=on_text)
    finally:
        body.close()
    row = protected.real_row if protected else 0
    if as_json:
        payload = {
            "text": result.texts[row],
            "prompt_token_ids": result.prompt_token_ids[row],
            "token_ids": result.token_ids[row],
            "finish_reason": result.finish_reasons[row],
            "split": device.spec.as_dict(),
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


@app.command("train-draft")
def train_draft(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the head (draft_head.safetensors + draft_head.json).")],
    model: ModelOpt = None,
    split: SplitOpt = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", callback=_check_text_file, help="JSON list of training prompts (default: --prompt-count generated ones).")] = None,
    prompt_count: Annotated[int, typer.Option("--prompt-count", min=1, help="Generated training prompts (without --prompts).")] = 6000,
    epochs: Annotated[int, typer.Option("--epochs", min=1, max=1000, help="Epochs at most (--max-minutes may stop sooner).")] = 6,
    device: DeviceOpt = "cpu",
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Train on the first N prompts only.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=8, max=4096, help="Longest training answer.")] = 128,
    sampled: Annotated[float, typer.Option("--sampled", min=0.0, max=1.0, help="Share of the prompts that also get an answer sampled at --temperature.")] = 0.0,
    temperature: Annotated[float, typer.Option("--temperature", min=0.01, max=2.0, help="Temperature of the sampled answers.")] = 0.7,
    gen_batch: Annotated[int, typer.Option("--gen-batch", min=1, help="Prompts answered at once.")] = 32,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Answers per training step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", min=1e-6, max=1.0)] = 1e-3,
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
    meta = run(model, _split(split), out, prompts, device, settings, data)
    held, trained = meta["heldout_chat"], meta["training"]
    typer.echo(f"{out}: {meta['size']['head_parameters']:,} parameters ({meta['size']['ratio']:.1%} of the device's parts); "
               f"{trained['answers']} answers, {trained['epochs']} epochs, loss {trained['epoch_losses'][0]:.3f} -> "
               f"{trained['epoch_losses'][-1]:.3f}; held-out chat {held['tokens_per_round_trip']:.2f} tokens per round trip "
               f"({held['acceptance']:.0%} of drafts accepted)")


@app.command()
def info(model: ModelOpt = None, split: SplitOpt = None, dtype: DtypeOpt = None, quantize: QuantizeOpt = None,
         allow_shallow: ShallowOpt = False) -> None:
    """Show the architecture, L, D, and each part's parameters, bytes and precision (as stored in an
    exported part; otherwise as --dtype / --quantize would store them)."""
    from rich.console import Console
    from rich.table import Table

    from lambdasplit.split.inspect import part_sizes
    from lambdasplit.split.load import open_source, resolve_dtype, resolve_quantize

    opened = open_source(model, _split(split), allow_shallow)
    torch_dtype = resolve_dtype(dtype, opened)
    config = opened.config
    console = Console()
    console.print(
        f"[bold]{config.model_type}[/]  L = {config.num_hidden_layers}  D = {config.hidden_size}  "
        f"vocab = {config.vocab_size}  dtype = {str(torch_dtype).removeprefix('torch.')}"
    )
    console.print(f"source: {opened.checkpoint.path}", soft_wrap=True)
    table = Table("part", "runs on", "layers", "parameters", "bytes", "precision")
    for role, size in part_sizes(opened, torch_dtype, resolve_quantize(quantize, opened)).items():
        start, stop = opened.spec.range(role)
        where = "cloud" if role == "body" else "device"
        table.add_row(role, where, f"[{start}, {stop})", f"{size.parameters:,}", f"{size.bytes / 2**20:.1f} MiB", size.precision)
    console.print(table)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (gets device/ and cloud/).")],
    model: ModelOpt = None,
    split: SplitOpt = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    allow_shallow: ShallowOpt = False,
    pipeline: PipelineOpt = None,
    mode: ModeOpt = "paper",
    k: BlocksOpt = 1,
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
        for side, directory in written.items():
            typer.echo(f"{side}: {directory}")
        return
    from lambdasplit.split.export import export_parts

    written = export_parts(model, _split(split), out, dtype, allow_shallow, force=force, quantize=quantize)
    for side, directory in written.items():
        typer.echo(f"{side}: {directory}")


@app.command()
def serve(
    part: Annotated[Optional[Path], typer.Option("--part", help="Exported cloud part (DIR/cloud).")] = None,
    model: ModelOpt = None,
    split: RangeSplitOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback requires a token.")] = "127.0.0.1",
    port: PortOpt = 8470,
    token_file: TokenOpt = None,
    tls_cert: Annotated[Optional[Path], typer.Option("--tls-cert", help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Optional[Path], typer.Option("--tls-key", help="Server private key (PEM).")] = None,
    max_sessions: Annotated[int, typer.Option("--max-sessions", min=1, help="Concurrent sessions.")] = 64,
    session_ttl: Annotated[float, typer.Option(
        "--session-ttl", callback=_check_positive, help="Idle seconds before a session expires."
    )] = 300.0,
    max_context: Annotated[Optional[int], typer.Option(
        "--max-context", min=1, help="Positions per session row (default: the model's context window)."
    )] = None,
    min_free_memory_mb: Annotated[int, typer.Option("--min-free-memory", min=0, help="Refuse sessions below this many MiB free.")] = 512,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Rows (B) per session.")] = defaults.MAX_BATCH,
    max_frame_positions: Annotated[int, typer.Option(
        "--max-frame-positions", min=1, help="Positions (B x T) per frame; bounds how long one frame holds the compute thread."
    )] = defaults.MAX_FRAME_POSITIONS,
    max_session_kv: Annotated[int, typer.Option(
        "--max-session-kv", min=1, help="MiB of body KV cache one session may hold."
    )] = defaults.MAX_SESSION_KV_MIB,
    step_tokens: Annotated[int | None, typer.Option(
        "--step-tokens", min=1,
        help="Positions one batched body step runs: every session's decode step, then prefill chunks up to this "
             "budget (default 256 on a GPU, 64 on the CPU).",
    )] = None,
    kv_pool: Annotated[int | None, typer.Option(
        "--kv-pool", min=1,
        help="MiB of the KV pool every session's body cache lives in (default: what --max-sessions sessions at "
             "--max-session-kv need, capped at 90% of free GPU memory or half the free host memory).",
    )] = None,
    cuda_graphs: Annotated[bool, typer.Option(
        "--cuda-graphs/--no-cuda-graphs", help="On a GPU, replay captured batched decode steps (CUDA graphs)."
    )] = True,
    kv_wait: Annotated[float, typer.Option(
        "--kv-wait", min=0, help="Seconds a frame waits for KV pool space before a capacity error."
    )] = defaults.KV_WAIT_SECONDS,
    step_wait: Annotated[float, typer.Option(
        "--step-wait", min=0,
        help="Milliseconds the next batched step waits, from its first frame, for the sessions the last step "
             "answered to send their next frame (fewer, fuller steps; 0: start on whatever has arrived).",
    )] = defaults.STEP_WAIT_SECONDS * 1000,
    stall_timeout: Annotated[float, typer.Option(
        "--stall-timeout", callback=_check_positive,
        help="Seconds the compute loop may spend in one step before /healthz answers 503 (a wedged engine).",
    )] = defaults.STALL_TIMEOUT_SECONDS,
    uvloop: Annotated[bool, typer.Option(
        "--uvloop/--no-uvloop", help="Run the network on uvloop's event loop (C; less host time per frame) when it is installed."
    )] = True,
    engine_process: Annotated[bool, typer.Option(
        "--engine-process/--in-process",
        help="Run the scheduler and the model in their own process, apart from the network front end (not with "
             "--tensor-parallel). Off by default: measured, it still costs throughput (one H100, 64 sessions: "
             "985-1,317 tok/s against 1,572 in one process; on 2 CPU cores 13-26%).",
    )] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = None,
    insecure_no_auth: Annotated[bool, typer.Option("--insecure-no-auth", help="Allow a non-loopback bind without a token.")] = False,
    allow_shallow: ShallowOpt = False,
    pipeline: PipelineOpt = None,
    mode: ModeOpt = "paper",
    k: BlocksOpt = 1,
    tensor_parallel: Annotated[int, typer.Option(
        "--tensor-parallel", min=1,
        help="Cut the body's layers over this many GPUs of this host (torch.distributed, NCCL); relaunches itself "
             "under torchrun, rank 0 serves the network.",
    )] = 1,
) -> None:
    """Serve the body to devices over WebSocket (one persistent connection per device): a language
    model's middle layers, or with --pipeline a diffusion UNet (paper) or its inner blocks (unet-split)."""
    import asyncio

    from lambdasplit.cloud.server import BodyServer, ServerConfig
    from lambdasplit.engine.loading import load_scheduler
    from lambdasplit.engine.scheduler import SchedulerLimits
    from lambdasplit.security import is_loopback, read_token, server_ssl_context

    if part is not None and model is not None:
        raise LambdaSplitError("give either --part or --model, not both")
    tp = _tensor_parallel(tensor_parallel, pipeline)
    if tp is not None and not tp.leader:
        from lambdasplit.engine.loading import follow_leader
        from lambdasplit.split.spec import parse_split_range

        k_min, _, m = parse_split_range(split) if split else (None, None, None)
        follow_leader(str(part) if part else model, (k_min, m) if split else None, dtype, tp, allow_shallow)
        return
    token = read_token(token_file)
    if token is None and not is_loopback(host) and not insecure_no_auth:
        raise LambdaSplitError(
            f"refusing to serve on {host} without authentication; pass --token-file F "
            "(or --insecure-no-auth on a network you trust)"
        )
    _check_bindable(host, port)  # before the model loads: a taken port fails in a second, not after it
    limits = SchedulerLimits(
        max_sessions, max_context, min_free_memory_mb << 20, max_batch, max_frame_positions, max_session_kv << 20,
        step_tokens, kv_pool << 20 if kv_pool else None, kv_wait, step_wait / 1000, stall_timeout,
    )
    if pipeline is not None:
        from lambdasplit.diffusion.cloud import load_diffusion_scheduler

        if part is not None or model is not None or split is not None:
            raise LambdaSplitError("--pipeline serves a diffusion UNet; drop --part, --model and --split")
        build, args = load_diffusion_scheduler, (pipeline, mode, k, dtype, device, limits)
    else:
        from lambdasplit.split.spec import parse_split_range

        k_min, k_max, m = parse_split_range(split) if split else (None, None, None)
        parts = (k_min, m) if split else None
        build, args = load_scheduler, (
            str(part) if part else model, parts, dtype, device, limits, allow_shallow, k_max if k_max != k_min else None,
            cuda_graphs, tp,
        )
    config = ServerConfig(host, port, token, server_ssl_context(tls_cert, tls_key), session_ttl)
    if engine_process and tp is None:
        from lambdasplit.engine.core import EngineClient

        scheduler = EngineClient.start(build, *args, max_frame_bytes=config.max_frame_bytes,
                                       setup=functools.partial(_quiet_libraries, logging.getLogger().level <= logging.INFO))
    else:
        scheduler = build(*args)
    server = BodyServer(scheduler, config)

    async def run() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(server.run(ready))
        # A bind failure ends the task before `ready` is set: wait for whichever comes first, so the
        # error surfaces instead of the process waiting forever on an event nobody will set.
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.is_set():
            waiting.cancel()
            await task  # raises the OSError
            raise LambdaSplitError("the body server stopped before it was listening")
        typer.echo(f"lambdasplit body server listening on {server.url} ({_serving(scheduler)})")
        sys.stdout.flush()
        await task

    try:
        _event_loop(uvloop)(run())
    except OSError as exc:
        raise _bind_error(host, port, exc) from None


def _event_loop(use_uvloop: bool):
    """uvloop.run where asked for and installed (its loop and transports are C: on the serving
    benchmark the asyncio machinery was the largest share of the event loop thread), else asyncio.run."""
    import asyncio

    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            logging.getLogger(__name__).info("uvloop is not installed; serving on asyncio's event loop")
        else:
            return uvloop.run
    return asyncio.run


def _tensor_parallel(ranks: int, pipeline: str | None):
    """This process's tensor-parallel group for `--tensor-parallel N`: relaunch under torchrun
    (which starts N copies of this command) unless already inside it."""
    import os

    if ranks == 1:
        return None
    if pipeline is not None:
        raise LambdaSplitError("--tensor-parallel serves text bodies only; drop --pipeline")
    if "WORLD_SIZE" not in os.environ:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "lambdasplit.cli", *sys.argv[1:]]
        os.execv(sys.executable, args)
    from lambdasplit.engine.parallel import TensorParallel

    tp = TensorParallel.from_env()
    if tp is None or tp.world != ranks:
        raise LambdaSplitError(f"--tensor-parallel {ranks} inside a torchrun group of {os.environ['WORLD_SIZE']}")
    return tp


def _bind_error(host: str, port: int, exc: OSError) -> LambdaSplitError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        reason += " (another process holds it; pick another --port, or 0 for a free one)"
    return LambdaSplitError(f"cannot listen on {host}:{port}: {reason}")


def _check_bindable(host: str, port: int) -> None:
    """Bind and release (host, port) the way the server will (SO_REUSEADDR, every address of host)."""
    import socket

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise LambdaSplitError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise _bind_error(host, port, exc) from None


def _serving(scheduler) -> str:
    first, *others = [body.manifest for body in scheduler.bodies]
    return first.summary(others)


@app.command()
def image(
    prompt: Annotated[str, typer.Argument(callback=_check_text, help="What to draw.")],
    pipeline: PipelineOpt = None,
    mode: ModeOpt = "paper",
    k: BlocksOpt = 1,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 20,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (<= 1 turns it off).")] = 5.0,
    seed: Annotated[int, typer.Option(help="Seed for the initial latents.")] = 0,
    size: Annotated[Optional[str], typer.Option(help="WxH in pixels (default: the pipeline's).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("image.png"),
    codec: Annotated[str, typer.Option(help="Wire codec for per-step tensors: fp32, bf16, fp16, int8 (lossy).")] = "fp32",
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    server: ServerOpt = None,
    token_file: TokenOpt = None,
    tls_ca: CaOpt = None,
) -> None:
    """Generate an image with a split diffusion pipeline; the UNet (part) runs on --server, or in this process."""
    from rich.progress import Progress

    from lambdasplit.diffusion.device import SplitPipeline
    from lambdasplit.security import read_token
    from lambdasplit.wire.codec import Codec

    width_height = _size(size) if size else None
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


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise LambdaSplitError(f"--size {text!r}: expected WxH, e.g. 1024x1024") from None
    if width <= 0 or height <= 0:
        raise LambdaSplitError(f"--size {text!r}: width and height must be positive")
    return width, height


@app.command()
def certs(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for ca.pem, server.pem, server-key.pem.")],
    host: Annotated[Optional[list[str]], typer.Option("--host", help="Name or IP the certificate is for (repeatable).")] = None,
) -> None:
    """Make a self-signed CA and a server certificate, for trying TLS out."""
    from lambdasplit.security import make_certificates

    try:
        paths = make_certificates(out, host or ["localhost", "127.0.0.1"])
    except OSError as exc:
        raise LambdaSplitError(f"cannot write the certificates to {out}: {exc.strerror or exc}") from None
    typer.echo(f"CA: {paths['ca']}\ncertificate: {paths['cert']}\nkey: {paths['key']}")


@app.command()
def demo(
    prompt: Annotated[str, typer.Argument(callback=_check_text, help="What to ask.")] = "What is the capital of France?",
    model: ModelOpt = None,
    split: SplitOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 64,
    codec: Annotated[str, typer.Option(help="Wire codec: fp32 (exact), bf16, fp16, int8 (lossy).")] = "fp32",
) -> None:
    """Start a body server on loopback in a child process, run the device against it, show what crossed."""
    from rich.console import Console

    from lambdasplit.cloud.process import ServerProcess
    from lambdasplit.device.connect import BodyConfig, connect_body
    from lambdasplit.device.generation import GenerationOptions
    from lambdasplit.device.runtime import SplitDevice
    from lambdasplit.wire.codec import Codec

    console = Console()
    parts = _split(split) or (2, 2)
    wire = Codec.parse(codec)
    server_args = ["--split", f"{parts[0]},{parts[1]}"] + (["--model", model] if model else [])
    with console.status("starting the body server (cloud) in a child process..."):
        server = ServerProcess(*server_args)
    try:
        with console.status("loading the head and tail (device)..."):
            device = SplitDevice.load(model, parts)
        _warn_without_chat_template(device)
        body = connect_body(BodyConfig(server.url, codec=wire, capture=True), device.manifest)
        console.print(f"[dim]cloud: {server.url}  device: head + tail of {device.config.model_type}[/]")
        console.print(f"[bold]> {prompt}[/]")
        result = device.generate(
            body, prompt, GenerationOptions(max_new_tokens=max_new_tokens),
            on_text=lambda text: console.out(text, end="", highlight=False),
        )
        console.out("")
        body.close()
    finally:
        server.stop()
    _demo_table(console, device, body, result, prompt, wire)


def _demo_table(console, device, body, result, prompt, wire) -> None:
    """Where layers ran, what crossed per token, where the time went, and a plaintext check."""
    from statistics import median

    from rich.table import Table

    from lambdasplit.device.leakcheck import plaintext_found

    spec = device.spec
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


@app.command()
def gateway(
    server: Annotated[str, typer.Option("--server", callback=_check_server, help="Body server URL, ws://HOST:PORT or wss://HOST:PORT.")],
    model: ModelOpt = None,
    split: SplitOpt = None,
    host: Annotated[str, typer.Option(help="Address for the HTTP API (keep it on loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="HTTP port.")] = 8471,
    token_file: TokenOpt = None,
    tls_ca: CaOpt = None,
    reconnect_window: ReconnectOpt = defaults.RECONNECT_WINDOW,
    codec: CodecOpt = "fp32",
    api_key_file: Annotated[Optional[Path], typer.Option("--api-key-file", callback=_check_text_file, help="Require this key from API clients.")] = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    speculate: SpeculateOpt = None,
    draft_tokens: DraftOpt = 8,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="Model id for API clients (default: the model file's or directory's name).")] = None,
    conversations: Annotated[int, typer.Option(min=0, help="Conversations whose body session is kept for their next turn (0: off); each holds a session on the body server.")] = 16,
    pseudonymize: Annotated[bool, typer.Option("--pseudonymize", help="Defense: replace names, e-mails, numbers and other identifiers in chat requests with stand-ins on the device and restore them in the answer (see docs/gateway.md).")] = False,
    decoys: Annotated[int, typer.Option("--decoys", min=0, max=defaults.MAX_BATCH - 1, help="Defense: run each chat request among N decoy rows that differ in its identifiers (every row runs to max_tokens).")] = 0,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /health) backed by split inference; see docs/gateway.md."""
    import uvicorn

    from lambdasplit.device.connect import BodyConfig, connect_body
    from lambdasplit.device.runtime import SplitDevice
    from lambdasplit.gateway.app import create_app, default_model_name
    from lambdasplit.gateway.protected import flags as protected_flags
    from lambdasplit.privacy.protect import Protection
    from lambdasplit.security import is_loopback, read_token
    from lambdasplit.wire.codec import Codec

    api_key = read_token(api_key_file)
    if api_key is None and not is_loopback(host):
        raise LambdaSplitError(f"refusing to expose the gateway on {host} without --api-key-file")
    _check_bindable(host, port)  # one line now, not a banner and then uvicorn's raw [Errno 98]
    device = SplitDevice.load(model, _split(split), dtype, quantize=quantize)
    _warn_without_chat_template(device)
    config = BodyConfig.from_options(server, token_file, tls_ca=tls_ca, codec=Codec.parse(codec),
                                     reconnect_window=reconnect_window)
    connect = functools.partial(connect_body, config, device.manifest)  # one body session per request
    name = model_name or default_model_name(model, device.opened.exported is not None)
    protection = Protection(pseudonymize, decoys)
    defenses = f", defenses: {protected_flags(protection)}" if protection.active else ""
    typer.echo(f"lambdasplit gateway: http://{host}:{port}/v1 (model {name}{defenses}) -> body at {server}")
    app_ = create_app(device, connect, name, api_key, speculate=speculate, draft_tokens=draft_tokens, conversations=conversations,
                      protection=protection)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
def audit(
    model: ModelOpt = None,
    split: Annotated[Optional[list[str]], typer.Option("--split", callback=_check_split, help="K,M to audit (repeatable); default 1,1 2,2 4,4 8,8.")] = None,
    attacks: Annotated[str, typer.Option(help="Comma-separated: tail-replay, vocab-matching, split-probing, learned-inversion.")] = "tail-replay,vocab-matching,split-probing,learned-inversion",
    defenses: Annotated[str, typer.Option(help="Comma-separated: none, tls, random-split, int8, noise-0.1, noise-0.3, noise-1.0, noise-1.0-prompt.")] = "all",
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.md, report.json, pareto.png.")] = Path("audit"),
    prompts: Annotated[Optional[int], typer.Option(help="Use only the first N prompts of the set.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 24,
    inversion_steps: Annotated[int, typer.Option(help="Training steps of the learned inverter per K.")] = 300,
    pipeline: Annotated[Optional[str], typer.Option("--pipeline", help="Audit a split diffusion pipeline instead (a directory, tiny-sdxl or tiny-sd): image leakage per mode and K.")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps of the audited image (with --pipeline).")] = 20,
    quick: Annotated[bool, typer.Option(help="Reduced audit: 3 prompts, splits 1,1 and 4,4, four defenses; about 10 minutes on a laptop CPU (the full audit takes hours).")] = False,
    identifiers: Annotated[bool, typer.Option("--identifiers", help="Audit pseudonymisation and decoy rows instead, on the held-out identifier set (one split: the first --split, default 2,2).")] = False,
    identifier_set: Annotated[str, typer.Option("--identifier-set", help="With --identifiers: heldout or tune.")] = "heldout",
    decoys: Annotated[str, typer.Option("--decoys", help="With --identifiers: decoy counts N to measure, comma-separated.")] = "1,3,7",
    attack_prompts: Annotated[int, typer.Option("--attack-prompts", help="With --identifiers: prompts whose captured frames are attacked.")] = 12,
) -> None:
    """Measure what a curious cloud or an eavesdropper recovers from the hidden states, per defense."""
    from rich.console import Console
    from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

    from lambdasplit.privacy.audit import ATTACKS, DEFENSES, AuditConfig, run_audit
    from lambdasplit.privacy.report import write_report

    if pipeline is not None:
        from lambdasplit.privacy.diffusion import audit_pipeline

        with Progress() as progress:
            task = progress.add_task("auditing", total=None)
            audit_pipeline(pipeline, "a lighthouse at dusk, oil painting", steps, out,
                           lambda label: progress.update(task, description=label))
        typer.echo(f"wrote {out / 'diffusion.md'}, {out / 'diffusion.json'}")
        return

    if identifiers:
        from lambdasplit.privacy.pii_audit import PiiAuditConfig, run_pii_audit
        from lambdasplit.privacy.report import write_pii_report

        if identifier_set not in ("heldout", "tune"):
            raise LambdaSplitError("--identifier-set must be heldout or tune")
        pii_config = PiiAuditConfig(source=model, split=_split(split[0]) if split else (2, 2), prompt_set=identifier_set, prompts=prompts,
                                    attack_prompts=attack_prompts, decoys=tuple(int(n) for n in decoys.split(",")), max_new_tokens=max_new_tokens)
        with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True)) as progress:
            task = progress.add_task("auditing identifiers", total=None)
            result = run_pii_audit(pii_config, lambda label, done, total: progress.update(task, description=label, completed=done, total=total))
        paths = write_pii_report(result, out, "lambdasplit " + " ".join(sys.argv[1:]))
        typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")
        return

    config = AuditConfig(source=model, max_new_tokens=max_new_tokens, prompts=prompts, inversion_steps=inversion_steps)
    if quick:
        config.splits, config.prompts, config.max_new_tokens = [(1, 1), (4, 4)], prompts or 3, 12
        config.inversion_steps = min(inversion_steps, 100)
        config.defenses = ["none", "tls", "int8", "noise-1.0"]
    if split:
        config.splits = [_split(s) for s in split]
    if defenses != "all":
        config.defenses = [d.strip() for d in defenses.split(",")]
    config.attacks = [a.strip() for a in attacks.split(",")]
    unknown = [d for d in config.defenses if d not in DEFENSES] + [a for a in config.attacks if a not in ATTACKS]
    if unknown:
        raise LambdaSplitError(f"unknown defense or attack: {', '.join(unknown)}")
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True)) as progress:
        # Units: each generation (reference or attacked run), quality pass and inverter training;
        # the audit reports done/total itself, the total growing if the attacks need another inverter.
        task = progress.add_task("auditing", total=None)

        def report(label: str, done: int, total: int) -> None:
            progress.update(task, description=label, completed=done, total=total)

        result = run_audit(config, progress=report)
    command = "lambdasplit " + " ".join(sys.argv[1:])
    paths = write_report(result, out, command)
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command()
def ui(
    server: ServerOpt = None,
    model: ModelOpt = None,
    split: SplitOpt = None,
    host: Annotated[str, typer.Option(help="Address for the web page (keep it on loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="HTTP port.")] = 8472,
    token_file: TokenOpt = None,
    tls_ca: CaOpt = None,
    codec: CodecOpt = "fp32",
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    pipeline: PipelineOpt = None,
    image_server: Annotated[Optional[str], typer.Option("--image-server", callback=_check_server, help="Body server for the image tab (started with serve --pipeline); default: in this process.")] = None,
    image: Annotated[bool, typer.Option("--image/--no-image", help="Enable the image tab.")] = True,
    speculate: SpeculateOpt = None,
    draft_tokens: DraftOpt = 8,
    pseudonymize: Annotated[bool, typer.Option("--pseudonymize", help="Defense: chats are pseudonymised on the device (identifiers replaced by stand-ins, restored in the answer); the panel shows what the cloud can recover.")] = False,
    decoys: Annotated[int, typer.Option("--decoys", min=0, help="Defense: each chat runs among N decoy rows that differ in its identifiers.")] = 0,
) -> None:
    """Serve the web UI: chat and image generation through the split model, showing what crosses the network."""
    import uvicorn

    from lambdasplit.device.runtime import SplitDevice
    from lambdasplit.security import is_loopback, read_token
    from lambdasplit.ui.app import create_ui, load_audit
    from lambdasplit.wire.codec import Codec

    if not is_loopback(host):
        raise LambdaSplitError(f"the UI has no login; refusing to serve it on {host} (keep it on 127.0.0.1)")
    _check_bindable(host, port)
    _check_in_process(model, server, decoys)
    token = read_token(token_file)
    wire = Codec.parse(codec)
    parts = _split(split)
    device = SplitDevice.load(model, parts, dtype, quantize=quantize)
    _warn_without_chat_template(device)
    # The UI gives up on an unreachable server within seconds, so the page says why instead of waiting.
    def connect():  # one body session per conversation of the page
        return _body(device, model, parts, dtype, wire, False, server, token_file, tls_ca, connect_timeout=5.0,
                     reconnect_window=5.0)

    connect().close()  # an in-process body loads now rather than on the first message; a remote one connects lazily
    load_image = _image_loader(pipeline, image_server, token, tls_ca, wire) if image else None
    info = {"model": model or "SmolLM2-135M-Instruct", "server": server, "image_server": image_server,
            "image_note": _image_note(pipeline, image_server)}
    audit = load_audit(device.spec) if model is None else None
    typer.echo(f"lambdasplit UI: http://{host}:{port}/ (body {'at ' + server if server else 'in this process'})")
    sys.stdout.flush()
    from lambdasplit.privacy.protect import Protection

    protection = Protection(pseudonymize, decoys) if pseudonymize or decoys else None
    app_ = create_ui(device, connect, info, load_image, audit, speculate=speculate, draft_tokens=draft_tokens, protection=protection)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


def _image_loader(pipeline, image_server, token, tls_ca, codec):
    """Split pipelines for the image tab, loaded on first use per (mode, K) and kept."""
    import threading

    from lambdasplit.diffusion.device import SplitPipeline

    loaded: dict[tuple[str, int], SplitPipeline] = {}
    lock = threading.Lock()

    def load(mode: str, k: int) -> SplitPipeline:
        with lock:
            if (mode, k) not in loaded:
                loaded[(mode, k)] = SplitPipeline.load(pipeline, mode, k, codec=codec, server=image_server, token=token,
                                                       tls_ca=tls_ca)
            return loaded[(mode, k)]

    return load


def _image_note(pipeline, image_server) -> str:
    name = pipeline or "tiny-sdxl (small offline SDXL-shaped pipeline with random weights: expect noise-like pictures)"
    return f"pipeline: {name}; UNet part {'at ' + image_server if image_server else 'in this process'}"


def main() -> None:
    """Run the app; every error the user can fix is one `error: ...` line on stderr and exit 2."""
    try:  # typer >= 0.22 vendors click as typer._click; its exceptions are not click's
        from typer import _click as click
    except ImportError:
        import click

    try:
        code = app(standalone_mode=False)
    except LambdaSplitError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        # Bad values and usage (typer's min=/max=, callbacks): one line, not a boxed panel.
        command = f" (see: {exc.ctx.command_path} --help)" if getattr(exc, "ctx", None) else ""
        typer.echo(f"error: {exc.format_message()}{command}", err=True)
        raise SystemExit(exc.exit_code) from None
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
