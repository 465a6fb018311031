"""FrontEnds: the extra network front-end processes of `serve --front-ends N`.

On a GPU body, one front end's event loop (WebSocket framing, frame parsing and encoding) is the
bottleneck before the GPU is (docs/benchmarks.md: about 7 ms of one core per step of 64 frames).
So the server process's own front end is joined by N-1 spawned ones: each a `BodyServer` with its
own pipe to the one engine process (`engine/core.py`), all bound to the same port with
SO_REUSEPORT, so the kernel spreads new connections over them (Linux hashes each connection to one
of the listening sockets). Their metrics are shared (`cloud/metrics.py`). A front end that dies
takes its connections with it (their devices reconnect and replay on another front end, and the
engine closes its sessions); the others keep serving.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

from lambdasplit.errors import LambdaSplitError

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0  # seconds a front end may take to import, attach and listen
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class FrontEndSpec:
    """What a front-end process needs to build its server; picklable (it rebuilds the TLS context)."""

    host: str
    port: int
    token: str | None
    tls_cert: Path | None
    tls_key: Path | None
    session_ttl: float
    use_uvloop: bool
    tls_key_password: str | None = None  # an encrypted key's passphrase, read once by the server process

    def config(self):  # -> ServerConfig (imported late: the spawned process imports it once)
        from lambdasplit.cloud.server import ServerConfig
        from lambdasplit.security import server_ssl_context

        tls = server_ssl_context(self.tls_cert, self.tls_key, self.tls_key_password)
        return ServerConfig(self.host, self.port, self.token, tls, self.session_ttl, reuse_port=True)


def front_end_main(index: int, conn: Connection, ready: Connection, spec: FrontEndSpec,
                   setup: Callable[[], None] | None) -> None:
    """A spawned front end: attach to the engine, listen on the shared port, report, serve until Ctrl-C
    (SIGINT, which the server process sends its front ends when it stops) or until the server process
    is gone (killed: an orphaned front end would go on serving the port with nobody to stop it)."""
    signal.signal(signal.SIGINT, _interrupt_once)  # even if the server started with SIGINT ignored
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    try:
        if setup is not None:
            setup()
        from lambdasplit.cloud.server import BodyServer
        from lambdasplit.engine.core import EngineClient

        server = BodyServer(EngineClient.attach(conn), spec.config())
        server.serve_forever(spec.use_uvloop, lambda: ready.send_bytes(b""))
    except KeyboardInterrupt:
        pass
    except LambdaSplitError as exc:
        # The server process may be stopping every front end already (another one's error came first).
        with contextlib.suppress(KeyboardInterrupt, OSError):
            ready.send_bytes(f"front end {index}: {exc}".encode())
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # on its way out: a Ctrl-C now would only interrupt the exit


def _interrupt_once(signum: int, frame: object) -> None:
    """Ctrl-C in a terminal reaches a front end twice: from the terminal (the whole process group) and
    from the server process stopping its front ends. The first stops it; a second would interrupt
    its way out (a KeyboardInterrupt traceback from an exit handler). This handler covers the start
    (setup, attaching to the engine); while the front end serves, `BodyServer.serve_forever` takes
    Ctrl-C in its event loop instead (raised here, it could land inside a transport callback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


class Terminated(SystemExit):
    """SIGTERM, raised in the server process (`sigterm_unwinds`); a SystemExit, so asyncio lets it out
    of the event loop as it does Ctrl-C's KeyboardInterrupt."""


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: a second must not cut the clean-up short
    raise Terminated(128 + signum)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within: SIGTERM unwinds the server process as Ctrl-C does, so its clean-up runs (front ends
    stopped, the metrics directory removed); then the process ends as SIGTERM ends it (systemd counts
    that a clean stop, an exit status of 143 a failure), its remaining children (the engine) first:
    the exit handler that would stop them does not run."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except Terminated:
        for child in multiprocessing.active_children():
            child.terminate()
            child.join(STOP_TIMEOUT)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        log.error("the server process is gone; this front end stops")
        os._exit(1)


class FrontEnds:
    """The spawned front ends of one server: started once the server process's own front end has
    bound the port (so a port of 0 becomes a real one they can share), stopped with it."""

    def __init__(self, links: list[Connection], setup: Callable[[], None] | None = None) -> None:
        self.links = links
        self.setup = setup
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self._stopping = threading.Event()

    def start(self, spec: FrontEndSpec) -> None:
        """Spawn one front end per engine pipe and wait until each listens; raises the first one's error."""
        context = multiprocessing.get_context("spawn")
        waiting = []
        for index, link in enumerate(self.links, start=1):
            ours, theirs = context.Pipe(duplex=False)
            process = context.Process(target=front_end_main, args=(index, link, theirs, spec, self.setup),
                                      name=f"lambdasplit-front-end-{index}", daemon=True)
            process.start()
            link.close()  # the child holds it now
            theirs.close()
            self.processes.append(process)
            waiting.append((index, process, ours))
        for index, process, ours in waiting:
            self._await_listening(index, process, ours)
        threading.Thread(target=self._watch, name="front-end-watch", daemon=True).start()

    def stop(self) -> None:
        """Ctrl-C to every front end still running, then a kill after STOP_TIMEOUT."""
        self._stopping.set()
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(STOP_TIMEOUT)

    def _await_listening(self, index: int, process: multiprocessing.process.BaseProcess, ready: Connection) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.poll(0.5):
            if not process.is_alive():
                raise LambdaSplitError(f"front end {index} exited with status {process.exitcode} before it listened")
            if time.monotonic() > deadline:
                raise LambdaSplitError(f"front end {index} was not listening within {START_TIMEOUT:.0f} s")
        problem = ready.recv_bytes().decode()
        if problem:
            raise LambdaSplitError(problem)

    def _watch(self) -> None:
        """One error line per front end that exits while the server runs; its live gauges are dropped."""
        from lambdasplit.cloud.metrics import process_gone

        running = {process.sentinel: process for process in self.processes}
        while running:
            for sentinel in wait(list(running)):
                process = running.pop(sentinel)
                process.join()  # it has exited: this reaps it
                if process.pid is not None:
                    process_gone(process.pid)
                if not self._stopping.is_set():
                    log.error("%s exited with status %s; the other front ends keep serving", process.name,
                              process.exitcode)
