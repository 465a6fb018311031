"""Speculative decoding over an emulated WAN: plain split decode against prompt lookup and the trained
draft head (issue 24), in one run, on two prompt sets: the draft head's held-out chat set (never
trained on: src/lambdasplit/device/draft_data/heldout_chat.json) and benchmarks/prompts/reuse.json
(the answer copies from the prompt).

    .venv/bin/python -m benchmarks speculative [--quick]
    .venv/bin/python -m benchmarks speculative --draft-lengths 3,8 [--prompts 12] [--new-tokens 64]

Through `benchmarks/netem.py`'s delay proxy at each added RTT, every prompt runs greedily through
the product's one generation path (`generate_ids`: transformers' `generate()` over
`SplitModelForCausalLM`) in every mode, the modes in a rotating order; all must give the same
tokens. Answers end at EOS or `new_tokens`. Reported per mode: tokens/s (median over prompts,
prefill included; each prompt's too), tokens per body round trip (counted: the prefill's trip included), and for the
draft head the share of drafted tokens accepted, drafted tokens per round that drafted and the device's
milliseconds per drafted token. Results to benchmarks/results/speculative-cpu.json (`--quick`:
benchmarks/results/local/speculative-cpu-quick.json, which git ignores; `--out DIR` chooses).

`--draft-lengths` compares the draft head's longest chain instead (docs/benchmarks.md's
`draft-tree-cpu` model: up to 3 drafts pays better than up to 8 at 50 and 100 ms): plain and the draft
head at each cap (the 10% confidence stop applies to all), held-out chat only, at 50 and 100 ms;
results to benchmarks/results/speculative-draft-lengths-cpu.json.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import environment, write
from benchmarks.netem import DelayProxy
from lambdasplit import defaults
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
CHAT = "chat (held out)"
LENGTHS_RTTS = (50, 100)
LENGTHS_SUITE = "speculative-draft-lengths-cpu"
WARM_UP_TOKENS = 4


@dataclass(frozen=True)
class Mode:
    """One way to decode: its name in the results, `--speculate` and the longest draft."""

    name: str
    speculate: str | None = None
    draft_tokens: int = defaults.DRAFT_TOKENS

    @property
    def drafts_with_head(self) -> bool:
        return self.speculate is not None and self.speculate.startswith("draft-head")


def head_mode(cap: int) -> Mode:
    return Mode(f"draft head, up to {cap}", "draft-head", cap)


def _run(runtime: SplitRuntime, body: BodyClient, ids: torch.Tensor, new_tokens: int, mode: Mode) -> GenerationResult:
    params = SamplingParams(max_new_tokens=new_tokens, speculate=mode.speculate, draft_tokens=mode.draft_tokens)
    return runtime.generate_ids(body, ids, None, params)


def chat_prompts(count: int) -> list[str]:
    return json.loads((DRAFT_PROMPTS / "heldout_chat.json").read_text())[:count]


def _sets(quick: bool) -> dict[str, list[str]]:
    reuse = json.loads((PROMPTS / "reuse.json").read_text())
    return {CHAT: chat_prompts(4 if quick else 8), "reuse": reuse[:2] if quick else reuse}


def run(quick: bool = False, out: Path | None = None) -> Path:
    """Plain vs prompt lookup vs the draft head (drafts of at most 6), both sets, 0/50/100 ms."""
    rtts = (0, 50) if quick else (0, 50, 100)
    new_tokens, draft = (32, 6) if quick else (48, 6)
    modes = (Mode("plain"), Mode("prompt-lookup", "prompt-lookup", draft), Mode("draft-head", "draft-head", draft))
    sets = _sets(quick)
    payload: dict = {"suite": "speculative-cpu" + ("-quick" if quick else ""), "environment": environment(), "split": [2, 2],
                     "codec": "bf16", "new_tokens": new_tokens, "draft_tokens": draft,
                     "prompts": {name: len(p) for name, p in sets.items()}}
    local = AutoModelForCausalLM.from_pretrained(str(resolve_source(None).path), dtype=torch.float32).eval()
    payload["rows"] = compare(sets, modes, rtts, new_tokens, local)
    return write(payload["suite"], payload, out)


def run_draft_lengths(caps: Sequence[int], prompts: int, new_tokens: int, rtts: Sequence[int] = LENGTHS_RTTS,
                      out: Path | None = None) -> Path:
    """Plain vs the draft head at each longest chain in `caps`, on the first `prompts` held-out chat prompts."""
    modes = (Mode("plain"), *(head_mode(cap) for cap in caps))
    sets = {CHAT: chat_prompts(prompts)}
    payload: dict = {"suite": LENGTHS_SUITE, "environment": environment(), "split": [2, 2], "codec": "bf16",
                     "new_tokens": new_tokens, "draft_lengths": list(caps), "confidence": defaults.DRAFT_CONFIDENCE,
                     "prompts": {name: len(p) for name, p in sets.items()}}
    began = time.monotonic()
    payload["rows"] = compare(sets, modes, rtts, new_tokens)
    payload["seconds"] = round(time.monotonic() - began, 1)
    return write(LENGTHS_SUITE, payload, out)


def compare(sets: dict[str, list[str]], modes: Sequence[Mode], rtts: Sequence[int], new_tokens: int,
            local: torch.nn.Module | None = None) -> list[dict]:
    """One row per RTT and set, over a `lambdasplit serve` child behind the delay proxy; `local`
    (the unsplit model) is timed at 0 ms as well. Each mode runs once first, unmeasured."""
    runtime = SplitRuntime.load(None, (2, 2))
    rows = []
    with ServerProcess("--split", "2,2") as server:
        port = int(server.url.rsplit(":", 1)[1])
        for rtt in rtts:
            with DelayProxy(port, rtt) as proxy:
                body = connect_body(BodyConfig(f"ws://127.0.0.1:{proxy.port}", codec=Codec.BF16), runtime.manifest)
                warm = runtime.encode_chat([{"role": "user", "content": next(iter(sets.values()))[0]}])
                for mode in modes:
                    _run(runtime, body, warm, WARM_UP_TOKENS, mode)
                for name, prompts in sets.items():
                    rows.append(_measure(runtime, body, local if rtt == 0 else None, prompts, new_tokens, modes, rtt, name))
                body.close()
    return rows


def _measure(runtime: SplitRuntime, body: BodyClient, local: torch.nn.Module | None, prompts: list[str], new_tokens: int,
             modes: Sequence[Mode], rtt: int, name: str) -> dict:
    """One row: every prompt in every mode (interleaved, each prompt starting at the next mode, so
    load changes hit all modes alike)."""
    samples: dict[str, dict[str, list[float]]] = {m.name: {"tok_s": [], "trips": [], "tokens": []} for m in modes}
    drafting = {m.name: {"drafted": 0, "accepted": 0, "rounds": 0, "ms": []} for m in modes if m.drafts_with_head}
    identical = True
    plain = modes[0].name
    for i, prompt in enumerate(prompts):
        ids = runtime.encode_chat([{"role": "user", "content": prompt}])
        order = [*modes[i % len(modes):], *modes[:i % len(modes)]]
        results = {m.name: _run(runtime, body, ids, new_tokens, m) for m in order}
        identical &= all(r.token_ids == results[plain].token_ids for r in results.values())
        for mode, r in results.items():
            samples[mode]["tok_s"].append(len(r.token_ids[0]) / r.timings.total)
            samples[mode]["trips"].append(r.round_trips)
            samples[mode]["tokens"].append(len(r.token_ids[0]))
        for mode, counts in drafting.items():
            stats = results[mode].drafting or {}
            for key in ("drafted", "accepted", "rounds"):
                counts[key] += int(stats.get(key, 0))
            if stats.get("drafted"):
                counts["ms"].append(stats["ms_per_drafted_token"])
        if local is not None:
            start = time.perf_counter()
            with torch.no_grad():
                out = local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
            samples.setdefault("unsplit local", {"tok_s": []})["tok_s"].append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
    row: dict = {"rtt_ms": rtt, "set": name, "identical": identical, "modes": {}}
    for mode, s in samples.items():
        row["modes"][mode] = {"tok_s": statistics.median(s["tok_s"]), "tok_s_per_prompt": [round(x, 3) for x in s["tok_s"]]}
        if "trips" in s:  # counted over the whole set, not a median of ratios
            row["modes"][mode].update(tokens_per_trip=sum(s["tokens"]) / sum(s["trips"]), tokens=sum(s["tokens"]),
                                      round_trips=sum(s["trips"]))
    for mode, c in drafting.items():
        row["modes"][mode].update(draft_tokens=next(m.draft_tokens for m in modes if m.name == mode),
                                  acceptance=c["accepted"] / c["drafted"] if c["drafted"] else 0.0,
                                  drafted=c["drafted"], drafted_per_round=c["drafted"] / c["rounds"] if c["rounds"] else 0.0,
                                  ms_per_drafted_token=statistics.median(c["ms"]) if c["ms"] else 0.0)
    base = row["modes"][plain]["tok_s"]
    shown = [f"{mode} {m['tok_s']:.1f} tok/s ({m['tok_s'] / base:.2f}x, {m.get('tokens_per_trip', 0):.2f} tokens/trip)"
             for mode, m in row["modes"].items()]
    print(f"RTT {rtt} ms, {name}: {', '.join(shown)}, identical {identical}", flush=True)
    return row


if __name__ == "__main__":  # `python -m benchmarks.speculative ARGS` is `python -m benchmarks speculative ARGS`
    import sys

    from benchmarks.__main__ import app

    app(["speculative", *sys.argv[1:]], prog_name="python -m benchmarks")
