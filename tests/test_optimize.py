"""Body speed-ups (`engine/optimize.py`, issue 22 items 5-6): a compiled body serves the unsplit
model's greedy tokens, batched; fp8 is refused clearly where it cannot run."""

from __future__ import annotations

import threading

import pytest
import torch

from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.loading import load_scheduler
from lambdasplit.engine.local import LocalBody
from lambdasplit.engine.optimize import BodyOptions, compile_layers, quantize_fp8
from lambdasplit.engine.scheduler import SchedulerLimits
from lambdasplit.errors import LambdaSplitError
from lambdasplit.wire.codec import Codec
from tests.conftest import oracle

PROMPTS = [[1, 504, 3458], [1, 504, 3458, 282, 4649, 314, 253, 2030, 30], [1, 2030, 30, 282]]
NEW_TOKENS = 10


def test_a_compiled_body_gives_the_unsplit_models_tokens_batched(llama):
    """Three sessions at once through a compiled body (prefill chunks of 4 mixed with decodes, so
    the compiled modules see several packed lengths): each session's greedy tokens equal the
    unsplit model's own generate(). One session runs alone first, so the compilation is done before
    the device threads start: while Dynamo traces in one thread, the `kernels` package's hook on
    Llama attention is not safe in other threads running the device parts in this process (a
    server compiles and runs its body in one compute thread, apart from any device)."""
    model = oracle(llama)
    expected = [model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               do_sample=False)[0, len(ids):].tolist() for ids in PROMPTS]
    scheduler = load_scheduler(str(llama), (2, 2), limits=SchedulerLimits(step_tokens=4), options=BodyOptions(compile=True))
    layers = scheduler.bodies[0].runner.module.layers
    assert all(hasattr(layer.mlp, "_compiled_call_impl") and layer.mlp._compiled_call_impl for layer in layers)
    assert not getattr(layers[0].self_attn, "_compiled_call_impl", None)  # the paged attention stays eager
    steps: list = []
    scheduler.on_step = steps.append
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        body = LocalBody(scheduler, Codec.FP32)
        try:
            runtime = SplitRuntime.load(llama, (2, 2))
            options = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
            results[i] = runtime.generate_ids(body, torch.tensor([PROMPTS[i]]), None, options).token_ids[0]
        finally:
            body.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    try:
        run(0)
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        scheduler.shutdown()
    assert [results.get(i) for i in range(len(PROMPTS))] == expected
    assert steps, "the scheduler ran no step"


def test_compile_layers_leaves_attention_and_counts_what_it_compiled(llama):
    runner = load_scheduler(str(llama), (1, 1)).bodies[0].runner
    layers = len(runner.module.layers)
    # a Llama decoder layer: input norm, MLP, post-attention norm (attention is left out)
    assert compile_layers(runner.module) == 3 * layers


def test_fp8_and_unknown_formats_are_refused_clearly():
    with pytest.raises(LambdaSplitError, match="the body supports fp8"):
        BodyOptions(quantize="int8")
    with pytest.raises(LambdaSplitError, match="needs a CUDA GPU of compute capability 8.9"):
        quantize_fp8(torch.nn.Linear(4, 4))
