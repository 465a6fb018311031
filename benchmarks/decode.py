"""Decode benchmarks: unsplit generate() against lambdasplit in-process and over the network."""

from __future__ import annotations

import re
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from benchmarks.common import Run
from lambdasplit.device.body import BodyClient
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams


class _StepClock(LogitsProcessor):
    """Stamps the time each step's logits are ready (synchronising the GPU, as the loop does anyway)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def unsplit_run(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, **generate_kwargs) -> Callable[[], Run]:
    """`generate_kwargs`: e.g. cache_implementation="static" (on a GPU transformers then compiles the
    decoding forward with torch.compile itself)."""
    device = next(model.parameters()).device
    ids = ids.to(device)

    def run() -> Run:
        clock = _StepClock(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, logits_processor=LogitsProcessorList([clock]), pad_token_id=0, **generate_kwargs,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
        decode = clock.stamps[-1] - clock.stamps[0]
        return Run(
            prefill_s=clock.stamps[0] - start,
            decode_tok_s=(new_tokens - 1) / decode,
            total_s=end - start,
            per_token_ms={"total": 1000 * decode / (new_tokens - 1)},
        )

    return run


def split_run(
    runtime: SplitRuntime, body: BodyClient, ids: torch.Tensor, new_tokens: int,
    body_compute: Callable[[], tuple[float, int]] | None = None,
) -> Callable[[], Run]:
    """`body_compute` returns (seconds, steps) of body compute so far (from the server's metrics)."""

    def run() -> Run:
        before = body_compute() if body_compute else None
        result = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        t = result.timings
        steps = t.steps[1:]
        n = len(steps)
        stats = body.stats
        per_token = {
            "head": 1000 * statistics.median(s[0] for s in steps),
            "body_call": 1000 * statistics.median(s[1] for s in steps),
            "tail": 1000 * statistics.median(s[2] for s in steps),
            "serialization": 1000 * stats.codec_seconds / (n + 1),
            "generate_other": 1000 * (t.total - t.head - t.body - t.tail) / t.tokens,  # sampling, processors, streamer
            "total": 1000 * (t.total - t.prefill) / n,
        }
        if before is not None:
            after = body_compute()
            compute = (after[0] - before[0]) / max(after[1] - before[1], 1)
            per_token["body_compute"] = 1000 * compute
            per_token["network"] = 1000 * stats.wait_seconds / (n + 1) - per_token["body_compute"]
        else:
            per_token["body_compute"] = 1000 * stats.wait_seconds / (n + 1)
        decode_bytes = stats.per_step[1] if len(stats.per_step) > 1 else (0, 0)
        return Run(
            prefill_s=t.prefill,
            decode_tok_s=t.tokens_per_second,
            total_s=t.total,
            per_token_ms=per_token,
            bytes_per_token={"to_cloud": decode_bytes[0], "from_cloud": decode_bytes[1]},
        )

    return run


def metrics_reader(url: str, token: str | None = None) -> Callable[[], tuple[float, int]]:
    """Reads the server's cumulative body compute seconds and step count from /metrics."""
    http_url = url.replace("wss://", "https://").replace("ws://", "http://") + "/metrics"

    def read() -> tuple[float, int]:
        request = urllib.request.Request(http_url, headers={"Authorization": f"Bearer {token}"} if token else {})
        text = urllib.request.urlopen(request, timeout=10).read().decode()
        total = float(re.search(r"^lambdasplit_step_seconds_sum (\S+)", text, re.M).group(1))
        count = int(float(re.search(r"^lambdasplit_step_seconds_count (\S+)", text, re.M).group(1)))
        return total, count

    return read


def concurrent_run(runtimes: list[SplitRuntime], bodies: list[BodyClient], ids: torch.Tensor, new_tokens: int) -> dict:
    """All devices generate at once against one server: aggregate and per-session decode rates."""
    rates: list[float] = []
    lock = threading.Lock()

    def one(runtime: SplitRuntime, body: BodyClient) -> None:
        result = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        with lock:
            rates.append(result.timings.tokens_per_second)

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=pair) for pair in zip(runtimes, bodies, strict=False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {
        "sessions": len(runtimes),
        "aggregate_tok_s": len(runtimes) * ids.shape[0] * new_tokens / wall,
        "per_session_tok_s_median": statistics.median(rates),
        "per_session_tok_s_min": min(rates),
    }


def kv_bytes_per_session(runtime: SplitRuntime, positions: int, itemsize: int) -> int:
    """Body KV cache for one sequence of `positions`: 2 x layers x kv_heads x head_dim x positions."""
    config = runtime.config
    start, stop = runtime.spec.range("body")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * (stop - start) * config.num_key_value_heads * head_dim * positions * itemsize
