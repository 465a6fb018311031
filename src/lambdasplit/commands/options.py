"""What the `lambdasplit` commands share: their common options, checks and parameter types, and the
few steps several commands take (the prompt's text, the body connection, the chat-template warning).

Every check runs while the command line is parsed, before any model loads, and a bad value is one
`error: Invalid value for '--OPTION': ...` line. `--split` is a parameter type: its text becomes a
`SplitChoice` (the one grammar, split/spec.py) through typer's `parser=`; its metavar shows the
grammar in --help. (A click `ParamType`
through `click_type=` is not possible: typer >= 0.22 vendors its own click and dropped
`click_type`, and no longer depends on click.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import urlsplit

import typer

from lambdasplit import defaults
from lambdasplit.errors import LambdaSplitError, SplitError
from lambdasplit.split.spec import SplitChoice


def split_type(ranged: bool) -> Callable[[str], SplitChoice]:
    """The --split parameter type: K,M (or, where `ranged`, KMIN-KMAX,M) as a SplitChoice."""

    def parse(text: str) -> SplitChoice:
        try:
            return SplitChoice.parse(text, ranged)
        except SplitError as exc:
            raise typer.BadParameter(str(exc)) from None

    return parse


def check_server(value: str | None) -> str | None:
    """--server ws://HOST:PORT or wss://HOST:PORT."""
    if value is None:
        return value
    try:
        url = urlsplit(value)
        url.port  # noqa: B018  (raises ValueError for a port out of range or not a number)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is not a valid URL ({exc}); expected ws://HOST:PORT or wss://HOST:PORT") from None
    if url.scheme not in ("ws", "wss") or not url.hostname:
        raise typer.BadParameter(f"{value!r}: expected ws://HOST:PORT or wss://HOST:PORT")
    return value


def check_text_file(value: Path | None) -> Path | None:
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


def check_text(value: str | None) -> str | None:
    """A prompt from the command line: bytes that are not UTF-8 reach Python as lone surrogates."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise typer.BadParameter("the text is not valid UTF-8; check the terminal's or the file's encoding") from None
    return value


def check_positive(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value:g} is not a positive number")
    return value


def check_quantize(value: str | None) -> str | None:
    """--quantize: one of the schemes (split/quantize.py), refused while parsing, before any output."""
    if value is None:
        return value
    from lambdasplit.split.quantize import SCHEMES

    if value not in SCHEMES:
        raise typer.BadParameter(f"{value!r}: choose one of {', '.join(SCHEMES)}")
    return value


def check_device(value: str) -> str:
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


def check_speculate(value: str | None) -> str | None:
    if value is None or value in ("prompt-lookup", "self", "draft-head", "draft-tree"):
        return value
    if value.startswith(("draft-head:", "draft-tree:")):
        if not Path(value.partition(":")[2]).expanduser().is_dir():
            raise typer.BadParameter(f"{value!r}: {value.partition(':')[2]!r} is not a directory (a draft head from train-draft)")
        return value
    if not Path(value).expanduser().exists():
        raise typer.BadParameter(f"{value!r}: expected prompt-lookup, draft-head[:DIR], draft-tree[:DIR], self, "
                                 "or the path of a draft model")
    return value


def image_size(text: str) -> tuple[int, int]:
    """--size WxH in pixels."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise LambdaSplitError(f"--size {text!r}: expected WxH, e.g. 1024x1024") from None
    if width <= 0 or height <= 0:
        raise LambdaSplitError(f"--size {text!r}: width and height must be positive")
    return width, height


_SPLIT_HELP = "K,M: K layers in the head, M in the tail (default {},{}).".format(*defaults.SPLIT)
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model directory, .gguf file or exported part; default: embedded SmolLM2-135M-Instruct."),
]
SplitOpt = Annotated[Optional[SplitChoice], typer.Option("--split", parser=split_type(ranged=False), metavar="<K,M>", help=_SPLIT_HELP)]
RangeSplitOpt = Annotated[
    Optional[SplitChoice],
    typer.Option(
        "--split",
        parser=split_type(ranged=True),
        metavar="<K,M|KMIN-KMAX,M>",
        help=_SPLIT_HELP + " KMIN-KMAX,M randomises the split: "
        "the device draws K per session with `secrets`, and the server hosts every body in the range.",
    ),
]
ShallowOpt = Annotated[
    bool, typer.Option("--allow-shallow", help="Allow K=0 or M=0, which expose the prompt or the output trivially.")
]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="float32, bfloat16 or float16: what the parts compute in and send; device and server must agree. "
    "Default: an exported part's own, else float32 (export from a .gguf: bfloat16; with --quantize gguf-exact: float32).",
)]
QuantizeOpt = Annotated[Optional[str], typer.Option(
    "--quantize", callback=check_quantize, help="int8, int4 or gguf-exact: the device's head, tail, LM head and embeddings stored quantized (CPU); "
    "the body is unchanged. A quantized export loads quantized. gguf-exact keeps a GGUF's own 4-bit/8-bit grids "
    "(Q4_0, Q4_1, Q8_0 blocks of 32; other sources are refused) and gives the float32 split's tokens exactly, "
    "computing in float32: slower than float32, int8 and int4.",
)]
ServerOpt = Annotated[
    Optional[str],
    typer.Option("--server", callback=check_server, help="Body server URL, ws://HOST:PORT or wss://HOST:PORT."),
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
    Optional[Path], typer.Option("--token-file", callback=check_text_file, help="File holding the bearer token.")
]
DeviceOpt = Annotated[str, typer.Option("--device", callback=check_device, help="cpu or cuda.")]
PortOpt = Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0 picks a free one).")]
HttpPortOpt = Annotated[int, typer.Option(min=0, max=65535, help="HTTP port.")]
CaOpt = Annotated[Optional[Path], typer.Option("--tls-ca", help="CA certificate that signed the server's (wss://).")]
SpeculateOpt = Annotated[Optional[str], typer.Option(
    "--speculate", callback=check_speculate,
    help="Speculative decoding (same output, fewer round trips): prompt-lookup drafts from n-grams of the prompt; "
    "draft-head drafts with the trained head shipped for the embedded model (draft-head:DIR: one from train-draft); "
    f"draft-tree drafts a tree of {defaults.DRAFT_TREE_NODES} tokens with that head, verified in one round trip (greedy; "
    "sampling drafts the chain); PATH is a small draft model with the same tokenizer; self is refused with its measured acceptance.",
)]
DraftOpt = Annotated[Optional[int], typer.Option(
    "--draft-tokens", min=1, max=64, show_default=False, help="Prompt lookup's and a draft model's first draft length "
    f"(default {defaults.DRAFT_TOKENS}; it then grows after accepted drafts and shrinks after rejections); the draft "
    f"head's longest chain (default {defaults.DRAFT_TOKENS}; it also stops below {defaults.DRAFT_CONFIDENCE:.0%} "
    f"confidence); draft-tree's drafted tokens (default {defaults.DRAFT_TREE_NODES})."
)]
ReconnectOpt = Annotated[float, typer.Option(
    "--reconnect-window", min=0, help="Seconds to keep reconnecting (and replaying) after losing the body server."
)]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n")]


def point(split: SplitChoice | None) -> tuple[int, int] | None:
    """(K, M) of a --split, or None where it was not given (the model's default then applies)."""
    return split.point if split else None


def device_split(split: SplitChoice | None, model: str | None, allow_shallow: bool) -> tuple[int, int] | None:
    """K,M as given, or a K drawn with `secrets` from KMIN-KMAX (the cloud still learns K: it runs
    layers K..L-M; this hides K from an eavesdropper and varies it across sessions). Both ends of a
    range are checked against the model first: checking only the drawn K let a bad range pass some runs."""
    if split is None or not split.ranged:
        return point(split)
    from lambdasplit.privacy.defenses import random_split_point
    from lambdasplit.split.load import open_source
    from lambdasplit.split.spec import SplitSpec

    layers = open_source(model, split.point, allow_shallow).config.num_hidden_layers
    SplitSpec.create(split.k_max, split.m, layers, allow_shallow)
    return random_split_point(split.k_min, split.k_max), split.m


def body_client(runtime, model, parts, dtype, codec, allow_shallow, server, token_file, tls_ca, **options):
    """The BodyClient: a session on --server, else on the body in this process."""
    from lambdasplit.device.connect import BodyConfig, connect_body

    config = BodyConfig.from_options(
        server, token_file, tls_ca=tls_ca, codec=codec, source=model, split=parts, dtype=dtype,
        allow_shallow=allow_shallow, **options,
    )
    return connect_body(config, runtime.manifest)


def check_local_body(model: str | None, server: str | None, decoys: int) -> None:
    """Without --server the body runs in this process: refuse, before anything loads, what cannot run there."""
    if server is None:
        from lambdasplit.device.connect import check_in_process

        check_in_process(model, decoys)


def prompt_text(prompt: str | None, prompt_file: Path | None) -> str:
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


def names(text: str) -> list[str]:
    """A comma-separated option's items."""
    return [item.strip() for item in text.split(",")]


def warn_without_chat_template(runtime) -> None:
    """SplitRuntime falls back to the raw prompt when the tokenizer has no chat template (e.g. a GGUF
    without one); an instruction-tuned model then answers worse, so say it once."""
    if runtime.has_tokenizer and runtime.tokenizer.chat_template is None:
        typer.echo(
            f"warning: the tokenizer of {runtime.opened.checkpoint.path.name} has no chat template; "
            "prompts are sent raw, as with --raw",
            err=True,
        )


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on stderr, updated by the yielded `report(label, done, total)`."""
    from rich.console import Console
    from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=None)
        yield lambda label, done, total: progress.update(task, description=label, completed=done, total=total)
