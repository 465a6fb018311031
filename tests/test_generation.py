"""Sampling, stop strings and streaming behave as users expect (checked against transformers)."""

import torch

from lambdasplit.device.generation import GenerationOptions
from lambdasplit.device.runtime import SplitDevice
from lambdasplit.engine.local import load_local_body
from tests.conftest import oracle


def _pair(source, split=(2, 2)):
    return SplitDevice.load(source, split), load_local_body(source, split)


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed(tiny_models):
    device, body = _pair(tiny_models["llama"])
    ids = torch.tensor([[1, 10, 20, 30]])
    run = lambda seed: device.generate_ids(  # noqa: E731
        body, ids, None, GenerationOptions(max_new_tokens=12, greedy=False, temperature=1.5, top_k=50, top_p=0.95, seed=seed)
    ).token_ids[0]
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_one_equals_greedy(tiny_models):
    device, body = _pair(tiny_models["qwen3"])
    ids = torch.tensor([[1, 10, 20, 30]])
    greedy = device.generate_ids(body, ids, None, GenerationOptions(max_new_tokens=10)).token_ids
    top1 = device.generate_ids(body, ids, None, GenerationOptions(max_new_tokens=10, greedy=False, top_k=1, seed=3)).token_ids
    assert greedy == top1


def test_repetition_penalty_matches_generate(tiny_models):
    source = tiny_models["mistral"]
    device, body = _pair(source)
    ids = torch.tensor([[1, 10, 20, 30, 10, 20]])
    ours = device.generate_ids(body, ids, None, GenerationOptions(max_new_tokens=10, repetition_penalty=1.8)).token_ids[0]
    ref = oracle(source).generate(ids, max_new_tokens=10, do_sample=False, repetition_penalty=1.8)[0, 6:].tolist()
    assert ours == ref


def test_stop_string_and_streaming(smollm2_dir):
    device, body = _pair(None)
    full = device.generate(body, "List the numbers from 1 to 10, separated by commas.", GenerationOptions(max_new_tokens=40))
    assert "5" in full.text
    pieces: list[str] = []
    stopped = device.generate(
        body, "List the numbers from 1 to 10, separated by commas.",
        GenerationOptions(max_new_tokens=40, stop=("5",)), on_text=pieces.append,
    )
    assert stopped.text == full.text[: full.text.index("5")]
    assert "".join(pieces) == stopped.text
    assert len(pieces) > 2, "text must arrive in pieces, not at the end"
    assert len(stopped.token_ids[0]) < len(full.token_ids[0])
    assert stopped.finish_reasons == ["stop"]


def test_streamed_text_equals_final_text(smollm2_dir):
    device, body = _pair(None, (1, 1))
    pieces: list[str] = []
    result = device.generate(body, "Write a haiku about autumn.", GenerationOptions(max_new_tokens=30), on_text=pieces.append)
    assert "".join(pieces) == result.text and result.text
