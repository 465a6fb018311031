"""BodyServer: the WebSocket transport in front of the BodyScheduler.

It moves frames and enforces who may talk (auth), how much (limits) and for how long (TTL); it
never interprets a tensor. A bad frame, a failed step or a dropped connection ends that
connection's session only, and every refusal reaches the device as an ERROR frame with an
`ErrorCode`, logged on one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from lambdasplit import defaults
from lambdasplit.cloud.deliveries import Deliveries
from lambdasplit.cloud.metrics import ServerMetrics
from lambdasplit.engine.core import EngineClient
from lambdasplit.engine.scheduler import BodyScheduler
from lambdasplit.errors import (
    ErrorCode,
    ExpiredError,
    LambdaSplitError,
    MismatchError,
    RemoteError,
    WireError,
)
from lambdasplit.listen import bind_error
from lambdasplit.security import token_matches
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import HEADER_SIZE, Frame, Limits, MsgType, parse_frame
from lambdasplit.wire.protocol import BODY_PATH, PROTOCOL, control_frame, error_frame, read_control

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    host: str = defaults.HOST
    port: int = defaults.SERVE_PORT
    token: str | None = None
    tls: ssl.SSLContext | None = None
    session_ttl: float = defaults.SESSION_TTL  # idle seconds before a session is closed
    handshake_timeout: float = defaults.HANDSHAKE_TIMEOUT
    max_frame_bytes: int = defaults.MAX_FRAME_BYTES
    reuse_port: bool = False  # SO_REUSEPORT: several front-end processes share the port (`serve --front-ends`)


def _event_loop(use_uvloop: bool) -> Callable[[Coroutine[Any, Any, None]], None]:
    """uvloop.run where asked for and installed (its loop and transports are C: on the serving
    benchmark the asyncio machinery was the largest share of the event loop thread), else asyncio.run."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed; serving on asyncio's event loop")
        else:
            return uvloop.run
    return asyncio.run


class BodyServer:
    def __init__(self, scheduler: BodyScheduler | EngineClient, config: ServerConfig) -> None:
        self.scheduler = scheduler
        self.config = config
        self.metrics = ServerMetrics()
        # The open sessions of this server's connections: `sessions_active` is its size, so a
        # session closed by its connection and by the reaper (in either order) counts once.
        self._sessions: set[bytes] = set()
        scheduler.on_step = self.metrics.observe_forward
        scheduler.on_refusal = self.metrics.observe_refusal
        if scheduler.pool is not None:
            self.metrics.kv_blocks.set(scheduler.pool.usable_blocks)
        self.limits: Limits = scheduler.manifest.frame_limits(config.max_frame_bytes, scheduler.limits.max_context)
        self.port: int | None = None
        self._healthy = True  # what /healthz last answered
        self._deliveries: Deliveries | None = None  # the frames' answers, once the loop runs

    async def run(self, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set (or forever). Binding errors propagate as OSError."""
        self._deliveries = Deliveries(asyncio.get_running_loop())
        async with serve(
            self._connection,
            self.config.host,
            self.config.port,
            ssl=self.config.tls,
            process_request=self._http,
            server_header=None,  # do not advertise the websockets version
            max_size=self.config.max_frame_bytes + HEADER_SIZE,
            reuse_port=self.config.reuse_port or None,
            compression=None,
            ping_interval=20,
            ping_timeout=20,
        ) as server:
            sockets = list(server.sockets)
            for sock in sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.port = sockets[0].getsockname()[1]
            reaper = asyncio.create_task(self._reap())
            if ready is not None:
                ready.set()
            try:
                await (stop.wait() if stop is not None else asyncio.Future())
            finally:
                reaper.cancel()
        self.scheduler.shutdown()

    def serve_forever(self, use_uvloop: bool = True, on_listening: Callable[[], None] = lambda: None) -> None:
        """Serve in this thread until interrupted; `on_listening()` once the socket is bound. A bind
        failure is one LambdaSplitError (`lambdasplit.listen.bind_error`), never a wait on a server
        that will not start. Ctrl-C (and SIGTERM under `sigterm_unwinds`) stops the server from
        inside its event loop (`_CtrlC`), then raises here what the signal's handler would have
        (KeyboardInterrupt: the CLI exits with 130 on it; Terminated)."""
        ctrl_c = _CtrlC()

        async def serve_until_stopped() -> None:
            with ctrl_c.cancels_this_task():
                ready = asyncio.Event()
                task = asyncio.create_task(self.run(ready))
                # A bind failure ends the task before `ready` is set: wait for whichever comes first.
                waiting = asyncio.create_task(ready.wait())
                await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if not ready.is_set():
                    waiting.cancel()
                    await task  # raises the OSError
                    raise LambdaSplitError("the body server stopped before it was listening")
                on_listening()
                await task

        try:
            _event_loop(use_uvloop)(serve_until_stopped())
        except OSError as exc:
            raise bind_error(self.config.host, self.config.port, exc) from None
        except asyncio.CancelledError:
            if ctrl_c.pressed is None:
                raise
        ctrl_c.raise_pressed()

    @property
    def serving(self) -> str:
        """What this server hosts, in words (the manifest's summary of every body)."""
        first, *others = [body.manifest for body in self.scheduler.bodies]
        return first.summary(others)

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.tls else "ws"
        return f"{scheme}://{self.config.host}:{self.port}"

    async def _reap(self) -> None:
        """Backstop for sessions whose connection vanished without running its cleanup."""
        idle = self.config.session_ttl + self.config.handshake_timeout
        while True:
            await asyncio.sleep(max(1.0, self.config.session_ttl / 4))
            with contextlib.suppress(LambdaSplitError):  # the compute loop has stopped: /healthz says so
                await self.reap(idle)

    async def reap(self, idle_seconds: float) -> list[bytes]:
        """One pass of the reaper: close the sessions idle for longer than `idle_seconds`; their ids."""
        closed = await asyncio.wrap_future(self.scheduler.reap(idle_seconds))
        self._sessions.difference_update(closed)
        self.metrics.sessions_active.set(len(self._sessions))
        return closed

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        """Plain HTTP: health and metrics; the body endpoint requires the bearer token."""
        path = request.path.split("?")[0]
        if path == "/healthz":
            return self._health(connection)
        auth = request.headers.get_all("Authorization")
        if len(auth) > 1:
            log.warning("refused a request from %s: %d Authorization headers", connection.remote_address, len(auth))
            return connection.respond(http.HTTPStatus.BAD_REQUEST, "send exactly one Authorization header\n")
        authorized = self.config.token is None or token_matches(auth[0] if auth else None, self.config.token)
        if path == "/metrics":
            if not authorized:
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token\n")
            response = connection.respond(http.HTTPStatus.OK, self.metrics.render().decode())
            response.headers["Content-Type"] = "text/plain; version=0.0.4"
            return response
        if path != BODY_PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, f"not found; the body endpoint is {BODY_PATH}\n")
        if not authorized:
            self.metrics.sessions_refused.inc()
            log.warning("refused a connection from %s: bad or missing token", connection.remote_address)
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token\n")
        return None

    def _health(self, connection: ServerConnection) -> Response:
        """200 `ok` while the compute loop is alive and not stuck in a step; else 503 and why."""
        problem = self.scheduler.health.problem()
        if (problem is None) != self._healthy:  # one log line per change, not one per check
            self._healthy = problem is None
            (log.info if self._healthy else log.error)("health: %s", problem or "the compute loop is running again")
        if problem is None:
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, f"unhealthy: {problem}\n")

    async def _connection(self, ws: ServerConnection) -> None:
        # The session is registered in `opened` before WELCOME is sent, so a device that vanishes
        # between HELLO and WELCOME cannot leak it.
        opened: list[bytes] = []
        try:
            await self._handshake(ws, opened)
            await self._serve_session(ws, opened[0])
        except ConnectionClosed:
            log.info("device disconnected")
        except Exception as exc:  # noqa: BLE001 - one log line, never a traceback
            session = opened[0] if opened else None
            await self._end_session(opened)  # before the ERROR frame: a device that reads it finds its session gone
            await self._refuse(ws, exc, session)
        finally:
            await self._end_session(opened)

    async def _end_session(self, opened: list[bytes]) -> None:
        """Close the connection's session, once (a no-op in the scheduler if the reaper was first)."""
        if opened:
            session = opened.pop()
            try:
                await asyncio.wrap_future(self.scheduler.close_session(session))
            finally:
                self._sessions.discard(session)
                self.metrics.sessions_active.set(len(self._sessions))

    async def _refuse(self, ws: ServerConnection, exc: Exception, session: bytes | None) -> None:
        code = _code(exc)
        if code in (ErrorCode.PROTOCOL, ErrorCode.LIMIT):
            self.metrics.frame_errors.inc()
        message = str(exc) if isinstance(exc, LambdaSplitError) else f"internal error ({type(exc).__name__})"
        if not isinstance(exc, LambdaSplitError):
            log.error("unexpected %s on a connection: %s", type(exc).__name__, ascii(str(exc))[:300])
        retry_after = exc.retry_after if isinstance(exc, RemoteError) else None
        level = logging.ERROR if code == ErrorCode.COMPUTE else logging.WARNING
        where = f" (session {session.hex()[:8]})" if session else ""
        log.log(level, "closing a connection%s (%s): %s", where, code.value, ascii(message)[1:-1])
        with contextlib.suppress(ConnectionClosed):
            await ws.send(error_frame(code.value, message, session or bytes(16), retry_after).to_bytes())
            await ws.close(1008, code.value)

    async def _handshake(self, ws: ServerConnection, opened: list[bytes]) -> None:
        try:
            message = await asyncio.wait_for(ws.recv(), self.config.handshake_timeout)
        except asyncio.TimeoutError:
            raise WireError(f"no HELLO within {self.config.handshake_timeout:.0f} s") from None
        frame = _parse(message, self.limits)
        try:
            hello = read_control(frame, MsgType.HELLO)
        except RemoteError:
            # An ERROR frame in place of HELLO: never echo a code (or retry_after) the device chose.
            raise WireError(f"expected a HELLO frame, got {frame.type.name}") from None
        if hello.get("protocol") != PROTOCOL:
            raise WireError(f"protocol {hello.get('protocol')!r} is not supported; this server speaks {PROTOCOL}")
        theirs = self.scheduler.parse_manifest(hello.get("manifest") or {})
        body_index, problem = self.scheduler.body_for(theirs)
        if problem:
            self.metrics.sessions_refused.inc()
            raise MismatchError(f"the device's parts do not match this server's body: {problem}")
        Codec.parse(str(hello.get("codec", "fp32")))
        try:
            session = await asyncio.wrap_future(self.scheduler.open_session(body_index))
        except LambdaSplitError:
            self.metrics.sessions_refused.inc()
            raise
        opened.append(session)
        self._sessions.add(session)
        self.metrics.sessions_active.set(len(self._sessions))
        self.metrics.sessions_total.inc()
        limits = self.scheduler.limits
        body = self.scheduler.bodies[body_index]
        welcome = {
            "protocol": PROTOCOL,
            "session": session.hex(),
            "manifest": body.manifest.as_dict(),
            "limits": {
                "max_context": limits.max_context,
                "max_batch": limits.max_batch,
                "max_frame_positions": limits.max_frame_positions,
                "max_session_kv_bytes": limits.max_session_kv_bytes,
                "max_frame_bytes": self.config.max_frame_bytes,
            },
        }
        if getattr(body, "verifies_trees", False):  # a text body whose layers can verify a draft tree (TREE frames)
            welcome["limits"]["max_tree_positions"] = min(defaults.MAX_TREE_POSITIONS, limits.max_frame_positions)
        await ws.send(control_frame(MsgType.WELCOME, welcome, session).to_bytes())

    async def _serve_session(self, ws: ServerConnection, session: bytes) -> None:
        idle = _IdleWatch(self.config.session_ttl)
        deliveries = self._deliveries
        assert deliveries is not None  # set by run() before it serves
        try:
            while True:
                message = await idle.receive(ws)
                self.metrics.bytes_in.inc(len(message))
                frame = _parse(message, self.limits)
                if frame.session != session:
                    raise WireError("frame for another session: session ids are bound to their connection")
                if frame.type == MsgType.CLOSE:
                    return
                answer = deliveries.answer()
                self.scheduler.submit(session, frame, answer)
                reply, seconds = await answer.future
                if reply is not None:
                    data = reply.to_bytes()
                    await ws.send(data)
                    self.metrics.bytes_out.inc(len(data))
                    self.metrics.observe_step(seconds, reply.shape[0] * (reply.shape[1] if len(reply.shape) > 1 else 1))
        finally:
            idle.stop()


class _CtrlC:
    """Ctrl-C (and SIGTERM where the process unwinds on it) as an event-loop callback: the first one
    cancels the serving task, so the server stops as any cancelled coroutine does; a later one is
    ignored. A Python signal handler that raises instead (Python's own KeyboardInterrupt, a front
    end's `_interrupt_once`, `sigterm_unwinds`' Terminated) raises at whatever bytecode is running,
    which may be inside a uvloop transport callback (a closing connection's `eof_received`): uvloop
    catches it there, logs "Fatal error on transport" with a traceback and serves on. Ctrl-C in a
    terminal reaches a front end twice (from the terminal, then from the server process stopping its
    front ends): the second must not cut its way out short."""

    def __init__(self) -> None:
        self.pressed: int | None = None  # the signal that came first
        # Before asyncio's runner puts in its own. Signals reach the main thread only, and the loop
        # takes them on Unix only. A process that ignores one (started from a background shell), or
        # leaves it to the system (SIGTERM without `sigterm_unwinds`), goes on doing so.
        main = os.name == "posix" and threading.current_thread() is threading.main_thread()
        self.previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        self.taken = [signum for signum, handler in self.previous.items() if main and callable(handler)]

    @contextlib.contextmanager
    def cancels_this_task(self) -> Iterator[None]:
        """Within (in a running task): the signals cancel that task. After: ignored if one came (the
        process is on its way out, stopping its front ends and engine), else handled as before."""
        task = asyncio.current_task()
        if not self.taken or task is None:
            yield
            return
        loop = asyncio.get_running_loop()
        for signum in self.taken:
            loop.add_signal_handler(signum, self._press, signum, task)
        try:
            yield
        finally:
            for signum in self.taken:
                loop.remove_signal_handler(signum)  # puts in Python's default handler: replaced at once
                signal.signal(signum, signal.SIG_IGN if self.pressed is not None else self.previous[signum])

    def _press(self, signum: int, task: asyncio.Task) -> None:
        if self.pressed is None:
            self.pressed = signum
            task.cancel()

    def raise_pressed(self) -> None:
        """Out of the loop: what the signal would have raised (KeyboardInterrupt for Ctrl-C, the
        process's own SIGTERM handler's exception), now from ordinary code."""
        if self.pressed == signal.SIGTERM:
            self.previous[signal.SIGTERM](signal.SIGTERM, None)
        if self.pressed is not None:
            raise KeyboardInterrupt


class _IdleWatch:
    """Ends a session whose device sent nothing for `ttl` seconds while the server waited for its
    next frame (the time its own frames spend in the body does not count).

    One timer per connection, moved on only when it fires: `asyncio.wait_for` around every
    `recv()` armed and cancelled a timer (and, before Python 3.12, a task) per frame, 4% of the
    event loop thread at 64 sessions. A `recv()` cancelled by the watch is safe to cancel
    (websockets keeps the message for the next one)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._since: float | None = None  # when the current wait for a frame began; None: not waiting
        self._expired = False
        self._timer = self._loop.call_later(ttl, self._check)

    async def receive(self, ws: ServerConnection) -> str | bytes:
        """The next message, or ExpiredError once none came for `ttl` seconds."""
        self._since = self._loop.time()
        try:
            return await ws.recv()
        except asyncio.CancelledError:
            if not self._expired:
                raise
            # Python 3.11+ counts cancellations: ours is handled; one more means someone else also
            # cancelled this task (a shutdown), and theirs wins.
            if hasattr(self._task, "uncancel") and self._task.uncancel() > 0:
                raise
            raise ExpiredError(f"session idle for {self.ttl:.0f} s; expired") from None
        finally:
            self._since = None

    def stop(self) -> None:
        self._timer.cancel()

    def _check(self) -> None:
        now = self._loop.time()
        due = now + self.ttl if self._since is None else self._since + self.ttl
        if now < due or self._task is None:
            self._timer = self._loop.call_at(due, self._check)
            return
        self._expired = True
        self._task.cancel()


def _code(exc: Exception) -> ErrorCode:
    if isinstance(exc, RemoteError):
        return exc.code
    if isinstance(exc, WireError):
        return ErrorCode.PROTOCOL
    if isinstance(exc, LambdaSplitError):
        return ErrorCode.PROTOCOL
    return ErrorCode.COMPUTE


def _parse(message: str | bytes, limits: Limits) -> Frame:
    if isinstance(message, str):
        raise WireError("text messages are not part of the protocol; send binary frames")
    return parse_frame(message, limits)

