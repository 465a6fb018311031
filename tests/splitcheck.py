"""Run a split generation and the unsplit transformers generate() side by side."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lambdasplit.device.generation import GenerationResult
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.local import LocalBody, load_local_body
from lambdasplit.engine.scheduler import BodyScheduler
from lambdasplit.wire.codec import Codec
from tests.conftest import oracle


@dataclass
class Comparison:
    split: GenerationResult
    split_logits: torch.Tensor  # (steps, B, V)
    oracle_ids: list[list[int]]
    oracle_logits: torch.Tensor
    per_step_bytes: list[tuple[int, int]]  # (to cloud, from cloud) for each body call

    @property
    def max_logit_error(self) -> float:
        return (self.split_logits - self.oracle_logits).abs().max().item()


def trim(ids: list[int], eos: list[int]) -> list[int]:
    cut = next((i + 1 for i, t in enumerate(ids) if t in eos), None)
    return ids[:cut] if cut else ids


def compare(
    source: Path | str, split: tuple[int, int], input_ids: torch.Tensor, mask: torch.Tensor | None = None,
    new_tokens: int = 12, allow_shallow: bool = False, runtime: SplitRuntime | None = None,
) -> Comparison:
    runtime = runtime or SplitRuntime.load(source, split, allow_shallow=allow_shallow)
    body = load_local_body(source, split, codec=Codec.FP32, allow_shallow=allow_shallow)
    result = runtime.generate_ids(body, input_ids, mask, SamplingParams(max_new_tokens=new_tokens), keep_logits=True)
    model = oracle(Path(source) if source else runtime.opened.checkpoint.path)
    with torch.no_grad():
        ref = model.generate(
            input_ids, attention_mask=mask if mask is not None else torch.ones_like(input_ids),
            max_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True,
        )
    prompt_len = input_ids.shape[1]
    ref_ids = [trim(row[prompt_len:].tolist(), runtime.eos_ids) for row in ref.sequences]
    steps = result.logits.shape[0]
    return Comparison(result, result.logits, ref_ids, torch.stack(ref.logits[:steps]), list(body.stats.per_step))


def generate_together(scheduler: BodyScheduler, source: Path | str, prompts: list[list[int]], new_tokens: list[int],
                      first_alone: bool = False, timeout: float = 300.0) -> dict[int, list[int]]:
    """Each prompt's greedy tokens from its own device (split 2,2, fp32 frames), all in threads at
    once against one scheduler, which is shut down afterwards; a device's error is raised here.
    `first_alone`: the first prompt also runs once before the others start (what it compiles or
    captures is then done before the threads share the process)."""
    runtimes = [SplitRuntime.load(source, (2, 2)) for _ in prompts]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        body = LocalBody(scheduler, Codec.FP32)
        try:
            options = SamplingParams(max_new_tokens=new_tokens[i], ignore_eos=True)
            results[i] = runtimes[i].generate_ids(body, torch.tensor([prompts[i]]), None, options).token_ids[0]
        except BaseException as exc:  # noqa: BLE001 - raised by the calling thread
            errors.append(exc)
        finally:
            body.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    try:
        if first_alone:
            run(0)
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
    finally:
        scheduler.shutdown()
    if errors:
        raise errors[0]
    return results
