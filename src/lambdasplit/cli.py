"""The `lambdasplit` command line: export, info, generate, demo."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lambdasplit.errors import LambdaSplitError

app = typer.Typer(
    help="Split inference: head and tail on this device, the body in the cloud; only hidden states cross.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model directory, .gguf file or exported part; default: embedded SmolLM2-135M-Instruct."),
]
SplitOpt = Annotated[
    Optional[str], typer.Option("--split", help="K,M: K layers in the head, M in the tail (default 2,2).")
]
ShallowOpt = Annotated[
    bool, typer.Option("--allow-shallow", help="Allow K=0 or M=0, which expose the prompt or the output trivially.")
]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float32 (default), bfloat16 or float16.")]


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _split(text: str | None) -> tuple[int, int] | None:
    from lambdasplit.split.spec import parse_split

    return parse_split(text) if text else None


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False) -> None:
    _quiet_libraries(verbose)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (the chat template is applied unless --raw).")],
    model: ModelOpt = None,
    split: SplitOpt = None,
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
    allow_shallow: ShallowOpt = False,
) -> None:
    """Generate text with the split model; the body runs in this process."""
    from lambdasplit.device.body import load_local_body
    from lambdasplit.device.runtime import SplitDevice
    from lambdasplit.device.sampling import SamplingConfig
    from lambdasplit.wire.codec import Codec

    sampling_given = temperature is not None or top_p is not None or top_k is not None
    if greedy and sampling_given:
        raise LambdaSplitError("--greedy cannot be combined with --temperature, --top-p or --top-k")
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens,
        greedy=not sampling_given,
        temperature=temperature if temperature is not None else 1.0,
        top_k=top_k or 0,
        top_p=top_p if top_p is not None else 1.0,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop or ()),
    )
    wire = Codec.parse(codec)
    parts = _split(split)
    device = SplitDevice.load(model, parts, dtype, allow_shallow=allow_shallow)
    body = load_local_body(model, parts, dtype, codec=wire, allow_shallow=allow_shallow)
    on_text = None if as_json else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    result = device.generate(body, prompt, sampling, raw=raw, on_text=on_text)
    if as_json:
        payload = {
            "text": result.text,
            "prompt_token_ids": result.prompt_token_ids[0],
            "token_ids": result.token_ids[0],
            "finish_reason": result.finish_reasons[0],
            "split": device.spec.as_dict(),
            "codec": wire.name.lower(),
            "bytes": {"to_cloud": result.bytes_to_cloud, "from_cloud": result.bytes_from_cloud},
            "timings": result.timings.as_dict(),
        }
        typer.echo(json.dumps(payload))
    else:
        typer.echo()


@app.command()
def info(model: ModelOpt = None, split: SplitOpt = None, dtype: DtypeOpt = None, allow_shallow: ShallowOpt = False) -> None:
    """Show the architecture, L, D, and the parameters and memory of each part."""
    from rich.console import Console
    from rich.table import Table

    from lambdasplit.split.inspect import part_sizes
    from lambdasplit.split.load import open_source, resolve_dtype

    opened = open_source(model, _split(split), allow_shallow)
    torch_dtype = resolve_dtype(dtype, opened)
    config = opened.config
    console = Console()
    console.print(
        f"[bold]{config.model_type}[/]  L = {config.num_hidden_layers}  D = {config.hidden_size}  "
        f"vocab = {config.vocab_size}  dtype = {str(torch_dtype).removeprefix('torch.')}"
    )
    console.print(f"source: {opened.checkpoint.path}", soft_wrap=True)
    table = Table("part", "runs on", "layers", "parameters", "memory")
    for role, size in part_sizes(opened, torch_dtype).items():
        start, stop = opened.spec.range(role)
        where = "cloud" if role == "body" else "device"
        table.add_row(role, where, f"[{start}, {stop})", f"{size.parameters:,}", f"{size.bytes / 2**20:.1f} MiB")
    console.print(table)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (gets device/ and cloud/).")],
    model: ModelOpt = None,
    split: SplitOpt = None,
    dtype: DtypeOpt = None,
    allow_shallow: ShallowOpt = False,
) -> None:
    """Write the device part (head + tail) and the cloud part (body) to separate directories."""
    from lambdasplit.split.export import export_parts

    written = export_parts(model, _split(split), out, dtype, allow_shallow)
    for side, directory in written.items():
        typer.echo(f"{side}: {directory}")


def main() -> None:
    try:
        app()
    except LambdaSplitError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
