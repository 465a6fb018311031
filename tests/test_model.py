"""SplitModelForCausalLM (issue 13): transformers' own generate() and pipeline() drive the split
model and give the unsplit model's tokens, with the body in process and behind a real server."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoTokenizer, TextIteratorStreamer, pipeline

from lambdasplit.device.model import SplitCache, SplitModelForCausalLM
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.engine.local import load_local_body
from lambdasplit.wire.codec import Codec
from tests.conftest import oracle
from tests.test_server_hardening import TOKEN, ThreadServer


@pytest.fixture(scope="module")
def split(llama):
    body = load_local_body(str(llama), (2, 2), codec=Codec.FP32)
    model = SplitModelForCausalLM.from_pretrained(llama, (2, 2), body=body)
    yield model
    body.scheduler.shutdown()


@pytest.fixture(scope="module")
def tokenizer(split):
    tok = AutoTokenizer.from_pretrained(split.name_or_path)
    tok.padding_side = "left"
    return tok


def _both(split, llama, inputs, seed=None, **kwargs):
    outs = []
    for model in (split, oracle(llama)):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model.generate(**inputs, **kwargs))
    return outs


def test_greedy_generate_equals_the_unsplit_model_and_the_cache_mirrors_the_length(split, llama, tokenizer):
    inputs = tokenizer(["The capital of France is"], return_tensors="pt")
    got, want = _both(split, llama, inputs, max_new_tokens=12, do_sample=False)
    assert got.tolist() == want.tolist()
    out = split(**inputs)
    assert isinstance(out.cache if hasattr(out, "cache") else out.past_key_values, SplitCache)
    assert torch.allclose(out.logits, oracle(llama)(**inputs).logits, atol=1e-4)


@pytest.mark.parametrize("options", [
    dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
    dict(do_sample=True, repetition_penalty=1.3, top_k=0),
    dict(do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2),
])
def test_sampling_and_logits_processors_equal_the_unsplit_model_with_the_same_seed(split, llama, tokenizer, options):
    inputs = tokenizer(["Once upon a time"], return_tensors="pt")
    got, want = _both(split, llama, inputs, seed=7, max_new_tokens=16, **options)
    assert got.tolist() == want.tolist()


def test_a_left_padded_batch_equals_the_unsplit_batch(split, llama, tokenizer):
    inputs = tokenizer(["Hi", "The quick brown fox jumps over"], return_tensors="pt", padding=True)
    assert inputs["attention_mask"][0, 0] == 0  # really padded
    got, want = _both(split, llama, inputs, max_new_tokens=10, do_sample=False)
    assert got.tolist() == want.tolist()


def test_stop_strings_and_a_streamer_match_the_unsplit_model(split, llama, tokenizer):
    inputs = tokenizer(["Count: one, two,"], return_tensors="pt")
    got, want = _both(split, llama, inputs, max_new_tokens=20, do_sample=False, stop_strings=[","], tokenizer=tokenizer)
    assert got.tolist() == want.tolist()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(target=split.generate, kwargs=dict(**inputs, max_new_tokens=12, do_sample=False, streamer=streamer))
    thread.start()
    text = "".join(streamer)
    thread.join()
    reference = oracle(llama).generate(**inputs, max_new_tokens=12, do_sample=False)
    assert text == tokenizer.decode(reference[0, inputs["input_ids"].shape[1]:])


def test_the_text_generation_pipeline_runs_the_split_model(split, llama, tokenizer):
    args = dict(max_new_tokens=10, do_sample=False)
    got = pipeline("text-generation", model=split, tokenizer=tokenizer)("Hello there", **args)
    want = pipeline("text-generation", model=oracle(llama), tokenizer=tokenizer)("Hello there", **args)
    assert got == want


def test_generate_through_a_real_server_equals_the_unsplit_model(llama, tokenizer):
    load = load_local_body(str(llama), (2, 2))
    server = ThreadServer(load.scheduler.bodies)
    try:
        runtime = SplitRuntime.load(llama, (2, 2))
        body = RemoteBody(server.url, runtime.manifest, Codec.FP32, token=TOKEN)
        model = SplitModelForCausalLM.from_pretrained(llama, (2, 2), body=body)
        inputs = tokenizer(["The capital of France is", "Paris"], return_tensors="pt", padding=True)
        got = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        body.close()
        want = oracle(llama).generate(**inputs, max_new_tokens=8, do_sample=False)
        assert got.tolist() == want.tolist()
    finally:
        server.close()
        load.scheduler.shutdown()


def test_beam_search_is_refused_rather_than_silently_wrong(split, tokenizer):
    inputs = tokenizer(["Hello"], return_tensors="pt")
    with pytest.raises(NotImplementedError, match="beam search"):
        split.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)


def test_a_continued_cache_sends_only_the_new_positions_and_gives_the_fresh_tokens(llama):
    """generate_ids(cache=...) continues a conversation: turn 2 reuses turn 1's head, body and tail
    KV, sends only its new positions, and gives the tokens a fresh run over the whole history gives."""
    from lambdasplit.device.sampling import SamplingParams

    runtime = SplitRuntime.load(llama, (2, 2))
    body, fresh_body = load_local_body(str(llama), (2, 2)), load_local_body(str(llama), (2, 2))
    first = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    cache = runtime.model.new_cache(body)
    turn1 = runtime.generate_ids(body, first, None, SamplingParams(max_new_tokens=5, ignore_eos=True), cache=cache)
    assert cache.get_seq_length() == first.shape[1] + 5 - 1  # the last new token is not fed yet
    history = torch.cat([first, torch.tensor([turn1.token_ids[0]]), torch.tensor([[253, 2030, 30]])], dim=1)
    turn2 = runtime.generate_ids(body, history, None, SamplingParams(max_new_tokens=5, ignore_eos=True), cache=cache)
    fresh = runtime.generate_ids(fresh_body, history, None, SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert turn2.token_ids == fresh.token_ids
    assert turn2.bytes_to_cloud < fresh.bytes_to_cloud / 2  # 4 new prompt positions + 4 decodes, against 14 + 4
    for b in (body, fresh_body):
        b.scheduler.shutdown()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_model_owns_its_parts_and_post_init_ties_the_lm_head_only_when_the_config_does(tiny_models, family):
    """Like a transformers model: the head's and tail's modules are its children and post_init ties
    the tail's LM head to the head's embedding where the config ties them (llama), not otherwise (qwen2)."""
    model = SplitModelForCausalLM.from_source(tiny_models[family], (2, 2))
    assert model.head.module is model.head_module and model.tail.module is model.tail_module
    tied = model.config.tie_word_embeddings
    assert tied == (family == "llama")
    assert model.all_tied_weights_keys == ({"tail_module.lm_head.weight": "head_module.embed_tokens.weight"} if tied else {})
    assert (model.tail_module.lm_head.weight is model.head_module.embed_tokens.weight) == tied


def test_few_row_projections_equal_f_linear_and_one_row_is_bit_identical():
    """`SkinnyLinear` (a verification frame's few positions as W @ x^T): within its row limit (8 for
    an LM head, 4 for other projections) it equals F.linear within float rounding; one row and
    rows past the limit are F.linear itself, bit for bit; a bf16 projection stays a plain Linear;
    the weight stays the same tensor (a tied LM head stays tied)."""
    import torch.nn.functional as F

    from lambdasplit.split.parts import SKINNY_LM_HEAD_ROWS, SKINNY_ROWS, SkinnyLinear, skinny_linears

    gen = torch.Generator().manual_seed(0)
    part = torch.nn.Module()
    part.lm_head = torch.nn.Linear(64, 1000, bias=False)
    part.proj = torch.nn.Linear(64, 96, bias=True)
    part.bf16 = torch.nn.Linear(64, 96, dtype=torch.bfloat16)
    weight = part.lm_head.weight
    skinny_linears(part)
    assert type(part.lm_head) is type(part.proj) is SkinnyLinear and part.lm_head.weight is weight
    assert type(part.bf16) is torch.nn.Linear
    for layer, limit in ((part.lm_head, SKINNY_LM_HEAD_ROWS), (part.proj, SKINNY_ROWS)):
        for rows in (1, 2, 3, limit, limit + 1):
            x = torch.randn(1, rows, 64, generator=gen)
            got, want = layer(x), F.linear(x, layer.weight, layer.bias)
            assert got.shape == want.shape == (1, rows, layer.out_features) and got.is_contiguous()
            if 1 < rows <= limit:
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
            else:
                assert torch.equal(got, want)
    part.proj.to(torch.float64)  # moved to another dtype: plain F.linear again
    x = torch.randn(1, 3, 64, dtype=torch.float64, generator=gen)
    assert torch.equal(part.proj(x), F.linear(x, part.proj.weight, part.proj.bias))
