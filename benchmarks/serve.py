"""Load generator for one body server: many concurrent devices speaking the real wire protocol.

Each simulated device opens a WebSocket, sends HELLO with the device manifest, then one prefill
HIDDEN frame (1, P, D) and N decode HIDDEN frames (1, 1, D), waiting for each reply. The hidden
states are seeded random with unit RMS, like a real h_K, in the bf16 codec; there is no head or
tail compute, so the numbers are the server's (body compute, scheduling, WebSocket stack).

Clients run in worker processes ('spawn'), several per process on asyncio, apart from the server
(a `lambdasplit serve` child, or `--url`). Two modes:
- closed loop: `n` sessions connect, then all start together (one run per concurrency level);
- open loop: sessions arrive at `rate` per second (Poisson, seeded) for `duration` seconds.

Per run: aggregate decode tok/s (all decode replies / the time from the first prefill reply to the
last reply), time to first token (the prefill reply's latency) and inter-token latency (each
decode reply's latency), p50/p99 pooled over sessions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import os
import random
import statistics
import time
from pathlib import Path

from benchmarks.common import RESULTS, environment, write

READY_TIMEOUT = 300.0  # seconds for every worker to import, build its frames and connect its sessions


@dataclasses.dataclass(frozen=True)
class Load:
    """What one worker process runs: its sessions and, in open loop, when each one arrives."""

    url: str
    manifest: dict
    token: str | None
    prompt: int
    steps: int
    seeds: list[int]
    arrivals: list[float] | None = None  # seconds after the start; None: closed loop, all at once
    keep_replies: bool = False  # return every reply's payload (to compare sessions run together and alone)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated q-th percentile (0-100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# ---------------------------------------------------------------- worker process side


def _frames(load: Load, seed: int) -> list:
    """The session's HIDDEN frames (prefill, then decode), encoded once before the clock starts."""
    import torch

    from lambdasplit.wire.codec import Codec
    from lambdasplit.wire.frame import MsgType, tensor_frame

    hidden = int(load.manifest["hidden_size"])
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, load.prompt, hidden)] + [(1, 1, hidden)] * load.steps
    return [tensor_frame(MsgType.HIDDEN, torch.randn(s, generator=gen), Codec.BF16) for s in shapes]


class Client:
    """One simulated device: a connection, its session and its timings (time.monotonic seconds)."""

    def __init__(self, load: Load, seed: int, arrival: float | None) -> None:
        self.load, self.seed, self.arrival = load, seed, arrival
        self.frames = _frames(load, seed)
        self.ws = None
        self.session = b""
        self.record: dict = {"seed": seed, "error": None, "bad_replies": 0, "replies": 0, "itl_s": []}

    async def connect(self) -> None:
        from websockets.asyncio.client import connect

        from lambdasplit.wire.frame import MsgType
        from lambdasplit.wire.protocol import BODY_PATH, PROTOCOL, control_frame, read_control

        start = time.monotonic()
        headers = {"Authorization": f"Bearer {self.load.token}"} if self.load.token else None
        self.ws = await connect(self.load.url.rstrip("/") + BODY_PATH, additional_headers=headers,
                                compression=None, max_size=None, open_timeout=60, ping_interval=None)
        hello = {"protocol": PROTOCOL, "manifest": self.load.manifest, "codec": "bf16"}
        await self.ws.send(control_frame(MsgType.HELLO, hello).to_bytes())
        welcome = read_control(self._parse(await self.ws.recv()), MsgType.WELCOME)
        self.session = bytes.fromhex(welcome["session"])
        self.record["connect_s"] = time.monotonic() - start

    def _parse(self, data: bytes):
        from lambdasplit.wire.frame import Limits, parse_frame

        hidden = int(self.load.manifest["hidden_size"])
        return parse_frame(data, Limits(max_payload=1 << 31, max_elements=1 << 31, hidden_size=hidden))

    async def generate(self) -> None:
        from lambdasplit.wire.frame import MsgType
        from lambdasplit.wire.protocol import read_control

        rec = self.record
        for seq, frame in enumerate(self.frames, start=1):
            data = dataclasses.replace(frame, session=self.session, seq=seq).to_bytes()
            sent = time.monotonic()
            await self.ws.send(data)
            reply = self._parse(await self.ws.recv())
            now = time.monotonic()
            if reply.type == MsgType.ERROR:
                read_control(reply, MsgType.HIDDEN)  # raises the server's typed error
            rec["replies"] += 1
            if self.load.keep_replies:
                rec.setdefault("payloads", []).append(reply.payload)
            if reply.type != MsgType.HIDDEN or reply.seq != seq or reply.shape != frame.shape:
                rec["bad_replies"] += 1
            if seq == 1:
                rec["prefill_sent"], rec["first_reply"] = sent, now
            else:
                rec["itl_s"].append(now - sent)
            rec["end"] = now

    async def close(self) -> None:
        from lambdasplit.wire.frame import Frame, MsgType

        if self.ws is not None:
            try:
                await self.ws.send(Frame(MsgType.CLOSE, session=self.session).to_bytes())
                await self.ws.close()
            except Exception:  # noqa: BLE001 - closing a connection the server may have dropped
                pass

    async def run_open_loop(self, start: float) -> None:
        await asyncio.sleep(max(0.0, start + self.arrival - time.monotonic()))
        self.record["arrived"] = time.monotonic()
        await self.guarded(self.connect)
        if self.record["error"] is None:
            await self.guarded(self.generate)
        await self.close()

    async def guarded(self, step) -> None:
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - one failed session is a result, not a crash
            self.record["error"] = f"{type(exc).__name__}: {exc}"


async def _worker_main(load: Load, ready, go) -> list[dict]:
    loop = asyncio.get_running_loop()
    arrivals = load.arrivals or [None] * len(load.seeds)
    clients = [Client(load, seed, arrival) for seed, arrival in zip(load.seeds, arrivals, strict=True)]
    if load.arrivals is None:
        await asyncio.gather(*(c.guarded(c.connect) for c in clients))
    ready.put(os.getpid())
    start = await loop.run_in_executor(None, go.get)  # a time.monotonic() value, shared by every worker
    if load.arrivals is None:
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        await asyncio.gather(*(c.guarded(c.generate) for c in clients if c.record["error"] is None))
        await asyncio.gather(*(c.close() for c in clients))
    else:
        await asyncio.gather(*(c.run_open_loop(start) for c in clients))
    return [c.record for c in clients]


def _worker(load: Load, ready, go, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        results.put(asyncio.run(_worker_main(load, ready, go)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which would otherwise wait
        ready.put(os.getpid())
        results.put(f"worker failed: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- parent side


def drive(loads: list[Load]) -> list[dict]:
    """Run the loads in one spawned process each; start them together; every session's record."""
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(load, ready, go, results), daemon=True) for load in loads]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=READY_TIMEOUT)
        start = time.monotonic() + 0.2
        for _ in procs:
            go.put(start)
        records: list[dict] = []
        for _ in procs:
            out = results.get(timeout=READY_TIMEOUT)
            if isinstance(out, str):
                raise RuntimeError(out)
            records += out
        return records
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def summarize(records: list[dict], steps: int) -> dict:
    done = [r for r in records if r["error"] is None]
    ttft = [r["first_reply"] - r["prefill_sent"] for r in done]
    itl = [x for r in done for x in r["itl_s"]]
    out: dict = {
        "sessions": len(records),
        "completed": len(done),
        "errors": sorted({r["error"] for r in records if r["error"]}),
        "replies": sum(r["replies"] for r in records),
        "bad_replies": sum(r["bad_replies"] for r in records),
        "aggregate_decode_tok_s": None,
    }
    if done:
        window = max(r["end"] for r in done) - min(r["first_reply"] for r in done)
        out["aggregate_decode_tok_s"] = len(itl) / window if window > 0 else None
        out["wall_s"] = max(r["end"] for r in done) - min(r.get("arrived", r["prefill_sent"]) for r in done)
        rates = [steps / (r["end"] - r["first_reply"]) for r in done if steps and r["end"] > r["first_reply"]]
        out["per_session_decode_tok_s_median"] = statistics.median(rates) if rates else None
    for name, values in (("ttft_ms", ttft), ("itl_ms", itl), ("connect_ms", [r["connect_s"] for r in done])):
        out[name] = {f"p{q}": (v * 1000 if (v := percentile(values, q)) is not None else None) for q in (50, 99)}
    return out


def _split_evenly(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts) if items[i::parts]]


def closed_loop(base: Load, sessions: int, procs: int, seed: int) -> dict:
    seeds = list(range(seed, seed + sessions))
    loads = [dataclasses.replace(base, seeds=s) for s in _split_evenly(seeds, procs)]
    return {"mode": "closed", **summarize(drive(loads), base.steps), "procs": len(loads)}


def open_loop(base: Load, rate: float, duration: float, procs: int, seed: int) -> dict:
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration:
        arrivals.append(t)
        t += rng.expovariate(rate)
    pairs = list(enumerate(arrivals, start=seed))
    loads = [dataclasses.replace(base, seeds=[s for s, _ in p], arrivals=[a for _, a in p])
             for p in _split_evenly(pairs, procs)]
    records = drive(loads) if loads else []
    return {"mode": "open", "rate_per_s": rate, "duration_s": duration, **summarize(records, base.steps),
            "procs": len(loads)}


def run_serve(
    model: str | None = None,
    split: tuple[int, int] = (2, 2),
    prompt: int = 32,
    steps: int = 64,
    sessions: tuple[int, ...] = (1, 8, 64),
    rate: float = 0.0,
    duration: float = 10.0,
    url: str | None = None,
    token: str | None = None,
    procs: int = 0,
    dtype: str = "float32",
    seed: int = 0,
) -> dict:
    """Every run's summary (closed loop per level in `sessions`, then open loop if `rate`)."""
    from lambdasplit.cloud.process import ServerProcess
    from lambdasplit.split.load import open_source
    from lambdasplit.split.manifest import dtype_named

    opened = open_source(model, split)
    manifest = opened.manifest("device", dtype_named(dtype, "float32")).as_dict()
    procs = procs or min(4, max(2, os.cpu_count() or 1))
    expected_open = int(rate * duration * 2 + 16) if rate else 0
    capacity = max([*sessions, expected_open, 1]) + 8
    payload: dict = {
        "environment": environment(), "model": model or "SmolLM2-135M-Instruct (embedded)", "dtype": dtype,
        "split": list(split), "prompt_tokens": prompt, "decode_steps": steps, "codec": "bf16",
        "hidden_size": manifest["hidden_size"], "client_procs": procs, "server": url or "lambdasplit serve child",
        "closed_loop": [], "open_loop": None,
    }
    server = None
    if url is None:
        args = ["--split", f"{split[0]},{split[1]}", "--max-sessions", str(capacity), "--dtype", dtype,
                "--min-free-memory", "0", "--max-context", str(max(4096, prompt + steps + 1))]
        server = ServerProcess(*args, *(["--model", str(model)] if model else []))
        url = server.url
    try:
        base = Load(url, manifest, token, prompt, steps, [])
        for n in sessions:
            row = closed_loop(base, n, min(procs, n), seed)
            payload["closed_loop"].append(row)
            print(_line(f"{n} sessions", row), flush=True)
        if rate:
            row = open_loop(base, rate, duration, procs, seed)
            payload["open_loop"] = row
            print(_line(f"open loop {rate:g}/s x {duration:g} s ({row['sessions']} sessions)", row), flush=True)
    finally:
        if server is not None:
            server.stop()
    return payload


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _line(label: str, row: dict) -> str:
    bad = f", {row['sessions'] - row['completed']} failed: {row['errors'][:1]}" if row["errors"] else ""
    return (f"{label}: {_fmt(row['aggregate_decode_tok_s'])} decode tok/s, "
            f"TTFT p50/p99 {_fmt(row['ttft_ms']['p50'])}/{_fmt(row['ttft_ms']['p99'])} ms, "
            f"ITL p50/p99 {_fmt(row['itl_ms']['p50'])}/{_fmt(row['itl_ms']['p99'])} ms, "
            f"bad replies {row['bad_replies']}{bad}")


def plot(payload: dict, path: Path) -> Path | None:
    """tok/s and latency percentiles against concurrency; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in payload["closed_loop"] if r["aggregate_decode_tok_s"] is not None]
    if not rows:
        return None
    n = [r["sessions"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(n, [r["aggregate_decode_tok_s"] for r in rows], marker="o")
    a.set_xscale("log", base=2)
    a.set_xticks(n, [str(x) for x in n])
    a.set_ylim(bottom=0)
    a.set_xlabel("concurrent sessions")
    a.set_ylabel("aggregate decode tokens/s")
    a.set_title(f"body server, split {payload['split'][0]},{payload['split'][1]}, bf16 frames")
    for key, style in (("ttft_ms", "tab:orange"), ("itl_ms", "tab:blue")):
        for q, dash in (("p50", "-"), ("p99", "--")):
            b.plot(n, [r[key][q] for r in rows], dash, color=style, marker="o", label=f"{key[:-3].upper()} {q}")
    b.set_xscale("log", base=2)
    b.set_xticks(n, [str(x) for x in n])
    b.set_yscale("log")
    b.set_xlabel("concurrent sessions")
    b.set_ylabel("ms")
    b.set_title(f"latency (prompt {payload['prompt_tokens']}, {payload['decode_steps']} decode steps)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(name: str, payload: dict, directory: Path | None = None) -> tuple[Path, Path | None]:
    path = write(name, {"suite": name, **payload}, directory)
    return path, plot(payload, (directory or RESULTS) / f"{name}.png")
