"""The engine's health and its futures (issue 21): /healthz reflects the compute loop (a dead or
wedged loop answers 503 with the reason), every future the scheduler hands out is answered
(cancelled waiters, shutdown, a dead loop, a stopped scheduler), LocalBody never waits forever,
and a frame of the wrong kind or shape is refused before it is queued, never failing another
session's step."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future

import pytest
import torch

from lambdasplit.engine.frames import frame_problem
from lambdasplit.engine.local import LocalBody
from lambdasplit.engine.scheduler import BodyScheduler, SchedulerLimits
from lambdasplit.errors import ComputeError, ExpiredError, UnavailableError, WireError
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import DType, Frame, MsgType, parse_frame, tensor_frame
from tests import test_server_hardening as hardening
from tests.test_server_hardening import D, ThreadServer, expect_error, hello, hidden_frame, raw_connect, raw_session

bodies, runtime = hardening.bodies, hardening.runtime  # the same module-scoped fixtures (weights loaded once per module)

WAIT = 30  # seconds any poll below may take before the test fails


@pytest.fixture
def gated(bodies, monkeypatch):
    """A `Gate` on the first body's step, released and removed after the test."""
    body = bodies[0]
    gate = Gate(body.step)
    monkeypatch.setattr(body, "step", gate)
    yield gate
    gate.release()


def healthz(server: ThreadServer) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def poll(predicate, what: str):
    deadline = time.monotonic() + WAIT
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling
    return value


class Gate:
    """Wraps a body's `step`: the calls from `hold_from` on block until `release()`; `entered` is set
    when one is held."""

    def __init__(self, step, hold_from: int = 1) -> None:
        self._step, self._hold_from, self.calls = step, hold_from, 0
        self.entered, self._open = threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= self._hold_from and not self._open.is_set():
            self.entered.set()
            assert self._open.wait(WAIT), "the test never released the step"
        return self._step(*args, **kwargs)

    def release(self) -> None:
        self._open.set()


def frame(session: bytes, seq: int, length: int = 1, seed: int = 0) -> Frame:
    return hidden_frame(session, seq, 1, length, seed)


# ---- /healthz ------------------------------------------------------------------------------------


def test_healthz_fails_when_the_compute_thread_dies_and_sessions_get_a_clear_error(bodies, runtime, monkeypatch):
    with ThreadServer(bodies) as server:
        assert healthz(server) == (200, "ok\n")
        ws, session = raw_session(server, runtime)

        def broken() -> None:
            raise RuntimeError("injected fault outside any step")

        monkeypatch.setattr(server.scheduler, "_gather", broken)  # the loop's next pass raises
        ws.send(frame(session, 1).to_bytes())
        error = expect_error(ws)
        assert error["code"] == "compute" and "compute loop has stopped" in error["message"]
        assert "injected fault outside any step" in error["message"]
        status, text = poll(lambda: (r := healthz(server))[0] != 200 and r, "/healthz to fail")
        assert status == 503 and text.startswith("unhealthy: the compute loop has stopped (RuntimeError: injected")
        server.wait_metric("lambdasplit_sessions_active", 0)
        fresh = raw_connect(server)  # a new device is refused at once, with the same reason
        fresh.send(hello(runtime))
        refusal = expect_error(fresh)
        assert refusal["code"] == "compute" and "compute loop has stopped" in refusal["message"]


def test_healthz_fails_while_a_step_is_wedged_and_recovers_when_it_ends(bodies, runtime, gated):
    with ThreadServer(bodies, SchedulerLimits(stall_timeout=0.5)) as server:
        ws, session = raw_session(server, runtime)
        health = server.scheduler.health
        opened = time.monotonic()
        poll(lambda: health.last_beat > opened + 2 * health.stall_timeout, "idle heartbeats")
        assert healthz(server) == (200, "ok\n")  # idle for longer than the stall timeout: still healthy
        ws.send(frame(session, 1, length=3).to_bytes())
        assert gated.entered.wait(WAIT)
        status, text = poll(lambda: (r := healthz(server))[0] != 200 and r, "/healthz to see the wedged step")
        assert status == 503 and "inside one step for" in text and "--stall-timeout" in text
        gated.release()
        reply = parse_frame(ws.recv(timeout=WAIT))
        assert reply.type == MsgType.HIDDEN and reply.seq == 1
        poll(lambda: healthz(server)[0] == 200, "/healthz to recover")
        ws.close()


# ---- futures -------------------------------------------------------------------------------------


def test_a_cancelled_future_does_not_stop_its_step_from_answering_the_others(bodies, gated, caplog):
    scheduler = BodyScheduler(bodies)
    try:
        a, b, c = (scheduler.open_session().result(WAIT) for _ in range(3))
        first = scheduler.submit(a, frame(a, 1, seed=1))
        assert gated.entered.wait(WAIT)  # a's step runs; a's next frame, then b's and c's, join the next step
        cancelled = scheduler.submit(a, frame(a, 2, seed=4))  # first in that step
        assert cancelled.cancel()  # its transport stopped waiting
        futures = [scheduler.submit(s, frame(s, 1, seed=i)) for i, s in ((2, b), (3, c))]
        gated.release()
        assert first.result(WAIT)[0].seq == 1
        for future in futures:
            reply, _ = future.result(WAIT)
            assert reply.type == MsgType.HIDDEN and reply.shape == (1, 1, D)
        # The loop is alive and a's session still serves (its cancelled frame ran: the cache is whole).
        assert scheduler.submit(a, frame(a, 3, seed=5)).result(WAIT)[0].seq == 3
        assert scheduler.health.problem() is None
    finally:
        scheduler.shutdown()
    assert "failed a step" not in caplog.text


def test_shutdown_fails_queued_and_active_frames(bodies, gated):
    scheduler = BodyScheduler(bodies, SchedulerLimits(step_tokens=2))
    a, b = scheduler.open_session().result(WAIT), scheduler.open_session().result(WAIT)
    active = scheduler.submit(a, frame(a, 1, length=6))  # three steps of two positions
    assert gated.entered.wait(WAIT)
    queued = [scheduler.submit(a, frame(a, 2)), scheduler.submit(b, frame(b, 1))]
    stopper = threading.Thread(target=scheduler.shutdown)
    stopper.start()
    poll(lambda: scheduler._stopping, "shutdown to begin")
    gated.release()
    stopper.join(WAIT)
    for future in [active, *queued]:
        with pytest.raises(ComputeError, match="compute loop has stopped .*shutting down"):
            future.result(WAIT)


def test_submit_and_calls_after_shutdown_fail_clearly(bodies):
    scheduler = BodyScheduler(bodies)
    session = scheduler.open_session().result(WAIT)
    scheduler.shutdown()
    with pytest.raises(ComputeError, match="compute loop has stopped"):
        scheduler.submit(session, frame(session, 1)).result(WAIT)
    with pytest.raises(ComputeError, match="compute loop has stopped"):
        scheduler.open_session().result(WAIT)
    assert scheduler.close_session(session).result(WAIT) is None  # nothing is left to close
    assert "stopped" in scheduler.health.problem()


def test_local_body_waits_with_a_timeout(bodies, gated):
    scheduler = BodyScheduler(bodies, SchedulerLimits(stall_timeout=0.2))
    local = LocalBody(scheduler, Codec.FP32, timeout=0.5)
    try:
        with pytest.raises(UnavailableError, match=r"did not answer within 0.5 s \(the compute loop has been inside"):
            local.forward(torch.randn(1, 3, D))
        assert local._session is None  # the session whose frame is still running is given up
    finally:
        gated.release()
        scheduler.shutdown()


# ---- frames of the wrong kind --------------------------------------------------------------------


def _raw(type_: MsgType, dtype: DType, shape: tuple[int, ...], payload: bytes, codec: Codec = Codec.NONE) -> Frame:
    return Frame(type_, bytes(16), 1, codec, dtype, shape, payload)


WRONG = {
    "hidden without dimensions": _raw(MsgType.HIDDEN, DType.BYTES, (), b'{"x": 1}'),
    "hidden of rank 2": _raw(MsgType.HIDDEN, DType.FLOAT32, (1, D), bytes(4 * D), Codec.FP32),
    "hidden of rank 1": _raw(MsgType.HIDDEN, DType.FLOAT32, (D,), bytes(4 * D), Codec.FP32),
    "hidden with a zero dimension": _raw(MsgType.HIDDEN, DType.FLOAT32, (1, 0, D), b"", Codec.FP32),
    "hidden of another width": _raw(MsgType.HIDDEN, DType.FLOAT32, (1, 1, 8), bytes(32), Codec.FP32),
    "hidden of uint8": _raw(MsgType.HIDDEN, DType.UINT8, (1, 1, D), bytes(D)),
    "mask without dimensions": _raw(MsgType.MASK, DType.BYTES, (), b""),
    "mask of rank 3": _raw(MsgType.MASK, DType.UINT8, (1, 1, 1), b"\x01"),
    "mask of floats": _raw(MsgType.MASK, DType.FLOAT32, (1, 1), bytes(4), Codec.FP32),
    "tensor without dimensions": _raw(MsgType.TENSOR, DType.BYTES, (), b""),
    "reset carrying a tensor": _raw(MsgType.RESET, DType.FLOAT32, (1,), bytes(4), Codec.FP32),
    "crop carrying a tensor": _raw(MsgType.CROP, DType.UINT8, (1,), b"\x01"),
}


@pytest.mark.parametrize("kind", list(WRONG))
def test_frames_of_the_wrong_kind_or_shape_are_refused_before_queuing(bodies, kind):
    assert frame_problem(WRONG[kind], D) is not None
    scheduler = BodyScheduler(bodies)
    try:
        session = scheduler.open_session().result(WAIT)
        future = scheduler.submit(session, WRONG[kind])
        assert future.done()  # refused on the caller's thread: it never reached a queue
        with pytest.raises(WireError):
            future.result()
        assert scheduler._frames == [] and scheduler._queues == {}
        assert scheduler.submit(session, frame(session, 1)).result(WAIT)[0].seq == 1  # the session still serves
    finally:
        scheduler.shutdown()


def test_sound_frames_pass_the_shape_check():
    for sound in (hidden_frame(bytes(16), 1, 2, 3), Frame(MsgType.RESET),
                  tensor_frame(MsgType.MASK, torch.ones(1, 3, dtype=torch.uint8), Codec.NONE),
                  tensor_frame(MsgType.TENSOR, torch.zeros(2, 4), Codec.FP32, slot=1)):
        assert frame_problem(sound, D) is None, sound.type


def test_a_hidden_frame_without_dimensions_never_fails_another_sessions_step(bodies, runtime, gated, caplog):
    """It passes parsing (a bytes payload of rank 0); it used to raise IndexError inside the loop
    while another session's long prompt was half way through its chunks, failing that one too."""
    with ThreadServer(bodies, SchedulerLimits(step_tokens=4)) as server:
        victim, victim_id = raw_session(server, runtime)
        hostile, hostile_id = raw_session(server, runtime)
        sent = hidden_frame(victim_id, 1, 1, 16, seed=7)  # four steps of four positions
        victim.send(sent.to_bytes())
        assert gated.entered.wait(WAIT)  # the victim's prompt is in its first step
        bad = Frame(MsgType.HIDDEN, hostile_id, 1, Codec.NONE, DType.BYTES, (), b'{"x": 1}').to_bytes()
        assert parse_frame(bad).shape == ()  # the parser lets it through
        hostile.send(bad)
        # /metrics is served by the event loop that hands frames to the scheduler: once it counts the
        # frame's bytes, the frame has been submitted (and, before the fix, queued).
        server.wait_metric("lambdasplit_bytes_in_total", len(sent.to_bytes()) + len(bad))
        gated.release()
        error = expect_error(hostile)
        assert error["code"] == "protocol" and "must carry a tensor" in error["message"]
        reply = parse_frame(victim.recv(timeout=WAIT))
        assert reply.type == MsgType.HIDDEN and reply.seq == 1, reply.payload[:300]
        reference = LocalBody(BodyScheduler(bodies), Codec.FP32)
        torch.testing.assert_close(reply.tensor(), reference.forward(sent.tensor()), atol=1e-5, rtol=1e-5)
        reference.scheduler.shutdown()
        victim.close()
    assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records if r.exc_info]
    assert "failed a step" not in caplog.text


def test_a_shape_check_bug_fails_only_its_own_frame(bodies, gated, monkeypatch):
    """A check that raises something unexpected fails its own session, not the others' work."""
    scheduler = BodyScheduler(bodies, SchedulerLimits(step_tokens=4))
    try:
        a, b = scheduler.open_session().result(WAIT), scheduler.open_session().result(WAIT)
        long = scheduler.submit(a, frame(a, 1, length=16))
        assert gated.entered.wait(WAIT)
        monkeypatch.setattr(scheduler.sessions[b], "check", lambda f: [][0])
        broken: Future = scheduler.submit(b, frame(b, 1))
        gated.release()
        assert long.result(WAIT)[0].shape == (1, 16, D)
        with pytest.raises(ComputeError, match="IndexError"):
            broken.result(WAIT)
        with pytest.raises(ExpiredError):  # b was closed: its cache can no longer be trusted
            scheduler.submit(b, frame(b, 2)).result(WAIT)
    finally:
        scheduler.shutdown()
