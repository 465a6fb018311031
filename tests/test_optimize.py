"""Body speed-ups (`engine/optimize.py`, issue 22 items 5-6): a compiled body serves the unsplit
model's greedy tokens, batched, and compiles at load (its warm-up) what its sessions then run; fp8
is refused clearly where it cannot run."""

from __future__ import annotations

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
from tests.splitcheck import generate_together

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
    results = generate_together(scheduler, llama, PROMPTS, [NEW_TOKENS] * len(PROMPTS), first_alone=True)
    assert [results.get(i) for i in range(len(PROMPTS))] == expected
    assert steps, "the scheduler ran no step"


@pytest.fixture
def counting_backend(monkeypatch) -> list[list[torch.Tensor]]:
    """torch.compile's backend swapped for one that records each graph's tensor inputs and runs it
    eagerly: what gets compiled, and when, without inductor's cost on the CPU."""
    graphs: list[list[torch.Tensor]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append([x for x in example_inputs if isinstance(x, torch.Tensor)])
        return gm.forward

    torch._dynamo.reset()  # code compiled earlier in this process would run without asking the backend
    monkeypatch.setattr("lambdasplit.engine.optimize.BACKEND", backend)
    yield graphs
    torch._dynamo.reset()  # later tests compile with inductor again


def test_the_warm_up_compiles_at_load_in_the_bodys_dtype(llama, counting_backend):
    scheduler = load_scheduler(str(llama), (2, 2), "bfloat16", options=BodyOptions(compile=True))
    scheduler.shutdown()
    assert counting_backend, "nothing was compiled at load"
    tensors = [x for graph in counting_backend for x in graph if x.dim()]  # not a scalar (RMSNorm's eps, float64)
    assert {x.dtype for x in tensors} == {torch.bfloat16}  # hidden states and weights alike
    assert {x.device.type for x in tensors} == {"cpu"}
    assert {x.shape[1] for x in tensors if x.dim() == 3} == {2, 1}  # a step of several positions, one decode row


@pytest.mark.parametrize("step_tokens", [4, None])
def test_a_session_after_the_warm_up_compiles_nothing_more(llama, counting_backend, step_tokens):
    """Prefill chunks (4, 4, 1 positions, or all 9 at once) and decode steps reuse the warm-up's
    graphs. The packed hidden states are built in inference mode like every other layer input:
    built outside it, the first layer's norm compiled a second graph for each length on the first
    session. A float32 CPU body's projections take 2-4 positions as W @ x^T (`SkinnyLinear`), so
    Dynamo guards its graph of 2 positions to at most 4: the 9-position chunk needs the warm-up's
    graph past that range."""
    ids = PROMPTS[1]
    expected = oracle(llama).generate(torch.tensor([ids]), max_new_tokens=3, min_new_tokens=3,
                                      do_sample=False)[0, len(ids):].tolist()
    scheduler = load_scheduler(str(llama), (2, 2), limits=SchedulerLimits(step_tokens=step_tokens),
                               options=BodyOptions(compile=True))
    at_load = len(counting_backend)
    body = LocalBody(scheduler, Codec.FP32)
    try:
        runtime = SplitRuntime.load(llama, (2, 2))
        options = SamplingParams(max_new_tokens=3, ignore_eos=True)
        tokens = runtime.generate_ids(body, torch.tensor([ids]), None, options).token_ids[0]
    finally:
        body.close()
        scheduler.shutdown()
    assert tokens == expected
    assert at_load > 0, "nothing was compiled at load"
    assert len(counting_backend) == at_load, f"{len(counting_backend) - at_load} more graphs compiled while serving"


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
