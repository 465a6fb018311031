"""Sampling, stop strings and streaming behave as users expect (checked against transformers)."""

import threading

import pytest
import torch

from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.local import LocalBody, load_local_body
from tests.conftest import oracle


def _pair(source, split=(2, 2)):
    return SplitRuntime.load(source, split), load_local_body(source, split)


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed(tiny_models):
    runtime, body = _pair(tiny_models["llama"])
    ids = torch.tensor([[1, 10, 20, 30]])
    run = lambda seed: runtime.generate_ids(  # noqa: E731
        body, ids, None, SamplingParams(max_new_tokens=12, greedy=False, temperature=1.5, top_k=50, top_p=0.95, seed=seed)
    ).token_ids[0]
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_concurrent_seeded_requests_sample_as_they_do_alone(tiny_models):
    """Two seeded requests on one shared model, in lockstep (a barrier at every step, so their draws
    interleave), give each the tokens it gives alone: each request samples with its own generator.
    (Reseeding torch's global generator, as before, let each request draw from the other's stream.)"""
    runtime, body = _pair(tiny_models["llama"])
    other = LocalBody(body.scheduler)
    ids = torch.tensor([[1, 10, 20, 30]])
    options = {seed: SamplingParams(max_new_tokens=16, greedy=False, temperature=1.5, seed=seed, ignore_eos=True)
               for seed in (1, 2)}
    alone = {seed: runtime.generate_ids(body, ids, None, options[seed]).token_ids[0] for seed in (1, 2)}
    lockstep = threading.Barrier(2, timeout=120)
    together: dict[int, list[int]] = {}

    def run(seed: int, row_body: LocalBody) -> None:
        result = runtime.generate_ids(row_body, ids, None, options[seed], on_tokens=lambda _: lockstep.wait())
        together[seed] = result.token_ids[0]

    threads = [threading.Thread(target=run, args=(1, body)), threading.Thread(target=run, args=(2, other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert together == alone
    assert alone[1] != alone[2]


def test_generate_kwargs_may_not_override_the_options(tiny_models):
    """A sampling argument given both by SamplingParams and as a generate() keyword is refused
    (the gateway's temperature=1.0 keyword used to replace the options' temperature silently)."""
    runtime, body = _pair(tiny_models["llama"])
    options = SamplingParams(max_new_tokens=4, greedy=False, temperature=0.5, seed=1)
    with pytest.raises(ValueError, match="temperature, top_p come from SamplingParams"):
        runtime.generate_ids(body, torch.tensor([[1, 10, 20, 30]]), None, options, temperature=1.0, top_p=1.0)


def test_an_explicit_setting_is_never_replaced_by_the_models_defaults():
    """generate()'s own sampling keywords are None (the model's generation_config cannot add or
    double a processor); every setting is one of our processors, in transformers' order."""
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from lambdasplit.device.sampling import OpenAIPenalties, SeededSampling, generate_kwargs

    params = SamplingParams(max_new_tokens=5, greedy=False, temperature=0.5, top_k=7, top_p=0.9, repetition_penalty=1.2,
                            presence_penalty=0.5, seed=4, ignore_eos=True)
    kwargs = generate_kwargs(params, prompt_len=3)
    assert {k: kwargs[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")} == dict.fromkeys(
        ("temperature", "top_k", "top_p", "repetition_penalty"))
    assert (kwargs["max_new_tokens"], kwargs["min_new_tokens"], kwargs["do_sample"]) == (5, 5, True)
    kinds = [type(p) for p in kwargs["logits_processor"]]
    assert kinds == [RepetitionPenaltyLogitsProcessor, OpenAIPenalties, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                     SeededSampling]
    assert kwargs["logits_processor"][2].temperature == 0.5
    greedy = generate_kwargs(SamplingParams(temperature=0.5, top_k=7), prompt_len=3)
    assert greedy["do_sample"] is False and len(greedy["logits_processor"]) == 0


def test_top_k_one_equals_greedy(tiny_models):
    runtime, body = _pair(tiny_models["qwen3"])
    ids = torch.tensor([[1, 10, 20, 30]])
    greedy = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=10)).token_ids
    top1 = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=10, greedy=False, top_k=1, seed=3)).token_ids
    assert greedy == top1


def test_repetition_penalty_matches_generate(tiny_models):
    source = tiny_models["mistral"]
    runtime, body = _pair(source)
    ids = torch.tensor([[1, 10, 20, 30, 10, 20]])
    ours = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=10, repetition_penalty=1.8)).token_ids[0]
    ref = oracle(source).generate(ids, max_new_tokens=10, do_sample=False, repetition_penalty=1.8)[0, 6:].tolist()
    assert ours == ref


def test_stop_string_and_streaming(smollm2_dir):
    runtime, body = _pair(None)
    full = runtime.generate(body, "List the numbers from 1 to 10, separated by commas.", SamplingParams(max_new_tokens=40))
    assert "5" in full.text
    pieces: list[str] = []
    stopped = runtime.generate(
        body, "List the numbers from 1 to 10, separated by commas.",
        SamplingParams(max_new_tokens=40, stop=("5",)), on_text=pieces.append,
    )
    assert stopped.text == full.text[: full.text.index("5")]
    assert "".join(pieces) == stopped.text
    assert len(pieces) > 2, "text must arrive in pieces, not at the end"
    assert len(stopped.token_ids[0]) < len(full.token_ids[0])
    assert stopped.finish_reasons == ["stop"]


def test_streamed_text_equals_final_text(smollm2_dir):
    runtime, body = _pair(None, (1, 1))
    pieces: list[str] = []
    result = runtime.generate(body, "Write a haiku about autumn.", SamplingParams(max_new_tokens=30), on_text=pieces.append)
    assert "".join(pieces) == result.text and result.text


@pytest.mark.parametrize("decode_stream", [True, False])
def test_the_detokenizer_gives_the_whole_decode_piece_by_piece(smollm2_dir, decode_stream):
    """tokenizers' DecodeStream, and the fallback for other tokenizers, join to the whole decode,
    holding a multi-byte character until it is complete; `flush` gives one cut short by the end."""
    from lambdasplit.device.textstream import Detokenizer

    tokenizer = SplitRuntime.load(None, (1, 1)).tokenizer
    text = "Héllo wörld 日本語 😀, done."
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = Detokenizer(tokenizer, decode_stream)
    pieces = [detokenizer.step(t) for t in [*ids, tokenizer.eos_token_id]]
    assert "".join(pieces) + detokenizer.flush() == text
    assert "\ufffd" not in "".join(pieces) and "" in pieces  # some bytes waited for their character
    cut = Detokenizer(tokenizer, decode_stream)
    emoji = tokenizer.encode(" 😀", add_special_tokens=False)
    assert "".join(cut.step(t) for t in emoji[:-1]) + cut.flush() == tokenizer.decode(emoji[:-1])


def test_hold_from_holds_what_may_still_become_a_key():
    from lambdasplit.device.textstream import hold_from

    assert hold_from("the end. St", ("Stop",)) == 9  # "St" may become "Stop"
    assert hold_from("the end. Stop", ("Stop",)) == 13  # a whole stop string is cut, not held
    assert hold_from("see White", ("white",), whole=True, word=True, fold=True) == 4  # may be "Whiteboard"
    assert hold_from("seeWhi", ("white",), whole=True, word=True, fold=True) == 6  # not at a word start
    assert hold_from("hi", ("hit",), word=True, before="s") == 2 and hold_from("hi", ("hit",), word=True, before=" ") == 0
