"""ServerProcess: a `lambdasplit serve` child process (for the demo and tests), started and stopped cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import deque

from lambdasplit.errors import LambdaSplitError


class ServerProcess:
    def __init__(self, *args: str, port: int = 0, timeout: float = 120.0) -> None:
        self.args = [*args, "--port", str(port)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lambdasplit.cli", "serve", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.output: deque[str] = deque(maxlen=200)
        self.url = self._wait_ready(timeout)
        self.port = int(self.url.rsplit(":", 1)[1])
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.time() + timeout
        assert self.proc.stdout is not None
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise LambdaSplitError("the body server exited before it was ready:\n" + "".join(self.output).strip())
            self.output.append(line)
            match = re.search(r"listening on (wss?://\S+)", line)
            if match:
                return match.group(1)
        self.kill()
        raise LambdaSplitError(f"the body server did not start within {timeout:.0f} s")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def kill(self) -> None:
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
