"""Speculative decoding across the network (issue 13): the device drafts, the body verifies all
draft positions in one frame, rejected positions are cropped on both sides (the CROP message)."""

from __future__ import annotations

import json

import pytest
import torch

from lambdasplit.device.model import SplitModelForCausalLM
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import MsgType, parse_frame
from lambdasplit.wire.protocol import control_frame
from tests.conftest import oracle
from tests.test_server_hardening import TOKEN, expect_error, hidden_frame, raw_session

REUSE = "Repeat exactly: the cat sat on the mat and the dog sat on the log. Repeat exactly: the cat sat on the mat and"




def _logits(model, ids, chunks):
    """Feed `ids` in the given chunk lengths through a fresh cache; the logits of every position."""
    cache, outs, start = model.new_cache(), [], 0
    for n in chunks:
        outs.append(model(ids[:, start:start + n], cache=cache).logits)
        start += n
    return torch.cat(outs, dim=1), cache


def test_cropping_drafted_positions_leaves_head_body_and_tail_as_if_never_drafted(llama, local):
    model = SplitModelForCausalLM.from_pretrained(llama, (2, 2), body=local)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2030, 30, 282, 4649]])
    plain, _ = _logits(model, ids, [6, 1, 1, 1, 1, 1])
    cache = model.new_cache()
    model(ids[:, :6], cache=cache)
    model(torch.tensor([[9, 9, 9, 9]]), cache=cache)  # a draft the tail rejects entirely
    cache.crop(-4)
    assert cache.get_seq_length() == 6 and local._positions == 6
    rest = [model(ids[:, i:i + 1], cache=cache).logits for i in range(6, ids.shape[1])]
    torch.testing.assert_close(torch.cat(rest, dim=1), plain[:, 6:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("where", ["in process", "server"])
def test_prompt_lookup_greedy_equals_plain_greedy_and_the_unsplit_model(llama, local, server, where):
    runtime = SplitRuntime.load(llama, (2, 2))
    body = local if where == "in process" else RemoteBody(server.url, runtime.manifest, Codec.FP32, token=TOKEN)
    model = SplitModelForCausalLM.from_pretrained(llama, (2, 2), body=body)
    tok = runtime.tokenizer
    inputs = tok([REUSE], return_tensors="pt")
    start = body.stats.frames_from_cloud
    plain = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    middle = body.stats.frames_from_cloud
    fast = model.generate(**inputs, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=6)
    assert fast.tolist() == plain.tolist()
    assert middle - start == 24  # one round trip per token (the prefill's gives the first)
    assert body.stats.frames_from_cloud - middle < 24, "no draft was accepted"
    assert fast.tolist() == oracle(llama).generate(**inputs, max_new_tokens=24, do_sample=False).tolist()
    if where == "server":
        body.close()


def test_a_connection_lost_after_a_crop_replays_to_the_cropped_length(llama, server):
    """Replay resends the drafted frame and then the CROP, so the fresh session's KV has the cropped
    length, and the next positions equal a run that never drafted."""
    runtime = SplitRuntime.load(llama, (2, 2))
    body = RemoteBody(server.url, runtime.manifest, Codec.FP32, token=TOKEN, backoff=0.05)
    model = SplitModelForCausalLM.from_pretrained(llama, (2, 2), body=body)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2030, 30]])
    plain, _ = _logits(model, ids, [5, 1, 1, 1, 1])
    cache = model.new_cache()
    model(ids[:, :5], cache=cache)
    model(torch.cat([ids[:, 5:6], torch.tensor([[7, 7, 7]])], dim=1), cache=cache)  # first draft token right
    cache.crop(-3)
    body._ws.close()  # lost mid-verification, after the CROP
    rest = [model(ids[:, i:i + 1], cache=cache).logits for i in range(6, ids.shape[1])]
    assert body.reconnects == 1
    torch.testing.assert_close(torch.cat(rest, dim=1), plain[:, 6:], atol=1e-5, rtol=1e-5)
    body.close()


@pytest.mark.parametrize("length", [-1, 99, "3", True, 2.5])
def test_a_bad_crop_gets_a_protocol_error(llama, server, length):
    runtime = SplitRuntime.load(llama, (2, 2))
    ws, session = raw_session(server, runtime)
    ws.send(hidden_frame(session, 1, 1, 4).to_bytes())
    assert parse_frame(ws.recv(timeout=15)).type == MsgType.HIDDEN
    ws.send(control_frame(MsgType.CROP, {"length": length}, session).to_bytes())
    error = expect_error(ws)
    assert error["code"] == "protocol" and "CROP length" in error["message"], json.dumps(error)


@pytest.mark.parametrize("draft", ["llama", "qwen2"])
def test_a_draft_model_gives_the_plain_greedy_tokens_over_the_network(tiny_models, server, draft):
    """`--speculate PATH`: a local draft model with the same tokenizer. The target itself as draft
    has every draft accepted; an unrelated random model has nearly every draft rejected (and cropped)."""
    from lambdasplit.device.sampling import SamplingParams

    runtime = SplitRuntime.load(tiny_models["llama"], (2, 2))
    body = RemoteBody(server.url, runtime.manifest, Codec.FP32, token=TOKEN)
    ids = runtime.tokenizer([REUSE], return_tensors="pt")["input_ids"]
    plain = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=16, ignore_eos=True))
    fast = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=16, ignore_eos=True,
                                                                  speculate=str(tiny_models[draft]), draft_tokens=4))
    body.close()
    assert fast.token_ids == plain.token_ids
    assert plain.round_trips == 16
    if draft == "llama":
        # Every draft is accepted; drafts stay short because transformers stops drafting where the
        # draft's own confidence is below `assistant_confidence_threshold` (a random model's often is).
        assert fast.round_trips <= plain.round_trips // 2, "the target as its own draft should have its drafts accepted"
    else:
        assert fast.round_trips >= 12, "a random draft model should be rejected almost always"


def test_prompt_lookup_draft_length_follows_acceptance():
    """Full acceptance grows the draft by 2, a rejection shrinks it by 1; a rejected one-token draft
    pauses drafting for 1, 2, 4 ... steps; a step where nothing was drafted changes nothing."""
    from lambdasplit.device.model import AdaptivePromptLookup

    gen = AdaptivePromptLookup(num_output_tokens=4, max_length=100, vocab_size=10)
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    candidates, _ = gen.get_candidates(ids)
    assert gen.proposed == candidates.shape[1] - ids.shape[1] == 3  # "3 1 2" followed the earlier "1 2"
    gen.update_candidate_strategy(ids, None, 3)
    assert gen.num_output_tokens == 6
    for _ in range(5):
        gen.update_candidate_strategy(ids, None, 0)
    assert gen.num_output_tokens == 1 and gen.pause == 0
    for pause in (1, 2, 4):  # each rejected one-token draft doubles the pause
        gen.update_candidate_strategy(ids, None, 0)
        assert gen.pause == pause
        for _ in range(pause):
            assert gen.get_candidates(ids)[0].shape == ids.shape  # paused: no draft
        gen.get_candidates(ids)
        assert gen.proposed == 1
    gen.update_candidate_strategy(ids, None, 1)  # accepted: drafting resumes at full pace
    assert gen.backoff == 0 and gen.num_output_tokens == 3
    gen.proposed = 0
    gen.update_candidate_strategy(ids, None, 0)
    assert gen.num_output_tokens == 3


def test_self_drafting_is_refused_with_its_measured_acceptance(llama, local):
    from lambdasplit.device.sampling import SamplingParams
    from lambdasplit.errors import LambdaSplitError

    runtime = SplitRuntime.load(llama, (2, 2))
    with pytest.raises(LambdaSplitError, match="benchmarks self-draft"):
        runtime.generate_ids(local, torch.tensor([[1, 504, 3458]]), None, SamplingParams(max_new_tokens=2, speculate="self"))
