"""Exactness budget of quantized device parts: how often int8 / int4 / gguf-exact head + tail (the body
unchanged, float32) give the float32 split's tokens on held-out chat prompts (benchmarks/prompts/heldout.json).

- greedy agreement: prompts whose `--new-tokens` greedy tokens are identical to the float32 split's
  (the float32 split is exact to the unsplit model: tests/test_exactness.py), and where they first differ;
- "bfloat16" is the unquantized device parts computing in bf16 (the body stays float32), for scale;
- a scheme the source cannot take (gguf-exact on a GGUF in other block types) is recorded as refused;
- top-1 agreement: teacher-forced on the float32 continuation, the share of positions whose argmax
  is the float32 split's argmax (a divergence early in a reply does not hide the later positions).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import environment, write
from lambdasplit.device.body import BodyClient
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.local import load_local_body
from lambdasplit.errors import SourceError

PROMPTS = Path(__file__).parent / "prompts" / "heldout.json"
log = logging.getLogger(__name__)


def greedy(runtime: SplitRuntime, body: BodyClient, prompts: list[str], new_tokens: int, batch: int) -> list[list[int]]:
    """Greedy token ids per prompt, in left-padded batches of `batch`."""
    rows: list[list[int]] = []
    for start in range(0, len(prompts), batch):
        result = runtime.generate(body, prompts[start:start + batch], SamplingParams(max_new_tokens=new_tokens))
        rows.extend(result.token_ids)
    return rows


@torch.inference_mode()
def argmaxes(runtime: SplitRuntime, body: BodyClient, prompt: str, continuation: list[int]) -> torch.Tensor:
    """The argmax after each prefix of prompt + continuation[:-1], in one teacher-forced forward."""
    ids, _ = runtime.encode(prompt)
    full = torch.cat([ids, torch.tensor([continuation[:-1]], dtype=ids.dtype)], dim=1)
    model = runtime.model
    logits = model(full, past_key_values=model.new_cache(body)).logits
    return logits[0, ids.shape[1] - 1:].argmax(-1)


def compare(source: str | None, split: tuple[int, int], schemes: list[str], prompts: list[str], new_tokens: int,
            batch: int) -> dict:
    body = load_local_body(source, split)
    reference = SplitRuntime.load(source, split)
    start = time.perf_counter()
    expected = greedy(reference, body, prompts, new_tokens, batch)
    ref_top1 = [argmaxes(reference, body, p, row) for p, row in zip(prompts, expected, strict=True) if len(row) > 1]
    result = {"source": source or "default", "split": list(split), "prompts": len(prompts), "new_tokens": new_tokens,
              "float32_seconds": round(time.perf_counter() - start, 1), "schemes": {}}
    for scheme in schemes:
        try:
            runtime = (SplitRuntime.load(source, split, dtype=scheme) if scheme == "bfloat16"
                      else SplitRuntime.load(source, split, quantize=scheme))
        except SourceError as exc:
            result["schemes"][scheme] = {"refused": str(exc)}
            log.info("%s %s refused: %s", source or "default", scheme, exc)
            continue
        got = greedy(runtime, body, prompts, new_tokens, batch)
        firsts = [_first_difference(a, b) for a, b in zip(expected, got, strict=True)]
        top1 = [argmaxes(runtime, body, p, row) for p, row in zip(prompts, expected, strict=True) if len(row) > 1]
        agree = sum(int((a == b).sum()) for a, b in zip(top1, ref_top1, strict=True))
        positions = sum(len(a) for a in ref_top1)
        diverged = [f for f in firsts if f is not None]
        result["schemes"][scheme] = {
            "identical_prompts": len(firsts) - len(diverged),
            "identical_share": (len(firsts) - len(diverged)) / len(firsts),
            "median_first_difference": statistics.median(diverged) if diverged else None,
            "top1_agreement": agree / positions,
            "positions": positions,
        }
        log.info("%s %s: %s", source or "default", scheme, result["schemes"][scheme])
    return result


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


SCHEMES = ("bfloat16", "int8", "int4", "gguf-exact")


def run_agreement(models: dict[str, str | None], split: tuple[int, int], new_tokens: int, limit: int, name: str,
                  batch: int = 8, schemes: tuple[str, ...] = SCHEMES) -> Path:
    prompts = json.loads(PROMPTS.read_text())[: limit or None]
    payload = {"environment": environment(), "results": []}
    for model, source in models.items():
        row = compare(source, split, list(schemes), prompts, new_tokens, batch)
        row["model"] = model
        payload["results"].append(row)
        write(name, payload)
    return write(name, payload)
