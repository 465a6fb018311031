"""The CPU suite on the embedded SmolLM2-135M-Instruct (fp32)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from transformers import AutoModelForCausalLM

from benchmarks.common import alternate, environment, summarize, write
from benchmarks.decode import concurrent_run, kv_bytes_per_session, metrics_reader, split_run, unsplit_run
from benchmarks.memory import device_vs_unsplit
from benchmarks.netem import DelayProxy
from lambdasplit.cloud.process import ServerProcess
from lambdasplit.device.connect import BodyConfig, connect_body
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.engine.local import load_local_body
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import HEADER_SIZE

PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how "
    "books were made, sold and read across Europe. Within decades, presses spread from Mainz to Venice, "
    "Paris and London, and the price of a book fell sharply. "
)
console = Console()


def prompt_ids(runtime: SplitRuntime, length: int) -> torch.Tensor:
    ids = runtime.tokenizer(PARAGRAPH * 8, add_special_tokens=False)["input_ids"][:length]
    return torch.tensor([ids])


def run_cpu(quick: bool, reps: int, new_tokens: int, split: tuple[int, int], out: Path | None = None) -> Path:
    logging.getLogger("lambdasplit").setLevel(logging.ERROR)
    torch.manual_seed(0)
    runtime = SplitRuntime.load(None, split)
    ids = prompt_ids(runtime, 64)
    model = AutoModelForCausalLM.from_pretrained(str(runtime.opened.checkpoint.path), dtype=torch.float32).eval()
    results: dict = {"suite": "cpu-quick" if quick else "cpu", "environment": environment(), "model": "SmolLM2-135M-Instruct (embedded, fp32)",
                     "split": list(split), "prompt_tokens": ids.shape[1], "new_tokens": new_tokens}
    with ServerProcess("--split", f"{split[0]},{split[1]}") as server:
        remote = connect_body(BodyConfig(server.url, codec=Codec.BF16), runtime.manifest)
        compute = metrics_reader(server.url)
        candidates = {
            "unsplit_generate": unsplit_run(model, ids, new_tokens),
            "split_in_process": split_run(runtime, load_local_body(None, split), ids, new_tokens),
            "split_loopback_bf16": split_run(runtime, remote, ids, new_tokens, compute),
        }
        console.print(f"decode: {len(candidates)} candidates x {reps} reps, {new_tokens} new tokens")
        runs = alternate(candidates, reps)
        summary = {name: summarize(r) for name, r in runs.items()}
        base = summary["unsplit_generate"]["decode_tok_s"]
        for _name, s in summary.items():
            s["ratio_vs_unsplit"] = s["decode_tok_s"] / base
        results["decode"] = summary

        results["bytes"] = codec_bytes(runtime, server.url, ids)
        results["wan"] = wan(runtime, server.port, ids, 16 if quick else 32, quick)
        results["concurrency"] = concurrency(runtime, server.url, ids, 16 if quick else 32, [1, 4] if quick else [1, 4, 16])
        remote.close()
    results["memory"] = device_vs_unsplit("default", split)
    results["memory"]["cloud_kv_bytes_per_session"] = kv_bytes_per_session(runtime, ids.shape[1] + new_tokens, 4)
    results["targets"] = {
        "decode_ratio_loopback_vs_unsplit": {"target": ">= 0.95", "measured": summary["split_loopback_bf16"]["ratio_vs_unsplit"]},
        "header_bytes_per_frame": {"target": "<= 64", "measured": HEADER_SIZE},
    }
    return write(results["suite"], results, out)


def codec_bytes(runtime: SplitRuntime, url: str, ids: torch.Tensor) -> dict:
    """Bytes per decode token each way for every codec, measured on real frames."""
    out = {}
    for codec in (Codec.FP32, Codec.BF16, Codec.FP16, Codec.INT8):
        body = connect_body(BodyConfig(url, codec=codec), runtime.manifest)
        split_run(runtime, body, ids, 3)()
        sent, received = body.stats.per_step[1]
        body.close()
        out[codec.name.lower()] = {"to_cloud": sent, "from_cloud": received, "header": HEADER_SIZE,
                                   "payload": sent - HEADER_SIZE, "lossy": codec.lossy}
    return out


def wan(runtime: SplitRuntime, port: int, ids: torch.Tensor, new_tokens: int, quick: bool) -> list[dict]:
    """Decode rate through a delay proxy: added RTT 0/10/50/100 ms, and 50 ms with a 10 Mbit/s cap."""
    settings = [(0, None), (10, None), (50, None), (100, None), (50, 10.0)]
    if quick:
        settings = [(0, None), (50, None), (50, 10.0)]
    rows = []
    for rtt, mbit in track(settings, description="emulated WAN", console=console):
        with DelayProxy(port, rtt, mbit) as proxy:
            body = connect_body(BodyConfig(f"ws://127.0.0.1:{proxy.port}", codec=Codec.BF16), runtime.manifest)
            run = split_run(runtime, body, ids, new_tokens)()
            body.close()
        rows.append({"rtt_ms": rtt, "mbit_s": mbit, "decode_tok_s": run.decode_tok_s, "prefill_s": run.prefill_s})
    return rows


def concurrency(runtime: SplitRuntime, url: str, ids: torch.Tensor, new_tokens: int, counts: list[int]) -> list[dict]:
    rows = []
    for n in track(counts, description="concurrency", console=console):
        runtimes = [runtime] * n  # generate() gives each call its own caches
        bodies = [connect_body(BodyConfig(url, codec=Codec.BF16), runtime.manifest) for _ in range(n)]
        rows.append(concurrent_run(runtimes, bodies, ids, new_tokens))
        for body in bodies:
            body.close()
    return rows
