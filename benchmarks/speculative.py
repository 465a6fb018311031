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

`--body-device cuda` serves the body on a GPU (`serve --device cuda`; the device's parts on the CPU,
or with `--parts-device cuda` on the GPU too, as a laptop with a GPU would run them) and compares
plain, prompt lookup and a draft head (`--head DIR`, default the shipped one; `--draft-lengths 6,8`
adds the head at those longest chains) on the first `--prompts` held-out chat prompts; each prompt
runs at every RTT in turn, so a time budget (`--max-minutes`, loading counted) cuts every RTT's row
alike. Results to speculative-body-cuda.json (-parts-cuda.json with the parts on the GPU;
scripts/train_draft_gpu.sh's STAGE=speculative runs it on a GPU machine):

    python3 -m benchmarks speculative --body-device cuda --model SRC --head DIR --prompts 8 --new-tokens 64 \
        --rtts 50,100 --max-minutes 3.5 --out DIR
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack
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
BODY_START_SECONDS = 300.0  # a GPU body loads, checks its decode kernel and warms up before it listens


@dataclass(frozen=True)
class Mode:
    """One way to decode: its name in the results, `--speculate` and the longest draft."""

    name: str
    speculate: str | None = None
    draft_tokens: int = defaults.DRAFT_TOKENS

    @property
    def drafts_with_head(self) -> bool:
        return self.speculate is not None and self.speculate.startswith(("draft-head", "draft-tree"))


def head_mode(cap: int) -> Mode:
    return Mode(f"draft head, up to {cap}", "draft-head", cap)


def tree_mode(nodes: int, head: str | None = None) -> Mode:
    """The draft head's static tree of `nodes` drafted tokens, verified in one round trip."""
    return Mode(f"draft tree, {nodes}", f"draft-tree:{head}" if head else "draft-tree", nodes)


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
                      out: Path | None = None, trees: Sequence[int] = ()) -> Path:
    """Plain vs the draft head at each longest chain in `caps` and each tree size in `trees`, on
    the first `prompts` held-out chat prompts."""
    modes = (Mode("plain"), *(head_mode(cap) for cap in caps), *(tree_mode(n) for n in trees))
    sets = {CHAT: chat_prompts(prompts)}
    payload: dict = {"suite": LENGTHS_SUITE, "environment": environment(), "split": [2, 2], "codec": "bf16",
                     "new_tokens": new_tokens, "draft_lengths": list(caps), "trees": list(trees), "confidence": defaults.DRAFT_CONFIDENCE,
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
        for rtt in rtts:
            with DelayProxy(server.port, rtt) as proxy:
                body = connect_body(BodyConfig(f"ws://127.0.0.1:{proxy.port}", codec=Codec.BF16), runtime.manifest)
                _warm_up(runtime, body, next(iter(sets.values()))[0], modes)
                for name, prompts in sets.items():
                    rows.append(_measure(runtime, body, local if rtt == 0 else None, prompts, new_tokens, modes, rtt, name))
                body.close()
    return rows


def served_suite(body_device: str, parts_device: str = "cpu") -> str:
    """speculative-body-BODY, and -parts-PARTS where the device's parts are not on the CPU."""
    parts = parts_device.split(":")[0]
    return f"speculative-body-{body_device.split(':')[0]}" + ("" if parts == "cpu" else f"-parts-{parts}")


def run_served_body(source: str | None, head: str | None, body_device: str, prompts: int, new_tokens: int,
                    rtts: Sequence[int], draft_tokens: int = defaults.DRAFT_TOKENS, max_minutes: float | None = None,
                    out: Path | None = None, parts_device: str = "cpu", caps: Sequence[int] = (), trees: Sequence[int] = ()) -> Path:
    """Plain vs prompt lookup vs the draft head in `head` (None: the shipped one) with the body served on
    `body_device` and the device's parts (float32) on `parts_device`: the first `prompts` held-out chat
    prompts, each at every RTT in turn, until they or `max_minutes` (loading counted) run out; at least
    one runs. `caps`: the draft head again at each of these longest chains (a GPU drafts a token for far
    less than a round trip, so longer chains may pay there where they do not on a CPU). `trees`: the
    head's static tree of each of these sizes, verified in one round trip."""
    began = time.monotonic()
    deadline = began + 60 * max_minutes if max_minutes else math.inf
    speculate = f"draft-head:{head}" if head else "draft-head"
    modes = (Mode("plain"), Mode("prompt-lookup", "prompt-lookup", draft_tokens), Mode("draft-head", speculate, draft_tokens),
             *(Mode(head_mode(cap).name, speculate, cap) for cap in caps if cap != draft_tokens), *(tree_mode(n, head) for n in trees))
    chat = chat_prompts(prompts)
    suite = served_suite(body_device, parts_device)
    payload: dict = {"suite": suite, "environment": environment(body_device), "split": [2, 2], "codec": "bf16",
                     "body_device": body_device, "device_parts": parts_device, "model": source or "embedded SmolLM2-135M-Instruct",
                     "head": head or "shipped", "new_tokens": new_tokens, "draft_tokens": draft_tokens,
                     "confidence": defaults.DRAFT_CONFIDENCE, "max_minutes": max_minutes,
                     "draft_lengths": sorted({draft_tokens, *caps}), "trees": list(trees)}
    runtime = SplitRuntime.load(source, (2, 2), device=parts_device)
    serve = ["--split", "2,2", "--device", body_device, *(["--model", source] if source else [])]
    tallies = {rtt: _Tally(modes, rtt, CHAT) for rtt in rtts}
    ran, slowest = 0, 0.0
    # A body that fell back (graph capture failed, the paged kernel refused) says so only in its log.
    warnings: list[str] = []

    def keep(line: str) -> None:  # every line, from the first: the child keeps only its last 200
        if line.startswith(("WARNING", "ERROR", "CRITICAL")):
            warnings.append(line.strip())

    with ServerProcess(*serve, timeout=BODY_START_SECONDS, on_line=keep) as server, ExitStack() as stack:
        bodies = {}
        for rtt in rtts:
            proxy = stack.enter_context(DelayProxy(server.port, rtt))
            bodies[rtt] = connect_body(BodyConfig(f"ws://127.0.0.1:{proxy.port}", codec=Codec.BF16), runtime.manifest)
            stack.callback(bodies[rtt].close)
            _warm_up(runtime, bodies[rtt], chat[0], modes)
        for i, prompt in enumerate(chat):
            start = time.monotonic()
            if ran and start + slowest > deadline:  # the next prompt would likely end past the budget
                break
            ids = runtime.encode_chat([{"role": "user", "content": prompt}])
            for rtt, tally in tallies.items():
                tally.add(_prompt(runtime, bodies[rtt], ids, new_tokens, modes, i))
            ran, slowest = ran + 1, max(slowest, time.monotonic() - start)
    payload.update(prompts={CHAT: ran}, of=len(chat), seconds=round(time.monotonic() - began, 1),
                   server_warnings=warnings, rows=[tally.row() for tally in tallies.values()])
    return write(suite, payload, out)


def _warm_up(runtime: SplitRuntime, body: BodyClient, prompt: str, modes: Sequence[Mode]) -> None:
    """Each mode once, unmeasured: the first generation of each pays for loading and compiling."""
    ids = runtime.encode_chat([{"role": "user", "content": prompt}])
    for mode in modes:
        _run(runtime, body, ids, WARM_UP_TOKENS, mode)


def _prompt(runtime: SplitRuntime, body: BodyClient, ids: torch.Tensor, new_tokens: int, modes: Sequence[Mode],
            index: int) -> dict[str, GenerationResult]:
    """One prompt in every mode, the `index`-th prompt starting at the next mode, so load changes hit
    all modes alike."""
    order = [*modes[index % len(modes):], *modes[:index % len(modes)]]
    return {m.name: _run(runtime, body, ids, new_tokens, m) for m in order}


def _measure(runtime: SplitRuntime, body: BodyClient, local: torch.nn.Module | None, prompts: list[str], new_tokens: int,
             modes: Sequence[Mode], rtt: int, name: str) -> dict:
    """One row: every prompt in every mode; `local` (the unsplit model) timed on each prompt too."""
    tally = _Tally(modes, rtt, name)
    for i, prompt in enumerate(prompts):
        ids = runtime.encode_chat([{"role": "user", "content": prompt}])
        tally.add(_prompt(runtime, body, ids, new_tokens, modes, i))
        if local is not None:
            start = time.perf_counter()
            with torch.no_grad():
                out = local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
            tally.samples.setdefault("unsplit local", {"tok_s": []})["tok_s"].append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
    return tally.row()


# Where a generation's wall time goes, per body round trip: the device's parts, the wait for the body
# (the emulated RTT included), the draft head, and the rest (transformers' generate loop, sampling).
STAGES = ("head", "body and network", "tail", "drafting", "the rest")


class _Tally:
    """One row's numbers as its prompts come in: per mode tok/s, tokens and round trips, and what the
    draft head drafted; whether every mode gave plain decoding's tokens (and where one did not: the
    prompt's number in the set, the mode and the first position that differs)."""

    def __init__(self, modes: Sequence[Mode], rtt: int, name: str) -> None:
        self.modes, self.rtt, self.name = modes, rtt, name
        self.samples: dict[str, dict[str, list[float]]] = {m.name: {"tok_s": [], "trips": [], "tokens": []} for m in modes}
        self.stages = {m.name: dict.fromkeys(STAGES, 0.0) for m in modes}  # seconds over the set
        self.drafting = {m.name: {"drafted": 0, "accepted": 0, "rounds": 0, "ms": []} for m in modes if m.drafts_with_head}
        self.differing: list[dict] = []

    @property
    def identical(self) -> bool:
        return not self.differing

    def add(self, results: dict[str, GenerationResult]) -> None:
        plain = results[self.modes[0].name].token_ids[0]
        prompt = len(self.samples[self.modes[0].name]["tokens"])
        for mode, r in results.items():
            if (ids := r.token_ids[0]) != plain:
                first = next((i for i, (a, b) in enumerate(zip(ids, plain, strict=False)) if a != b), min(len(ids), len(plain)))
                self.differing.append({"prompt": prompt, "mode": mode, "first_position": first})
        for mode, r in results.items():
            self.samples[mode]["tok_s"].append(len(r.token_ids[0]) / r.timings.total)
            self.samples[mode]["trips"].append(r.round_trips)
            self.samples[mode]["tokens"].append(len(r.token_ids[0]))
            t, stages = r.timings, self.stages[mode]
            drafting = (r.drafting or {}).get("seconds", 0.0)  # rounds that proposed nothing included
            stages["head"] += t.head
            stages["body and network"] += t.body
            stages["tail"] += t.tail
            stages["drafting"] += drafting
            stages["the rest"] += t.total - t.head - t.body - t.tail - drafting
        for mode, counts in self.drafting.items():
            stats = results[mode].drafting or {}
            for key in ("drafted", "accepted", "rounds"):
                counts[key] += int(stats.get(key, 0))
            if stats.get("drafted"):
                counts["ms"].append(stats["ms_per_drafted_token"])

    def row(self) -> dict:
        """The row (and its console line): tok/s as a median over prompts, round trips counted over the set."""
        row: dict = {"rtt_ms": self.rtt, "set": self.name, "identical": self.identical, "differing": self.differing, "modes": {}}
        for mode, s in self.samples.items():
            row["modes"][mode] = {"tok_s": statistics.median(s["tok_s"]), "tok_s_per_prompt": [round(x, 3) for x in s["tok_s"]]}
            if "trips" in s:  # counted over the whole set, not a median of ratios
                row["modes"][mode].update(tokens_per_trip=sum(s["tokens"]) / sum(s["trips"]), tokens=sum(s["tokens"]),
                                          round_trips=sum(s["trips"]))
                row["modes"][mode]["ms_per_trip"] = {k: round(1000 * v / sum(s["trips"]), 2) for k, v in self.stages[mode].items()}
        for mode, c in self.drafting.items():
            row["modes"][mode].update(draft_tokens=next(m.draft_tokens for m in self.modes if m.name == mode),
                                      acceptance=c["accepted"] / c["drafted"] if c["drafted"] else 0.0,
                                      drafted=c["drafted"], drafted_per_round=c["drafted"] / c["rounds"] if c["rounds"] else 0.0,
                                      ms_per_drafted_token=statistics.median(c["ms"]) if c["ms"] else 0.0)
        base = row["modes"][self.modes[0].name]["tok_s"]
        shown = [f"{mode} {m['tok_s']:.1f} tok/s ({m['tok_s'] / base:.2f}x, {m.get('tokens_per_trip', 0):.2f} tokens/trip)"
                 for mode, m in row["modes"].items()]
        print(f"RTT {self.rtt} ms, {self.name}: {', '.join(shown)}, identical {self.identical}", flush=True)
        return row


if __name__ == "__main__":  # `python -m benchmarks.speculative ARGS` is `python -m benchmarks speculative ARGS`
    import sys

    from benchmarks.__main__ import app

    app(["speculative", *sys.argv[1:]], prog_name="python -m benchmarks")
