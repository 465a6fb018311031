"""Speculative decoding over an emulated WAN: plain split decode against prompt lookup, and unsplit
local generate(), on two prompt sets kept in benchmarks/prompts (reuse: the answer copies from
the prompt; chat: it does not).

    .venv/bin/python -m benchmarks.speculative [--quick]

Through `benchmarks/netem.py`'s delay proxy at each added RTT, every prompt runs greedily through
the product's one generation path (`generate_ids`: transformers' `generate()` over
`SplitModelForCausalLM`) plain and with `--speculate prompt-lookup` (adaptive draft length); both
must give the same tokens. Self-drafting is measured separately (`benchmarks self-draft`). Reported per mode: decode tok/s
(median over prompts), body round trips per generated token, and for prompt lookup the accepted
tokens per round trip. Results to benchmarks/results/speculative-cpu.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import environment, write
from benchmarks.netem import DelayProxy
from lambdasplit.cloud.process import ServerProcess
from lambdasplit.device.body import BodyClient
from lambdasplit.device.connect import BodyConfig, connect_body
from lambdasplit.device.generation import GenerationOptions
from lambdasplit.device.runtime import SplitDevice
from lambdasplit.split.sources import resolve_source
from lambdasplit.wire.codec import Codec

PROMPTS = Path(__file__).parent / "prompts"


def _run(device: SplitDevice, body: BodyClient, ids: torch.Tensor, new_tokens: int, lookup: int) -> tuple[list[int], float, int]:
    """(new token ids, seconds, body round trips) of one greedy generation."""
    options = GenerationOptions(max_new_tokens=new_tokens, ignore_eos=True,
                                speculate="prompt-lookup" if lookup else None, draft_tokens=lookup or 8)
    result = device.generate_ids(body, ids, None, options)
    return result.token_ids[0], result.timings.total, result.round_trips


def run(quick: bool = False) -> dict:
    rtts = (0, 50) if quick else (0, 10, 50, 100)
    new_tokens, lookup = (24, 6) if quick else (48, 8)
    device = SplitDevice.load(None, (2, 2))
    sets = {name: json.loads((PROMPTS / f"{name}.json").read_text()) for name in ("reuse", "chat")}
    payload: dict = {"suite": "speculative-cpu", "environment": environment(), "split": [2, 2], "codec": "bf16",
                     "new_tokens": new_tokens, "prompt_lookup_num_tokens": lookup, "draft_length": "adaptive (AdaptivePromptLookup)", "rows": []}
    local = AutoModelForCausalLM.from_pretrained(str(resolve_source(None).path), dtype=torch.float32).eval()
    with ServerProcess("--split", "2,2") as server:
        port = int(server.url.rsplit(":", 1)[1])
        for rtt in rtts:
            with DelayProxy(port, rtt) as proxy:
                body = connect_body(BodyConfig(f"ws://127.0.0.1:{proxy.port}", codec=Codec.BF16), device.manifest)
                for name, prompts in sets.items():
                    row: dict = {"rtt_ms": rtt, "set": name, "plain_tok_s": [], "lookup_tok_s": [], "plain_trips_per_token": [],
                                 "lookup_trips_per_token": [], "identical": True}
                    for prompt in prompts:
                        ids = device.encode_chat([{"role": "user", "content": prompt}])
                        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                        plain, t_plain, trips_plain = _run(device, body, ids, new_tokens, 0)
                        fast, t_fast, trips_fast = _run(device, body, ids, new_tokens, lookup)
                        row["identical"] &= plain == fast
                        row["plain_tok_s"].append(new_tokens / t_plain)
                        row["lookup_tok_s"].append(new_tokens / t_fast)
                        row["plain_trips_per_token"].append(trips_plain / new_tokens)
                        row["lookup_trips_per_token"].append(trips_fast / new_tokens)
                        if rtt == 0:
                            start = time.perf_counter()
                            with torch.no_grad():
                                local.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                            row.setdefault("unsplit_local_tok_s", []).append(new_tokens / (time.perf_counter() - start))
                    summary = {k: statistics.median(v) if isinstance(v, list) else v for k, v in row.items()}
                    summary["speedup"] = summary["lookup_tok_s"] / summary["plain_tok_s"]
                    summary["lookup_tokens_per_trip"] = 1 / summary["lookup_trips_per_token"]
                    payload["rows"].append(summary)
                    print(f"RTT {rtt} ms, {name}: plain {summary['plain_tok_s']:.1f} tok/s, prompt lookup "
                          f"{summary['lookup_tok_s']:.1f} ({summary['speedup']:.2f}x, {summary['lookup_tokens_per_trip']:.2f} "
                          f"tokens per round trip), identical {summary['identical']}", flush=True)
                body.close()
    write("speculative-cpu", payload)
    return payload


if __name__ == "__main__":
    run("--quick" in sys.argv[1:])
