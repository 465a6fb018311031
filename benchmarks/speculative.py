"""Speculative decoding over an emulated WAN: plain split decode against prompt lookup and the trained
draft head (issue 24), in one run, on two prompt sets: the draft head's held-out chat set (never
trained on: src/lambdasplit/device/draft_data/heldout_chat.json) and benchmarks/prompts/reuse.json
(the answer copies from the prompt).

    .venv/bin/python -m benchmarks.speculative [--quick]

Through `benchmarks/netem.py`'s delay proxy at each added RTT, every prompt runs greedily through
the product's one generation path (`generate_ids`: transformers' `generate()` over
`SplitModelForCausalLM`) plain, with `--speculate prompt-lookup` and with `--speculate draft-head`;
all must give the same tokens. Answers end at EOS or `new_tokens`. Reported per mode: tokens/s
(median over prompts, prefill included), tokens per body round trip (counted: the prefill's trip
included), and for the draft head the share of drafted tokens accepted and the device's
milliseconds per drafted token. Results to benchmarks/results/speculative-cpu[-quick].json.
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
from lambdasplit.device.draft import PROMPTS as DRAFT_PROMPTS
from lambdasplit.device.generation import GenerationResult
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.split.sources import resolve_source
from lambdasplit.wire.codec import Codec

PROMPTS = Path(__file__).parent / "prompts"
MODES = (None, "prompt-lookup", "draft-head")


def _name(mode: str | None) -> str:
    return mode or "plain"


def _run(runtime: SplitRuntime, body: BodyClient, ids: torch.Tensor, new_tokens: int, mode: str | None, draft: int) -> GenerationResult:
    return runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=new_tokens, speculate=mode, draft_tokens=draft))


def _sets(quick: bool) -> dict[str, list[str]]:
    chat = json.loads((DRAFT_PROMPTS / "heldout_chat.json").read_text())
    reuse = json.loads((PROMPTS / "reuse.json").read_text())
    return {"chat (held out)": chat[:4] if quick else chat[:8], "reuse": reuse[:2] if quick else reuse}


def run(quick: bool = False) -> dict:
    rtts = (0, 50) if quick else (0, 50, 100)
    new_tokens, draft = (32, 6) if quick else (48, 6)
    runtime = SplitRuntime.load(None, (2, 2))
    sets = _sets(quick)
    payload: dict = {"suite": "speculative-cpu" + ("-quick" if quick else ""), "environment": environment(), "split": [2, 2],
                     "codec": "bf16", "new_tokens": new_tokens, "draft_tokens": draft,
                     "prompts": {name: len(p) for name, p in sets.items()}, "rows": []}
    local = AutoModelForCausalLM.from_pretrained(str(resolve_source(None).path), dtype=torch.float32).eval()
    with ServerProcess("--split", "2,2") as server:
        port = int(server.url.rsplit(":", 1)[1])
        for rtt in rtts:
            with DelayProxy(port, rtt) as proxy:
                body = connect_body(BodyConfig(f"ws://127.0.0.1:{proxy.port}", codec=Codec.BF16), runtime.manifest)
                for name, prompts in sets.items():
                    payload["rows"].append(_measure(runtime, body, local if rtt == 0 else None, prompts, new_tokens, draft, rtt, name))
                body.close()
    write(payload["suite"], payload)
    return payload


def _measure(runtime: SplitRuntime, body: BodyClient, local: torch.nn.Module | None, prompts: list[str], new_tokens: int,
             draft: int, rtt: int, name: str) -> dict:
    """One row: every prompt in every mode (interleaved, so load changes hit all modes alike)."""
    samples: dict[str, dict[str, list[float]]] = {_name(m): {"tok_s": [], "trips": [], "tokens": []} for m in MODES}
    drafted = accepted = 0
    draft_ms: list[float] = []
    identical = True
    for prompt in prompts:
        ids = runtime.encode_chat([{"role": "user", "content": prompt}])
        results = {_name(m): _run(runtime, body, ids, new_tokens, m, draft) for m in MODES}
        identical &= all(r.token_ids == results["plain"].token_ids for r in results.values())
        for mode, r in results.items():
            samples[mode]["tok_s"].append(len(r.token_ids[0]) / r.timings.total)
            samples[mode]["trips"].append(r.round_trips)
            samples[mode]["tokens"].append(len(r.token_ids[0]))
        head = results["draft-head"].drafting or {}
        drafted += int(head.get("drafted", 0))
        accepted += int(head.get("accepted", 0))
        if head.get("drafted"):
            draft_ms.append(head["ms_per_drafted_token"])
        if local is not None:
            start = time.perf_counter()
            with torch.no_grad():
                out = local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
            samples.setdefault("unsplit local", {"tok_s": []})["tok_s"].append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
    row: dict = {"rtt_ms": rtt, "set": name, "identical": identical, "modes": {}}
    for mode, s in samples.items():
        row["modes"][mode] = {"tok_s": statistics.median(s["tok_s"])}
        if "trips" in s:  # counted over the whole set, not a median of ratios
            row["modes"][mode]["tokens_per_trip"] = sum(s["tokens"]) / sum(s["trips"])
    row["modes"]["draft-head"].update(acceptance=accepted / drafted if drafted else 0.0,
                                      ms_per_drafted_token=statistics.median(draft_ms) if draft_ms else 0.0)
    plain = row["modes"]["plain"]["tok_s"]
    shown = [f"{mode} {m['tok_s']:.1f} tok/s ({m['tok_s'] / plain:.2f}x, {m.get('tokens_per_trip', 0):.2f} tokens/trip)"
             for mode, m in row["modes"].items()]
    print(f"RTT {rtt} ms, {name}: {', '.join(shown)}, identical {identical}", flush=True)
    return row


if __name__ == "__main__":
    run("--quick" in sys.argv[1:])
