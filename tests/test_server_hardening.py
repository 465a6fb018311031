"""Server hardening (issue 11) against a real BodyServer in a thread, mostly over the raw protocol:
sessions opened before WELCOME, per-session limits, zero-size tensors, duplicate auth headers,
compute errors, what the server advertises and logs, hostile HELLOs and the idle TTL."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.request

import pytest
import torch
from websockets.sync.client import connect

from lambdasplit import defaults
from lambdasplit.cloud.server import BodyServer, ServerConfig
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.loading import load_scheduler
from lambdasplit.engine.local import LocalBody
from lambdasplit.engine.scheduler import BodyScheduler, SchedulerLimits
from lambdasplit.engine.session import kv_bytes_per_position
from lambdasplit.errors import ComputeError, WireError
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import Frame, Limits, MsgType, parse_frame, tensor_frame
from lambdasplit.wire.protocol import BODY_PATH, control_frame, error_frame
from tests.conftest import oracle

TOKEN = "correct-horse-battery-staple-0123"
IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2030, 30]])
D = 64  # the tiny llama's hidden size
SERVER_LOG = "lambdasplit.cloud.server"


@pytest.fixture(scope="module")
def bodies(llama):
    """The hosted bodies (weights loaded once); every test server gets its own scheduler over them."""
    return load_scheduler(str(llama), (2, 2)).bodies


@pytest.fixture(scope="module")
def runtime(llama):
    return SplitRuntime.load(llama, (2, 2))


@pytest.fixture(scope="module")
def local_body(bodies):
    body = LocalBody(BodyScheduler(bodies), Codec.FP32)
    yield body
    body.scheduler.shutdown()


@pytest.fixture(scope="module")
def expected_ids(runtime, local_body):
    """The in-process split's greedy tokens for IDS (itself checked against the unsplit model)."""
    return runtime.generate_ids(local_body, IDS, None, SamplingParams(max_new_tokens=12)).token_ids


class ThreadServer:
    """A BodyServer on 127.0.0.1:0, running its own event loop in a thread."""

    def __init__(self, bodies, limits: SchedulerLimits | None = None, **config) -> None:
        self.scheduler = BodyScheduler(bodies, limits or SchedulerLimits())
        self.server = BodyServer(self.scheduler, ServerConfig(port=0, token=TOKEN, **config))
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the server did not start"

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self.server.run(self._ready, self._stop)  # a threading.Event is a fine `ready`

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    def metric(self, name: str) -> float:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        text = urllib.request.urlopen(request, timeout=10).read().decode()
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        assert match, text
        return float(match.group(1))

    def wait_metric(self, name: str, value: float, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} stayed at {self.metric(name)}, expected {value}"
            time.sleep(0.05)  # polling

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def __enter__(self) -> ThreadServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def raw_connect(server: ThreadServer):
    return connect(
        server.url + BODY_PATH,
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        compression=None,
        open_timeout=10,
    )


def hello(runtime, codec: str = "fp32", manifest: dict | None = None) -> bytes:
    data = {"protocol": 1, "manifest": manifest or runtime.manifest.as_dict(), "codec": codec}
    return control_frame(MsgType.HELLO, data).to_bytes()


def raw_session(server: ThreadServer, runtime):
    ws = raw_connect(server)
    ws.send(hello(runtime))
    welcome = parse_frame(ws.recv(timeout=10))
    assert welcome.type == MsgType.WELCOME, welcome.payload
    return ws, welcome.session


def expect_error(ws) -> dict:
    """The ERROR frame the server sends, after which it closes the connection with 1008."""
    reply = parse_frame(ws.recv(timeout=15))
    assert reply.type == MsgType.ERROR, reply.type
    data = json.loads(reply.payload)
    deadline = time.monotonic() + 10
    while ws.close_code is None:  # the close handshake follows the ERROR frame
        assert time.monotonic() < deadline, "the server did not close the connection"
        with pytest.raises(Exception):  # noqa: B017, PT011 - ConnectionClosed of either kind
            ws.recv(timeout=10)
    assert ws.close_code == 1008, (ws.close_code, ws.close_reason)
    assert ws.close_reason == data["code"]
    return data


def hidden_frame(session: bytes, seq: int, batch: int, length: int, seed: int = 0) -> Frame:
    torch.manual_seed(seed)
    return tensor_frame(MsgType.HIDDEN, torch.randn(batch, length, D), Codec.FP32, session, seq)


def problems(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def assert_no_tracebacks(caplog) -> None:
    for record in caplog.records:
        assert record.exc_info is None and record.exc_text is None, record.getMessage()
        assert "Traceback" not in record.getMessage()
    assert "Traceback" not in caplog.text


# ---- 1. sessions opened before WELCOME -----------------------------------------------------------


def _vanish(ws) -> None:
    """Drop the TCP connection without a closing handshake."""
    import socket

    ws.socket.shutdown(socket.SHUT_RDWR)
    ws.socket.close()


def test_clients_vanishing_between_hello_and_welcome_do_not_leak_sessions(bodies, runtime, expected_ids, monkeypatch):
    with ThreadServer(bodies, SchedulerLimits(max_sessions=4)) as server:
        # Hold every session opening until the four clients have gone, so each one vanishes after
        # its HELLO and before its WELCOME, deterministically.
        gone = threading.Event()
        original = server.scheduler._open

        def slow_open(body_index: int) -> bytes:
            assert gone.wait(30)
            return original(body_index)

        monkeypatch.setattr(server.scheduler, "_open", slow_open)
        clients = [raw_connect(server) for _ in range(4)]
        for ws in clients:
            ws.send(hello(runtime))
        for ws in clients:
            _vanish(ws)
        gone.set()
        server.wait_metric("lambdasplit_sessions_total", 4)  # all four were opened...
        server.wait_metric("lambdasplit_sessions_active", 0)  # ...and closed again
        assert server.scheduler.sessions == {}

        # The same without the hold: HELLO and an immediate drop.
        monkeypatch.setattr(server.scheduler, "_open", original)
        for _ in range(4):
            ws = raw_connect(server)
            ws.send(hello(runtime))
            _vanish(ws)
        server.wait_metric("lambdasplit_sessions_active", 0)

        body = RemoteBody(server.url, runtime.manifest, codec=Codec.FP32, token=TOKEN, reconnect_window=0)
        try:
            result = runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=12))
        finally:
            body.close()
        assert result.token_ids == expected_ids
        server.wait_metric("lambdasplit_sessions_active", 0)


# ---- 2. per-session limits and the free-memory guard ---------------------------------------------


def test_session_limits_refuse_with_limit_and_other_sessions_keep_working(bodies, runtime, expected_ids):
    per_position = kv_bytes_per_position(bodies[0].runner)
    limits = SchedulerLimits(max_batch=2, max_frame_positions=16, max_session_kv_bytes=64 * per_position)
    with ThreadServer(bodies, limits) as server:
        body = RemoteBody(server.url, runtime.manifest, codec=Codec.FP32, token=TOKEN, reconnect_window=0)
        try:
            first = runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=12))
            assert first.token_ids == expected_ids

            ws, session = raw_session(server, runtime)  # B over max_batch
            ws.send(hidden_frame(session, 1, 3, 1).to_bytes())
            error = expect_error(ws)
            assert error["code"] == "limit" and "3 rows" in error["message"] and "--max-batch 2" in error["message"]

            ws, session = raw_session(server, runtime)  # a MASK over max_batch too
            ws.send(tensor_frame(MsgType.MASK, torch.ones(3, 1, dtype=torch.uint8), Codec.NONE, session).to_bytes())
            assert expect_error(ws)["code"] == "limit"

            ws, session = raw_session(server, runtime)  # B x T over max_frame_positions
            ws.send(hidden_frame(session, 1, 2, 9).to_bytes())
            error = expect_error(ws)
            assert error["code"] == "limit" and "2 x 9 positions" in error["message"]
            assert "--max-frame-positions 16" in error["message"]

            ws, session = raw_session(server, runtime)  # KV bytes over max_session_kv_bytes
            for seq in range(1, 5):  # 4 x 16 = 64 positions: exactly the limit
                ws.send(hidden_frame(session, seq, 1, 16, seed=seq).to_bytes())
                reply = parse_frame(ws.recv(timeout=15))
                assert reply.type == MsgType.HIDDEN and reply.seq == seq and reply.shape == (1, 16, D)
            ws.send(hidden_frame(session, 5, 1, 1).to_bytes())
            error = expect_error(ws)
            assert error["code"] == "limit" and "--max-session-kv" in error["message"], error

            assert server.metric("lambdasplit_frame_errors_total") == 4
            # The device's session was never disturbed: same connection, same tokens.
            second = runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=12))
            assert second.token_ids == expected_ids
            assert body.reconnects == 0
        finally:
            body.close()


def test_the_free_memory_guard_refuses_sessions_and_frames_with_capacity(bodies, runtime):
    with ThreadServer(bodies, SchedulerLimits(min_free_memory=1 << 60)) as server:
        ws = raw_connect(server)
        ws.send(hello(runtime))
        error = expect_error(ws)
        assert error["code"] == "capacity" and "MiB of memory free" in error["message"]
        assert error["retry_after"] == defaults.CAPACITY_RETRY_AFTER
        assert server.metric("lambdasplit_sessions_refused_total") == 1
        assert server.metric("lambdasplit_sessions_active") == 0

    with ThreadServer(bodies) as server:  # checked per frame too: memory runs out mid-session
        ws, session = raw_session(server, runtime)
        ws.send(hidden_frame(session, 1, 1, 4).to_bytes())
        assert parse_frame(ws.recv(timeout=15)).type == MsgType.HIDDEN
        server.scheduler.limits = dataclasses.replace(server.scheduler.limits, min_free_memory=1 << 60)
        ws.send(hidden_frame(session, 2, 1, 1).to_bytes())
        error = expect_error(ws)
        assert error["code"] == "capacity" and "this frame" in error["message"]
        assert error["retry_after"] == defaults.CAPACITY_RETRY_AFTER
        server.wait_metric("lambdasplit_sessions_active", 0)


# ---- 3. zero-size dimensions ---------------------------------------------------------------------


ZERO_FRAMES = {
    "hidden (1, 0, D)": lambda s: tensor_frame(MsgType.HIDDEN, torch.zeros(1, 0, D), Codec.FP32, s, 1),
    "hidden (0, 1, D)": lambda s: tensor_frame(MsgType.HIDDEN, torch.zeros(0, 1, D), Codec.FP32, s, 1),
    "hidden (1, 1, 0)": lambda s: tensor_frame(MsgType.HIDDEN, torch.zeros(1, 1, 0), Codec.BF16, s, 1),
    "hidden int8 (1, 0, D)": lambda s: tensor_frame(MsgType.HIDDEN, torch.zeros(1, 0, D), Codec.INT8, s, 1),
    "mask (0, 3)": lambda s: tensor_frame(MsgType.MASK, torch.ones(0, 3, dtype=torch.uint8), Codec.NONE, s),
    "mask (1, 0)": lambda s: tensor_frame(MsgType.MASK, torch.ones(1, 0, dtype=torch.uint8), Codec.NONE, s),
    "tensor (0,)": lambda s: tensor_frame(MsgType.TENSOR, torch.zeros(0), Codec.FP32, s, slot=1),
    "tensor (2, 0, 4, 4)": lambda s: tensor_frame(MsgType.TENSOR, torch.zeros(2, 0, 4, 4), Codec.FP16, s, slot=8),
}


@pytest.mark.parametrize("kind", list(ZERO_FRAMES))
def test_parse_frame_refuses_zero_dimensions(kind):
    data = ZERO_FRAMES[kind](bytes(16)).to_bytes()
    with pytest.raises(WireError, match="zero"):
        parse_frame(data, Limits(hidden_size=D if "(1, 1, 0)" not in kind else None))


def test_parse_frame_still_accepts_empty_control_payloads_and_real_tensors():
    assert parse_frame(Frame(MsgType.RESET).to_bytes()).shape == ()
    assert parse_frame(tensor_frame(MsgType.TENSOR, torch.zeros(1), Codec.FP32, slot=2).to_bytes()).shape == (1,)
    assert parse_frame(tensor_frame(MsgType.HIDDEN, torch.zeros(1, 1, D), Codec.FP32).to_bytes()).shape == (1, 1, D)


@pytest.fixture(scope="module")
def plain_server(bodies):
    with ThreadServer(bodies) as server:
        yield server


@pytest.mark.parametrize("kind", list(ZERO_FRAMES))
def test_zero_dimensions_get_a_protocol_error_frame_and_one_log_line(plain_server, runtime, kind, caplog):
    caplog.set_level(logging.INFO)
    ws, session = raw_session(plain_server, runtime)
    caplog.clear()
    ws.send(ZERO_FRAMES[kind](session).to_bytes())
    error = expect_error(ws)
    assert error["code"] == "protocol"
    assert "zero" in error["message"] and "dimension" in error["message"], error
    plain_server.wait_metric("lambdasplit_sessions_active", 0)
    lines = problems(caplog)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].name == SERVER_LOG and "(protocol)" in lines[0].getMessage() and "zero" in lines[0].getMessage()
    assert_no_tracebacks(caplog)


# ---- 4. duplicate Authorization headers ----------------------------------------------------------


@pytest.mark.parametrize("path", [BODY_PATH, "/metrics"])
def test_two_authorization_headers_get_400_before_auth(plain_server, path, caplog):
    caplog.set_level(logging.INFO)
    conn = http.client.HTTPConnection("127.0.0.1", plain_server.port, timeout=10)
    conn.putrequest("GET", path)
    conn.putheader("Host", f"127.0.0.1:{plain_server.port}")
    conn.putheader("Upgrade", "websocket")
    conn.putheader("Connection", "Upgrade")
    conn.putheader("Sec-WebSocket-Key", base64.b64encode(os.urandom(16)).decode())
    conn.putheader("Sec-WebSocket-Version", "13")
    conn.putheader("Authorization", f"Bearer {TOKEN}")  # both correct: still refused
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.endheaders()
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    assert response.status == 400, (response.status, text)
    assert "exactly one Authorization header" in text
    assert any("2 Authorization headers" in r.getMessage() for r in problems(caplog))
    assert_no_tracebacks(caplog)


# ---- 5. compute errors inside the body -----------------------------------------------------------


class FailingStep:
    """Wraps a body's batched `step`; its calls number `fail_at` (1-based, counted in `calls`) and
    the next ones, `times` calls in all, raise `error`; every other call runs the body. By default
    it fails as many times as the scheduler runs a failed step, so the step's sessions are closed."""

    def __init__(self, step, error: BaseException, calls: list[int], fail_at: int = 1,
                 times: int = defaults.STEP_RETRIES + 1) -> None:
        self._step = step
        self._error = error
        self._calls = calls
        self._failing = range(fail_at, fail_at + times)

    def __call__(self, *args, **kwargs):
        self._calls[0] += 1
        if self._calls[0] in self._failing:
            raise self._error
        return self._step(*args, **kwargs)


@pytest.mark.parametrize(
    "error", [RuntimeError("boom in layer 3\nsecond line of detail"), torch.OutOfMemoryError("CUDA out of memory\nmore")]
)
def test_a_compute_error_is_an_error_frame_and_closes_only_that_session(plain_server, runtime, local_body, error, caplog,
                                                                        monkeypatch):
    caplog.set_level(logging.INFO)
    failing, failing_id = raw_session(plain_server, runtime)
    healthy, healthy_id = raw_session(plain_server, runtime)
    try:
        body = plain_server.scheduler.sessions[failing_id].body
        monkeypatch.setattr(body, "step", FailingStep(body.step, error, [0]))  # the next step (failing's) fails
        caplog.clear()
        failing.send(hidden_frame(failing_id, 1, 1, 5).to_bytes())
        reply = expect_error(failing)
        # The session was closed, and counted, before its ERROR frame was sent.
        assert failing_id not in plain_server.scheduler.sessions
        assert plain_server.metric("lambdasplit_sessions_active") == 1
        assert reply["code"] == "compute"
        assert f"the body failed to run this step ({type(error).__name__}: {str(error).splitlines()[0]})" == reply["message"]
        lines = [r.getMessage() for r in problems(caplog)]
        assert len(lines) == 2, lines  # the step failed, ran again (nothing committed), failed again
        assert "nothing was committed, running it again" in lines[0]
        assert "(compute)" in lines[1] and "second line" not in lines[0] + lines[1]
        assert "\n" not in lines[0] + lines[1]
        assert_no_tracebacks(caplog)

        # The other session is unaffected and exact: the same hidden states as the in-process split.
        frame = hidden_frame(healthy_id, 1, 1, 5)
        healthy.send(frame.to_bytes())
        out = parse_frame(healthy.recv(timeout=15))
        assert out.type == MsgType.HIDDEN and out.seq == 1
        local_body.reset()
        assert torch.equal(out.tensor(), local_body.forward(frame.tensor()))
    finally:  # a failure here must not leave a session open for the module's later tests
        healthy.close()
        failing.close()
    plain_server.wait_metric("lambdasplit_sessions_active", 0)


def test_a_failed_steps_sessions_are_closed_before_their_frames_are_answered(bodies):
    """Whoever reads the compute error (the server, then the device) finds the session gone."""
    scheduler = BodyScheduler(bodies)
    body = bodies[0]
    gate, release = threading.Event(), threading.Event()

    def fail_when_released(*args, **kwargs):
        gate.set()
        assert release.wait(30)
        raise RuntimeError("boom")

    body.step = fail_when_released
    try:
        session = scheduler.open_session().result(10)
        future = scheduler.submit(session, hidden_frame(session, 1, 1, 3))
        assert gate.wait(30)
        open_when_answered = []  # a done-callback runs on the thread that answers, at that moment
        future.add_done_callback(lambda f: open_when_answered.append(session in scheduler.sessions))
        release.set()
        with pytest.raises(ComputeError, match="RuntimeError: boom"):
            future.result(30)
        assert open_when_answered == [False]
    finally:
        del body.step
        scheduler.shutdown()


def test_a_device_replays_after_a_compute_error_and_matches_the_unsplit_model(bodies, runtime, llama, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    calls = [0]  # body steps over all sessions: the 4th (a decode step, so there is history) fails, and its rerun

    with ThreadServer(bodies) as server:
        for body in server.scheduler.bodies:  # an instance attribute, undone by monkeypatch
            monkeypatch.setattr(body, "step", FailingStep(body.step, RuntimeError("transient failure"), calls, fail_at=4))
        remote = RemoteBody(server.url, runtime.manifest, codec=Codec.FP32, token=TOKEN, backoff=0.05)
        try:
            result = runtime.generate_ids(remote, IDS, None, SamplingParams(max_new_tokens=12))
        finally:
            remote.close()
        assert remote.reconnects == 1  # one fresh session, on which the 3 earlier frames were replayed
        assert calls[0] == 1 + 11 + 2 + 3  # prefill, 11 decode steps, the failed one twice, 3 replayed frames
        assert server.metric("lambdasplit_sessions_total") == 2
    model = oracle(llama)
    with torch.no_grad():
        full = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert result.token_ids[0] == full[0, IDS.shape[1] :].tolist()
    assert any("(compute)" in r.getMessage() and "transient failure" in r.getMessage() for r in caplog.records)
    assert_no_tracebacks(caplog)


# ---- 6. what the server advertises and logs ------------------------------------------------------


def test_the_server_header_does_not_name_websockets(plain_server):
    conn = http.client.HTTPConnection("127.0.0.1", plain_server.port, timeout=10)
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b"ok\n"
    assert "websockets" not in (response.getheader("Server") or "").lower()
    conn.close()
    with raw_connect(plain_server) as ws:
        assert ws.response.status_code == 101
        assert "websockets" not in (ws.response.headers.get("Server") or "").lower()
        assert all("websockets/" not in value.lower() for _, value in ws.response.headers.raw_items())


HOSTILE = "evil\n2024-01-01 INFO forged line\x1b[31mred\x1b[0m\r"


@pytest.mark.parametrize("field", ["model_type", "fingerprint", "dtype", "role"])
def test_hostile_manifest_strings_are_logged_escaped(plain_server, runtime, field, caplog):
    caplog.set_level(logging.DEBUG)
    manifest = {**runtime.manifest.as_dict(), field: HOSTILE}
    ws = raw_connect(plain_server)
    ws.send(hello(runtime, manifest=manifest))
    error = expect_error(ws)
    assert error["code"] in ("mismatch", "protocol"), error
    assert caplog.records
    for record in caplog.records:
        message = record.getMessage()
        assert "\n" not in message and "\x1b" not in message and "\r" not in message, message
    assert any("evil" in r.getMessage() for r in problems(caplog)), [r.getMessage() for r in caplog.records]
    assert_no_tracebacks(caplog)


# ---- 7. a hostile HELLO that is an ERROR frame ---------------------------------------------------


@pytest.mark.parametrize("code", ["auth", "capacity", "compute", "expired", "mismatch", "limit", "not-a-code"])
def test_an_error_frame_instead_of_hello_gets_protocol(plain_server, code, caplog):
    caplog.set_level(logging.INFO)
    plain_server.wait_metric("lambdasplit_sessions_active", 0)  # the module's earlier sessions are all closed
    ws = raw_connect(plain_server)
    ws.send(error_frame(code, "I am the server now\n\x1b[2J", retry_after=999).to_bytes())
    error = expect_error(ws)
    assert error["code"] == "protocol", error
    assert "retry_after" not in error
    assert "HELLO" in error["message"] and "ERROR" in error["message"], error
    for record in caplog.records:
        assert "\n" not in record.getMessage() and "\x1b" not in record.getMessage()
    assert plain_server.metric("lambdasplit_sessions_active") == 0


# ---- 8. the idle TTL -----------------------------------------------------------------------------


def test_an_idle_session_expires(bodies, runtime, caplog):
    caplog.set_level(logging.INFO)
    with ThreadServer(bodies, session_ttl=0.5) as server:
        ws, session = raw_session(server, runtime)
        ws.send(hidden_frame(session, 1, 1, 3).to_bytes())
        assert parse_frame(ws.recv(timeout=15)).type == MsgType.HIDDEN
        start = time.monotonic()
        error = expect_error(ws)  # nothing sent: the server closes the session after the TTL
        assert time.monotonic() - start < 10
        assert error["code"] == "expired" and "expired" in error["message"]
        server.wait_metric("lambdasplit_sessions_active", 0)
        assert server.scheduler.sessions == {}
        assert any("(expired)" in r.getMessage() for r in problems(caplog))


def test_a_frame_in_the_body_for_longer_than_the_ttl_does_not_expire_its_session(bodies, runtime, monkeypatch):
    """The TTL counts only the time the server waits for the device's next frame: a step that runs
    for three TTLs (a long queue, a slow body) answers its frame, and the session goes on."""
    slow = [True]

    class SlowStep:
        def __init__(self, step) -> None:
            self._step = step

        def __call__(self, *args, **kwargs):
            if slow[0]:
                slow[0] = False
                threading.Event().wait(1.5)  # this step takes three TTLs
            return self._step(*args, **kwargs)

    with ThreadServer(bodies, session_ttl=0.5) as server:
        for body in server.scheduler.bodies:
            monkeypatch.setattr(body, "step", SlowStep(body.step))
        ws, session = raw_session(server, runtime)
        ws.send(hidden_frame(session, 1, 1, 3).to_bytes())
        assert parse_frame(ws.recv(timeout=15)).type == MsgType.HIDDEN
        assert not slow[0]  # the slow step ran
        ws.send(hidden_frame(session, 2, 1, 1).to_bytes())
        assert parse_frame(ws.recv(timeout=15)).type == MsgType.HIDDEN
        assert server.scheduler.sessions.keys() == {session}
        ws.close()


def test_a_reaped_session_and_a_closed_one_each_count_once(bodies, runtime):
    """`sessions_active` reads the server's own set of open sessions: a session the reaper closed
    while its connection still ran is not taken off again when that connection ends."""
    with ThreadServer(bodies) as server:
        ws, session = raw_session(server, runtime)
        server.wait_metric("lambdasplit_sessions_active", 1)
        assert server._loop is not None
        reaped = asyncio.run_coroutine_threadsafe(server.server.reap(0.0), server._loop).result(timeout=30)
        assert reaped == [session] and server.scheduler.sessions == {}
        assert server.metric("lambdasplit_sessions_active") == 0
        ws.send(hidden_frame(session, 1, 1, 3).to_bytes())  # the connection finds its session gone...
        assert expect_error(ws)["code"] == "expired"  # ...and has ended it (again) before this ERROR frame
        assert server.metric("lambdasplit_sessions_active") == 0

        ws, session = raw_session(server, runtime)
        server.wait_metric("lambdasplit_sessions_active", 1)
        ws.send(control_frame(MsgType.CLOSE, {}, session).to_bytes())
        server.wait_metric("lambdasplit_sessions_active", 0)
        ws.close()
        assert server.metric("lambdasplit_sessions_total") == 2
        assert asyncio.run_coroutine_threadsafe(server.server.reap(0.0), server._loop).result(timeout=30) == []
        assert server.metric("lambdasplit_sessions_active") == 0
