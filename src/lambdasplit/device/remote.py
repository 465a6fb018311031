"""RemoteBody: the BodyClient that reaches a body server over one WebSocket.

It keeps every frame of the current sequence, so when the connection drops or the server restarts
it reconnects with backoff and replays them — same frames, same chunking, hence a bit-identical
body KV cache — and the generation continues as if nothing happened.

Reconnect policy, per exchange:
- a server that was never reached (refused, unreachable, timed out) fails at once with one
  `UnavailableError` (a refused connection is retried once, silently): it is a wrong URL or a
  server that is not running, and waiting would only hide that;
- a connection lost after a WELCOME, or a session the server closed (ERROR `compute` / `expired`),
  is retried with exponential backoff for `reconnect_window` seconds, then replayed; one warning
  when it is lost, one when it is replayed, and no sleep after the last attempt;
- a capacity refusal (HTTP 503/429 or ERROR `capacity`) waits its `retry_after` while that fits
  in the window, then raises `CapacityError`;
- auth (HTTP 401/403 or ERROR `auth`), mismatch, protocol and TLS errors are never retried.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from lambdasplit import defaults
from lambdasplit.device.body import BodyClient, TransferStats
from lambdasplit.errors import (
    AuthError,
    CapacityError,
    ComputeError,
    ExpiredError,
    LambdaSplitError,
    MismatchError,
    ProtocolError,
    RemoteError,
    UnavailableError,
    WireError,
)
from lambdasplit.security import certificate_names, client_ssl_context, peer_certificate
from lambdasplit.split.manifest import PartManifest
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import Frame, Limits, MsgType, parse_frame
from lambdasplit.wire.protocol import BODY_PATH, PROTOCOL, control_frame, read_control

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRYABLE = (ConnectionClosed, OSError, TimeoutError, InvalidHandshake)  # transport failures
_TRANSIENT_FIRST = (ConnectionRefusedError, ConnectionResetError, EOFError, InvalidMessage)
MAX_BACKOFF = 4.0  # seconds between two reconnect attempts, at most


class RemoteBody(BodyClient):
    def __init__(
        self,
        url: str,
        manifest: PartManifest,  # or a PipelineManifest for split diffusion
        codec: Codec = Codec.BF16,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        timeout: float = defaults.REPLY_TIMEOUT,
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        reconnect_window: float = defaults.RECONNECT_WINDOW,
        backoff: float = 0.25,
        retries: int | None = None,
        capture: bool = False,
    ) -> None:
        """`reconnect_window`: seconds one exchange keeps reconnecting (or waiting out a capacity
        refusal) before it raises; `backoff`: the first delay, doubled per attempt up to
        MAX_BACKOFF; `retries`: an optional cap on the attempts within the window."""
        self.url = url.rstrip("/") + BODY_PATH if not url.rstrip("/").endswith(BODY_PATH) else url
        if not self.url.startswith(("ws://", "wss://")):
            raise LambdaSplitError(f"--server {url!r}: expected ws://HOST:PORT or wss://HOST:PORT")
        if tls_ca is not None and self.url.startswith("ws://"):
            raise LambdaSplitError(
                f"--tls-ca was given but --server {url!r} is plain ws://, which would ignore it: use wss://"
            )
        if reconnect_window < 0 or backoff < 0 or (retries is not None and retries < 0):
            raise LambdaSplitError("reconnect_window, backoff and retries must not be negative")
        self.manifest = manifest
        self.codec = codec
        self.token = token
        self.ssl = client_ssl_context(tls_ca) if self.url.startswith("wss://") else None
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.reconnect_window = reconnect_window
        self.backoff = backoff
        self.retries = retries
        self.stats = TransferStats()
        self.limits = manifest.frame_limits()  # what this device accepts from the server
        if capture:
            self.start_capture()
        self.server_manifest: PartManifest | None = None
        self.reconnects = 0
        self._connected_once = False  # a WELCOME was ever received: later failures are outages
        self._ws: ClientConnection | None = None
        self._session = bytes(16)
        self._seq = 0
        self._history: list[Frame] = []  # this sequence's frames, for replay

    # BodyClient
    def _exchange(self, frames: list[Frame]) -> Frame:
        def roundtrip() -> Frame:
            reply = self._roundtrip(frames)
            self._history.extend(f for f in frames if self.kept_for_replay(f))
            return reply

        return self._with_policy(roundtrip)

    def _with_policy(self, action: Callable[[], T]) -> T:
        """Connect (replaying this sequence) and run `action`, under the reconnect policy."""
        deadline: float | None = None
        attempts = 0  # failed attempts so far
        while True:
            try:
                self._ensure_connected(deadline)
                return action()
            except (CapacityError, ComputeError, ExpiredError, *_RETRYABLE) as exc:
                self._drop()
                if deadline is None:
                    deadline = time.monotonic() + self.reconnect_window
                attempts += 1
                delay = self._retry_delay(exc, attempts, deadline)
                time.sleep(delay)

    def _retry_delay(self, exc: Exception, attempts: int, deadline: float) -> float:
        """How long to wait before the next attempt after `exc`, or raise when there is none."""
        remaining = deadline - time.monotonic()
        exhausted = remaining <= 0 or (self.retries is not None and attempts > self.retries)
        if isinstance(exc, CapacityError):
            delay = exc.retry_after if exc.retry_after is not None else defaults.CAPACITY_RETRY_AFTER
            if exhausted or delay > remaining:
                waited = self.reconnect_window - max(remaining, 0.0)
                raise CapacityError(
                    f"{exc} (waited {waited:.0f} s of the {self.reconnect_window:g} s reconnect window)",
                    retry_after=delay,
                ) from None
            (log.warning if attempts == 1 else log.info)(
                "the body server is at capacity; retrying in %.1f s (for up to %.0f s)", delay, self.reconnect_window
            )
            return delay
        if not self._connected_once and not isinstance(exc, RemoteError):
            # Never reached: a wrong URL or a server that is not running. Say so now.
            if attempts == 1 and isinstance(exc, _TRANSIENT_FIRST) and not exhausted:
                # One quiet retry: the server may be starting, or a busy server (or the proxy in
                # front of it) hung up before answering the opening handshake.
                log.info("the first connection to %s failed (%s); retrying once", self.url, _describe(exc))
                return min(self.backoff, remaining)
            raise UnavailableError(f"cannot reach the body server at {self.url}: {_describe(exc)}") from None
        if exhausted:
            if isinstance(exc, RemoteError):
                raise type(exc)(
                    f"{exc} (still failing after {self.reconnect_window:g} s of reconnecting)", exc.retry_after
                ) from None
            raise UnavailableError(
                f"lost the body server at {self.url} and could not reconnect within "
                f"{self.reconnect_window:g} s ({attempts} attempts): {_describe(exc)}"
            ) from None
        delay = min(self.backoff * 2 ** (attempts - 1), MAX_BACKOFF, remaining)
        if attempts == 1:
            log.warning(
                "lost the body server (%s); reconnecting for up to %.0f s", _describe(exc), self.reconnect_window
            )
        else:
            log.info("reconnect attempt %d failed (%s); next in %.2f s", attempts, _describe(exc), delay)
        return delay

    def _reset(self) -> None:
        self._history.clear()
        if self._ws is not None:
            try:
                self._send(self._stamp(Frame(MsgType.RESET)))
            except _RETRYABLE:
                self._drop()  # a fresh session starts empty anyway

    def _crop(self, length: int) -> None:
        # Kept for replay: a fresh session rebuilds the drafted positions, then crops them again.
        frame = control_frame(MsgType.CROP, {"length": length})
        self._history.append(frame)
        if self._ws is not None:
            try:
                self._send(self._stamp(frame))
            except _RETRYABLE:
                self._drop()  # the next exchange reconnects and replays, CROP included

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._send(self._stamp(Frame(MsgType.CLOSE)))
            except _RETRYABLE:
                pass
            self._ws.close()
        self._ws = None

    # connection
    def frame_positions(self) -> int | None:
        self._welcomed()
        return self.max_frame_positions

    def tree_positions(self) -> int | None:
        self._welcomed()
        return self.max_tree_positions

    def context_limit(self) -> int | None:
        self._welcomed()  # so a prompt too long for the server fails before its prefill, not after
        return self.max_context

    def _welcomed(self) -> None:
        """The server announces its limits in WELCOME: connect first, under the reconnect policy."""
        if self._ws is None:
            self._with_policy(lambda: None)

    def _ensure_connected(self, deadline: float | None = None) -> None:
        if self._ws is not None:
            return
        open_timeout = self.connect_timeout
        if deadline is not None:  # a reconnect: no attempt outlives the window by much
            open_timeout = max(1.0, min(open_timeout, deadline - time.monotonic()))
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            ws = connect(
                self.url, ssl=self.ssl, additional_headers=headers, compression=None, proxy=None,
                open_timeout=open_timeout, max_size=None, ping_interval=20, ping_timeout=self.timeout,
                max_queue=2 * defaults.SEND_WINDOW_FRAMES,  # every reply the send window lets come fits
            )
        except InvalidStatus as exc:
            raise self._status_error(exc) from None
        except InvalidURI as exc:
            raise LambdaSplitError(f"bad server URL {self.url!r}: {exc}") from None
        except ssl.SSLCertVerificationError as exc:
            reason = (exc.verify_message or str(exc)).rstrip(".")
            mismatch = "mismatch" in reason.lower() or "not valid for" in reason.lower()
            hint = self._name_hint(open_timeout) if mismatch else "pass the server's CA with --tls-ca"
            raise LambdaSplitError(f"TLS with {self.url} failed: {reason}; {hint}") from None
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise LambdaSplitError(
                f"TLS with {self.url} failed: {exc}; if the server speaks plain WebSocket, use ws:// instead"
            ) from None
        except (InvalidMessage, ConnectionResetError, EOFError) as exc:
            # A TLS server hangs up on (or resets) a plain HTTP request: find out, and say so.
            if self.url.startswith("ws://") and _speaks_tls(self.url, min(open_timeout, 5.0)):
                raise UnavailableError(
                    f"the server at {self.url} speaks TLS: use wss:// and --tls-ca (the CA that signed its certificate)"
                ) from None
            raise exc from None
        ws.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ws = ws
        hello = {"protocol": PROTOCOL, "manifest": self.manifest.as_dict(), "codec": self.codec.name.lower()}
        self._send(control_frame(MsgType.HELLO, hello))
        welcome = read_control(self._recv(self.connect_timeout), MsgType.WELCOME)
        try:
            server = type(self.manifest).from_dict(welcome.get("manifest") or {})
            session = bytes.fromhex(welcome["session"])
        except (KeyError, TypeError, ValueError, WireError) as exc:
            self._drop()
            raise WireError(f"the body server sent a malformed WELCOME ({type(exc).__name__}: {exc})") from None
        problem = self.manifest.compatible_with(server)
        if problem:
            self.close()
            raise MismatchError(f"the body server's part does not match this device's: {problem}")
        self.server_manifest = server
        limits = welcome.get("limits") if isinstance(welcome.get("limits"), dict) else {}
        self.max_frame_positions = _positive(limits.get("max_frame_positions"), self.max_frame_positions)  # prompts go in chunks that fit
        self.max_context = _positive(limits.get("max_context"), self.max_context)  # checked before a prompt is sent
        self.max_tree_positions = _positive(limits.get("max_tree_positions"), None)  # absent: the server verifies chains only
        self._session = session
        self._connected_once = True
        if self._history:
            self._replay()

    def _name_hint(self, timeout: float) -> str:
        """What to connect to instead when the certificate is not for the URL's host: the names it
        lists (read from the server), never a guess such as localhost that it may not list."""
        parts = urlsplit(self.url)
        der = peer_certificate(parts.hostname or "", parts.port or 443, min(timeout, 5.0))
        names = certificate_names(der) if der else []
        make = "or make a certificate for this name with `lambdasplit certs --host NAME`"
        if not names:
            return f"connect with a host name the server's certificate lists, {make}"
        return f"the certificate is for {', '.join(names)}: connect with one of those (wss://NAME:{parts.port}), {make}"

    def _status_error(self, exc: InvalidStatus) -> RemoteError:
        """The typed error for an HTTP status that refused the WebSocket upgrade."""
        status = exc.response.status_code
        if status in (401, 403):
            return AuthError(f"the body server at {self.url} refused the token ({status}); check --token-file")
        if status in (429, 503):
            retry_after = _seconds(exc.response.headers.get("Retry-After"))
            return CapacityError(f"the body server at {self.url} is busy (HTTP {status}); retry later", retry_after)
        return ProtocolError(f"the body server at {self.url} answered HTTP {status}")

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
        """Send frames in order, reading one reply per answered frame as it comes; return the last.

        At most a window of frames and bytes (defaults.SEND_WINDOW_*) goes out ahead of the oldest
        unread reply, counting unanswered frames (CROP, MASK, diffusion conditioning) too; a frame
        is only held back while a reply is due, so one larger than the window goes alone."""
        window = SendWindow(defaults.SEND_WINDOW_FRAMES, defaults.SEND_WINDOW_BYTES)
        reply = None
        for frame in frames:
            stamped = self._stamp(frame)
            while window.full(stamped.size):
                reply = self._read_reply(window.answered())
            self._send(stamped)
            window.sent(stamped, self.expects_reply(stamped))
        while window.waiting:
            reply = self._read_reply(window.answered())
        return reply

    def _read_reply(self, sent: Frame) -> Frame:
        """The reply to `sent`, the oldest answered frame still without one."""
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


class SendWindow:
    """Frames sent but not yet known to be consumed by the server, in order.

    The server handles one connection's frames in order, so a reply to an answered frame means that
    frame and every frame before it were consumed: reading it frees all of them at once."""

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames, self.max_bytes = max_frames, max_bytes
        self.frames = self.bytes = 0  # sent so far
        self.freed_frames = self.freed_bytes = 0  # consumed, as far as the replies read tell
        self.waiting: deque[tuple[Frame, int, int]] = deque()  # answered frames without a reply yet

    def full(self, size: int) -> bool:
        """Whether a reply must be read before a frame of `size` bytes goes out."""
        if not self.waiting:
            return False  # nothing to read: the server is not blocked on us, so sending is safe
        in_flight = self.frames - self.freed_frames
        return in_flight >= self.max_frames or self.bytes - self.freed_bytes + size > self.max_bytes

    def sent(self, frame: Frame, answered: bool) -> None:
        self.frames += 1
        self.bytes += frame.size
        if answered:
            self.waiting.append((frame, self.frames, self.bytes))

    def answered(self) -> Frame:
        """The oldest answered frame, whose reply the caller reads now."""
        frame, self.freed_frames, self.freed_bytes = self.waiting.popleft()
        return frame


def _describe(exc: Exception | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is `lambdasplit serve` running there?)"
    return f"{type(exc).__name__}: {text}"


def _positive(value: object, otherwise: int | None) -> int | None:
    """A limit from WELCOME if it is a positive integer, else `otherwise` (a server may not send it)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else otherwise


def _seconds(header: str | None) -> float | None:
    """A Retry-After header's delay in seconds (the HTTP-date form is ignored)."""
    try:
        value = float(header) if header is not None else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value < 3600 else None


def _speaks_tls(url: str, timeout: float) -> bool:
    """Whether `url`'s host:port completes a TLS handshake (certificate not checked: a probe only)."""
    parts = urlsplit(url)
    return peer_certificate(parts.hostname or "", parts.port or 80, timeout) is not None
