"""Logging for the command line: our progress lines always, our other logs with -v, and the
libraries' own chatter (transformers' and diffusers' warnings and progress bars) silenced."""

from __future__ import annotations

import logging
import sys


def configure_logging(verbose: bool) -> None:
    """Set up this process's logging (also the engine process's, which runs it at its start)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = logging.getLogger("lambdasplit.progress")  # what long work is doing, shown without -v
    if not progress.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lambdasplit: %(message)s"))
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False
    import transformers  # here, not at the top: `lambdasplit COMMAND --help` never needs it

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import diffusers
    except ImportError:
        return
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
