"""ServerProcess: a `lambdasplit serve` child process (for the demo and tests), started and stopped cleanly."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from lambdasplit.errors import LambdaSplitError

_EOF = None  # what the reader thread queues when the child closes its output


class ServerProcess:
    """`lambdasplit serve ARGS --port PORT` in a child; `url` once it listens.

    The child's output is read by a thread, so the start-up `timeout` holds even when the child
    prints nothing (a blocking readline would wait forever); on failure the error carries the
    child's last lines."""

    def __init__(self, *args: str, port: int = 0, timeout: float = 120.0, command: list[str] | None = None,
                 on_line: Callable[[str], None] | None = None) -> None:
        self.args = [*args, "--port", str(port)]
        self.on_line = on_line  # sees every line the child prints (the reader thread calls it)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        # `command` replaces `python -m lambdasplit.cli serve` (tests use it to stand in a silent child).
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "lambdasplit.cli", "serve"]), *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.output: deque[str] = deque(maxlen=200)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._waiting = True  # lines are queued only until the server is ready
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.url = self._wait_ready(timeout)
            self._waiting = False
        except BaseException:
            self.kill()
            raise
        self.port = int(self.url.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if self.on_line is not None:
                self.on_line(line)
            if self._waiting:
                self._lines.put(line)
        self._lines.put(_EOF)

    def _recent(self) -> str:
        text = "".join(self.output).strip()
        return ("; its output:\n" + text) if text else " (it printed nothing)"

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LambdaSplitError(f"the body server did not start within {timeout:g} s{self._recent()}")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is _EOF:
                code = self.proc.wait(timeout=10)
                raise LambdaSplitError(f"the body server exited with status {code} before it was ready{self._recent()}")
            match = re.search(r"listening on (wss?://\S+)", line)
            if match:
                return match.group(1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
