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

The engine serves one pipe per front end (`serve --front-ends N`, `cloud/frontends.py`): request
ids are each pipe's own, replies go back on the pipe the request came on, heartbeats go to every
pipe and step statistics and refusals to the first (the metrics are shared between the front
ends). A session belongs to the pipe that opened it: when a front end's pipe closes, its sessions
are closed, and so is one that finishes opening after that; a REAP closes idle sessions of its own
pipe only (every front end runs its reaper). The engine stops on SHUTDOWN (sent by
the first front end) or when every pipe has closed.
"""

from __future__ import annotations

import contextlib
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
from multiprocessing.connection import Connection, wait
from typing import Any

from lambdasplit import errors
from lambdasplit.errors import ComputeError, LambdaSplitError

log = logging.getLogger(__name__)

HEADER = struct.Struct("<BQ")  # op or kind, request id
RESULT = struct.Struct("<dB")  # compute seconds, whether a reply frame follows
LENGTH = struct.Struct("<I")  # a message's length inside a BATCH
HEARTBEAT_SECONDS = 0.5
# Messages a front end may leave unread before its heartbeats and step statistics are dropped (a
# stopped front end's queue would otherwise grow by every step's statistics); replies are never dropped.
BACKLOG = 1024
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
    verifies_trees: bool = False  # TREE frames accepted (`TextBody.verifies_trees`): WELCOME's max_tree_positions


# ---------------------------------------------------------------- engine process


def engine_main(conns: list[Connection], setup: Callable[[], None] | None, build: Callable[..., Any], args: tuple,
                kwargs: dict, max_frame_bytes: int) -> None:
    """The child process: build the scheduler, announce it on every pipe, then serve the pipes
    until SHUTDOWN or until all of them have closed.

    Ctrl-C is the front ends' to handle (it reaches the whole process group): the engine stops
    when the first front end sends SHUTDOWN or every front end's end of its pipe has closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if setup is not None:
        setup()  # the front end's logging and library verbosity
    try:
        scheduler = build(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the front end, which prints it and exits
        for conn in conns:
            # The first front end may have read its copy and exited, closing the other pipes' ends.
            with contextlib.suppress(OSError):
                conn.send_bytes(HEADER.pack(Kind.FAILED, 0) + _json(_error_dict(exc)))
        return
    _EngineLoop(conns, scheduler, max_frame_bytes).run()


class _EngineLoop:
    """Reads requests from every front end's pipe on this thread; replies go through a writer
    thread per pipe (so the compute thread, which completes the futures, never blocks on a pipe,
    and a front end that stops reading, e.g. SIGSTOPped, stalls only its own replies)."""

    def __init__(self, conns: list[Connection], scheduler: Any, max_frame_bytes: int) -> None:
        from lambdasplit.wire.frame import parse_frame

        self.conns = conns
        self.scheduler = scheduler
        self.parse = parse_frame
        self.limits = scheduler.manifest.frame_limits(max_frame_bytes, scheduler.limits.max_context)
        # Each pipe's messages to send; None stops its writer.
        self.outboxes: list[queue.SimpleQueue[bytes | None]] = [queue.SimpleQueue() for _ in conns]
        # Each pipe's open sessions, None once the pipe has closed. The reader thread and the compute
        # thread's callbacks (an OPEN's, a REAP's) both use them; one set operation is atomic, but
        # closing a pipe's sessions while an OPEN of that pipe completes is not: under `owned_lock`,
        # a session that finishes opening after its pipe closed is closed, not left open for nobody.
        self.owned: list[set[bytes] | None] = [set() for _ in conns]
        self.owned_lock = threading.Lock()
        scheduler.on_step = lambda stats: self._send(0, Kind.STEP, 0, _json(dataclasses.asdict(stats)))
        scheduler.on_refusal = lambda reason: self._send(0, Kind.REFUSAL, 0, _json(reason))
        self.stopping = threading.Event()

    def run(self) -> None:
        writers = [threading.Thread(target=self._write, args=(link,), name=f"engine-writer-{link}", daemon=True)
                   for link in range(len(self.conns))]
        for writer in writers:
            writer.start()
        beat = threading.Thread(target=self._heartbeat, name="engine-heartbeat", daemon=True)
        beat.start()
        scheduler = self.scheduler
        ready = {
            "manifests": [_manifest_dict(b.manifest) for b in scheduler.bodies],
            "trees": [getattr(b, "verifies_trees", False) for b in scheduler.bodies],
            "limits": dataclasses.asdict(scheduler.limits),
            "pool_blocks": scheduler.pool.usable_blocks if scheduler.pool is not None else None,
            "pid": os.getpid(),
        }
        for link in range(len(self.conns)):
            self._send(link, Kind.READY, 0, _json(ready))
        try:
            self._serve()
        finally:
            self.stopping.set()
            scheduler.shutdown()
            deadline = time.monotonic() + 5
            for outbox in self.outboxes:
                outbox.put(None)
            for writer in writers:  # one stuck on a stopped front end's full pipe is left to the exit
                writer.join(timeout=max(0.0, deadline - time.monotonic()))

    def _serve(self) -> None:
        """Requests from every open pipe, in arrival order per pipe, until SHUTDOWN or no pipe is left."""
        links = {conn: link for link, conn in enumerate(self.conns)}
        while links:
            for conn in wait(list(links)):
                link = links[conn]
                try:
                    message = conn.recv_bytes()
                except (EOFError, OSError):
                    del links[conn]  # that front end is gone: so are its sessions
                    self._drop(link)
                    continue
                op, request = HEADER.unpack_from(message)
                if op == Op.SHUTDOWN:
                    return
                self._dispatch(link, Op(op), request, memoryview(message)[HEADER.size:])

    def _drop(self, link: int) -> None:
        with self.owned_lock:
            owned, self.owned[link] = self.owned[link] or set(), None
        if owned:
            log.warning("front end %d left with %d open sessions; closing them", link, len(owned))
        for session in owned:
            self.scheduler.close_session(session)

    def _dispatch(self, link: int, op: Op, request: int, payload: memoryview) -> None:
        scheduler = self.scheduler
        try:
            if op == Op.SUBMIT:
                frame = self.parse(bytes(payload[16:]), self.limits)
                future = scheduler.submit(bytes(payload[:16]), frame)
                future.add_done_callback(lambda f: self._frame_result(link, request, f))
                return
            if op == Op.OPEN:
                future = scheduler.open_session(json.loads(bytes(payload))["body"])
                future.add_done_callback(lambda f: self._opened(link, f))  # first: owned before the reply
                future.add_done_callback(lambda f: self._value_result(link, request, f, bytes.hex))
            elif op == Op.CLOSE:
                session = bytes(payload)
                with self.owned_lock:
                    self.owned[link].discard(session)  # not None: this thread drops a pipe at its EOF only
                future = scheduler.close_session(session)
                future.add_done_callback(lambda f: self._value_result(link, request, f, lambda _: None))
            elif op == Op.REAP:
                with self.owned_lock:
                    owned = frozenset(self.owned[link])  # a copy: this thread changes the set while the reap waits
                future = scheduler.reap(json.loads(bytes(payload))["idle"], owned)
                future.add_done_callback(lambda f: self._reaped(link, request, f))
        except Exception as exc:  # noqa: BLE001 - a refused request fails alone
            self._send(link, Kind.ERROR, request, _json(_error_dict(exc)))

    def _opened(self, link: int, future: Future) -> None:
        """A new session belongs to the pipe that asked for it; if that pipe has closed meanwhile, nobody
        will ever use or close it, so it is closed now."""
        if _exception(future) is not None:
            return
        session = future.result()
        with self.owned_lock:
            owned = self.owned[link]
            if owned is not None:
                owned.add(session)
                return
        log.warning("front end %d left while its session opened; closing it", link)
        self.scheduler.close_session(session)

    def _reaped(self, link: int, request: int, future: Future) -> None:
        """A front end's reaper closes idle sessions of its own pipe only, since only that front end
        learns which ones it closed (and stops counting them); the pipe forgets them."""
        if _exception(future) is None:
            with self.owned_lock:
                owned = self.owned[link]
                if owned is not None:
                    owned.difference_update(future.result())
        self._value_result(link, request, future, lambda ids: [s.hex() for s in ids])

    def _frame_result(self, link: int, request: int, future: Future) -> None:
        exc = _exception(future)
        if exc is not None:
            self._send(link, Kind.ERROR, request, _json(_error_dict(exc)))
            return
        reply, seconds = future.result()
        data = reply.to_bytes() if reply is not None else b""
        self._send(link, Kind.FRAME, request, RESULT.pack(seconds, reply is not None) + data)

    def _value_result(self, link: int, request: int, future: Future, convert: Callable[[Any], Any]) -> None:
        exc = _exception(future)
        if exc is not None:
            self._send(link, Kind.ERROR, request, _json(_error_dict(exc)))
        else:
            self._send(link, Kind.VALUE, request, _json(convert(future.result())))

    def _heartbeat(self) -> None:
        """Every HEARTBEAT_SECONDS, to every front end: the compute loop's own health (None: alive and moving)."""
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            beat = _json(self.scheduler.health.problem())
            for link in range(len(self.conns)):
                self._send(link, Kind.HEARTBEAT, 0, beat)

    def _send(self, link: int, kind: Kind, request: int, payload: bytes) -> None:
        outbox = self.outboxes[link]
        if kind in (Kind.HEARTBEAT, Kind.STEP, Kind.REFUSAL) and outbox.qsize() >= BACKLOG:
            return
        outbox.put(HEADER.pack(kind, request) + payload)

    def _write(self, link: int) -> None:
        """Send what is queued for one pipe; the replies a step completes together leave in one write.
        Once the pipe is gone its messages are still taken off the queue (and dropped), so they do not pile up."""
        outbox, conn, gone = self.outboxes[link], self.conns[link], False
        while (item := outbox.get()) is not None:
            burst = [item]
            while len(burst) < 256:
                try:
                    more = outbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    outbox.put(None)
                    break
                burst.append(more)
            if gone:
                continue
            message = burst[0] if len(burst) == 1 else (
                HEADER.pack(Kind.BATCH, 0) + b"".join(LENGTH.pack(len(m)) + m for m in burst))
            try:
                conn.send_bytes(message)
            except (OSError, ValueError):
                gone = True  # that front end is gone; the reader sees EOF too


# ---------------------------------------------------------------- front end


class EngineClient:
    """The scheduler's interface, served by an engine process over one pipe (see the module docstring).

    `start` spawns the process and blocks until the model is loaded (or raises its error); the
    other front ends' pipes wait in `links` for `attach`, which the front-end processes call."""

    def __init__(self, conn: Connection, ready: dict, process: multiprocessing.process.BaseProcess | None = None,
                 links: list[Connection] | None = None) -> None:
        from lambdasplit.engine.scheduler import SchedulerLimits

        self.process = process  # None in a front end that did not start the engine
        # Only one thread at a time may reap the process: two in waitpid at once and the loser gets
        # ECHILD, which multiprocessing reads as "still running" (a shut-down engine reported alive).
        self._reaping = threading.Lock()
        self.conn = conn
        self.links = links or []  # the other front ends' pipes, not yet handed out
        trees = ready.get("trees") or [False] * len(ready["manifests"])
        self.bodies = [BodyInfo(_manifest_from(m), bool(t)) for m, t in zip(ready["manifests"], trees, strict=True)]
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
              setup: Callable[[], None] | None = None, front_ends: int = 1, **kwargs: Any) -> EngineClient:
        """Spawn the engine process running `setup()`, then `build(*args, **kwargs)` (a scheduler
        factory); both must be importable by name (the process is spawned, not forked). It serves
        `front_ends` pipes: this client's and `links`, one for each other front end."""
        context = multiprocessing.get_context("spawn")
        pairs = [context.Pipe(duplex=True) for _ in range(front_ends)]
        process = context.Process(target=engine_main,
                                  args=([theirs for _, theirs in pairs], setup, build, args, kwargs, max_frame_bytes),
                                  name="lambdasplit-engine", daemon=True)
        process.start()
        for _, theirs in pairs:
            theirs.close()
        ours = pairs[0][0]
        deadline = time.monotonic() + READY_TIMEOUT
        while not ours.poll(1.0):
            if not process.is_alive():
                raise LambdaSplitError(f"the engine process exited with status {process.exitcode} while loading")
            if time.monotonic() > deadline:
                process.kill()
                raise LambdaSplitError(f"the engine process did not load the model within {READY_TIMEOUT:.0f} s")
        answer = _ready(ours)
        if answer is None:
            process.join(timeout=10)
            raise LambdaSplitError(f"the engine process exited with status {process.exitcode} while loading")
        return cls(ours, answer, process, [link for link, _ in pairs[1:]])

    @classmethod
    def attach(cls, conn: Connection) -> EngineClient:
        """A client on a pipe of a running engine (a front-end process's; `start` made the pipe)."""
        if not conn.poll(READY_TIMEOUT):
            raise LambdaSplitError("the engine process did not announce itself on this front end's pipe")
        answer = _ready(conn)
        if answer is None:
            raise LambdaSplitError("the engine process is gone")
        return cls(conn, answer)

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

    def submit(self, session_id: bytes, frame: Any, waiter: Any = None) -> Any:
        """As `BodyScheduler.submit`: answers `waiter` (a Future or a `scheduler.Waiter` that also
        has `done()`), or a new Future; returned either way."""
        return self._request(Op.SUBMIT, session_id + frame.to_bytes(), "frame", waiter)

    @property
    def health(self) -> EngineClient:
        """What `/healthz` asks (`health.problem()`), as `BodyScheduler.health` answers it."""
        return self

    def problem(self) -> str | None:
        """None while the engine process is alive, reporting, and its compute loop moving; else why not."""
        if self._dead is not None:
            return self._dead
        status = self._exit_status()
        if status is not None:
            return f"the engine process exited with status {status}"
        silent = time.monotonic() - self._beat
        if silent > max(10 * HEARTBEAT_SECONDS, 5.0):
            return f"the engine process has not reported for {silent:.0f} s"
        return self._problem

    def shutdown(self) -> None:
        """The engine's starter stops it (SHUTDOWN, then a kill after 30 s); another front end only
        closes its pipe, which closes its sessions in the engine."""
        if self.process is None:
            self._fail_all("the body server is shutting down", quiet=True)
            self.conn.close()
            return
        with self._lock:
            if self._dead is None:
                try:
                    self.conn.send_bytes(HEADER.pack(Op.SHUTDOWN, 0))
                except (OSError, ValueError):
                    pass
        if not self._await_exit(30):
            self.process.kill()
            self._await_exit(10)
        with self._reaping:
            self.process.join(timeout=1)  # it has exited (or is killed): reap it
        self._fail_all("the body server is shutting down", quiet=True)

    def _await_exit(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the engine process to exit, without reaping it (its sentinel)."""
        return bool(wait([self.process.sentinel], timeout))

    def _exit_status(self) -> int | None:
        """The engine process's exit status; None while it runs (or in a front end that did not start it)."""
        if self.process is None:
            return None
        with self._reaping:
            return self.process.exitcode  # a non-blocking waitpid

    # plumbing
    def _request(self, op: Op, payload: bytes, what: str, waiter: Any = None) -> Any:
        future = waiter if waiter is not None else Future()
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
            except (EOFError, OSError, ValueError, TypeError):
                # ValueError, TypeError: shutdown() closed the pipe here, between two messages or
                # (TypeError) inside one: a read blocked on a message's length still returns it
                break
            for kind, request, payload in _unbatch(memoryview(message)):
                try:
                    self._deliver(kind, request, payload)
                except Exception:  # noqa: BLE001 - a metrics callback must not stop the replies
                    log.exception("handling a message from the engine process")
        if self.process is None:
            self._fail_all("the engine process stopped")
            return
        self._await_exit(2)  # for its exit status
        self._fail_all(f"the engine process stopped (exit status {self._exit_status()})")

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

    def _fail_all(self, reason: str, quiet: bool = False) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
                if not quiet and (self.process is None or self._exit_status() not in (None, 0)):
                    log.error("%s; every session in flight gets an error", reason)
            pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(ComputeError(f"{reason}; reconnect to replay the session"))


def _ready(conn: Connection) -> dict | None:
    """The engine's first message on a pipe: READY's fields, or FAILED's error raised; None at EOF."""
    try:
        message = conn.recv_bytes()
    except (EOFError, OSError):
        return None
    kind, _ = HEADER.unpack_from(message)
    answer = json.loads(message[HEADER.size:])
    if kind == Kind.FAILED:
        raise _error_from(answer)
    return answer


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
