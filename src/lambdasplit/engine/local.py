"""LocalBody: the body in this process, behind the device's `BodyClient` interface.

It lives with the engine, not in `device/`, so that a device which reaches its body over the
network never imports the scheduler, tensor parallel or psutil: `import lambdasplit` loads this
module only when a local body is asked for (`load_local_body`, `connect_body` without a server).
"""

from __future__ import annotations

import functools
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from lambdasplit import defaults
from lambdasplit.device.body import BodyClient, TransferStats
from lambdasplit.engine.loading import load_scheduler
from lambdasplit.engine.scheduler import BodyScheduler
from lambdasplit.errors import UnavailableError
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import Frame, Limits, MsgType, parse_frame
from lambdasplit.wire.protocol import control_frame

T = TypeVar("T")


class LocalBody(BodyClient):
    """The body in this process, reached through the same frames, scheduler and limits as a server.

    Each LocalBody holds one session on `scheduler`; several LocalBodies may share one scheduler
    (the gateway opens one per request), exactly as devices share a server. Every wait for the
    scheduler ends within `timeout` seconds, as a remote device's wait for a reply does.
    """

    def __init__(self, scheduler: BodyScheduler, codec: Codec = Codec.FP32, limits: Limits | None = None,
                 timeout: float = defaults.REPLY_TIMEOUT) -> None:
        self.scheduler = scheduler
        self.codec = codec
        self.limits = limits or scheduler.manifest.frame_limits()
        self.stats = TransferStats()
        self.max_frame_positions = scheduler.limits.max_frame_positions
        self.max_context = scheduler.limits.max_context
        # Draft-tree verification (TREE frames), as a server's WELCOME says it; this session is on bodies[0].
        self.max_tree_positions = (min(defaults.MAX_TREE_POSITIONS, self.max_frame_positions)
                                   if getattr(scheduler.bodies[0], "verifies_trees", False) else None)
        self.timeout = timeout
        self._session: bytes | None = None

    def _wait(self, future: Future[T]) -> T:
        """The scheduler's answer, or an error once `timeout` has passed (the compute thread is stuck)."""
        try:
            return future.result(self.timeout)
        except FutureTimeout:
            future.cancel()  # a call not started yet never runs
            if self._session is not None:  # the frame may still run: this session's cache is no longer ours
                self.scheduler.close_session(self._session)
                self._session = None
            raise UnavailableError(
                f"the in-process body did not answer within {self.timeout:g} s "
                f"({self.scheduler.health.problem() or 'its compute thread is busy'})"
            ) from None

    def _session_id(self) -> bytes:
        if self._session is None:
            self._session = self._wait(self.scheduler.open_session())
        return self._session

    def _exchange(self, frames: list[Frame]) -> Frame:
        session = self._session_id()
        reply = None
        for frame in frames:
            data = frame.to_bytes()
            if self.captured is not None:
                self.captured.append(("to_cloud", data))
            reply, _ = self._wait(self.scheduler.submit(session, parse_frame(data, self.limits)))
        assert reply is not None, "the last frame of an exchange is always answered"
        data = reply.to_bytes()
        if self.captured is not None:
            self.captured.append(("from_cloud", data))
        return parse_frame(data, self.limits)

    def _reset(self) -> None:
        if self._session is not None:
            self._wait(self.scheduler.submit(self._session, Frame(MsgType.RESET)))

    def _crop(self, length: int) -> None:
        if self._session is not None:
            self._wait(self.scheduler.submit(self._session, control_frame(MsgType.CROP, {"length": length}, self._session)))

    def close(self) -> None:
        if self._session is not None:
            self._wait(self.scheduler.close_session(self._session))
            self._session = None


def load_local_body(
    source: str | None = None,
    split: tuple[int, int] | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    codec: Codec = Codec.FP32,
    allow_shallow: bool = False,
) -> LocalBody:
    """The body of `source` in this process, behind the BodyClient interface."""
    scheduler = load_scheduler(source, split, dtype, device, allow_shallow=allow_shallow)
    return LocalBody(scheduler, codec)


@functools.cache
def shared_scheduler(
    source: str | None, split: tuple[int, int] | None, dtype: str | None, device: str, allow_shallow: bool
) -> BodyScheduler:
    """One scheduler (one copy of the weights) per in-process body source; `connect_body` opens a
    session on it per call, exactly as devices share a server."""
    return load_scheduler(source, split, dtype, device, allow_shallow=allow_shallow)
