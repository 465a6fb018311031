"""RemoteBody's reconnect policy: fail fast when never connected, typed refusals, bounded waits.

Most conditions come from a tiny scriptable WebSocket server on 127.0.0.1 (an echo body: each
HIDDEN frame comes back as it went), because a real body server cannot be told to run out of
capacity, fail a step or expire a session on cue; the auth and capacity paths also run against a
real `lambdasplit serve`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from websockets.asyncio.server import serve

from lambdasplit import defaults
from lambdasplit.device import remote as remote_module
from lambdasplit.device.remote import RemoteBody
from lambdasplit.diffusion.device import RemoteUNet
from lambdasplit.diffusion.protocol import Slot
from lambdasplit.errors import (
    AuthError,
    CapacityError,
    LambdaSplitError,
    MismatchError,
    UnavailableError,
)
from lambdasplit.split.manifest import PartManifest
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import Frame, MsgType, parse_frame, tensor_frame
from lambdasplit.wire.protocol import control_frame, error_frame

D = 8
DEVICE = PartManifest(
    role="device", model_type="llama", fingerprint="ab" * 32, layers=6, hidden_size=D,
    head=(0, 2), body=(2, 4), tail=(4, 6), dtype="float32",
)
CLOUD = PartManifest(**{**DEVICE.__dict__, "role": "cloud"})
LOGGER = "lambdasplit.device.remote"
T = TypeVar("T")

# What the fake does with connection number n (0-based): a Script returns one of
#   ("http", status, headers)          refuse the upgrade with an HTTP status
#   ("hangup",)                        drop the connection before answering the upgrade
#   ("refuse", code, retry_after)      answer HELLO with an ERROR frame and close
#   ("welcome", manifest)              a session; optional ("welcome", manifest, fail_at, code)
#                                      sends ERROR `code` (or drops the socket when code is None)
#                                      instead of the reply to HIDDEN frame number fail_at (1-based)
Script = Callable[[int], tuple]


class FakeBody:
    """A WebSocket server in a thread that plays a Script; records what each connection received."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None, **serve_options: object) -> None:
        """`serve_options` go to websockets' `serve` (e.g. a small `write_limit` and `max_queue`)."""
        self.script = script
        self.tls = tls
        self.serve_options = serve_options
        self.connections: list[list[int]] = []  # per connection: the first value of every HIDDEN frame
        self.times: list[float] = []  # when each connection arrived (monotonic)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}"

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        async with serve(
            self._handle, "127.0.0.1", 0, ssl=self.tls, process_request=self._http, compression=None, **self.serve_options
        ) as srv:
            self.port = srv.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop

    def _step(self, n: int) -> tuple:
        return self.script(n)

    def _http(self, connection, request):
        n = len(self.connections)
        action = self._step(n)
        if action[0] not in ("http", "hangup"):
            return None
        self.connections.append([])
        self.times.append(time.monotonic())
        if action[0] == "hangup":
            connection.transport.abort()  # what the response below is written to is gone
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "")
        response = connection.respond(http.HTTPStatus(action[1]), "refused\n")
        for key, value in action[2].items():
            response.headers[key] = value
        return response

    async def _handle(self, ws) -> None:
        n = len(self.connections)
        received: list[int] = []
        self.connections.append(received)
        self.times.append(time.monotonic())
        action = self._step(n)
        hello = parse_frame(await ws.recv())
        assert hello.type == MsgType.HELLO
        if action[0] == "refuse":
            _, code, retry_after = action
            await ws.send(error_frame(code, f"scripted {code} refusal", retry_after=retry_after).to_bytes())
            await ws.close(1008, code)
            return
        manifest, fail_at, code = (*action[1:], None, None)[:3]
        session = secrets.token_bytes(16)
        welcome = {"protocol": 1, "session": session.hex(), "manifest": manifest.as_dict(), "limits": {}}
        await ws.send(control_frame(MsgType.WELCOME, welcome, session).to_bytes())
        async for message in ws:
            frame = parse_frame(message)
            if frame.type != MsgType.HIDDEN:
                continue
            received.append(int(frame.tensor().flatten()[0]))
            if fail_at is not None and len(received) == fail_at:
                if code is None:
                    ws.transport.abort()  # the connection is lost, no close frame
                    return
                await ws.send(error_frame(code, f"scripted {code} failure", session).to_bytes())
                await ws.close(1011, code)
                return
            await ws.send(message)  # an identity body: the reply is the frame itself

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and not self._stop.done():
            self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        self._thread.join(10)

    def __enter__(self) -> FakeBody:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ok(n: int) -> tuple:
    return ("welcome", CLOUD)


def body(url: str, **kwargs) -> RemoteBody:
    kwargs.setdefault("codec", Codec.FP32)
    return RemoteBody(url, DEVICE, **kwargs)


class FakeClock:
    """RemoteBody's clock in these tests: time moves only when it sleeps, and every sleep is
    recorded, so the waits of the reconnect policy are asserted exactly, whatever the load."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(remote_module, "time", fake)
    return fake


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


X = torch.arange(3 * D, dtype=torch.float32).reshape(1, 3, D)


# ---- never connected ------------------------------------------------------------------------------

def test_a_server_never_reached_fails_fast_with_one_error_and_no_warnings(caplog, clock):
    caplog.set_level(logging.INFO, LOGGER)
    remote = body(f"ws://127.0.0.1:{free_port()}")
    with pytest.raises(UnavailableError, match="cannot reach the body server .* connection refused") as info:
        remote.forward(X)
    assert clock.sleeps == [0.25]  # one quiet retry after the backoff; was 32-38 s of retries
    assert "\n" not in str(info.value)
    assert warnings(caplog) == []  # was 7 "lost the body server" warnings


def test_a_first_connection_dropped_before_the_handshake_answer_is_retried_once_quietly(caplog):
    """A busy server (or the proxy in front of it) may hang up on the opening handshake: one retry."""
    caplog.set_level(logging.INFO, LOGGER)
    with FakeBody(lambda n: ("hangup",) if n == 0 else ok(n)) as fake:
        remote = body(fake.url)
        assert torch.equal(remote.forward(X), X)
        remote.close()
        assert len(fake.connections) == 2 and warnings(caplog) == []
    with FakeBody(lambda n: ("hangup",)) as fake:
        with pytest.raises(UnavailableError, match="cannot reach the body server"):
            body(fake.url).forward(X)
        assert len(fake.connections) == 2  # one retry, not the reconnect window


def test_plain_ws_to_a_tls_port_says_use_wss(tmp_path, caplog, clock):
    from lambdasplit.security import make_certificates

    paths = make_certificates(tmp_path, ["localhost", "127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths["cert"], paths["key"])
    with FakeBody(ok, tls=context) as fake:
        remote = body(fake.url.replace("wss://", "ws://"))
        with pytest.raises(UnavailableError, match="speaks TLS: use wss:// and --tls-ca"):
            remote.forward(X)
        assert clock.sleeps == []  # was 36 s of retries with no hint
        assert warnings(caplog) == []
        # and the right URL works (30 s: a TLS handshake once took over the 10 s default on the busy CI machine)
        secure = body(fake.url, tls_ca=paths["ca"], connect_timeout=30.0)
        assert torch.equal(secure.forward(X), X)
        secure.close()


def test_tls_ca_with_a_plain_url_is_refused():
    with pytest.raises(LambdaSplitError, match="--tls-ca was given but .* plain ws://.*use wss://"):
        body("ws://127.0.0.1:1", tls_ca="/nonexistent/ca.pem")


def test_wss_to_a_plain_port_says_the_server_is_plain():
    with FakeBody(ok) as fake:
        remote = body(fake.url.replace("ws://", "wss://"))
        with pytest.raises(LambdaSplitError, match="TLS with .* failed.*use ws://"):
            remote.forward(X)


# ---- outages after a session ----------------------------------------------------------------------

def test_a_dropped_connection_reconnects_and_replays_with_two_warnings(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    script = lambda n: ("welcome", CLOUD, 3, None) if n == 0 else ok(n)  # noqa: E731
    with FakeBody(script) as fake:
        remote = body(fake.url)
        outs = [remote.forward(X + i) for i in range(4)]
        remote.close()
    assert all(torch.equal(out, X + i) for i, out in enumerate(outs))
    assert remote.reconnects == 1
    assert fake.connections == [[0, 1, 2], [0, 1, 2, 3]]  # the first two replayed, then the lost one and the next
    messages = warnings(caplog)
    assert len(messages) == 2, messages
    assert messages[0].startswith("lost the body server") and messages[1].startswith("replaying 2 frames")


@pytest.mark.parametrize("code", ["compute", "expired"])
def test_a_session_the_server_closed_is_replayed(code, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    script = lambda n: ("welcome", CLOUD, 2, code) if n == 0 else ok(n)  # noqa: E731
    with FakeBody(script) as fake:
        remote = body(fake.url)
        outs = [remote.forward(X + i) for i in range(3)]
        remote.close()
    assert all(torch.equal(out, X + i) for i, out in enumerate(outs))
    assert remote.reconnects == 1
    assert fake.connections == [[0, 1], [0, 1, 2]]
    assert len(warnings(caplog)) == 2


def test_the_reconnect_window_bounds_an_outage_and_ends_without_a_last_sleep(caplog, clock):
    caplog.set_level(logging.INFO, LOGGER)
    fake = FakeBody(ok)
    try:
        remote = body(fake.url, reconnect_window=1.5, backoff=0.25)
        remote.forward(X)
    finally:
        fake.close()  # now nothing listens: every reconnect is refused
    with pytest.raises(UnavailableError, match=r"could not reconnect within 1.5 s \(4 attempts\)") as info:
        remote.forward(X)
    # Doubling backoff cut to fill the window exactly, not fixed retries; no sleep after the last attempt.
    assert clock.sleeps == [0.25, 0.5, 0.75]
    assert "connection refused" in str(info.value)
    assert len(warnings(caplog)) == 1


WIDE = dataclasses.replace(DEVICE, hidden_size=2048)  # one fp32 position is an 8 KiB frame, as in issue 21
WIDE_CLOUD = dataclasses.replace(WIDE, role="cloud")


def finish_within(action: Callable[[], T], deadline: float, on_timeout: Callable[[], None]) -> T:
    """`action`'s result, run in a thread; a wedged action fails the test at `deadline` (seconds)
    after `on_timeout` (which must unblock it) instead of hanging the run."""
    done: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            done.append(action())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        on_timeout()
        thread.join(30)
        pytest.fail(f"still not finished after {deadline:g} s: wedged")
    if errors:
        raise errors[0]
    return done[0]


def test_a_replay_of_thousands_of_frames_finishes_against_a_flow_controlled_server(caplog):
    """Issue 21: a replay that sent every frame before reading a reply wedged both ends once the
    server (answering one frame at a time, awaiting each send) stopped reading. Every 10th step
    also drafts a position and crops it (a CROP frame gets no reply but is replayed)."""
    caplog.set_level(logging.INFO, LOGGER)
    steps = 3000
    lost = steps + steps // 10 + 1  # the HIDDEN frame whose reply the first connection never sends
    script = lambda n: ("welcome", WIDE_CLOUD, lost, None) if n == 0 else ("welcome", WIDE_CLOUD)  # noqa: E731
    position = torch.zeros(1, 1, WIDE.hidden_size)
    sent: list[int] = []
    with FakeBody(script, write_limit=4096, max_queue=4) as fake:
        remote = RemoteBody(fake.url, WIDE, codec=Codec.FP32)
        for i in range(steps):
            sent.append(i)
            assert torch.equal(remote.forward(position + i), position + i)
            if i % 10 == 9:  # a rejected draft: sent, answered, then cropped away
                sent.append(-i)
                remote.forward(position - i)
                remote.crop(i + 1)
        out = finish_within(lambda: remote.forward(position + steps), 300, fake.close)
        remote.close()
    assert torch.equal(out, position + steps)
    assert remote.reconnects == 1
    assert len(fake.connections) == 2
    assert fake.connections[0] == sent + [steps]  # the last one's reply was lost with the connection
    assert fake.connections[1] == sent + [steps]  # replayed in the same order, then sent again
    assert f"replaying {len(sent) + steps // 10} frames" in " ".join(warnings(caplog))


class InMemoryBody(RemoteBody):
    """A RemoteBody whose body is in memory and consumes frames only when the device reads a reply
    (the slowest server there is); records what was in flight as each frame went out."""

    def __init__(self) -> None:
        super().__init__("ws://127.0.0.1:1", WIDE, codec=Codec.FP32)
        self.unread: list[Frame] = []  # sent, not yet consumed by the body
        self.log: list[tuple[Frame, int, int, bool]] = []  # (frame, frames and bytes in flight, a reply due)

    def _ensure_connected(self, deadline: float | None = None) -> None:
        self._connected_once = True

    def _send(self, frame: Frame) -> None:
        due = any(self.expects_reply(f) for f in self.unread)
        self.log.append((frame, len(self.unread), sum(f.size for f in self.unread), due))
        self.unread.append(frame)

    def _recv(self, timeout: float) -> Frame:
        while self.unread:
            frame = self.unread.pop(0)
            if self.expects_reply(frame):
                return frame  # an identity body
        raise AssertionError("the device read a reply nothing asked for")


class InMemoryUNet(InMemoryBody):
    expects_reply = RemoteUNet.expects_reply
    kept_for_replay = RemoteUNet.kept_for_replay


def hidden(value: float, positions: int = 1) -> Frame:
    return tensor_frame(MsgType.HIDDEN, torch.full((1, positions, WIDE.hidden_size), value), Codec.FP32)


def test_the_send_window_bounds_frames_and_bytes_ahead_of_the_oldest_unread_reply():
    """Unanswered frames (MASK, CROP) count in the window; one frame larger than the window's
    bytes goes alone; the frames go out unchanged and in order."""
    big = defaults.SEND_WINDOW_BYTES // (4 * WIDE.hidden_size) + 1  # positions of a frame over the bytes bound
    frames = []
    for i in range(60):
        frames.append(hidden(i, big if i % 20 == 10 else 1))
        if i % 3 == 0:
            frames.append(control_frame(MsgType.CROP, {"length": i}))
        if i % 7 == 0:
            frames.append(tensor_frame(MsgType.MASK, torch.ones(1, 1, dtype=torch.bool), Codec.NONE))
    remote = InMemoryBody()
    last = remote.exchange(frames)
    assert torch.equal(last, frames[-1].tensor())
    assert [(f.type, f.payload) for f, *_ in remote.log] == [(f.type, f.payload) for f in frames]
    for frame, in_flight, in_flight_bytes, due in remote.log:  # so a big frame goes alone
        assert not due or (in_flight < defaults.SEND_WINDOW_FRAMES and in_flight_bytes + frame.size <= defaults.SEND_WINDOW_BYTES)
    assert max(in_flight for _, in_flight, _, due in remote.log if due) == defaults.SEND_WINDOW_FRAMES - 1  # pipelined
    assert remote.unread == []


def test_a_diffusion_step_sends_its_unanswered_conditioning_and_reads_one_reply():
    text = tensor_frame(MsgType.TENSOR, torch.ones(2, 77, 2048), Codec.FP32, slot=Slot.TEXT)  # over 1 MiB, no reply
    step = [tensor_frame(MsgType.TENSOR, torch.ones(1), Codec.FP32, slot=Slot.TIMESTEP),
            tensor_frame(MsgType.TENSOR, torch.full((2, 4, 8, 8), 3.0), Codec.FP32, slot=Slot.SAMPLE)]
    remote = InMemoryUNet()
    for _ in range(2 * defaults.SEND_WINDOW_FRAMES):
        assert torch.equal(remote.exchange([text, *step]), step[-1].tensor())
    assert remote.unread == [] and len(remote.log) == 6 * defaults.SEND_WINDOW_FRAMES


# ---- refusals -------------------------------------------------------------------------------------

def test_a_capacity_refusal_waits_retry_after_then_succeeds(caplog, clock):
    caplog.set_level(logging.INFO, LOGGER)
    script = lambda n: ("refuse", "capacity", 0.4) if n == 0 else ok(n)  # noqa: E731
    with FakeBody(script) as fake:
        remote = body(fake.url)
        assert torch.equal(remote.forward(X), X)
        remote.close()
    assert len(fake.connections) == 2
    assert clock.sleeps == [0.4]  # retry_after honoured
    assert len(warnings(caplog)) == 1


def test_a_persistent_capacity_refusal_ends_in_capacity_error_within_the_window(clock):
    with FakeBody(lambda n: ("refuse", "capacity", 0.4)) as fake:
        remote = body(fake.url, reconnect_window=1.0)
        with pytest.raises(CapacityError, match="scripted capacity refusal.*waited") as info:
            remote.forward(X)
    assert len(fake.connections) == 3  # at 0, 0.4 and 0.8 s; 0.4 more would overrun the window
    assert clock.sleeps == [0.4, 0.4]
    assert info.value.retry_after == 0.4


def test_a_retry_after_beyond_the_window_is_not_waited_for(clock):
    with FakeBody(lambda n: ("refuse", "capacity", 120)) as fake:
        remote = body(fake.url, reconnect_window=5)
        with pytest.raises(CapacityError) as info:
            remote.forward(X)
    assert clock.sleeps == []
    assert len(fake.connections) == 1 and info.value.retry_after == 120


@pytest.mark.parametrize("status,error", [(401, AuthError), (403, AuthError), (503, CapacityError), (429, CapacityError)])
def test_http_statuses_map_to_typed_errors(status, error):
    script = lambda n: ("http", status, {"Retry-After": "30"})  # noqa: E731
    with FakeBody(script) as fake:
        remote = body(fake.url, reconnect_window=3)
        with pytest.raises(error, match=str(status)) as info:
            remote.forward(X)
    assert len(fake.connections) == 1  # auth: never retried; capacity: 30 s does not fit in 3 s
    if error is CapacityError:
        assert info.value.retry_after == 30


@pytest.mark.parametrize("code,error", [("auth", AuthError), ("mismatch", MismatchError)])
def test_auth_and_mismatch_error_frames_are_never_retried(code, error, caplog):
    with FakeBody(lambda n: ("refuse", code, None)) as fake:
        remote = body(fake.url)
        with pytest.raises(error, match=f"scripted {code} refusal"):
            remote.forward(X)
    assert len(fake.connections) == 1
    assert warnings(caplog) == []


def test_a_welcome_for_another_model_raises_mismatch():
    other = PartManifest(**{**CLOUD.__dict__, "fingerprint": "cd" * 32})
    with FakeBody(lambda n: ("welcome", other)) as fake:
        remote = body(fake.url)
        with pytest.raises(MismatchError, match="fingerprint differs"):
            remote.forward(X)
    assert len(fake.connections) == 1


# ---- against a real server ------------------------------------------------------------------------

TOKEN = "correct-horse-battery-staple-0123"


@pytest.fixture(scope="module")
def real_server(tiny_models, tmp_path_factory):
    from lambdasplit.cloud.process import ServerProcess

    token_file = tmp_path_factory.mktemp("tok") / "token"
    token_file.write_text(TOKEN)
    args = ("--model", str(tiny_models["llama"]), "--split", "2,2", "--token-file", str(token_file), "--max-sessions", "1")
    with ServerProcess(*args) as proc:
        yield proc


@pytest.fixture(scope="module")
def llama_device(tiny_models):
    from lambdasplit.device.runtime import SplitRuntime

    return SplitRuntime.load(tiny_models["llama"], (2, 2))


def test_a_wrong_token_is_an_auth_error_at_once(real_server, llama_device, caplog, clock):
    remote = RemoteBody(real_server.url, llama_device.manifest, token="wrong-token-wrong-token")
    with pytest.raises(AuthError, match="401"):
        remote.forward(torch.zeros(1, 2, llama_device.manifest.hidden_size))
    assert clock.sleeps == []
    assert warnings(caplog) == []


def test_a_full_real_server_is_waited_for_until_a_session_frees(real_server, llama_device, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    hidden = torch.zeros(1, 2, llama_device.manifest.hidden_size)
    first = RemoteBody(real_server.url, llama_device.manifest, token=TOKEN)
    first.forward(hidden)  # holds the only session
    second = RemoteBody(real_server.url, llama_device.manifest, token=TOKEN, reconnect_window=60)
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(_try(lambda: second.forward(hidden))))
    waiter.start()
    deadline = time.monotonic() + 30
    while not any(r.getMessage().startswith("the body server is at capacity") for r in caplog.records):
        assert time.monotonic() < deadline and waiter.is_alive(), result
        time.sleep(0.05)  # polling for the refusal, not a fixed wait
    first.close()
    waiter.join(60)
    second.close()
    assert result and isinstance(result[0], torch.Tensor), result
    assert result[0].shape == hidden.shape


def test_a_full_real_server_raises_capacity_error_after_the_window(real_server, llama_device, clock):
    hidden = torch.zeros(1, 2, llama_device.manifest.hidden_size)
    first = RemoteBody(real_server.url, llama_device.manifest, token=TOKEN)
    first.forward(hidden)
    try:
        second = RemoteBody(real_server.url, llama_device.manifest, token=TOKEN, reconnect_window=1.0)
        with pytest.raises(CapacityError, match="limit of 1 sessions") as info:
            second.forward(hidden)
        assert clock.sleeps == []  # its retry-after (2 s) does not fit in the 1 s window
        assert info.value.retry_after is not None and info.value.retry_after > 0
    finally:
        first.close()


def _try(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - handed to the test thread
        return exc
