"""`serve --front-ends N`: several front-end processes on one port (SO_REUSEPORT) with one engine
process behind them: connections spread over the front ends, every reply is exact, /metrics
answers for the whole server from any of them, and a front end that dies leaves the others serving."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
import torch

from lambdasplit.cloud.process import ServerProcess
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.local import load_local_body

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads connections on Linux")

IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2030, 30]])
DEVICES = 9  # connections: the chance that all of them land on one of 3 front ends is 3 / 3**9


@pytest.fixture(scope="module")
def runtime(llama):
    return SplitRuntime.load(llama, (2, 2))


@pytest.fixture(scope="module")
def expected(llama, runtime):
    return runtime.generate_ids(load_local_body(llama, (2, 2)), IDS, None, SamplingParams(max_new_tokens=6)).token_ids


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
        assert server.stop() == 130  # Ctrl-C's exit status, as for one front end
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, "the engine or a front end outlived the server"


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
