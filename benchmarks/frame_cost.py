"""How much host time the body server spends per frame, apart from the forward (issue 22).

On a GPU the server's step cycle is the forward plus the time between steps, and most of that is
Python: the event loop receiving and answering every session's frame, the compute thread planning
the step and encoding the replies. That Python costs the same on any host, so it can be measured
here, on the CPU, with a body so small that its forward is cheap: a random Llama of hidden size
512, split 1,1 (one body layer), 64 sessions from the load generator, bf16 frames.

Per run it reads the server process's CPU time per thread (psutil) and the step-cycle histograms of
/metrics, and reports per decode frame: the event loop thread's CPU, the compute thread's CPU less
the forward, and the forward. Two references run in the same invocation, alternating:
- `echo`: a bare `websockets` server on uvloop that echoes frames of the same size to the same
  number of connections, the floor of the WebSocket stack itself;
- `--baseline-src DIR` (optional): the `src` directory of another checkout of lambdasplit (an
  older commit), whose server runs the same load, for an A/B of a change.

    python -m benchmarks frame-cost [--rounds 3] [--sessions 64] [--baseline-src /path/to/old/src]
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch

from benchmarks.common import RESULTS, environment, write
from benchmarks.serve import Load, closed_loop
from lambdasplit.engine.kvpool import BLOCK_SIZE

NAME = "frame-cost-cpu"
HIDDEN = 512
PROMPT, STEPS = 8, 200
WORK = Path(os.environ.get("LAMBDASPLIT_BENCH_DIR", "/tmp/lambdasplit-bench"))


def tiny_model() -> Path:
    """A seeded random Llama with hidden size 512 and three layers (split 1,1: one body layer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = WORK / "frame-cost-llama"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=8,
                             num_key_value_heads=8, vocab_size=1000, max_position_embeddings=4096)
        LlamaForCausalLM(config).save_pretrained(str(path))
    return path


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """These environment variables set while a child is started (it copies the environment)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def _thread_seconds(proc: psutil.Process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


def server_run(path: Path, manifest: dict, sessions: int, procs: int, src: str | None) -> dict:
    """One closed-loop run of `sessions` against a fresh `lambdasplit serve` (from `src` if given)."""
    from benchmarks.serve_gpu import _metrics, step_cycle
    from lambdasplit.cloud.process import ServerProcess

    # One torch thread: the forward then runs on the compute thread alone, so that thread's CPU less
    # the forward is its Python. The baseline's child imports lambdasplit from the other checkout.
    env = {"OMP_NUM_THREADS": "1", **({"PYTHONPATH": os.pathsep.join(filter(None, (src, os.environ.get("PYTHONPATH"))))}
                                       if src else {})}
    # KV of the one body layer: keys and values of 512 float32 values per position.
    pool_mib = -(-sessions * (PROMPT + STEPS + BLOCK_SIZE) * 2 * HIDDEN * 4 // (1 << 20)) + 16
    with _environment(env):
        server = ServerProcess("--model", str(path), "--split", "1,1", "--device", "cpu", "--max-sessions",
                               str(sessions + 64), "--kv-pool", str(pool_mib), timeout=300)
    with server:
        base = Load(server.url, manifest, None, PROMPT, STEPS, [])
        closed_loop(base, sessions, procs, 5)  # warm-up
        proc = psutil.Process(server.pid)
        before, threads0 = _metrics(server.url), _thread_seconds(proc)
        row = closed_loop(base, sessions, procs, 0)
        after, threads1 = _metrics(server.url), _thread_seconds(proc)
    if row["errors"] or row["completed"] != sessions:
        raise RuntimeError(f"{sessions - row['completed']} of {sessions} sessions failed: {row['errors'][:3]}")
    frames = row["replies"]
    spent = {tid: threads1[tid] - threads0.get(tid, 0.0) for tid in threads1}
    forward = after["lambdasplit_forward_seconds_sum"] - before["lambdasplit_forward_seconds_sum"]
    loop = spent.pop(server.pid, 0.0)  # the main thread runs the event loop
    compute = max(spent.values(), default=0.0)  # the compute thread: the busiest of the others
    cycle = step_cycle(before, after)
    return {"tok_s": row["aggregate_decode_tok_s"], "frames": frames, "errors": row["errors"],
            "loop_us_per_frame": 1e6 * loop / frames, "compute_us_per_frame": 1e6 * (compute - forward) / frames,
            "forward_us_per_frame": 1e6 * forward / frames, "other_threads_us_per_frame": 1e6 * (sum(spent.values()) - compute) / frames,
            **{key: cycle[key] for key in ("server_between_ms_p50", "server_plan_ms_p50", "server_reply_ms_p50")}}


# ---------------------------------------------------------------- the WebSocket floor


def _echo_server(ports: mp.Queue) -> None:
    import uvloop
    from websockets.asyncio.server import serve

    async def handler(ws) -> None:
        async for message in ws:
            await ws.send(message)

    async def main() -> None:
        async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
            ports.put(next(iter(server.sockets)).getsockname()[1])
            await asyncio.Future()

    uvloop.run(main())


def _echo_clients(port: int, sessions: int, size: int, messages: int) -> None:
    from websockets.asyncio.client import connect

    async def one() -> None:
        async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
            data = os.urandom(size)
            for _ in range(messages):
                await ws.send(data)
                await ws.recv()

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(sessions)))

    asyncio.run(main())


def echo_run(sessions: int, procs: int, size: int, messages: int = STEPS) -> dict:
    """Server CPU per echoed message: a bare websockets server, the same connections and frame size."""
    ctx = mp.get_context("spawn")
    ports: mp.Queue = ctx.Queue()
    server = ctx.Process(target=_echo_server, args=(ports,), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=60)
        proc = psutil.Process(server.pid)
        before = proc.cpu_times()
        clients = [ctx.Process(target=_echo_clients, args=(port, len(part), size, messages))
                   for part in (list(range(sessions))[i::procs] for i in range(procs)) if part]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        after = proc.cpu_times()
    finally:
        server.kill()
    count = sessions * messages
    return {"loop_us_per_frame": 1e6 * (after.user + after.system - before.user - before.system) / count}


def run_frame_cost(rounds: int = 3, sessions: int = 64, procs: int = 2, baseline_src: str | None = None) -> Path:
    from lambdasplit.split.load import open_source
    from lambdasplit.wire.frame import HEADER_SIZE

    path = tiny_model()
    manifest = open_source(str(path), (1, 1)).manifest("device", torch.float32).as_dict()
    sides = {"this": None, **({"baseline": baseline_src} if baseline_src else {})}
    runs: dict[str, list[dict]] = {name: [] for name in [*sides, "echo"]}
    for number in range(rounds):  # alternating, so drift on a shared machine hits every side alike
        for name, src in sides.items():
            runs[name].append(server_run(path, manifest, sessions, procs, src))
            print(f"[frame-cost] round {number + 1} {name}: {runs[name][-1]}", flush=True)
        runs["echo"].append(echo_run(sessions, procs, HEADER_SIZE + 2 * HIDDEN))
        print(f"[frame-cost] round {number + 1} echo: {runs['echo'][-1]}", flush=True)
    medians = {name: {key: statistics.median(r[key] for r in rows) for key in rows[0] if isinstance(rows[0][key], float)}
               for name, rows in runs.items()}
    ratios = {"loop_vs_echo": medians["this"]["loop_us_per_frame"] / medians["echo"]["loop_us_per_frame"]}
    if baseline_src:
        for key in ("loop_us_per_frame", "compute_us_per_frame", "tok_s"):
            ratios[f"{key}_vs_baseline"] = medians["this"][key] / medians["baseline"][key]
    payload = {"suite": NAME, "environment": environment("cpu"), "sessions": sessions, "client_processes": procs,
               "model": f"random Llama, hidden {HIDDEN}, 3 layers, split 1,1", "prompt_tokens": PROMPT,
               "decode_steps": STEPS, "codec": "bf16", "this_commit": _commit(str(Path(__file__).parent)),
               "baseline_src": baseline_src, "baseline_commit": _commit(baseline_src) if baseline_src else None, "rounds": rounds,
               "runs": runs, "medians": medians, "ratios": ratios}
    out = write(NAME, payload, RESULTS)
    plot(payload, out.with_suffix(".png"))
    return out


def _commit(directory: str) -> str | None:
    """The short commit of the git checkout holding `directory`, if it is one."""
    done = subprocess.run(["git", "-C", directory, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def plot(payload: dict, path: Path) -> Path | None:
    """Host microseconds per frame by thread, per side (medians); None without matplotlib."""
    from benchmarks.report import _pyplot

    try:
        plt = _pyplot()
    except ImportError:
        return None
    medians = payload["medians"]
    names = list(medians)
    parts = (("loop_us_per_frame", "event loop thread"), ("compute_us_per_frame", "compute thread, less the forward"))
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.38
    for offset, (key, label) in enumerate(parts):
        values = [medians[name].get(key, 0.0) for name in names]
        ax.bar([i + (offset - 0.5) * width for i in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("host us per decode frame (median)")
    ax.set_title(f"body server host time per frame, {payload['sessions']} sessions, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
