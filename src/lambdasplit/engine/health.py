"""EngineHealth: whether the compute loop is alive and moving, for `/healthz`.

The transport stays up when the compute thread dies or hangs (a stuck collective under tensor
parallel, a step that never returns), so a health check that only asks "is the port open" keeps a
load balancer routing devices to a server that answers nothing. Like vLLM's engine health check,
the answer comes from the engine itself: the loop beats on every pass (a step, a call, or an idle
tick at least every `HEARTBEAT_SECONDS`), and a beat older than `stall_timeout` means the loop is
stuck inside one piece of work. The state is a few numbers written by one thread and read by
another, so it can move to shared memory when the engine gets its own process.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

HEARTBEAT_SECONDS = 1.0  # an idle loop wakes at least this often to beat


@dataclass
class EngineHealth:
    stall_timeout: float  # seconds one pass of the loop may take before the engine counts as wedged
    last_beat: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None  # the compute thread, once started
    stopped: str | None = None  # why the loop ended, once it has

    @property
    def tick(self) -> float:
        """How long an idle loop may sleep before it beats again (well inside the stall timeout)."""
        return min(HEARTBEAT_SECONDS, self.stall_timeout / 4)

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def stop(self, reason: str) -> None:
        self.stopped = reason

    def problem(self, now: float | None = None) -> str | None:
        """None while the loop is alive and beating, else why it is not (one line)."""
        if self.stopped is not None:
            return f"the compute loop has stopped ({self.stopped})"
        if self.thread is not None and not self.thread.is_alive():
            return "the compute thread is not running"
        stalled = (time.monotonic() if now is None else now) - self.last_beat
        if stalled > self.stall_timeout:
            return (f"the compute loop has been inside one step for {stalled:.1f} s "
                    f"(over the {self.stall_timeout:g} s --stall-timeout)")
        return None
