"""Failover behind HAProxy: body servers behind deploy/haproxy.cfg, one killed (SIGKILL) mid-generation.

Starts one `lambdasplit serve` per `server` line of deploy/haproxy.cfg (TLS, one shared token),
HAProxy on that very file (its addresses come from the environment), and a device that generates
greedily through the proxy. Each trial kills the server the device's session landed on after a few
tokens, lets the device reconnect through the proxy and replay onto another server, checks the
tokens against the unsplit transformers model, and restarts the killed server for the next trial.

    .venv/bin/python scripts/failover.py --trials 20

tests/test_loadbalancer.py runs the same `Cluster` and `run_trial` on loopback in CI.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lambdasplit.child import ChildProcess
from lambdasplit.cloud.process import ServerProcess
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.errors import LambdaSplitError
from lambdasplit.security import make_certificates
from lambdasplit.wire.codec import Codec

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "haproxy.cfg"
SPLIT = "2,2"
TOKEN = "failover-trial-token-0123456789abcdef"
# `server body1 "${LS_BODY1-10.0.0.11:8470}"`: the name and the environment variable of each server.
SERVER_LINE = re.compile(r'^\s*server\s+(\S+)\s+"\$\{(\w+)-', re.MULTILINE)


def free_port() -> int:
    """A loopback port nobody listens on now (HAProxy cannot report a port 0 bind back)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config_servers(config: Path = CONFIG) -> list[tuple[str, str]]:
    """(name, environment variable) of each `server` line: the config says how many servers there are."""
    servers = SERVER_LINE.findall(config.read_text())
    if not servers:
        raise LambdaSplitError(f"{config} has no `server NAME \"${{VAR-default}}\"` line")
    return servers


def haproxy_command(config: Path) -> list[str]:
    """`haproxy -db -f CONFIG` (foreground); a missing haproxy is an error, never a skip."""
    binary = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None)
    if binary is None:
        raise LambdaSplitError("haproxy is not installed: run ./scripts/haproxy.sh (Debian's package, with apt)")
    return [binary, "-db", "-f", str(config)]


@dataclass
class Cluster:
    """Body servers, HAProxy in front of them (deploy/haproxy.cfg, unmodified) and the TLS/token files.

    `url` is the proxy's, the one address devices know. Servers are indexed like the config's
    `server` lines; a killed one can be restarted on its port, where HAProxy's health check finds it."""

    model: Path
    workdir: Path
    config: Path = CONFIG
    start_timeout: float = 180.0
    servers: list[ServerProcess] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    haproxy: ChildProcess | None = None
    tls: dict[str, Path] | None = None
    url: str = ""

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def token_file(self) -> Path:
        return self.workdir / "token"

    @property
    def ca(self) -> Path:
        return (self.tls or {})["ca"]

    @property
    def stats_socket(self) -> Path:
        return self.workdir / "haproxy.sock"

    def server_args(self) -> list[str]:
        tls = self.tls or {}
        return ["--model", str(self.model), "--split", SPLIT, "--token-file", str(self.token_file),
                "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"])]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token_file.write_text(TOKEN)  # one token file shared by every server
        # One certificate for every server, naming the address the devices dial: the proxy's.
        self.tls = make_certificates(self.workdir / "tls", ["localhost", "127.0.0.1"])
        declared = config_servers(self.config)
        self.names = [name for name, _ in declared]
        self.servers = self._start_servers(len(declared))
        port = free_port()
        env = {**os.environ, "LS_BIND": f"127.0.0.1:{port}", "LS_HAPROXY_SOCKET": str(self.stats_socket),
               "LS_STATS_BIND": f"127.0.0.1:{free_port()}", "LS_HAPROXY_LOG": "127.0.0.1:9"}  # logs to the discard port
        env.update({var: f"127.0.0.1:{proc.port}" for (_, var), proc in zip(declared, self.servers, strict=True)})
        self.haproxy = ChildProcess(haproxy_command(self.config), name="haproxy", env=env, log=self.workdir / "haproxy.log")
        self.url = f"wss://127.0.0.1:{port}"
        self.wait_states({name: "UP" for name in self.names}, self.start_timeout, checked=True)

    def _start_servers(self, count: int) -> list[ServerProcess]:
        """Start `count` servers at once (each loads the model: in parallel it is one load's time)."""
        started: list[ServerProcess | BaseException | None] = [None] * count

        def start(i: int) -> None:
            try:
                started[i] = ServerProcess(*self.server_args(), timeout=self.start_timeout)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others are stopped
                started[i] = exc

        threads = [threading.Thread(target=start, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = [s for s in started if isinstance(s, BaseException)]
        if failed:
            for s in started:
                if isinstance(s, ServerProcess):
                    s.stop()
            raise failed[0]
        return [s for s in started if isinstance(s, ServerProcess)]

    def stop(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for proc in self.servers:
            proc.stop()

    # --- what HAProxy and the servers say -------------------------------------------------------
    def haproxy_command(self, command: str) -> str:
        """One command on HAProxy's admin socket (the runtime API of docs/deploy.md)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, tuple[str, str, int]]:
        """HAProxy's view of each body server: (status, last check, current connections)."""
        lines = self.haproxy_command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "lambdasplit" and row.get("svname") in self.names:
                states[row["svname"]] = (row["status"], row["check_status"], int(row["scur"] or 0))
        return states

    def wait_states(self, want: dict[str, str], timeout: float, checked: bool = False) -> None:
        """Wait until HAProxy reports each named server in the wanted status (UP, DOWN); with `checked`,
        also after a passing health check (L7OK: GET /healthz answered over TLS)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = self.server_states()
            except OSError:  # the socket appears once HAProxy has parsed its config
                states = {}
            if all(states.get(n, ("",))[0] == s and (not checked or states[n][1] == "L7OK") for n, s in want.items()):
                return
            if self.haproxy is not None and self.haproxy.returncode is not None:
                raise LambdaSplitError(f"haproxy exited with status {self.haproxy.returncode}: {self._haproxy_log()}")
            if time.monotonic() > deadline:
                raise LambdaSplitError(f"HAProxy did not report {want} within {timeout:g} s: {states}; {self._haproxy_log()}")
            time.sleep(0.1)

    def _haproxy_log(self) -> str:
        path = self.workdir / "haproxy.log"
        return path.read_text()[-3000:] if path.exists() else "(no haproxy output)"

    def sessions_active(self, index: int) -> float:
        """`lambdasplit_sessions_active` from one server's /metrics (TLS, bearer token)."""
        proc = self.servers[index]
        request = urllib.request.Request(proc.url.replace("wss://", "https://") + "/metrics",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        context = ssl.create_default_context(cafile=str(self.ca))
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            text = response.read().decode()
        match = re.search(r"^lambdasplit_sessions_active (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def landed_on(self) -> int:
        """The one live server that holds a session now (the device's connection landed there)."""
        live = [i for i, proc in enumerate(self.servers) if proc.returncode is None]
        holding = [i for i in live if self.sessions_active(i) > 0]
        if len(holding) != 1:
            raise LambdaSplitError(f"expected exactly one server with a session, got {holding} of {live}")
        return holding[0]

    def restart(self, index: int) -> None:
        """Start server `index` again on its port; HAProxy's health check brings it back (rise 2)."""
        port = self.servers[index].port
        self.servers[index].stop()
        self.servers[index] = ServerProcess(*self.server_args(), port=port, timeout=self.start_timeout)

    def device_body(self, runtime: SplitRuntime, **kwargs: object) -> RemoteBody:
        """A RemoteBody that knows only the proxy's URL; fp32 on the wire, so tokens match the unsplit model."""
        options = {"codec": Codec.FP32, "token": TOKEN, "tls_ca": self.ca, "reconnect_window": 60.0, "backoff": 0.2,
                   "connect_timeout": 30.0, **kwargs}
        return RemoteBody(self.url, runtime.manifest, **options)


# --- one trial ----------------------------------------------------------------------------------
@dataclass
class Trial:
    tokens: list[int]
    killed: str  # the config's name of the server killed mid-generation
    took_over: str  # the server the session was replayed onto (its /metrics, one token later)
    reconnects: int
    seconds: float


def unsplit_tokens(model: Path, input_ids: torch.Tensor, new_tokens: int, eos: list[int]) -> list[int]:
    """Greedy tokens of the whole model, by transformers itself: what every trial must reproduce."""
    from transformers import AutoModelForCausalLM

    oracle = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.no_grad():
        out = oracle.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False)
    ids = out[0, input_ids.shape[1]:].tolist()
    cut = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
    return ids[:cut]


def run_trial(cluster: Cluster, runtime: SplitRuntime, input_ids: torch.Tensor, new_tokens: int, kill_after: int) -> Trial:
    """Generate through the proxy and kill -9 the server the session is on after `kill_after` tokens."""
    body = cluster.device_body(runtime)
    tokens: list[int] = []
    killed: list[int] = []
    took_over: list[int] = []

    def on_tokens(step: list[list[int]]) -> None:
        tokens.extend(step[0])
        if killed and not took_over:
            took_over.append(cluster.landed_on())
        if len(tokens) == kill_after and not killed:
            index = cluster.landed_on()
            cluster.servers[index].kill()  # SIGKILL, no goodbye on the socket
            killed.append(index)

    start = time.monotonic()
    try:
        runtime.generate_ids(body, input_ids, None, SamplingParams(max_new_tokens=new_tokens), on_tokens=on_tokens)
    finally:
        body.close()
    if not killed:
        raise LambdaSplitError(f"the generation ended after {len(tokens)} tokens, before the kill at {kill_after}")
    after = cluster.names[took_over[0]] if took_over else "-"  # "-": the kill came with the last token
    return Trial(tokens, cluster.names[killed[0]], after, body.reconnects, time.monotonic() - start)


def kill_point(trial: int, length: int) -> int:
    """After how many tokens trial `trial` kills: walks 1 .. length-1, so every trial has a token after the kill."""
    return 1 + trial % max(1, length - 1)


def run_trials(cluster: Cluster, runtime: SplitRuntime, input_ids: torch.Tensor, expected: list[int], trials: int,
               report: Callable[[int, Trial, bool], None]) -> int:
    """`trials` kill trials (the kill point walks through the generation); returns how many were identical."""
    identical = 0
    for n in range(trials):
        trial = run_trial(cluster, runtime, input_ids, len(expected), kill_point(n, len(expected)))
        same = trial.tokens == expected and trial.reconnects >= 1
        identical += same
        report(n, trial, same)
        index = cluster.names.index(trial.killed)
        cluster.wait_states({trial.killed: "DOWN"}, 30)
        cluster.restart(index)
        cluster.wait_states({name: "UP" for name in cluster.names}, 60, checked=True)
    return identical


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="kill trials (default 20)")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per generation (default 24)")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", default="The three primary colours are", help="prompt (chat template applied)")
    args = parser.parse_args(argv)
    from lambdasplit.split.sources import resolve_source

    model = args.model or resolve_source(None).path
    runtime = SplitRuntime.load(model, (2, 2))
    input_ids, _ = runtime.encode(args.prompt)
    expected = unsplit_tokens(model, input_ids, args.tokens, runtime.eos_ids)
    if len(expected) < 2:
        raise LambdaSplitError(f"the model stops after {len(expected)} token(s): pick another --prompt")
    print(f"model {model}, split {SPLIT}, {len(expected)} tokens expected (unsplit transformers generate)")
    with tempfile.TemporaryDirectory() as tmp, Cluster(model, Path(tmp)) as cluster:
        print(f"{len(cluster.servers)} servers behind HAProxy at {cluster.url}: "
              + ", ".join(f"{n}=:{p.port}" for n, p in zip(cluster.names, cluster.servers, strict=True)))

        def report(n: int, trial: Trial, same: bool) -> None:
            print(f"trial {n + 1:2d}: killed {trial.killed} after {kill_point(n, len(expected)):2d} tokens, replayed onto {trial.took_over}, "
                  f"{trial.reconnects} reconnect(s), "
                  f"{trial.seconds:5.1f} s, {'identical' if same else 'DIFFERENT: ' + str(trial.tokens)}", flush=True)

        identical = run_trials(cluster, runtime, input_ids, expected, args.trials, report)
    print(f"{identical}/{args.trials} trials identical to the unsplit output")
    return 0 if identical == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
