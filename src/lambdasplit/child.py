"""ChildProcess: one way to start a child, wait until it is ready, and stop it.

The body server of the demo and the tests (`cloud/process.py`), the UI and gateway children of the
tests, and HAProxy in `scripts/failover.py` all go through here, so each gets the same deadlines:
its output is read by a thread (a blocking readline would wait forever on a silent child), a wait
for readiness ends at its deadline or when the child exits, with the child's last lines (and the child
stopped: a subclass that waits in its constructor has no object for its caller to stop), and a stop
sends SIGINT (a clean shutdown, as Ctrl-C), then SIGTERM, then SIGKILL, each after a deadline.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lambdasplit.errors import LambdaSplitError

_EOF = None  # what the reader thread queues when the child closes its output
POLL_INTERVAL = 0.25  # seconds between readiness checks that have no line to wait for
_Child = TypeVar("_Child", bound="ChildProcess")


class ChildProcess:
    """`argv` in a child; its merged stdout and stderr go to `log` if given, else to `output` (the
    last 200 lines) through a reader thread, which also hands each line to `on_line` if given."""

    def __init__(self, argv: list[str], *, name: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                 log: Path | None = None, on_line: Callable[[str], None] | None = None) -> None:
        self.name = name  # for messages: "the body server did not start ..."
        self.log = log
        self.on_line = on_line  # sees every line the child prints (the reader thread calls it)
        self.output: deque[str] = deque(maxlen=200)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._waiting = True  # lines are queued only until the child is ready
        self._reader: threading.Thread | None = None
        if log is not None:
            with open(log, "w") as sink:  # the child keeps its own descriptor
                self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
            return
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited; None while it runs."""
        return self.proc.poll()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if self.on_line is not None:
                self.on_line(line)
            if self._waiting:
                self._lines.put(line)
        self._lines.put(_EOF)

    def recent(self) -> str:
        """The child's last lines, for an error message."""
        if self.log is not None:
            return f"; its output is in {self.log}"
        text = "".join(self.output).strip()
        return ("; its output:\n" + text) if text else " (it printed nothing)"

    def _exited(self) -> LambdaSplitError:
        code = self.proc.wait(timeout=10)
        return LambdaSplitError(f"{self.name} exited with status {code} before it was ready{self.recent()}")

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first output line that matches `pattern`; an error at the deadline or if the child
        exits, the child stopped. Output is queued for this only until it returns (`output` keeps
        the last lines after)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LambdaSplitError(f"{self.name} did not start within {timeout:g} s{self.recent()}")
                try:
                    line = self._lines.get(timeout=left)
                except queue.Empty:
                    continue
                if line is _EOF:
                    raise self._exited()
                if match := re.search(pattern, line):
                    return match
        except BaseException:  # the deadline, an exit, or Ctrl-C while waiting
            self.stop()
            raise
        finally:
            self._waiting = False

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Poll `ready()` (e.g. an HTTP endpoint answers) until it is true; an error at the deadline
        or if the child exits first, the child stopped."""
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if self.proc.poll() is not None:
                    raise self._exited()
                if time.monotonic() >= deadline:
                    raise LambdaSplitError(f"{self.name} did not start within {timeout:g} s{self.recent()}")
                time.sleep(POLL_INTERVAL)
        except BaseException:  # the deadline, an exit, or Ctrl-C while waiting
            self.stop()
            raise
        finally:
            self._waiting = False

    def printed(self, text: str, timeout: float = 30.0) -> bool:
        """Whether the child prints a line containing `text` within `timeout` seconds (polling
        `output`): a server logs an error after sending it, so its client can see the error first."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in list(self.output)):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL / 5)
        return True

    def stop(self, grace: float = 10.0) -> int:
        """SIGINT, then SIGTERM, then SIGKILL, each given `grace` seconds; the exit status (and
        `output` holds everything the child printed)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        return self.kill()

    def kill(self) -> int:
        """SIGKILL (no goodbye on its sockets: the failover tests want exactly that); the exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)  # the rest of the pipe, which the child may have left to its own children
        return code

    def __enter__(self: _Child) -> _Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child, offline (nothing may download from a model hub)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}
