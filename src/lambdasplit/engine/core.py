"""The engine core in its own process: the scheduler and the model behind a local pipe.

Like vLLM v1's `EngineCore`, the GPU loop never waits on Python that serves sockets: the network
front end (asyncio, WebSockets, auth, frame parsing and encoding) runs in the server process, and
the scheduler, its compute thread and the model run in a child process started with `spawn` (CUDA
cannot be used after `fork`). They talk over one `multiprocessing` pipe of raw byte messages, never
pickled:

    front end -> engine   op (1 byte) | request id (8) | payload
    engine -> front end   kind (1)    | request id (8) | payload

A HIDDEN frame crosses as its own wire bytes (the front end has already validated it against the
same limits), its reply comes back as wire bytes, ready to send. Control calls (open, close,
reap) and errors cross as small JSON objects; errors keep their `RemoteError` type and
`retry_after`. The engine also sends each step's `StepStats` (for /metrics), refusals, and a
heartbeat every `HEARTBEAT_SECONDS` carrying the compute loop's own health, which `/healthz`
reports (a dead engine process fails every request in flight and every later one at once).

`EngineClient` (front end side) has the scheduler's interface as the server uses it, so
`BodyServer` serves either one unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import queue
import signal
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from enum import IntEnum
from multiprocessing.connection import Connection
from typing import Any

from lambdasplit import errors
from lambdasplit.errors import ComputeError, LambdaSplitError

log = logging.getLogger(__name__)

HEADER = struct.Struct("<BQ")  # op or kind, request id
RESULT = struct.Struct("<dB")  # compute seconds, whether a reply frame follows
LENGTH = struct.Struct("<I")  # a message's length inside a BATCH
HEARTBEAT_SECONDS = 0.5
READY_TIMEOUT = 900.0  # seconds a model may take to load (a 7B body from a slow disk)


class Op(IntEnum):
    """What the front end asks of the engine."""

    SUBMIT = 1  # payload: session id (16) + frame bytes
    OPEN = 2  # payload: JSON {"body": index}
    CLOSE = 3  # payload: session id
    REAP = 4  # payload: JSON {"idle": seconds}
    SHUTDOWN = 5


class Kind(IntEnum):
    """What the engine sends back."""

    FRAME = 1  # RESULT header + reply frame bytes (or none)
    VALUE = 2  # JSON value (open: session id hex; reap: the closed session ids, hex)
    ERROR = 3  # JSON {"type", "message", "retry_after"}
    STEP = 4  # JSON StepStats
    REFUSAL = 5  # JSON reason
    READY = 6  # JSON: manifests, limits, pool size
    HEARTBEAT = 7  # JSON: the compute loop's health
    FAILED = 8  # JSON {"message"}: the engine could not start
    BATCH = 9  # several messages, each prefixed by its length (u32): one pipe write per burst


@dataclass(frozen=True)
class EncodedReply:
    """A reply frame as the engine encoded it: the wire bytes and the tensor's shape (for metrics)."""

    data: bytes
    shape: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class PoolInfo:
    usable_blocks: int


@dataclass(frozen=True)
class BodyInfo:
    manifest: Any


# ---------------------------------------------------------------- engine process


def engine_main(conn: Connection, setup: Callable[[], None] | None, build: Callable[..., Any], args: tuple,
                kwargs: dict, max_frame_bytes: int) -> None:
    """The child process: build the scheduler, announce it, then serve the pipe until SHUTDOWN or EOF.

    Ctrl-C is the front end's to handle (it reaches the whole process group): the engine stops
    when the front end sends SHUTDOWN or its end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if setup is not None:
        setup()  # the front end's logging and library verbosity
    try:
        scheduler = build(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the front end, which prints it and exits
        conn.send_bytes(HEADER.pack(Kind.FAILED, 0) + _json(_error_dict(exc)))
        return
    _EngineLoop(conn, scheduler, max_frame_bytes).run()


class _EngineLoop:
    """Reads requests on this thread; replies go through one writer thread (so the compute thread,
    which completes the futures, never blocks on the pipe)."""

    def __init__(self, conn: Connection, scheduler: Any, max_frame_bytes: int) -> None:
        from lambdasplit.wire.frame import parse_frame

        self.conn = conn
        self.scheduler = scheduler
        self.parse = parse_frame
        self.limits = scheduler.manifest.frame_limits(max_frame_bytes, scheduler.limits.max_context)
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        scheduler.on_step = lambda stats: self._send(Kind.STEP, 0, _json(dataclasses.asdict(stats)))
        scheduler.on_refusal = lambda reason: self._send(Kind.REFUSAL, 0, _json(reason))
        self.stopping = threading.Event()

    def run(self) -> None:
        writer = threading.Thread(target=self._write, name="engine-writer", daemon=True)
        writer.start()
        beat = threading.Thread(target=self._heartbeat, name="engine-heartbeat", daemon=True)
        beat.start()
        scheduler = self.scheduler
        ready = {
            "manifests": [_manifest_dict(b.manifest) for b in scheduler.bodies],
            "limits": dataclasses.asdict(scheduler.limits),
            "pool_blocks": scheduler.pool.usable_blocks if scheduler.pool is not None else None,
            "pid": os.getpid(),
        }
        self._send(Kind.READY, 0, _json(ready))
        try:
            while True:
                try:
                    message = self.conn.recv_bytes()
                except (EOFError, OSError):
                    break  # the front end is gone
                op, request = HEADER.unpack_from(message)
                if op == Op.SHUTDOWN:
                    break
                self._dispatch(Op(op), request, memoryview(message)[HEADER.size:])
        finally:
            self.stopping.set()
            scheduler.shutdown()
            self.outbox.put(None)
            writer.join(timeout=5)

    def _dispatch(self, op: Op, request: int, payload: memoryview) -> None:
        scheduler = self.scheduler
        try:
            if op == Op.SUBMIT:
                frame = self.parse(bytes(payload[16:]), self.limits)
                future = scheduler.submit(bytes(payload[:16]), frame)
                future.add_done_callback(lambda f: self._frame_result(request, f))
                return
            if op == Op.OPEN:
                future = scheduler.open_session(json.loads(bytes(payload))["body"])
                future.add_done_callback(lambda f: self._value_result(request, f, bytes.hex))
            elif op == Op.CLOSE:
                future = scheduler.close_session(bytes(payload))
                future.add_done_callback(lambda f: self._value_result(request, f, lambda _: None))
            elif op == Op.REAP:
                future = scheduler.reap(json.loads(bytes(payload))["idle"])
                future.add_done_callback(lambda f: self._value_result(request, f, lambda ids: [s.hex() for s in ids]))
        except Exception as exc:  # noqa: BLE001 - a refused request fails alone
            self._send(Kind.ERROR, request, _json(_error_dict(exc)))

    def _frame_result(self, request: int, future: Future) -> None:
        exc = _exception(future)
        if exc is not None:
            self._send(Kind.ERROR, request, _json(_error_dict(exc)))
            return
        reply, seconds = future.result()
        data = reply.to_bytes() if reply is not None else b""
        self._send(Kind.FRAME, request, RESULT.pack(seconds, reply is not None) + data)

    def _value_result(self, request: int, future: Future, convert: Callable[[Any], Any]) -> None:
        exc = _exception(future)
        if exc is not None:
            self._send(Kind.ERROR, request, _json(_error_dict(exc)))
        else:
            self._send(Kind.VALUE, request, _json(convert(future.result())))

    def _heartbeat(self) -> None:
        """Every HEARTBEAT_SECONDS: the compute loop's own health (None: alive and moving)."""
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            self._send(Kind.HEARTBEAT, 0, _json(self.scheduler.health.problem()))

    def _send(self, kind: Kind, request: int, payload: bytes) -> None:
        self.outbox.put(HEADER.pack(kind, request) + payload)

    def _write(self) -> None:
        """Send what is queued; the replies a step completes together leave in one write."""
        while (message := self.outbox.get()) is not None:
            burst = [message]
            while len(burst) < 256:
                try:
                    more = self.outbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.outbox.put(None)
                    break
                burst.append(more)
            if len(burst) > 1:
                message = HEADER.pack(Kind.BATCH, 0) + b"".join(LENGTH.pack(len(m)) + m for m in burst)
            try:
                self.conn.send_bytes(message)
            except (OSError, ValueError):
                return  # the front end is gone; the reader sees EOF too


# ---------------------------------------------------------------- front end


class EngineClient:
    """The scheduler's interface, served by an engine process (see the module docstring).

    `start` spawns the process and blocks until the model is loaded (or raises its error)."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection, ready: dict) -> None:
        from lambdasplit.engine.scheduler import SchedulerLimits

        self.process = process
        self.conn = conn
        self.bodies = [BodyInfo(_manifest_from(m)) for m in ready["manifests"]]
        self.manifest = self.bodies[0].manifest
        self.limits = SchedulerLimits(**ready["limits"])
        self.pool = PoolInfo(ready["pool_blocks"]) if ready["pool_blocks"] is not None else None
        self.on_step: Callable[[Any], None] | None = None
        self.on_refusal: Callable[[str], None] | None = None
        self._pending: dict[int, tuple[Future, str]] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._dead: str | None = None  # why the engine is gone
        self._problem: str | None = None  # the compute loop's, as last reported
        self._beat = time.monotonic()
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, build: Callable[..., Any], *args: Any, max_frame_bytes: int,
              setup: Callable[[], None] | None = None, **kwargs: Any) -> EngineClient:
        """Spawn the engine process running `setup()`, then `build(*args, **kwargs)` (a scheduler
        factory); both must be importable by name (the process is spawned, not forked)."""
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe(duplex=True)
        process = context.Process(target=engine_main, args=(theirs, setup, build, args, kwargs, max_frame_bytes),
                                  name="lambdasplit-engine", daemon=True)
        process.start()
        theirs.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while not ours.poll(1.0):
            if not process.is_alive():
                raise LambdaSplitError(f"the engine process exited with status {process.exitcode} while loading")
            if time.monotonic() > deadline:
                process.kill()
                raise LambdaSplitError(f"the engine process did not load the model within {READY_TIMEOUT:.0f} s")
        message = ours.recv_bytes()
        kind, _ = HEADER.unpack_from(message)
        answer = json.loads(message[HEADER.size:])
        if kind == Kind.FAILED:
            process.join(timeout=10)
            raise _error_from(answer)
        return cls(process, ours, answer)

    # the scheduler's interface
    def body_for(self, theirs: Any) -> tuple[int | None, str | None]:
        from lambdasplit.engine.scheduler import match_body

        return match_body([b.manifest for b in self.bodies], theirs)

    def parse_manifest(self, data: dict) -> Any:
        return type(self.manifest).from_dict(data)

    def open_session(self, body_index: int = 0) -> Future[bytes]:
        future = self._request(Op.OPEN, _json({"body": body_index}), "open")
        return _chain(future, bytes.fromhex)

    def close_session(self, session_id: bytes) -> Future[None]:
        return self._request(Op.CLOSE, session_id, "close")

    def reap(self, idle_seconds: float) -> Future[list[bytes]]:
        future = self._request(Op.REAP, _json({"idle": idle_seconds}), "reap")
        return _chain(future, lambda ids: [bytes.fromhex(s) for s in ids])

    def submit(self, session_id: bytes, frame: Any) -> Future[tuple[EncodedReply | None, float]]:
        return self._request(Op.SUBMIT, session_id + frame.to_bytes(), "frame")

    @property
    def health(self) -> EngineClient:
        """What `/healthz` asks (`health.problem()`), as `BodyScheduler.health` answers it."""
        return self

    def problem(self) -> str | None:
        """None while the engine process is alive, reporting, and its compute loop moving; else why not."""
        if self._dead is not None:
            return self._dead
        if not self.process.is_alive():
            return f"the engine process exited with status {self.process.exitcode}"
        silent = time.monotonic() - self._beat
        if silent > max(10 * HEARTBEAT_SECONDS, 5.0):
            return f"the engine process has not reported for {silent:.0f} s"
        return self._problem

    def shutdown(self) -> None:
        with self._lock:
            if self._dead is None:
                try:
                    self.conn.send_bytes(HEADER.pack(Op.SHUTDOWN, 0))
                except (OSError, ValueError):
                    pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)
        self._fail_all("the body server is shutting down")

    # plumbing
    def _request(self, op: Op, payload: bytes, what: str) -> Future:
        future: Future = Future()
        with self._lock:
            if self._dead is not None:
                future.set_exception(ComputeError(f"{self._dead}; retry on another server"))
                return future
            self._next += 1
            self._pending[self._next] = (future, what)
            try:
                self.conn.send_bytes(HEADER.pack(op, self._next) + payload)
            except (OSError, ValueError) as exc:
                del self._pending[self._next]
                future.set_exception(ComputeError(f"the engine process is gone ({type(exc).__name__})"))
        return future

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv_bytes()
            except (EOFError, OSError):
                break
            for kind, request, payload in _unbatch(memoryview(message)):
                try:
                    self._deliver(kind, request, payload)
                except Exception:  # noqa: BLE001 - a metrics callback must not stop the replies
                    log.exception("handling a message from the engine process")
        self.process.join(timeout=2)  # for its exit status
        self._fail_all(f"the engine process stopped (exit status {self.process.exitcode})")

    def _deliver(self, kind: Kind, request: int, payload: memoryview) -> None:
        if kind == Kind.HEARTBEAT:
            self._problem, self._beat = json.loads(bytes(payload)), time.monotonic()
            return
        if kind == Kind.STEP:
            if self.on_step is not None:
                from lambdasplit.engine.scheduler import StepStats

                fields = json.loads(bytes(payload))
                fields["queue_waits"] = tuple(fields["queue_waits"])
                self.on_step(StepStats(**fields))
            return
        if kind == Kind.REFUSAL:
            if self.on_refusal is not None:
                self.on_refusal(json.loads(bytes(payload)))
            return
        with self._lock:
            future, _ = self._pending.pop(request, (None, ""))
        if future is None or future.done():
            return
        if kind == Kind.ERROR:
            future.set_exception(_error_from(json.loads(bytes(payload))))
        elif kind == Kind.VALUE:
            future.set_result(json.loads(bytes(payload)))
        elif kind == Kind.FRAME:
            seconds, has_reply = RESULT.unpack_from(payload)
            reply = None
            if has_reply:
                data = bytes(payload[RESULT.size:])
                reply = EncodedReply(data, _shape(data))
            future.set_result((reply, seconds))

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
                if self.process.exitcode not in (None, 0):
                    log.error("%s; every session in flight gets an error", reason)
            pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(ComputeError(f"{reason}; reconnect to replay the session"))


def _unbatch(message: memoryview) -> list[tuple[Kind, int, memoryview]]:
    """The messages in one pipe read: itself, or the members of a BATCH."""
    kind, request = HEADER.unpack_from(message)
    if kind != Kind.BATCH:
        return [(Kind(kind), request, message[HEADER.size:])]
    out, at = [], HEADER.size
    while at < len(message):
        (length,) = LENGTH.unpack_from(message, at)
        member = message[at + LENGTH.size: at + LENGTH.size + length]
        kind, request = HEADER.unpack_from(member)
        out.append((Kind(kind), request, member[HEADER.size:]))
        at += LENGTH.size + length
    return out


def _shape(data: bytes) -> tuple[int, ...]:
    from lambdasplit.wire.frame import HEADER as FRAME_HEADER

    fields = FRAME_HEADER.unpack_from(data)
    rank = fields[5]
    return tuple(fields[9: 9 + rank])


def _chain(future: Future, convert: Callable[[Any], Any]) -> Future:
    out: Future = Future()

    def done(f: Future) -> None:
        exc = _exception(f)
        if exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(convert(f.result()))

    future.add_done_callback(done)
    return out


def _exception(future: Future) -> BaseException | None:
    if future.cancelled():
        return ComputeError("the request was cancelled")
    return future.exception()


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _error_dict(exc: BaseException) -> dict:
    retry_after = getattr(exc, "retry_after", None)
    name = type(exc).__name__
    if not isinstance(exc, LambdaSplitError):
        name, message = "ComputeError", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    else:
        message = str(exc)
    return {"type": name, "message": message, "retry_after": retry_after}


def _error_from(data: dict) -> LambdaSplitError:
    """The typed error the engine raised, rebuilt by name from `lambdasplit.errors` only."""
    cls = getattr(errors, str(data.get("type")), None)
    message = str(data.get("message", "the engine failed"))
    if isinstance(cls, type) and issubclass(cls, errors.RemoteError):
        return cls(message, data.get("retry_after"))
    if isinstance(cls, type) and issubclass(cls, LambdaSplitError):
        return cls(message)
    return ComputeError(message)


def _manifest_dict(manifest: Any) -> dict:
    return {"class": type(manifest).__name__, "data": manifest.as_dict()}


def _manifest_from(data: dict) -> Any:
    if data["class"] == "PipelineManifest":
        from lambdasplit.diffusion.parts import PipelineManifest

        return PipelineManifest.from_dict(data["data"])
    from lambdasplit.split.manifest import PartManifest

    return PartManifest.from_dict(data["data"])
