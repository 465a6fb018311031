"""`serve --front-ends N`: several front-end processes on one port (SO_REUSEPORT) with one engine
process behind them: connections spread over the front ends, every reply is exact, /metrics
answers for the whole server from any of them, and a front end that dies leaves the others serving."""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from multiprocessing.connection import Connection
from types import SimpleNamespace

import psutil
import pytest
import torch

from lambdasplit.cloud.frontends import FrontEndSpec, front_end_main, sigterm_unwinds
from lambdasplit.cloud.process import ServerProcess
from lambdasplit.cloud.server import BodyServer
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.core import BACKLOG, HEADER, EngineClient, Kind, Op, _EngineLoop, _ready, engine_main
from lambdasplit.engine.loading import load_scheduler
from lambdasplit.errors import ComputeError
from lambdasplit.listen import claim_shared_port
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import Limits, MsgType, parse_frame, tensor_frame
from tests.conftest import oracle

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads connections on Linux")

IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2030, 30]])
DEVICES = 9  # connections: the chance that all of them land on one of 3 front ends is 3 / 3**9


@pytest.fixture(scope="module")
def runtime(llama):
    return SplitRuntime.load(llama, (2, 2))


@pytest.fixture(scope="module")
def expected(llama):
    """The unsplit transformers model's greedy tokens (the tiny model reaches no EOS in 6)."""
    return [oracle(llama).generate(IDS, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, IDS.shape[1]:].tolist()]


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url.replace("ws://", "http://") + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} is not in /metrics"
    return float(found.group(1))


def _processes(server: ServerProcess) -> list[psutil.Process]:
    """The server process and its spawned children (the engine and the other front ends)."""
    main, found = psutil.Process(server.pid), []
    for child in main.children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            pass  # a killed front end not yet reaped
    return [main, *found]


def _serving(server: ServerProcess) -> dict[int, int]:
    """Established connections to the server's port, by the pid holding them."""
    counts: dict[int, int] = {}
    for process in _processes(server):
        held = [c for c in process.net_connections("tcp") if c.laddr.port == server.port and c.status == "ESTABLISHED"]
        if held:
            counts[process.pid] = len(held)
    return counts


def _generate(runtime: SplitRuntime, body: RemoteBody) -> list[list[int]]:
    return runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=6)).token_ids


def test_front_ends_share_the_port_answer_exactly_and_count_together(llama, runtime, expected):
    with ServerProcess("--model", str(llama), "--split", "2,2", "--front-ends", "3") as server:
        assert len(_processes(server)) == 4  # this front end, the engine, two more front ends
        bodies = [RemoteBody(server.url, runtime.manifest, connect_timeout=30.0) for _ in range(DEVICES)]
        try:
            for body in bodies:
                assert _generate(runtime, body) == expected
            spread = _serving(server)
            assert sum(spread.values()) == DEVICES and len(spread) >= 2, spread
            for _ in range(6):  # each scrape may reach another front end: all see the whole server
                assert _metric(server.url, "lambdasplit_sessions_total") == DEVICES
                assert _metric(server.url, "lambdasplit_sessions_active") == DEVICES
        finally:
            for body in bodies:
                body.close()
        deadline = time.monotonic() + 60
        while _metric(server.url, "lambdasplit_sessions_active") != 0:
            assert time.monotonic() < deadline, "closed sessions are still counted as active"
            time.sleep(0.1)
        assert _metric(server.url, "lambdasplit_forward_seconds_count") > 0  # the engine's steps, counted once
        children = _processes(server)[1:]
        for process in _processes(server):  # Ctrl-C in a terminal: every process of the group gets it
            os.kill(process.pid, signal.SIGINT)
        assert server.proc.wait(60) == 130  # Ctrl-C's exit status, as for one front end
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, "the engine or a front end outlived the server"
    # A front end got a second SIGINT from the server process while it exited: it must not show.
    assert "Traceback" not in "".join(server.output), "".join(server.output)


def _signal_twice_in_eof_received(signum: int) -> None:
    """A spawned process's set-up: `signum` comes twice while a connection's `eof_received` runs (Ctrl-C
    reaches a front end from the terminal, then from the server process), the moment of the race CI
    met once, made certain (os.kill runs this process's Python signal handler before it returns)."""
    from websockets.asyncio.server import ServerConnection

    eof_received = ServerConnection.eof_received

    def signalled(connection: ServerConnection) -> None:
        os.kill(os.getpid(), signum)
        os.kill(os.getpid(), signum)
        eof_received(connection)

    ServerConnection.eof_received = signalled


def _serve_unwinding_on_sigterm(conn, ready, spec: FrontEndSpec) -> None:
    """The server process's front end as `serve --front-ends` runs it: under `sigterm_unwinds`."""
    _signal_twice_in_eof_received(signal.SIGTERM)
    with sigterm_unwinds():
        try:
            BodyServer(EngineClient.attach(conn), spec.config()).serve_forever(True, lambda: ready.send_bytes(b""))
        finally:
            print("cleaned up", flush=True)


def _close_one_connection_to(llama, uvloop: bool, process: Callable[[Connection, Connection, FrontEndSpec], tuple]) -> int | None:
    """Spawn `process(engine link, ready pipe, spec)` -> (target, args) on a fresh engine, wait until it
    listens, open and close one connection (its eof_received gets the signals); its exit code."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    engine = EngineClient.start(load_scheduler, str(llama), (2, 2), max_frame_bytes=1 << 20, front_ends=2)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe(duplex=False)
    target, args = process(engine.links[0], theirs, FrontEndSpec("127.0.0.1", port, None, None, None, 60.0, uvloop))
    child = context.Process(target=target, args=args, daemon=True)
    try:
        child.start()
        engine.links[0].close()
        theirs.close()
        assert ours.poll(120) and ours.recv_bytes() == b"", "it is not listening"
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
            child.join(10)
        engine.shutdown()
    return child.exitcode


@pytest.mark.parametrize("uvloop", [True, False])
def test_ctrl_c_inside_a_transport_callback_stops_a_front_end_quietly(llama, capfd, uvloop):
    """A front end's Ctrl-C was a KeyboardInterrupt raised wherever Python was: inside uvloop's
    `eof_received` of a closing connection, uvloop logged it as a fatal transport error with a
    traceback and served on (the handler ignores the second SIGINT). It stops from its event loop now."""
    setup = functools.partial(_signal_twice_in_eof_received, signal.SIGINT)
    code = _close_one_connection_to(llama, uvloop, lambda link, ready, spec: (front_end_main, (1, link, ready, spec, setup)))
    printed = "".join(capfd.readouterr())
    assert "Traceback" not in printed and "Fatal error" not in printed, printed
    assert code == 0, "the front end did not stop on Ctrl-C"


def test_sigterm_inside_a_transport_callback_still_unwinds_the_server(llama, capfd):
    """`sigterm_unwinds`' Terminated, raised inside uvloop's `eof_received`, was caught there and logged
    as a fatal transport error; SIGTERM was then ignored and the server served on (systemd waits,
    then kills it). It stops from its event loop now: the clean-up runs, then SIGTERM ends it."""
    code = _close_one_connection_to(llama, True, lambda link, ready, spec: (_serve_unwinding_on_sigterm, (link, ready, spec)))
    printed = "".join(capfd.readouterr())
    assert "Traceback" not in printed and "Fatal error" not in printed, printed
    assert code == -signal.SIGTERM, f"the server did not stop on SIGTERM: {code}"
    assert "cleaned up" in printed


def test_sigterm_stops_the_front_ends_and_removes_the_metrics_directory(llama):
    with ServerProcess("--model", str(llama), "--split", "2,2", "--front-ends", "2") as server:
        children = _processes(server)[1:]
        shared = {child.environ()["PROMETHEUS_MULTIPROC_DIR"] for child in children}
        assert len(shared) == 1 and os.path.isdir(next(iter(shared)))
        os.kill(server.pid, signal.SIGTERM)
        assert server.proc.wait(60) == -signal.SIGTERM  # still ended by SIGTERM (systemd: a clean stop)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, "the engine or a front end outlived the server"
        assert not os.path.exists(next(iter(shared)))
    assert "server process is gone" not in "".join(server.output)  # they were stopped, not orphaned


def test_a_second_front_ends_server_cannot_share_the_port():
    """SO_REUSEPORT would let a second `serve --front-ends` on the port listen too (both found it free,
    then loaded their models): the devices would be split between two servers without a word."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # free, so only the claim below stands in the way
    claim = claim_shared_port(port)  # as a server that is still loading its model holds it
    try:
        proc = subprocess.run([sys.executable, "-m", "lambdasplit.cli", "serve", "--front-ends", "2", "--port", str(port)],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        claim.close()
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.splitlines() == [f"error: cannot listen on port {port}: another `lambdasplit serve --front-ends` "
                                        "on this host holds it (it may still be loading its model); pick another --port, "
                                        "or 0 for a free one"], proc.stderr


def test_a_killed_front_end_leaves_the_others_serving(llama, runtime, expected):
    """With room for exactly DEVICES sessions, the replays fit only if the engine closed the dead
    front end's sessions when its pipe closed."""
    with ServerProcess("--model", str(llama), "--split", "2,2", "--front-ends", "3", "--max-sessions", str(DEVICES)) as server:
        bodies = [RemoteBody(server.url, runtime.manifest, connect_timeout=30.0) for _ in range(DEVICES)]
        try:
            for body in bodies:
                assert _generate(runtime, body) == expected
            spread = _serving(server)
            victim = next(pid for pid in spread if pid != server.pid)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while psutil.pid_exists(victim):  # the server process reaps it
                assert time.monotonic() < deadline, "the killed front end was never reaped"
                time.sleep(0.05)
            for body in bodies:  # those of the dead front end reconnect to another and replay
                assert _generate(runtime, body) == expected
            assert victim not in _serving(server)
            assert _metric(server.url, "lambdasplit_sessions_active") == DEVICES  # the dead one's gauge is gone
        finally:
            for body in bodies:
                body.close()
        assert server.returncode is None


def test_a_killed_engine_fails_every_front_ends_healthz(llama, runtime):
    with ServerProcess("--model", str(llama), "--split", "2,2", "--front-ends", "3") as server:
        engine = min(_processes(server)[1:], key=lambda p: p.create_time())  # spawned before the front ends
        os.kill(engine.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        answers: list[int] = []
        while len(answers) < 12:  # a dozen answers in a row, from whichever front ends the kernel picks
            status = _health(server.url)
            answers = [*answers, status] if status == 503 else []
            assert time.monotonic() < deadline, "some front end kept answering ok after the engine was killed"
        assert server.returncode is None


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(url.replace("ws://", "http://") + "/healthz", timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


class _SlowOpens:
    """Just enough of a scheduler for the engine's reader loop: an open completes when the test says."""

    def __init__(self) -> None:
        self.manifest = SimpleNamespace(frame_limits=lambda *_: None)
        self.limits = SimpleNamespace(max_context=64)
        self.opening: list[Future] = []
        self.closed: list[bytes] = []

    def open_session(self, body_index: int) -> Future:
        self.opening.append(Future())
        return self.opening[-1]

    def close_session(self, session: bytes) -> Future:
        self.closed.append(session)
        done: Future = Future()
        done.set_result(None)
        return done


def test_a_session_that_opens_after_its_front_end_left_is_closed():
    """A front end dies while its device's OPEN is on the compute thread: the session must not stay
    open (holding KV and a --max-sessions slot) with no pipe left to close it."""
    scheduler = _SlowOpens()
    pipes = [multiprocessing.Pipe() for _ in range(2)]
    loop = _EngineLoop([engine_end for _, engine_end in pipes], scheduler, 1 << 20)
    pipes[1][0].send_bytes(HEADER.pack(Op.OPEN, 1) + b'{"body": 0}')
    for front_end, _ in pipes:
        front_end.close()
    loop._serve()  # reads the OPEN, then both pipes' EOF
    assert len(scheduler.opening) == 1 and scheduler.closed == []
    scheduler.opening[0].set_result(b"s" * 16)  # the open finishes after its pipe closed
    assert scheduler.closed == [b"s" * 16]


def test_a_failed_load_is_reported_even_when_the_other_pipes_are_closed():
    """The engine reports a failed load on every pipe; the server process reads the first and exits,
    which may close the others first: that must not end the engine in a BrokenPipeError traceback."""
    pipes = [multiprocessing.Pipe() for _ in range(3)]
    for front_end, _ in pipes[1:]:
        front_end.close()
    handler = signal.getsignal(signal.SIGINT)
    try:
        engine_main([engine_end for _, engine_end in pipes], None, json.loads, ("{",), {}, 1 << 20)
    finally:
        signal.signal(signal.SIGINT, handler)  # engine_main leaves Ctrl-C to the front ends
    with pytest.raises(ComputeError, match="JSONDecodeError"):
        _ready(pipes[0][0])



@contextlib.contextmanager
def _engine_thread(llama, front_ends: int) -> Iterator[tuple[_EngineLoop, list[EngineClient]]]:
    """The engine's loop on a thread of this process over `front_ends` pipes, each with its client;
    stopped as the front ends stop it (every pipe closed)."""
    pipes = [multiprocessing.Pipe() for _ in range(front_ends)]
    loop = _EngineLoop([engine_end for _, engine_end in pipes], load_scheduler(str(llama), (2, 2)), 1 << 20)
    engine = threading.Thread(target=loop.run, name="engine", daemon=True)
    engine.start()
    clients = [EngineClient.attach(front_end) for front_end, _ in pipes]
    try:
        yield loop, clients
    finally:
        for client in clients:
            client.shutdown()
        engine.join(60)
    assert not engine.is_alive()


def test_a_front_ends_reaper_closes_only_its_own_idle_sessions(llama):
    """Each front end forgets only the ids its own REAP returns (its `sessions_active` is its set of
    open sessions): a reaper that closed another front end's idle session left that one counting it."""
    with _engine_thread(llama, 2) as (loop, clients):
        first, second = (client.open_session(0).result(timeout=60) for client in clients)
        assert clients[1].reap(0.0).result(timeout=60) == [second]
        assert set(loop.scheduler.sessions) == {first}  # still open: the first front end's reaper closes it
        assert clients[0].reap(0.0).result(timeout=60) == [first]
        assert loop.scheduler.sessions == {}


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_front_end_that_stops_ends_its_engine_reader_quietly(llama):
    """A spawned front end's `shutdown()` closes its pipe under its reader thread, which is waiting for
    the next message: that message (a heartbeat) raised TypeError in the reader, a traceback as it stopped."""
    with _engine_thread(llama, 1) as (_, clients):
        assert clients[0].health.problem() is None
    assert "shutting down" in str(clients[0].problem())


def test_a_front_end_that_stops_reading_stalls_only_its_own_replies(llama, runtime):
    """A stopped front end (SIGSTOP, a debugger) stops reading its pipe, and a write to a full pipe
    blocks: with one writer thread for every pipe, that stalled every other front end's replies too."""
    pipes = [multiprocessing.Pipe() for _ in range(2)]
    stopped, released = pipes[0][1], threading.Event()
    send = stopped.send_bytes

    def blocked(message: bytes) -> None:  # the stopped front end's pipe is full: the write waits
        released.wait()
        send(message)

    stopped.send_bytes = blocked
    loop = _EngineLoop([engine_end for _, engine_end in pipes], load_scheduler(str(llama), (2, 2)), 1 << 20)
    engine = threading.Thread(target=loop.run, name="engine", daemon=True)
    engine.start()
    client: EngineClient | None = None
    try:
        assert pipes[1][0].poll(60), "the other front end got no READY while the first one's pipe was full"
        client = EngineClient.attach(pipes[1][0])
        session = client.open_session(0).result(timeout=60)
        hidden = torch.randn(1, 3, runtime.config.hidden_size)
        reply, _ = client.submit(session, tensor_frame(MsgType.HIDDEN, hidden, Codec.FP32, session=session)).result(timeout=60)
        parsed = parse_frame(reply.data, Limits(max_payload=1 << 24, max_elements=1 << 24, hidden_size=hidden.shape[-1]))
        assert parsed.type == MsgType.HIDDEN and parsed.shape == hidden.shape
        for _ in range(3 * BACKLOG):  # the stopped one's queue keeps no more statistics than BACKLOG
            loop._send(0, Kind.STEP, 0, b"{}")
        assert BACKLOG <= loop.outboxes[0].qsize() <= BACKLOG + 1
    finally:
        released.set()
        (client or EngineClient.attach(pipes[1][0])).shutdown()
        pipes[0][0].close()
        engine.join(60)
    assert not engine.is_alive()


def test_the_engine_process_exits_at_shutdown_while_a_stopped_front_ends_pipe_is_full(llama, runtime):
    """A front end that stops reading (SIGSTOP) leaves its writer thread in a write to a full pipe
    for good: at SHUTDOWN the engine leaves that thread to the process exit, which must still come
    (status 0, not the kill `shutdown()` sends after 30 s)."""
    engine = EngineClient.start(load_scheduler, str(llama), (2, 2), max_frame_bytes=1 << 20, front_ends=2)
    stopped = engine.links[0]  # never read, as a stopped front end's pipe
    width, rows, length = runtime.config.hidden_size, 8, 200
    run, answered = [0], threading.Event()

    def count(stats) -> None:  # a step's replies are queued before its statistics
        run[0] += stats.positions
        if run[0] >= 3 * rows * length:
            answered.set()

    engine.on_step = count
    try:
        for seq in range(1, 4):  # replies of 400 KB each, more than the pipe holds
            session = engine.open_session(0).result(timeout=60)
            frame = tensor_frame(MsgType.HIDDEN, torch.randn(rows, length, width), Codec.FP32, session, seq)
            stopped.send_bytes(HEADER.pack(Op.SUBMIT, seq) + session + frame.to_bytes())
        assert answered.wait(120), "the stopped front end's frames were not run"
    finally:
        engine.shutdown()
        stopped.close()
    assert engine.process.exitcode == 0
