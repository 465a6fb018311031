"""The serving engine on one GPU: unsplit baselines, the body's batched step, the load generator and
bf16 exactness under batching, all in one run on one card (random 7B-shaped bf16 weights).

    PYTHONPATH=src:. python3 -m benchmarks serve-gpu [--quick]

1. Unsplit `generate()` (eager, greedy): a batch of 64 prompts (aggregate tok/s) and batch 1 (ms/token).
2. The body's batched step in process (`TextBody.step` over the KV pool), for each body variant
   (bf16, compiled, fp8 weights, both; `engine.optimize`): median step time eager and through CUDA
   graphs for 1, 64 and 256 decode rows, the outputs against bf16 eager's, and torch-profiler tables
   of one 64-row step eager and replayed (where the time goes).
   `agreement`: the embedded SmolLM2's body on the GPU in the same variants against its bf16 body,
   with the same float32 device parts: greedy tokens, top-1, hidden-state error (needs $GGUF).
3. A `lambdasplit serve` child on the same card and the load generator (`benchmarks.serve`) against
   it: 1, 8, 64 and 256 concurrent sessions (each level run once unmeasured first, so the CUDA
   graphs it needs are captured outside the measurement), then an open-loop arrival rate; the
   server's own step count and forward seconds per run from /metrics. Then 64 sessions against
   servers with one setting changed (`ABLATIONS`: `--engine-process`, `--no-async-schedule`, `--compile`,
   `--quantize fp8`, `--no-uvloop`, `--step-wait 0`).
4. End to end, one session: the device parts on the same GPU, the body over loopback, against
   unsplit batch-1 `generate()`, alternated.
5. bf16 under batching: 16 devices generating at once against each run alone; how many sessions'
   greedy tokens differ, and the largest difference of the body's hidden states and the logits.

Results to serve-gpu.json (written after every part) and serve-gpu.png in --out (default
benchmarks/results/local, which git ignores; a run of some --parts adds to the serve-gpu.json there).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import shutil
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import alternate, environment, summarize, write
from benchmarks.decode import split_run, unsplit_run
from benchmarks.gpu import SHAPES, build_random
from benchmarks.serve import Load, closed_loop, drive, open_loop, plot

NAME = "serve-gpu"
# Load-generator processes; each serves its sessions in turn, where real devices are one a session, so
# more of them take the clients' share out of the time between steps (`--client-processes`).
CLIENTS = 8
DEVICE = "cuda"  # a CPU smoke run of the parts sets "cpu"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


STATIC = {"cache_implementation": "static"}  # transformers then compiles the decoding forward (torch.compile)


def _generate_tok_s(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> float:
    """Aggregate decode tok/s of one batched generate(): decode steps only (from the first generated
    token to the last, stamped by a logits processor), as the load generator counts them."""
    run = unsplit_run(model, ids, new_tokens, **kwargs)()
    return ids.shape[0] * run.decode_tok_s


def unsplit_baselines(model, vocab: int, prompt: int, steps: int, batch: int, sizes: tuple[int, ...] = (64, 256)) -> dict:
    """Unsplit generate() at batch 1 and the load generator's batch sizes: eager, and with a static
    cache + torch.compile (the strongest plain-transformers baseline: compiled once per batch size,
    in warm-up runs outside the measurement)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (max(sizes), prompt), generator=gen).cuda()
    out: dict = {}
    for size in sizes:
        for name, kwargs in (("eager", {}), ("static_compile", STATIC)):
            for _ in range(2):  # warm-up: compile (static) and allocator
                _generate_tok_s(model, ids[:size], steps, **kwargs)
            runs = [_generate_tok_s(model, ids[:size], steps, **kwargs) for _ in range(3)]
            out[f"{name}_generate_batch{size}_tok_s"] = statistics.median(runs)
            out[f"{name}_generate_batch{size}_runs"] = runs
            print(f"[unsplit] {name} batch {size}: {runs}", flush=True)
    ones = alternate({"eager": unsplit_run(model, ids[:1], steps), "static_compile": unsplit_run(model, ids[:1], steps, **STATIC)}, 3)
    out["eager_generate_batch1"] = summarize(ones["eager"])
    out["static_compile_generate_batch1"] = summarize(ones["static_compile"])
    return out


# The first variant run is the reference of the others' hidden states: gather + SDPA, the path before the paged kernel.
VARIANTS = {"bf16-sdpa": {"paged_kernel": False}, "bf16": {}, "compiled": {"compile": True}, "fp8": {"quantize": "fp8"},
            "fp8+compiled": {"quantize": "fp8", "compile": True}}


def body_steps(path, rows_list: tuple[int, ...], context: int, variants: tuple[str, ...] = tuple(VARIANTS)) -> dict:
    """Per body variant (bf16 through gather + SDPA or the paged kernel, compiled, fp8 weights, both)
    and row count: median decode-step time eager and through CUDA graphs, in process, on two copies
    of the same sessions fed the same seeded states; each variant's outputs against the first
    variant's eager ones (the kernel, fp8 and compiled change the arithmetic); a profile of one
    64-row step eager and one replayed graph (bf16 and the last variant)."""
    out: dict = {"context": context, "steps": [], "variants": list(variants), "reference": variants[0]}
    reference: dict[int, torch.Tensor] = {}
    for variant in variants:
        try:
            rows_out = _variant_steps(path, variant, rows_list, context, reference, out)
        except Exception as exc:  # noqa: BLE001 - one variant that cannot run (fp8 without torchao) must not lose the others
            print(f"[body step] {variant} failed: {type(exc).__name__}: {exc}", flush=True)
            out.setdefault("failed", {})[variant] = f"{type(exc).__name__}: {exc}"[:500]
            rows_out = []
        _free_gpu()  # the variant's weights, pool and graphs are unreachable now
        out["steps"] += rows_out
    return out


def _variant_steps(path, variant: str, rows_list: tuple[int, ...], context: int, reference: dict, out: dict) -> list[dict]:
    from lambdasplit.engine.loading import load_scheduler
    from lambdasplit.engine.optimize import BodyOptions
    from lambdasplit.engine.scheduler import SchedulerLimits

    started = time.perf_counter()
    scheduler = load_scheduler(str(path), (1, 1), "bfloat16", DEVICE, SchedulerLimits(kv_pool_bytes=24 << 30),
                               options=BodyOptions(**VARIANTS[variant]))
    try:
        return _measure_variant(scheduler, variant, rows_list, context, reference, out)
    finally:
        scheduler.shutdown()
        out.setdefault("load_and_measure_seconds", {})[variant] = time.perf_counter() - started


def _measure_variant(scheduler, variant: str, rows_list: tuple[int, ...], context: int, reference: dict, out: dict) -> list[dict]:
    from lambdasplit.engine.kvpool import Sequence
    from lambdasplit.engine.step import Chunk, run_chunks

    body, pool = scheduler.bodies[0], scheduler.pool
    hidden = body.runner.config.hidden_size
    modes = step_modes(body, pool)
    rows_out = []
    for rows in rows_list:
        gen = torch.Generator(device=DEVICE).manual_seed(rows)
        seqs = {mode: [Sequence() for _ in range(rows)] for mode in modes}
        for i in range(0, rows, 64):  # prefill in groups so no single step is huge
            prompt = torch.randn(min(64, rows - i), context, hidden, device=DEVICE, dtype=torch.bfloat16, generator=gen)
            for mode in modes:
                part = seqs[mode][i:i + 64]
                assert pool.grow(part, context)
                run_chunks(body.runner.module, pool, [Chunk(part, prompt, torch.ones(len(part), context, dtype=torch.long))])
        one = torch.ones(rows, 1, dtype=torch.long)
        times: dict = {mode: [] for mode in modes}
        last: dict = {}
        for _ in range(12):
            step = torch.randn(rows, 1, hidden, device=DEVICE, dtype=torch.bfloat16, generator=gen)
            for mode, fn in modes.items():
                assert pool.grow(seqs[mode], seqs[mode][0].length + 1)
                _sync()
                start = time.perf_counter()
                last[mode] = fn([Chunk(seqs[mode], step, one)])[0]
                _sync()
                times[mode].append(time.perf_counter() - start)
        if rows == 64 and (variant == "bf16" or variant == out["variants"][-1]):
            out[f"profile_64_rows_{variant}"] = _profile_step(body, pool, seqs, step, one)
        if rows == 64 and variant == "bf16":
            out["mixed_steps"] = mixed_steps(body, pool, seqs, gen)
        row = {"variant": variant, "rows": rows, "graphs_vs_eager_max_abs_diff": (last["eager"] - last["graphs"]).abs().max().item()}
        reference.setdefault(rows, last["eager"].float())
        diff = last["graphs"].float() - reference[rows]
        row["vs_bf16_eager_max_abs_diff"] = diff.abs().max().item()
        row["vs_bf16_eager_relative_l2"] = (diff.norm() / reference[rows].norm()).item()
        for mode in modes:
            median = statistics.median(times[mode][2:])
            row[f"{mode}_step_ms"] = median * 1000
            row[f"{mode}_tok_s"] = rows / median
        rows_out.append(row)
        print(f"[body step] {row}", flush=True)
        pool.release([r for mode in modes for r in seqs[mode]])
    return rows_out


def step_modes(body, pool) -> dict:
    """The two ways the benchmarks run a body's step on the same chunks: eager, and the server's
    own path (a CUDA graph wherever one can replay the step)."""
    from lambdasplit.engine.step import run_chunks

    return {"eager": lambda chunks: run_chunks(body.runner.module, pool, chunks, kernel=body.kernel),
            "graphs": lambda chunks: body.run(pool, chunks)}


MIXED = {  # name: (decode rows that take T positions each, T, new sessions whose prompt joins the step)
    "63 decode rows + a 32-position prompt": (63, 1, 1),
    "1 session x 4 positions (a verification frame)": (1, 4, 0),
    "64 sessions x 4 positions (verification frames)": (64, 4, 0),
}


def mixed_steps(body, pool, seqs: dict, gen: torch.Generator, prompt: int = 32, repeats: int = 10) -> dict:
    """Steps that are not decode-only (issue 22 item 4, issue 24's verification frames): median ms
    eager and through the graphs path (replayed when every chunk is short enough for the paged
    kernel), on the same rows fed the same states, and how far the two outputs differ."""
    from lambdasplit.engine.graphs import capturable
    from lambdasplit.engine.kvpool import Sequence
    from lambdasplit.engine.step import Chunk, plan_step

    hidden = body.runner.config.hidden_size
    modes = step_modes(body, pool)
    out = {}
    for name, (rows, length, new) in MIXED.items():
        times: dict = {mode: [] for mode in modes}
        diffs, replayed = [], False
        for _ in range(repeats):
            states = torch.randn(rows, length, hidden, device=DEVICE, dtype=torch.bfloat16, generator=gen)
            fresh = torch.randn(new, prompt, hidden, device=DEVICE, dtype=torch.bfloat16, generator=gen)
            last = {}
            for mode, fn in modes.items():
                decode, joining = seqs[mode][:rows], [Sequence() for _ in range(new)]
                assert pool.grow(decode, decode[0].length + length) and (not new or pool.grow(joining, prompt))
                chunks = [Chunk(decode, states, torch.ones(rows, length, dtype=torch.long))]
                chunks += [Chunk(joining, fresh, torch.ones(new, prompt, dtype=torch.long))] if new else []
                replayed = body.cuda_graphs and body.kernel and capturable(plan_step(chunks), True)
                _sync()
                start = time.perf_counter()
                last[mode] = fn(chunks)
                _sync()
                times[mode].append(time.perf_counter() - start)
                pool.release(joining)
            eager, graphs = (torch.cat([o.float().flatten() for o in last[mode]]) for mode in modes)
            diffs.append(((eager - graphs).abs().max().item(), ((eager - graphs).norm() / eager.norm()).item()))
        out[name] = {"eager_ms": statistics.median(times["eager"][2:]) * 1000,
                     "graphs_ms": statistics.median(times["graphs"][2:]) * 1000,
                     "capturable": bool(replayed), "max_abs_diff": max(d[0] for d in diffs),
                     "relative_l2": max(d[1] for d in diffs)}
        print(f"[mixed step] {name}: {out[name]}", flush=True)
    return out


def _profile_step(body, pool, seqs, step, one) -> dict:
    """Torch-profiler tables of one eager step and one graph replay of the same 64 rows."""
    from torch.profiler import ProfilerActivity, profile

    from lambdasplit.engine.step import Chunk, run_chunks

    key = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    tables = {}
    for mode, fn in (("eager", lambda: run_chunks(body.runner.module, pool, [Chunk(seqs["eager"], step, one)], kernel=body.kernel)),
                     ("graphs", lambda: body.run(pool, [Chunk(seqs["graphs"], step, one)]))):
        assert pool.grow(seqs[mode], seqs[mode][0].length + 1)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])) as prof:
            fn()
            _sync()
        tables[mode] = prof.key_averages().table(sort_by=key, row_limit=16)
        tables[f"{mode}_cpu"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    return tables


def _metrics(url: str) -> dict[str, float]:
    """/metrics' unlabelled samples and histogram buckets (as `name_bucket{le="0.005"}`)."""
    base = url.replace("ws://", "http://")
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and ("{" not in line or line.split("{")[0].endswith("_bucket")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def histogram_quantile(before: dict[str, float], after: dict[str, float], name: str, q: float) -> float | None:
    """The q-quantile (0-1) of a histogram's observations between two /metrics reads, linear within
    its bucket (as Prometheus' histogram_quantile); None without observations."""
    bounds = sorted((float(key.split('le="')[1].rstrip('"}')), key) for key in after
                    if key.startswith(f"{name}_bucket{{") and "+Inf" not in key)
    total = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    if total <= 0:
        return None
    rank, low, below = q * total, 0.0, 0.0
    for bound, key in bounds:
        count = after[key] - before.get(key, 0.0)
        if count >= rank:
            return low + (bound - low) * (rank - below) / max(count - below, 1e-9)
        low, below = bound, count
    return low


def step_cycle(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean ms per forward of each part of the server's step cycle between two /metrics reads: the
    forward, the time between steps (of which the step wait held), planning, and replying."""
    forwards = max(after["lambdasplit_forward_seconds_count"] - before["lambdasplit_forward_seconds_count"], 1)
    names = {"forward": "lambdasplit_forward_seconds", "between": "lambdasplit_step_between_seconds",
             "held": "lambdasplit_step_held_seconds", "plan": "lambdasplit_step_plan_seconds",
             "reply": "lambdasplit_step_reply_seconds"}
    out = {f"server_{key}_ms_mean": 1000 * (after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)) / forwards
           for key, name in names.items()}
    for key, name in names.items():  # the mean of `between` also holds the idle gap before the run's first step
        p50 = histogram_quantile(before, after, name, 0.5)
        out[f"server_{key}_ms_p50"] = None if p50 is None else 1000 * p50
    return out


def load_generator(path, prompt: int, steps: int, levels: tuple[int, ...], rate: float, duration: float,
                   extra: tuple[str, ...] = (), profile: bool = False, compare_alone: bool = True,
                   on_progress: Callable[[dict], None] | None = None) -> dict:
    """Closed loop at each level, then the bf16 batched-vs-alone check and the open loop, against one
    server; `on_progress(out)` after each of them, so a run cut short by its call's limit keeps what
    it finished (the 12-07 H200 run lost its rows to the limit during the open loop)."""
    from lambdasplit.cloud.process import ServerProcess
    from lambdasplit.split.load import open_source

    manifest = open_source(str(path), (1, 1)).manifest("device", torch.bfloat16).as_dict()
    args = ["--model", str(path), "--split", "1,1", "--device", DEVICE, "--dtype", "bfloat16", "--max-sessions",
            str(max(levels) + 64), "--max-context", "4096", "--kv-pool", str(32 << 10), "--min-free-memory", "0", *extra]
    out: dict = {"closed_loop": [], "open_loop": None}
    with ServerProcess(*args, timeout=600) as server:
        base = Load(server.url, manifest, None, prompt, steps, [])
        closed_loop(base, 2, 2, 99)  # warm-up
        for n in levels:
            closed_loop(base, n, min(CLIENTS, n), 1000 + n)  # the same load first: its CUDA graphs are captured once, here
            label = f"{n}sessions" + "".join(a.replace("--", "_") for a in extra)  # runs with other settings apart
            spies = _py_spy(server.pid, label) if profile and n == 64 else []
            before = _metrics(server.url)
            row = closed_loop(base, n, min(CLIENTS, n), 0)
            after = _metrics(server.url)
            if spies:
                out["py_spy_64_sessions"] = _py_spy_summary(spies)
            forwards = after["lambdasplit_forward_seconds_count"] - before["lambdasplit_forward_seconds_count"]
            row["server_forwards"] = forwards
            row["server_forward_ms_mean"] = 1000 * (after["lambdasplit_forward_seconds_sum"]
                                                    - before["lambdasplit_forward_seconds_sum"]) / max(forwards, 1)
            row["server_sessions_per_forward"] = (after["lambdasplit_step_sessions_sum"]
                                                  - before["lambdasplit_step_sessions_sum"]) / max(forwards, 1)
            row.update(step_cycle(before, after))
            out["closed_loop"].append(row)
            if on_progress is not None:
                on_progress(out)
            print(f"[serve] {n} sessions: {row['aggregate_decode_tok_s']} tok/s, ITL p50/p99 {row['itl_ms']}, "
                  f"TTFT {row['ttft_ms']}, {row['server_forward_ms_mean']:.2f} ms/forward, "
                  f"{row['server_sessions_per_forward']:.1f} sessions/forward, errors {row['errors']}", flush=True)
        if compare_alone and levels[-1] >= 64 and 64 in levels:
            out["bf16_frames_batched_vs_alone"] = batched_vs_alone(server.url, base)
            if on_progress is not None:
                on_progress(out)
        if rate:
            out["open_loop"] = open_loop(base, rate, duration, CLIENTS, 0)
            print(f"[serve] open loop {rate}/s: {out['open_loop']['aggregate_decode_tok_s']} tok/s, "
                  f"ITL {out['open_loop']['itl_ms']}", flush=True)
    return out


def _py_spy(pid: int, label: str, seconds: int = 30) -> list[tuple[str, subprocess.Popen, Path]]:
    """py-spy records the server's front end, its engine process and its other front ends (spawned
    after the engine, so later pids) while a level runs (raw
    collapsed stacks of the threads on a CPU, per thread; not --gil: with it the 12-05 run kept 1
    sample in all; not --idle: a 6 s window with idle frames, on 12-06, ended while the load
    generator's workers were still starting and held only waits); [] when py-spy is not installed."""
    import psutil

    if shutil.which("py-spy") is None:
        print("[py-spy] not installed; no profile", flush=True)
        return []
    spawned = sorted(c.pid for c in psutil.Process(pid).children() if "spawn_main" in " ".join(c.cmdline()))
    targets = [("front_end", pid)] + [("engine" if i == 0 else f"front_end_{i}", child) for i, child in enumerate(spawned)]
    out = []
    for name, target in targets:
        path = Path(os.environ.get("OUT", "/tmp")) / f"py-spy-{label}-{name}.txt"
        proc = subprocess.Popen(["py-spy", "record", "--pid", str(target), "--duration", str(seconds), "--rate", "200",
                                 "--format", "raw", "--threads", "--nonblocking", "--output", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        out.append((name, proc, path))
    return out


def _py_spy_summary(spies: list[tuple[str, subprocess.Popen, Path]], top: int = 25) -> dict:
    """Per process: samples per thread, and the functions holding the most samples (self and total)."""
    summary: dict = {}
    for name, proc, path in spies:
        _, err = proc.communicate(timeout=120)
        if not path.is_file():
            summary[name] = {"error": (err or "").strip()[-500:]}
            continue
        threads: dict[str, int] = {}
        own: dict[str, int] = {}
        total: dict[str, int] = {}
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            samples = int(count)
            threads[frames[0]] = threads.get(frames[0], 0) + samples
            own[frames[-1]] = own.get(frames[-1], 0) + samples
            for frame in set(frames[1:]):
                total[frame] = total.get(frame, 0) + samples
        best = lambda d: sorted(d.items(), key=lambda kv: -kv[1])[:top]  # noqa: E731
        summary[name] = {"threads": best(threads), "self": best(own), "total": best(total)}
    return summary


def batched_vs_alone(url: str, base: Load, sessions: int = 64, alone: int = 8) -> dict:
    """The body's bf16 replies for `sessions` sessions run together against the first `alone` of
    them each run by itself (the same seeded frames): how many differ, and by how much."""
    import numpy as np

    def states(payloads: list[bytes]) -> list[np.ndarray]:
        return [np.frombuffer(p, dtype=np.uint16).astype(np.uint32) << 16 for p in payloads]  # bf16 -> f32 bits

    keep = dataclasses.replace(base, keep_replies=True)
    before = _metrics(url)
    together = {r["seed"]: r for r in drive([dataclasses.replace(keep, seeds=s) for s in
                                             (list(range(i, sessions, 8)) for i in range(8))])}
    after = _metrics(url)
    differ, worst = 0, 0.0
    for seed in range(alone):
        solo = drive([dataclasses.replace(keep, seeds=[seed])])[0]
        a, b = states(solo["payloads"]), states(together[seed]["payloads"])
        diffs = [np.abs(x.view(np.float32) - y.view(np.float32)).max() for x, y in zip(a, b, strict=True)]
        differ += any(d > 0 for d in diffs)
        worst = max(worst, float(max(diffs)))
    forwards = after["lambdasplit_forward_seconds_count"] - before["lambdasplit_forward_seconds_count"]
    out = {"sessions_together": sessions, "sessions_compared": alone, "sessions_with_different_states": differ,
           "max_hidden_abs_diff": worst, "sessions_per_forward_together":
           (after["lambdasplit_step_sessions_sum"] - before["lambdasplit_step_sessions_sum"]) / max(forwards, 1)}
    print(f"[bf16 batched vs alone] {out}", flush=True)
    return out


class _Recorder:
    """Wraps a body client: keeps every hidden state the body returns (float32, on the host), or
    only its last position with `last`."""

    def __init__(self, body, last: bool = True) -> None:
        self.body, self.last, self.hidden = body, last, []

    def __getattr__(self, name):
        return getattr(self.body, name)

    def forward(self, hidden, attention_mask=None):
        out = self.body.forward(hidden, attention_mask)
        self.hidden.append((out[:, -1] if self.last else out).float().cpu())
        return out


def divergence(path, devices: int, prompt: int, new_tokens: int) -> dict:
    """Greedy tokens and states of `devices` sessions run together against each run alone."""
    from lambdasplit.cloud.process import ServerProcess
    from lambdasplit.device.connect import BodyConfig, connect_body
    from lambdasplit.device.runtime import SplitRuntime
    from lambdasplit.device.sampling import SamplingParams
    from lambdasplit.wire.codec import Codec

    runtime = SplitRuntime.load(path, (1, 1), "bfloat16", device=DEVICE)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, runtime.config.vocab_size, (1, prompt + 3 * i), generator=gen) for i in range(devices)]
    args = ["--model", str(path), "--split", "1,1", "--device", DEVICE, "--dtype", "bfloat16", "--kv-pool", "8192"]
    with ServerProcess(*args, timeout=600) as server:
        def run(i: int, results: dict) -> None:
            body = _Recorder(connect_body(BodyConfig(server.url, codec=Codec.BF16, timeout=300), runtime.manifest))
            out = runtime.generate_ids(body, prompts[i], None, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                                      keep_logits=True)
            body.close()
            results[i] = (out.token_ids[0], torch.stack(body.hidden), out.logits[:, 0].float().cpu())

        alone: dict = {}
        for i in range(devices):
            run(i, alone)
        together: dict = {}
        threads = [threading.Thread(target=run, args=(i, together)) for i in range(devices)]
        before = _metrics(server.url)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = _metrics(server.url)
    forwards = after["lambdasplit_forward_seconds_count"] - before["lambdasplit_forward_seconds_count"]
    sessions = after["lambdasplit_step_sessions_sum"] - before["lambdasplit_step_sessions_sum"]
    differ, hidden_diff, logit_diff, first = 0, 0.0, 0.0, []
    for i in range(devices):
        a, b = alone[i], together[i]
        if a[0] != b[0]:
            differ += 1
            first.append(next(j for j, (x, y) in enumerate(zip(a[0], b[0], strict=True)) if x != y))
        same = next((j for j, (x, y) in enumerate(zip(a[0], b[0], strict=True)) if x != y), len(a[0]))
        # compare states only up to the first differing token: after it the sequences differ
        hidden_diff = max(hidden_diff, (a[1][:same + 1] - b[1][:same + 1]).abs().max().item())
        logit_diff = max(logit_diff, (a[2][:same + 1] - b[2][:same + 1]).abs().max().item())
    out = {"devices": devices, "new_tokens": new_tokens, "sessions_with_different_tokens": differ,
           "first_difference_at": first, "max_hidden_abs_diff": hidden_diff, "max_logit_abs_diff": logit_diff,
           "sessions_per_forward_together": sessions / max(forwards, 1)}
    print(f"[bf16] {out}", flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    return out


def body_agreement(source: str | None, split: tuple[int, int] = (2, 2), new_tokens: int = 64, limit: int = 40) -> dict:
    """The embedded model's body on the GPU as bf16 (the reference), compiled, fp8 and fp8 compiled,
    with the same float32 device parts: greedy tokens identical to the bf16 body's on held-out
    prompts, top-1 agreement teacher-forced on the bf16 continuation, and the body's hidden states'
    error relative to bf16's over those teacher-forced positions."""
    import json

    from benchmarks.agreement import PROMPTS, _first_difference, argmaxes, greedy
    from lambdasplit.device.runtime import SplitRuntime
    from lambdasplit.engine.loading import load_scheduler
    from lambdasplit.engine.local import LocalBody
    from lambdasplit.engine.optimize import BodyOptions
    from lambdasplit.engine.scheduler import SchedulerLimits
    from lambdasplit.wire.codec import Codec

    runtime = SplitRuntime.load(source, split)
    prompts = json.loads(PROMPTS.read_text())[:limit]
    out: dict = {"source": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)", "split": list(split), "prompts": len(prompts),
                 "new_tokens": new_tokens, "device_parts": "float32 on the CPU", "reference": "bf16 body", "bodies": {}}
    expected, ref_top1, ref_hidden = None, None, None
    for name, options in (("bf16", {}), ("compiled", {"compile": True}), ("fp8", {"quantize": "fp8"}),
                          ("fp8+compiled", {"quantize": "fp8", "compile": True})):
        try:
            scheduler = load_scheduler(source, split, "bfloat16", DEVICE, SchedulerLimits(kv_pool_bytes=2 << 30),
                                       options=BodyOptions(**options))
        except Exception as exc:  # noqa: BLE001 - fp8 without a GPU that has it: say so, keep the others
            out["bodies"][name] = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        try:
            body = _Recorder(LocalBody(scheduler, Codec.BF16), last=False)
            got = greedy(runtime, body, prompts, new_tokens, 8)
            body.hidden.clear()
            top1 = [argmaxes(runtime, body, p, row) for p, row in zip(prompts, expected or got, strict=True) if len(row) > 1]
            hidden = body.hidden
        finally:
            scheduler.shutdown()
        if expected is None:
            expected, ref_top1, ref_hidden = got, top1, hidden
        firsts = [_first_difference(a, b) for a, b in zip(expected, got, strict=True)]
        diverged = [f for f in firsts if f is not None]
        errors = [((h - r).norm() / r.norm()).item() for h, r in zip(hidden, ref_hidden, strict=True)]
        out["bodies"][name] = {
            "identical_prompts": len(firsts) - len(diverged), "identical_share": (len(firsts) - len(diverged)) / len(firsts),
            "median_first_difference": statistics.median(diverged) if diverged else None,
            "top1_agreement": sum(int((a == b).sum()) for a, b in zip(top1, ref_top1, strict=True)) / sum(len(a) for a in ref_top1),
            "hidden_relative_l2_median": statistics.median(errors), "hidden_relative_l2_max": max(errors),
        }
        print(f"[body agreement] {name}: {out['bodies'][name]}", flush=True)
        _free_gpu()
    return out


PARTS = ("unsplit", "steps", "agreement", "serve", "ablations", "e2e", "bf16")
ABLATIONS = {"default": (), "--no-paged-kernel": ("--no-paged-kernel",), "--engine-process": ("--engine-process",),
             "--no-async-schedule": ("--no-async-schedule",),
             "--compile": ("--compile",), "--quantize fp8": ("--quantize", "fp8"),
             "--compile --quantize fp8": ("--compile", "--quantize", "fp8"),
             "--no-uvloop": ("--no-uvloop",), "--step-wait 0": ("--step-wait", "0"),
             "--front-ends 2": ("--front-ends", "2"), "--front-ends 4": ("--front-ends", "4"),
             "--front-ends 8": ("--front-ends", "8")}
PROFILED = ("--engine-process", "--front-ends 4")  # ablations whose server is profiled with py-spy


def _earlier(out: Path) -> dict:
    """What earlier runs wrote to `out`'s serve-gpu.json, which a run of some parts adds to (only
    that directory's: a committed result is rewritten only if `out` is its directory)."""
    import json

    previous = out / f"{NAME}.json"
    return json.loads(previous.read_text()) if previous.is_file() else {}


def run_serve_gpu(out: Path, quick: bool = False, parts: tuple[str, ...] = PARTS, variants: tuple[str, ...] = tuple(VARIANTS),
                  server_args: tuple[str, ...] = (), ablations: tuple[str, ...] = tuple(ABLATIONS),
                  levels: tuple[int, ...] = ()) -> dict:
    """The suite, or some of its parts, into `out`/serve-gpu.json (each part merges its results into
    the file there and writes it before the next starts, so a run split over several 10-minute calls
    builds one file)."""
    logging.getLogger("lambdasplit").setLevel(logging.ERROR)
    assert torch.cuda.is_available(), "the GPU serving suite needs a CUDA device"
    steps, prompt = (16, 32) if quick else (64, 32)
    levels = levels or ((1, 8) if quick else (1, 8, 64, 256))
    path = build_random("llama2-7b")
    payload: dict = _earlier(out) if parts != PARTS else {}
    payload.update({"suite": NAME, "environment": environment("cuda"), "model": "llama2-7b (random bf16)",
                    "split": [1, 1], "prompt_tokens": prompt, "decode_steps": steps, "codec": "bf16",
                    "client_processes": CLIENTS})
    if "unsplit" in parts:
        unsplit = _load_unsplit(path)
        sizes = (8,) if quick else (64, 256)
        payload["unsplit"] = unsplit_baselines(unsplit, SHAPES["llama2-7b"]["vocab_size"], prompt, steps, 64, sizes)
        print(f"[unsplit] {payload['unsplit']}", flush=True)
        write(NAME, payload, out)
        del unsplit
        _free_gpu()  # the compiled static caches of batch 256 would leave the server too little memory on an 80 GB card
    if "steps" in parts:
        payload["body_step"] = body_steps(path, (1, 8) if quick else (1, 64, 256), prompt + steps // 2, variants)
        write(NAME, payload, out)
    if "agreement" in parts:
        payload["body_agreement"] = body_agreement(os.environ.get("GGUF", "/tmp/smollm2.gguf"))
        write(NAME, payload, out)
    if "serve" in parts:
        payload["serve_args"] = list(server_args)

        def keep(partial: dict) -> None:
            payload.update(partial)
            write(NAME, payload, out)

        keep(load_generator(path, prompt, steps, levels, 0 if quick else 16.0, 8.0, server_args, profile=not quick,
                            on_progress=keep))
    if "ablations" in parts and not quick:  # 64 sessions with one setting changed, and unchanged (its own baseline)
        payload["ablations"] = {}
        for name in ablations:
            # py-spy of the engine process and its front end apart (the default server is one process)
            run = load_generator(path, prompt, steps, (64,), 0, 0, ABLATIONS[name], compare_alone=False,
                                 profile=name in PROFILED)
            payload["ablations"][name] = run["closed_loop"][0]
            if "py_spy_64_sessions" in run:
                key = "py_spy_64_sessions" + name.replace("--", "_").replace("-", "_").replace(" ", "")
                payload[key] = run["py_spy_64_sessions"]
            write(NAME, payload, out)
    if "e2e" in parts:
        unsplit = _load_unsplit(path)
        payload["end_to_end_batch1"] = end_to_end(path, unsplit, prompt, steps)
        write(NAME, payload, out)
        del unsplit
        _free_gpu()
    if "bf16" in parts:
        payload["bf16_batched_vs_alone"] = divergence(path, 4 if quick else 16, prompt, 16 if quick else 32)
    path_out = write(NAME, payload, out)
    if "closed_loop" in payload:
        plot({**payload, "prompt_tokens": prompt, "decode_steps": steps}, path_out.with_suffix(".png"))
    return payload


def _load_unsplit(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).to("cuda").eval()


def _free_gpu() -> None:
    torch._dynamo.reset()  # compiled graphs hold their static caches
    gc.collect()
    torch.cuda.empty_cache()


def end_to_end(path, unsplit, prompt: int, steps: int) -> dict:
    """One session, the device parts on the same GPU and the body over loopback, against unsplit
    batch-1 generate(), eager and static cache + compile, alternated."""
    from lambdasplit.cloud.process import ServerProcess
    from lambdasplit.device.connect import BodyConfig, connect_body
    from lambdasplit.device.runtime import SplitRuntime
    from lambdasplit.wire.codec import Codec

    with ServerProcess("--model", str(path), "--split", "1,1", "--device", DEVICE, "--dtype", "bfloat16",
                       "--kv-pool", "4096", timeout=600) as server:
        runtime = SplitRuntime.load(path, (1, 1), "bfloat16", device=DEVICE)
        remote = connect_body(BodyConfig(server.url, codec=Codec.BF16, timeout=300), runtime.manifest)
        ids = torch.randint(3, SHAPES["llama2-7b"]["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(3))
        runs = alternate({"unsplit_generate": unsplit_run(unsplit, ids, steps),
                          "unsplit_static_compile": unsplit_run(unsplit, ids, steps, **STATIC),
                          "split_gpu_loopback_bf16": split_run(runtime, remote, ids, steps)}, 3)
        e2e = {n: summarize(r) for n, r in runs.items()}
        split_ms = e2e["split_gpu_loopback_bf16"]["per_token_ms"]["total"]
        e2e["latency_ratio_vs_unsplit"] = split_ms / e2e["unsplit_generate"]["per_token_ms"]["total"]
        e2e["latency_ratio_vs_static_compile"] = split_ms / e2e["unsplit_static_compile"]["per_token_ms"]["total"]
        print(f"[e2e] ratio {e2e['latency_ratio_vs_unsplit']:.3f} vs eager, "
              f"{e2e['latency_ratio_vs_static_compile']:.3f} vs static+compile", flush=True)
        remote.close()
        del runtime
    return e2e


def run_exactness(out: Path) -> dict:
    """`--exactness-only`: the bf16 batched-against-alone comparison alone, added to `out`/serve-gpu.json."""
    from lambdasplit.cloud.process import ServerProcess
    from lambdasplit.split.load import open_source

    path = build_random("llama2-7b")
    manifest = open_source(str(path), (1, 1)).manifest("device", torch.bfloat16).as_dict()
    payload = _earlier(out)
    with ServerProcess("--model", str(path), "--split", "1,1", "--device", DEVICE, "--dtype", "bfloat16",
                       "--max-sessions", "128", "--kv-pool", str(32 << 10), "--min-free-memory", "0", timeout=600) as server:
        base = Load(server.url, manifest, None, 32, 64, [])
        closed_loop(base, 64, 8, 1000)  # warm-up: capture the CUDA graphs
        payload["bf16_frames_batched_vs_alone"] = batched_vs_alone(server.url, base)
        payload["bf16_frames_batched_vs_alone"]["environment"] = environment("cuda")
    write(NAME, payload, out)
    return payload
