"""Chain or tree of drafts (issue 24): does a small tree pay over a network? Offline, on this CPU.

    python -m benchmarks draft-tree [--prompts 40] [--new-tokens 128] [--calibration 16] [--out DIR]

The shipped draft head drafts for the embedded SmolLM2-135M-Instruct, which is also the verifier
(float32, greedy). Tokens per round trip are counted, not timed: the model's greedy answers to the
held-out chat prompts are the reference, and at each round the accepted length is the longest root
path of the drafted tree whose tokens equal the reference continuation (what a body verifying the
tree with a tree attention mask would accept, greedily), plus the bonus token. No tree verification
runs here: the product verifies trees over the wire with `--speculate draft-tree` (device/tree.py, which
holds the shapes and the drafter used here), and `python -m benchmarks speculative` times it.

Shapes (`Shape`: each node named by its path of ranks in the head's top-k at each depth, EAGLE-1's
static trees):
- the product's chain (`--speculate draft-head`: up to `defaults.DRAFT_TOKENS` tokens, stopping below
  `defaults.DRAFT_CONFIDENCE`; the committed draft-tree-cpu.json replayed 8 and 10%),
  replayed through its own candidate generator;
- static chains of N tokens (no confidence stop);
- `wide-N`: the head's top N tokens at depth 1 only;
- `tree-N`: the N nodes of highest estimated acceptance, from how often the reference token had
  each rank at each depth on the head's *validation* answers (prompts set aside in training, never
  trained on, not the held-out set), assuming depths independent (Sequoia-style);
- `tree-N-depth-D`: the same, at most `defaults.DRAFT_TREE_DEPTH` deep, as `--speculate draft-tree`
  drafts (each depth is one head pass a round).

A tree of N nodes is drafted with one head pass per depth (the nodes of a depth attend to the
confirmed pairs and their own ancestors only, through an additive mask), so device time per
drafted token falls with width. Per shape: tokens per round trip, positions per verification (N + 1:
the last confirmed token and the drafts), device milliseconds per drafted token and per round on this
CPU. The device's head + tail + LM head and the 26-layer body are timed here for P positions, for
docs/benchmarks.md's model of tokens/s over a network. Writes benchmarks/results/draft-tree-cpu.json.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from benchmarks.common import environment, write
from lambdasplit import defaults
from lambdasplit.device import draft_prompts
from lambdasplit.device.draft import SHIPPED, Drafter, DraftHead, read_meta
from lambdasplit.device.train_draft import Sample, TrainSettings, answer, replay_acceptance
from lambdasplit.device.tree import Shape, TreeDrafter, acceptance_table, accepted_length, best_tree, chain, reference_ranks, wide
from lambdasplit.split.parts import cache_kwarg
from lambdasplit.split.sources import resolve_source

log = logging.getLogger(__name__)

@dataclass
class Tally:
    """Counts of one shape's replay, added up over answers."""

    tokens: int = 0  # answer tokens
    trips: int = 0  # round trips, the prefill's included
    verifications: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0  # drafting on the device
    lengths: list[int] = field(default_factory=list)  # rounds per accepted length (chains: per drafted length)

    def add(self, other: Tally) -> None:
        for name in ("tokens", "trips", "verifications", "drafted", "accepted", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lengths = [a + b for a, b in zip_longest(self.lengths, other.lengths, fillvalue=0)]


def replay_sample(tree: TreeDrafter, s: Sample) -> Tally:
    """Greedy speculative decoding replayed over one of the model's answers with a static tree:
    each round drafts the tree from the confirmed tokens and accepts its longest root path that
    matches the answer, plus the bonus token."""
    head = tree.drafter.head
    cache = head.new_cache()
    out = Tally(tokens=len(s.ids) - s.answer, trips=1, lengths=[0] * (tree.shape.depth + 1))
    length, end, confirmed = s.answer + 1, len(s.ids), 0  # the prefill's trip gave token s.answer
    while length < end:
        known = length - 1  # pairs (f_i, x_(i+1)) for i < length - 1 are confirmed
        began = time.perf_counter()
        if cache.get_seq_length() > confirmed:
            cache.crop(confirmed - cache.get_seq_length())
        positions = torch.arange(confirmed, known)[None]
        drafted = tree.draft(cache, s.features[None, confirmed:known], s.ids[None, confirmed + 1:length], positions)
        out.seconds += time.perf_counter() - began
        confirmed = known
        hit = accepted_length(drafted, tree.parents, s.ids[length:end].tolist())
        out.lengths[hit] += 1
        out.accepted += hit
        out.drafted += len(drafted)
        out.verifications += 1
        out.trips += 1
        length += hit + 1
    return out


def product_sample(drafter: Drafter, s: Sample, draft_tokens: int) -> Tally:
    """The product's chain (`--speculate draft-head`) over one answer, through its own candidate generator."""
    r = replay_acceptance(drafter, [s], draft_tokens, defaults.DRAFT_CONFIDENCE)
    return Tally(r["answer_tokens"], r["round_trips"], r["round_trips"] - 1, r["drafted"], r["accepted"],
                 r["draft_seconds"], r["chain_lengths"])


def summary(name: str, tally: Tally, shape: Shape | None = None) -> dict[str, Any]:
    """A result row: tokens per round trip (prefill included, as the benchmarks count them) and per
    verification (accepted + 1), positions per verification, device drafting time."""
    v = max(tally.verifications, 1)
    row: dict[str, Any] = {"shape": name, "tokens_per_round_trip": tally.tokens / max(tally.trips, 1),
                           "tokens_per_verification": (tally.accepted + tally.verifications) / v,
                           "positions_per_verification": 1 + tally.drafted / v, "acceptance": tally.accepted / max(tally.drafted, 1),
                           "round_trips": tally.trips, "verifications": tally.verifications, "answer_tokens": tally.tokens,
                           "drafted": tally.drafted, "accepted": tally.accepted,
                           "draft_ms_per_round": 1000 * tally.seconds / v, "draft_ms_per_drafted_token": 1000 * tally.seconds / max(tally.drafted, 1)}
    if shape is None:
        row["drafted_lengths"] = tally.lengths
    else:
        row.update(nodes=len(shape.paths), depth=shape.depth, accepted_lengths=tally.lengths, paths=[list(p) for p in shape.paths])
    return row


def replay_tree(drafter: Drafter, samples: Sequence[Sample], shape: Shape) -> dict[str, Any]:
    tree, total = TreeDrafter(drafter, shape), Tally()
    for s in samples:
        total.add(replay_sample(tree, s))
    return summary(shape.name, total, shape)


class CalibrationError(ValueError):
    """More calibration prompts asked for than the head set aside."""


def validation_prompts(meta: dict[str, Any], count: int) -> list[str]:
    """The first `count` validation prompts of the head's training (set aside, never trained on),
    rebuilt from its recorded settings as train_draft.generate_data chose them."""
    settings = meta["training"]["settings"]
    if not str(meta["training"].get("prompt_file", "")).startswith("generated"):
        raise ValueError("the head was trained on a prompt file; its validation prompts cannot be rebuilt")
    prompts = draft_prompts.generate(settings["prompt_count"], settings["seed"])
    order = list(range(len(prompts)))
    random.Random(settings["seed"]).shuffle(order)
    held_back = round(settings["validation"] * len(prompts))
    if count > held_back:
        raise CalibrationError(f"{count}: the head set {held_back} validation prompts aside; choose at most {held_back}")
    return [prompts[i] for i in order[:count]]


@torch.inference_mode()
def verification_costs(model: PreTrainedModel, counts: Sequence[int], context: int, split: tuple[int, int],
                       reps: int = 7) -> dict[int, dict[str, float]]:
    """Milliseconds (median of `reps`, the counts interleaved) to run P positions after `context`
    cached ones, per part: the device's (embeddings, first K and last M layers, final norm, the full
    LM head on every position, as verification needs) and the body's (the layers between)."""
    layers = model.model.layers
    k, m = split
    device_parts = [model.model.embed_tokens, *layers[:k], *layers[len(layers) - m:], model.model.norm, model.lm_head]
    body_parts = list(layers[k:len(layers) - m])
    started: dict[int, float] = {}
    spent: dict[int, float] = {}

    def before(module: torch.nn.Module, *_: Any) -> None:
        started[id(module)] = time.perf_counter()

    def after(module: torch.nn.Module, *_: Any) -> None:
        spent[id(module)] = spent.get(id(module), 0.0) + time.perf_counter() - started[id(module)]

    hooks = [h for mod in device_parts + body_parts for h in (mod.register_forward_pre_hook(before), mod.register_forward_hook(after))]
    ids = torch.randint(100, 40000, (1, context + max(counts)), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    name = cache_kwarg(model)
    model(ids[:, :context], use_cache=True, **{name: cache})
    samples: dict[int, dict[str, list[float]]] = {p: {"device": [], "body": []} for p in counts}
    try:
        for rep in range(reps + 1):  # the first is a warm-up
            for p in counts:
                spent.clear()
                model(ids[:, context:context + p], use_cache=True, logits_to_keep=0, **{name: cache})
                cache.crop(-p)
                if rep:
                    samples[p]["device"].append(1000 * sum(spent[id(mod)] for mod in device_parts))
                    samples[p]["body"].append(1000 * sum(spent[id(mod)] for mod in body_parts))
    finally:
        for h in hooks:
            h.remove()
    return {p: {part: statistics.median(v) for part, v in parts.items()} for p, parts in samples.items()}


def _interpolate(costs: dict[int, float], p: float) -> float:
    """Cost at `p` positions, linear between the measured counts."""
    known = sorted(costs)
    if p <= known[0]:
        return costs[known[0]]
    for lo, hi in zip(known, known[1:], strict=False):
        if p <= hi:
            return costs[lo] + (costs[hi] - costs[lo]) * (p - lo) / (hi - lo)
    lo, hi = known[-2], known[-1]
    return costs[hi] + (costs[hi] - costs[lo]) * (p - hi) / (hi - lo)


def padded(costs: dict[int, float]) -> dict[int, float]:
    """Each measured count's cost, or a larger count's where that is cheaper: a verification can
    be padded to more positions (their outputs unused), and on this CPU a matmul over 2, 3 or 7 rows
    of the LM head costs more than one over 4 or 8 (kernel choice, not arithmetic)."""
    known = sorted(costs)
    return {p: min(costs[q] for q in known if q >= p) for p in known}


GPU_BODY_MS = 10.0  # the model's GPU body, for any P up to 33: draft-head-gpu-h100.json's plain step took 10.3 ms
RTTS = (50, 100)
PRODUCT_TOKENS = defaults.DRAFT_TOKENS  # the product's longest chain


def modelled(rows: Sequence[dict[str, Any]], costs: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Modelled decode tokens/s per shape, RTT and body, from the counted tokens per verification,
    the drafting time and the device and body costs of P positions measured here. A model, not a
    measurement: nothing crossed a network."""
    device = padded({p: c["device"] for p, c in costs.items()})
    cpu_body = padded({p: c["body"] for p, c in costs.items()})
    bodies = {"gpu": lambda p: GPU_BODY_MS, "cpu-linear": lambda p: p * cpu_body[1], "cpu-measured": lambda p: _interpolate(cpu_body, p)}

    def round_ms(row: dict[str, Any], rtt: int, body: str) -> float:
        """Expected time of one round: over the drafted lengths for the product's chain (P varies)."""
        if "drafted_lengths" in row:
            weights = row["drafted_lengths"]
            spent = sum(w * (rtt + bodies[body](1 + n) + _interpolate(device, 1 + n)) for n, w in enumerate(weights))
            return spent / max(sum(weights), 1) + row["draft_ms_per_round"]
        p = row["positions_per_verification"]
        return rtt + bodies[body](p) + _interpolate(device, p) + row["draft_ms_per_round"]

    table: dict[str, Any] = {}
    for body in bodies:
        for rtt in RTTS:
            plain = 1000 / (rtt + bodies[body](1) + device[1])
            key = f"{body}@{rtt}"
            table[key] = {"plain_tok_s": plain, "shapes": {}}
            for row in rows:
                tok_s = 1000 * row["tokens_per_verification"] / round_ms(row, rtt, body)
                table[key]["shapes"][row["shape"]] = {"tok_s": tok_s, "vs_plain": tok_s / plain}
    return {"formula": "tok/s = 1000 x tokens per verification / (RTT + body(P) + device(P) + draft ms per round); "
                       "plain: 1000 / (RTT + body(1) + device(1))",
            "bodies": {"gpu": f"body(P) = {GPU_BODY_MS} ms for any P (a GPU body is launch- and weight-bound at these P)",
                       "cpu-linear": "body(P) = P x body(1) measured here (every position costs a full step)",
                       "cpu-measured": "body(P) measured here for P positions in one pass (26 layers, this CPU)"},
            "device": "device(P): embeddings, 2 + 2 layers, final norm and the full LM head on P positions, measured "
                      "here; device(P) and the measured body(P) are the cheapest measured cost of at least P positions "
                      "(padding a verification)",
            "rows": table}


def run(prompts: int = 40, new_tokens: int = 128, calibration: int = 16, out: Path | None = None) -> Path:
    """Answers, calibration, every shape replayed answer by answer (the shapes interleaved, so load
    on this shared CPU hits them alike), then the P-position costs and the model."""
    began = time.monotonic()
    validation = validation_prompts(read_meta(SHIPPED), calibration)  # first: a --calibration too large stops the run at once
    path = resolve_source(None).path
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head, _ = DraftHead.load(SHIPPED, model.config)
    drafter = Drafter(head, model.get_input_embeddings(), model.get_output_embeddings(), model.config)
    settings = TrainSettings(max_new_tokens=new_tokens, gen_batch=8)
    heldout = answer(model, tokenizer, draft_prompts.heldout_prompts()[:prompts], settings, "answers (held-out chat)")
    calibrating = answer(model, tokenizer, validation, settings, "answers (validation)")
    answered = time.monotonic()
    counts = reference_ranks(drafter, calibrating, depth=10, top=8)
    accept = acceptance_table(counts)
    shapes = ([chain(n) for n in (1, 2, 3, 4, 6, 8)] + [wide(4)] + [best_tree(n, accept) for n in (4, 8, 16, 32)]
              + [best_tree(n, accept, defaults.DRAFT_TREE_DEPTH) for n in (16, 32, 48)])  # the product's depth cap
    trees = [TreeDrafter(drafter, shape) for shape in shapes]
    product, tallies = Tally(), [Tally() for _ in shapes]
    calibrated = time.monotonic()
    for s in heldout:
        product.add(product_sample(drafter, s, PRODUCT_TOKENS))
        for tree, tally in zip(trees, tallies, strict=True):
            tally.add(replay_sample(tree, s))
    rows = [summary(f"product chain (up to {PRODUCT_TOKENS}, stops below {defaults.DRAFT_CONFIDENCE:.0%} confidence)", product)]
    rows += [summary(shape.name, tally, shape) for shape, tally in zip(shapes, tallies, strict=True)]
    for row in rows:
        print(_line(row), flush=True)
    replayed = time.monotonic()
    needed = sorted({*range(1, 10), 12, 16, 17, 24, 32, 33} | {row["nodes"] + 1 for row in rows if "nodes" in row})
    costs = verification_costs(model, needed, context=160, split=(2, 2))
    payload = {
        "suite": "draft-tree-cpu", "environment": environment(), "verifier": "SmolLM2-135M-Instruct (embedded GGUF, float32)",
        "head": "src/lambdasplit/device/draft_data/smollm2-135m-instruct (shipped)", "split": [2, 2],
        "reference": "the model's greedy answers (transformers generate(), float32, batches of 8 left-padded prompts)",
        "verification": "none ran: the accepted length is the longest root path of the tree equal to the reference continuation",
        "heldout": {"set": "src/lambdasplit/device/draft_data/heldout_chat.json", "prompts": len(heldout),
                    "of": len(draft_prompts.heldout_prompts()), "new_tokens": new_tokens,
                    "answer_tokens": sum(len(s.ids) - s.answer for s in heldout)},
        "calibration": {"set": "the head's validation prompts (generated training prompts set aside, never trained on)",
                        "prompts": len(calibrating), "new_tokens": new_tokens, "rank_counts": counts, "acceptance": accept},
        "rows": rows,
        "verification_ms": {"context": 160, "reps": 7, "split": [2, 2],
                            "by_positions": {str(p): v for p, v in costs.items()}},
        "modelled": modelled(rows, costs),
        "seconds": {"answers": round(answered - began, 1), "calibration": round(calibrated - answered, 1),
                    "replays": round(replayed - calibrated, 1), "total": round(time.monotonic() - began, 1)},
    }
    written = write("draft-tree-cpu", payload, out)
    log.info("wrote %s", written)
    return written


def _line(row: dict[str, Any]) -> str:
    return (f"{row['shape']}: {row['tokens_per_round_trip']:.2f} tokens per round trip, "
            f"{row['tokens_per_verification']:.2f} per verification of {row['positions_per_verification']:.1f} positions, "
            f"{row['draft_ms_per_drafted_token']:.2f} device ms per drafted token ({row['draft_ms_per_round']:.1f} per round)")


if __name__ == "__main__":  # `python -m benchmarks.draft_tree ARGS` is `python -m benchmarks draft-tree ARGS`
    import sys

    from benchmarks.__main__ import app

    app(["draft-tree", *sys.argv[1:]], prog_name="python -m benchmarks")
