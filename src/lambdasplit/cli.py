"""The `lambdasplit` command line: the app, its logging switch and its one-line errors. Each command
lives with its area in `lambdasplit.commands` (shared options, checks and parameter types in
commands/options.py, every default in defaults.py), parses its options and calls the modules that
do the work:

  generate     text from the split model; the body on --server or in this process   (commands/text.py)
  train-draft  a draft head for --speculate draft-head:DIR (device/train_draft.py)   (commands/text.py)
  info         architecture, L, D and each part's size (split/inspect.py)            (commands/text.py)
  export       device and cloud parts to separate directories (split/export.py)      (commands/text.py)
  serve        the body, or a diffusion UNet, over WebSocket (cloud/server.py)       (commands/serving.py)
  image        an image from a split diffusion pipeline (diffusion/device.py)        (commands/diffusion.py)
  certs        a self-signed CA and server certificate (security.py)                 (commands/serving.py)
  demo         a body server in a child process and the device against it           (commands/demo.py)
  gateway      an OpenAI-compatible API on the device (gateway/app.py)               (commands/serving.py)
  audit        what a curious cloud or an eavesdropper recovers (privacy/)           (commands/privacy.py)
  ui           the web UI: chat and images through the split model (ui/app.py)       (commands/serving.py)
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from lambdasplit.commands.demo import demo
from lambdasplit.commands.diffusion import image
from lambdasplit.commands.privacy import audit
from lambdasplit.commands.serving import certs, gateway, serve, ui
from lambdasplit.commands.text import export, generate, info, train_draft
from lambdasplit.errors import LambdaSplitError

app = typer.Typer(
    help="Split inference: head and tail on this device, the body in the cloud; only hidden states cross.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for command in (generate, train_draft, info, export, serve, image, certs, demo, gateway, audit, ui):  # --help's order
    app.command()(command)  # train_draft is `train-draft`: typer turns underscores into dashes


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False) -> None:
    if not _asks_for_help():  # configuring logging imports transformers: seconds that `COMMAND --help` does not need
        from lambdasplit.logs import configure_logging

        configure_logging(verbose)


def _asks_for_help(argv: list[str] | None = None) -> bool:
    """`--help` before any `--`: click prints the help and runs nothing else."""
    args = sys.argv[1:] if argv is None else argv
    return "--help" in (args[:args.index("--")] if "--" in args else args)


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
        # Bad values and usage (typer's min=/max=, parameter types, callbacks): one line, not a boxed panel.
        command = f" (see: {exc.ctx.command_path} --help)" if getattr(exc, "ctx", None) else ""
        typer.echo(f"error: {exc.format_message()}{command}", err=True)
        raise SystemExit(exc.exit_code) from None
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
