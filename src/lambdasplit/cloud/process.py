"""ServerProcess: a `lambdasplit serve` child process (for the demo and tests), started and stopped cleanly."""

from __future__ import annotations

import sys
from collections.abc import Callable

from lambdasplit.child import ChildProcess, child_env


class ServerProcess(ChildProcess):
    """`lambdasplit serve ARGS --port PORT` in a child; `url` once it listens.

    The start-up `timeout` holds even when the child prints nothing; on failure the error carries
    the child's last lines (`ChildProcess`). `stop()` sends SIGINT first, as Ctrl-C would."""

    def __init__(self, *args: str, port: int = 0, timeout: float = 120.0, command: list[str] | None = None,
                 on_line: Callable[[str], None] | None = None) -> None:
        self.args = [*args, "--port", str(port)]
        # `command` replaces `python -m lambdasplit.cli serve` (tests use it to stand in a silent child).
        argv = [*(command or [sys.executable, "-m", "lambdasplit.cli", "serve"]), *self.args]
        super().__init__(argv, name="the body server", env=child_env(), on_line=on_line)
        self.url = self.wait_for_line(r"listening on (wss?://\S+)", timeout).group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
