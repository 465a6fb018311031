"""BodyServer: the WebSocket transport in front of the BodyScheduler.

It moves frames and enforces who may talk (auth), how much (limits) and for how long (TTL); it
never interprets a tensor. A bad frame or a dropped connection ends that connection's session only.
"""

from __future__ import annotations

import asyncio
import http
import logging
import socket
import ssl
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from lambdasplit.cloud.metrics import ServerMetrics
from lambdasplit.engine.scheduler import BodyScheduler
from lambdasplit.errors import CapacityError
from lambdasplit.security import token_matches
from lambdasplit.errors import LambdaSplitError, WireError
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import HEADER_SIZE, Frame, Limits, MsgType, parse_frame
from lambdasplit.wire.protocol import BODY_PATH, PROTOCOL, control_frame, error_frame, read_control

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8470
    token: str | None = None
    tls: ssl.SSLContext | None = None
    session_ttl: float = 300.0  # idle seconds before a session is closed
    handshake_timeout: float = 10.0
    max_frame_bytes: int = 64 << 20


class BodyServer:
    def __init__(self, scheduler: BodyScheduler, config: ServerConfig) -> None:
        self.scheduler = scheduler
        self.config = config
        self.metrics = ServerMetrics()
        manifest = scheduler.manifest
        self.limits = Limits(
            max_payload=config.max_frame_bytes,
            hidden_size=manifest.hidden_size,
            max_tokens=scheduler.limits.max_context,
        )
        self.port: int | None = None

    async def run(self, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set (or forever)."""
        async with serve(
            self._connection,
            self.config.host,
            self.config.port,
            ssl=self.config.tls,
            process_request=self._http,
            max_size=self.config.max_frame_bytes + HEADER_SIZE,
            compression=None,
            ping_interval=20,
            ping_timeout=20,
        ) as server:
            sockets = list(server.sockets)
            for sock in sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.port = sockets[0].getsockname()[1]
            if ready is not None:
                ready.set()
            await (stop.wait() if stop is not None else asyncio.Future())
        self.scheduler.shutdown()

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.tls else "ws"
        return f"{scheme}://{self.config.host}:{self.port}"

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        """Plain HTTP: health and metrics; the body endpoint requires the bearer token."""
        path = request.path.split("?")[0]
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        authorized = self.config.token is None or token_matches(request.headers.get("Authorization"), self.config.token)
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

    async def _connection(self, ws: ServerConnection) -> None:
        session: bytes | None = None
        try:
            session = await self._handshake(ws)
            await self._serve_session(ws, session)
        except (WireError, LambdaSplitError) as exc:
            code = "protocol" if isinstance(exc, WireError) else "capacity" if isinstance(exc, CapacityError) else "refused"
            if isinstance(exc, WireError):
                self.metrics.frame_errors.inc()
            await _send_error(ws, code, str(exc), session)
        except ConnectionClosed:
            log.info("device disconnected")
        finally:
            if session is not None:
                await asyncio.wrap_future(self.scheduler.close_session(session))
                self.metrics.sessions_active.dec()

    async def _handshake(self, ws: ServerConnection) -> bytes:
        try:
            message = await asyncio.wait_for(ws.recv(), self.config.handshake_timeout)
        except asyncio.TimeoutError:
            raise WireError(f"no HELLO within {self.config.handshake_timeout:.0f} s") from None
        hello = read_control(_parse(message, self.limits), MsgType.HELLO)
        if hello.get("protocol") != PROTOCOL:
            raise WireError(f"protocol {hello.get('protocol')!r} is not supported; this server speaks {PROTOCOL}")
        theirs = self.scheduler.parse_manifest(hello.get("manifest") or {})
        body, problem = self.scheduler.body_for(theirs)
        if problem:
            self.metrics.sessions_refused.inc()
            log.warning("refused a device whose parts do not match: %s", problem)
            raise LambdaSplitError(f"the device's parts do not match this server's body: {problem}")
        Codec.parse(str(hello.get("codec", "fp32")))
        try:
            session = await asyncio.wrap_future(self.scheduler.open_session(body))
        except LambdaSplitError:
            self.metrics.sessions_refused.inc()
            raise
        self.metrics.sessions_total.inc()
        self.metrics.sessions_active.inc()
        welcome = {
            "protocol": PROTOCOL,
            "session": session.hex(),
            "manifest": self.scheduler.bodies[body][1].as_dict(),
            "limits": {"max_context": self.scheduler.limits.max_context, "max_frame_bytes": self.config.max_frame_bytes},
        }
        await ws.send(control_frame(MsgType.WELCOME, welcome, session).to_bytes())
        return session

    async def _serve_session(self, ws: ServerConnection, session: bytes) -> None:
        while True:
            try:
                message = await asyncio.wait_for(ws.recv(), self.config.session_ttl)
            except asyncio.TimeoutError:
                raise LambdaSplitError(f"session idle for {self.config.session_ttl:.0f} s; expired") from None
            self.metrics.bytes_in.inc(len(message))
            frame = _parse(message, self.limits)
            if frame.session != session:
                raise WireError("frame for another session: session ids are bound to their connection")
            if frame.type == MsgType.CLOSE:
                return
            reply, seconds = await asyncio.wrap_future(self.scheduler.submit(session, frame))
            if reply is not None:
                data = reply.to_bytes()
                await ws.send(data)
                self.metrics.bytes_out.inc(len(data))
                self.metrics.observe_step(seconds, reply.shape[0] * reply.shape[1])


def _parse(message: str | bytes, limits: Limits) -> Frame:
    if isinstance(message, str):
        raise WireError("text messages are not part of the protocol; send binary frames")
    return parse_frame(message, limits)


async def _send_error(ws: ServerConnection, code: str, message: str, session: bytes | None) -> None:
    log.warning("closing a connection (%s): %s", code, message)
    try:
        await ws.send(error_frame(code, message, session or bytes(16)).to_bytes())
        await ws.close(1008, code[:100])
    except ConnectionClosed:
        pass
