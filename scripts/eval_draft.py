"""Tokens per round trip on the held-out chat set, greedy: plain split decoding vs prompt lookup vs a
draft head, in process (the body is a LocalBody on the same device), every answer in every mode
asserted identical to plain decoding. Round trips are counted, not timed, so a GPU gives the same
numbers as a network would, only sooner. scripts/train_draft_gpu.sh runs it after training.

    python3 scripts/eval_draft.py --head DIR [--model SRC] [--device cuda] [--max-minutes M] --out eval.json

Prompts run in order until the set ends or the next one would likely end past --max-minutes (loading
counted; the JSON says how many ran), so a GPU call's time limit is kept; exit status 1
when any mode's tokens differ from plain decoding (the JSON is written first, with the prompts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lambdasplit import defaults
from lambdasplit.device.draft_prompts import heldout_prompts
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.local import load_local_body
from lambdasplit.wire.codec import Codec


def evaluate(model: str | None, head: str, device: str, split: tuple[int, int], new_tokens: int, draft_tokens: int,
             max_minutes: float | None, limit: int | None) -> dict:
    """Per mode: tokens, round trips, tokens per round trip, decode seconds; for the head, drafted
    and accepted tokens and device ms per drafted token; the prompts whose tokens differed."""
    modes = {"plain": None, "prompt-lookup": "prompt-lookup", "draft-head": f"draft-head:{head}"}
    deadline = time.monotonic() + 60 * max_minutes if max_minutes else float("inf")  # loading counts too
    runtime = SplitRuntime.load(model, split, device=device)
    body = load_local_body(model, split, device=device, codec=Codec.FP32)
    totals = {name: {"tokens": 0, "round_trips": 0, "seconds": 0.0} for name in modes}
    drafting = {"drafted": 0, "accepted": 0, "seconds": 0.0}
    differ: list[dict] = []
    prompts = heldout_prompts()[:limit]
    ran, slowest = 0, 0.0
    try:
        for prompt in prompts:
            began = time.monotonic()
            if began + slowest > deadline:  # the next prompt would likely end past the budget
                break
            ids = runtime.encode_chat([{"role": "user", "content": prompt}])
            results = {name: runtime.generate_ids(body, ids, None, SamplingParams(
                max_new_tokens=new_tokens, speculate=mode, draft_tokens=draft_tokens)) for name, mode in modes.items()}
            for name, result in results.items():
                totals[name]["tokens"] += len(result.token_ids[0])
                totals[name]["round_trips"] += result.round_trips
                totals[name]["seconds"] += result.timings.total
                if result.token_ids != results["plain"].token_ids:
                    differ.append({"prompt": prompt, "mode": name})
            stats = results["draft-head"].drafting or {}
            drafting["drafted"] += int(stats.get("drafted", 0))
            drafting["accepted"] += int(stats.get("accepted", 0))
            drafting["seconds"] += stats.get("ms_per_drafted_token", 0.0) * stats.get("drafted", 0) / 1000
            ran += 1
            slowest = max(slowest, time.monotonic() - began)
    finally:
        body.scheduler.shutdown()
    for row in totals.values():
        row["tokens_per_round_trip"] = row["tokens"] / max(row["round_trips"], 1)
        row["tokens_per_s"] = row["tokens"] / row["seconds"] if row["seconds"] else 0.0
    totals["draft-head"].update(drafted=drafting["drafted"], accepted=drafting["accepted"],
                                acceptance=drafting["accepted"] / max(drafting["drafted"], 1),
                                ms_per_drafted_token=1000 * drafting["seconds"] / max(drafting["drafted"], 1))
    card = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {"set": "held-out chat (draft_data/heldout_chat.json)", "prompts": ran, "of": len(prompts), "device": card,
            "split": list(split), "new_tokens": new_tokens, "draft_tokens": draft_tokens, "head": head,
            "identical": not differ, "differ": differ, "modes": totals}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", required=True, help="draft head directory (from train-draft)")
    parser.add_argument("--model", default=None, help="model source (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--split", default="2,2")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--draft-tokens", type=int, default=defaults.DRAFT_TOKENS)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--limit", type=int, default=None, help="the first N held-out prompts only")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    k, m = (int(v) for v in args.split.split(","))
    report = evaluate(args.model, args.head, args.device, (k, m), args.new_tokens, args.draft_tokens, args.max_minutes, args.limit)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    shown = ", ".join(f"{name} {row['tokens_per_round_trip']:.2f}" for name, row in report["modes"].items())
    print(f"held-out chat, {report['prompts']}/{report['of']} prompts on {report['device']}: tokens per round trip {shown}; "
          f"identical to plain: {report['identical']}")
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
