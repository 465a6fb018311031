"""RemoteBody: the BodyClient that reaches a body server over one WebSocket.

It keeps every frame of the current sequence, so when the connection drops or the server restarts
it reconnects with backoff and replays them — same frames, same chunking, hence a bit-identical
body KV cache — and the generation continues as if nothing happened.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import time
from pathlib import Path

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from lambdasplit.security import client_ssl_context
from lambdasplit.device.body import BodyClient, TransferStats
from lambdasplit.errors import LambdaSplitError, WireError
from lambdasplit.split.manifest import PartManifest
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import Frame, Limits, MsgType, parse_frame
from lambdasplit.wire.protocol import BODY_PATH, PROTOCOL, control_frame, read_control

log = logging.getLogger(__name__)

_RETRYABLE = (ConnectionClosed, OSError, TimeoutError, InvalidHandshake)


class RemoteBody(BodyClient):
    def __init__(
        self,
        url: str,
        manifest: PartManifest,  # or a PipelineManifest for split diffusion
        codec: Codec = Codec.BF16,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        retries: int = 6,
        backoff: float = 0.25,
        capture: bool = False,
    ) -> None:
        self.url = url.rstrip("/") + BODY_PATH if not url.rstrip("/").endswith(BODY_PATH) else url
        if not self.url.startswith(("ws://", "wss://")):
            raise LambdaSplitError(f"--server {url!r}: expected ws://HOST:PORT or wss://HOST:PORT")
        self.manifest = manifest
        self.codec = codec
        self.token = token
        self.ssl = client_ssl_context(tls_ca) if self.url.startswith("wss://") else None
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.backoff = backoff
        self.stats = TransferStats()
        self.limits = Limits(hidden_size=manifest.hidden_size)
        if capture:
            self.start_capture()
        self.server_manifest: PartManifest | None = None
        self.reconnects = 0
        self._ws: ClientConnection | None = None
        self._session = bytes(16)
        self._seq = 0
        self._history: list[Frame] = []  # this sequence's frames, for replay

    # BodyClient
    def _exchange(self, frames: list[Frame]) -> Frame:
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                self._ensure_connected()
                reply = self._roundtrip(frames)
                self._history.extend(f for f in frames if self.kept_for_replay(f))
                return reply
            except _RETRYABLE as exc:
                last_error = exc
                self._drop()
                delay = self.backoff * 2**attempt
                log.warning("lost the body server (%s); reconnecting in %.2f s", _describe(exc), delay)
                time.sleep(delay)
        raise LambdaSplitError(
            f"the body server at {self.url} is unreachable after {self.retries + 1} attempts: {_describe(last_error)}"
        )

    def _reset(self) -> None:
        self._history.clear()
        if self._ws is not None:
            try:
                self._send(self._stamp(Frame(MsgType.RESET)))
            except _RETRYABLE:
                self._drop()  # a fresh session starts empty anyway

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._send(self._stamp(Frame(MsgType.CLOSE)))
            except _RETRYABLE:
                pass
            self._ws.close()
        self._ws = None

    # connection
    def _ensure_connected(self) -> None:
        if self._ws is not None:
            return
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            ws = connect(
                self.url, ssl=self.ssl, additional_headers=headers, compression=None, proxy=None,
                open_timeout=self.connect_timeout, max_size=None, ping_interval=20, ping_timeout=self.timeout,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                raise LambdaSplitError(f"the body server at {self.url} refused the token (401); check --token-file") from None
            raise LambdaSplitError(f"the body server at {self.url} answered HTTP {status}") from None
        except InvalidURI as exc:
            raise LambdaSplitError(f"bad server URL {self.url!r}: {exc}") from None
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise LambdaSplitError(f"TLS with {self.url} failed: {exc}; pass the server's CA with --tls-ca") from None
        ws.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ws = ws
        hello = {"protocol": PROTOCOL, "manifest": self.manifest.as_dict(), "codec": self.codec.name.lower()}
        self._send(control_frame(MsgType.HELLO, hello))
        welcome = read_control(self._recv(self.connect_timeout), MsgType.WELCOME)
        server = type(self.manifest).from_dict(welcome.get("manifest") or {})
        problem = self.manifest.compatible_with(server)
        if problem:
            self.close()
            raise LambdaSplitError(f"the body server's part does not match this device's: {problem}")
        self.server_manifest = server
        self._session = bytes.fromhex(welcome["session"])
        if self._history:
            self._replay()

    def _replay(self) -> None:
        """Rebuild the body's KV cache on a fresh session from this sequence's frames."""
        self.reconnects += 1
        log.warning("replaying %d frames to rebuild the body's cache", len(self._history))
        self._pipeline(self._history)

    def expects_reply(self, frame: Frame) -> bool:
        """Whether the body answers this frame (text: every HIDDEN frame)."""
        return frame.type == MsgType.HIDDEN

    def kept_for_replay(self, frame: Frame) -> bool:
        """Whether a reconnect must resend this frame (text: the whole sequence rebuilds the cache)."""
        return True

    def _roundtrip(self, frames: list[Frame]) -> Frame:
        reply = self._pipeline(frames)
        if reply is None:
            raise WireError("an exchange must end with a frame the body answers")
        return reply

    def _pipeline(self, frames: list[Frame]) -> Frame | None:
        """Send all frames, then read one reply per answered frame, in order; return the last reply."""
        pending = []
        for frame in frames:
            stamped = self._stamp(frame)
            self._send(stamped)
            if self.expects_reply(stamped):
                pending.append(stamped)
        reply = None
        for sent in pending:
            reply = self._recv(self.timeout)
            if reply.type == MsgType.ERROR:
                read_control(reply, sent.type)
            if reply.type != sent.type or reply.seq != sent.seq:
                raise WireError(f"expected the reply to frame {sent.seq}, got {reply.type.name} {reply.seq}")
        return reply

    def _stamp(self, frame: Frame) -> Frame:
        if self.expects_reply(frame):
            self._seq += 1
        return dataclasses.replace(frame, session=self._session, seq=self._seq)

    def _send(self, frame: Frame) -> None:
        assert self._ws is not None
        data = frame.to_bytes()
        if self.captured is not None:
            self.captured.append(("to_cloud", data))
        self._ws.send(data)

    def _recv(self, timeout: float) -> Frame:
        assert self._ws is not None
        try:
            data = self._ws.recv(timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"no reply from the body server within {timeout:.0f} s") from None
        if isinstance(data, str):
            raise WireError("the body server sent a text message")
        if self.captured is not None:
            self.captured.append(("from_cloud", data))
        return parse_frame(data, Limits(max_payload=1 << 31, max_elements=1 << 31, hidden_size=self.limits.hidden_size))

    def _drop(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass
        self._ws = None


def _describe(exc: Exception | None) -> str:
    return f"{type(exc).__name__}: {exc}" if exc else "unknown error"
