"""The trained draft head (issue 24): training runs and learns on a tiny model, and drafting with it
gives exactly the plain greedy tokens, in process and over a server, also across a lost connection."""

from __future__ import annotations

import json

import pytest
import torch

from lambdasplit.device.body import load_local_body
from lambdasplit.device.draft import SHIPPED, DraftHeadError, read_meta
from lambdasplit.device.generation import GenerationOptions
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitDevice
from lambdasplit.device.train_draft import TrainSettings, train_draft
from lambdasplit.wire.codec import Codec
from tests.conftest import oracle
from tests.test_server_hardening import TOKEN, ThreadServer

PROMPTS = ["Tell me about the sea.", "Write a poem about trees.", "What is a cat?", "Explain rain."]


@pytest.fixture(scope="module")
def trained(llama, tmp_path_factory):
    """A head trained on the tiny model's own answers to PROMPTS (the held-out set is the shipped one)."""
    root = tmp_path_factory.mktemp("draft")
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    settings = TrainSettings(epochs=30, lr=3e-3, max_new_tokens=24, heldout_limit=2, gen_batch=4, batch=4, draft_vocab=1024)
    meta = train_draft(str(llama), (2, 2), root / "head", prompts, "cpu", settings)
    return root / "head", meta


@pytest.fixture(scope="module")
def local(llama):
    body = load_local_body(str(llama), (2, 2), codec=Codec.FP32)
    yield body
    body.scheduler.shutdown()


@pytest.fixture(scope="module")
def server(local):
    server = ThreadServer(local.scheduler.bodies)
    yield server
    server.close()


def test_training_reduces_the_loss_and_writes_a_head_within_the_size_budget(trained):
    directory, meta = trained
    losses = meta["training"]["epoch_losses"]
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    assert meta["size"]["ratio"] <= 0.05 and meta["size"]["split"] == [2, 2]
    assert meta["training"]["prompts"] == len(PROMPTS) and meta["heldout_chat"]["prompts"] == 2
    assert read_meta(directory)["intermediate_size"] == meta["intermediate_size"]
    assert (directory / "draft_head.safetensors").stat().st_size < 4 * meta["size"]["head_parameters"] + 1024 * 64


def test_the_tail_hands_the_draft_head_the_unsplit_models_final_features(llama, local):
    device = SplitDevice.load(llama, (2, 2))
    model = device.model
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    cache = model.new_cache(local)
    seen = []
    cache.on_features = seen.append
    model(ids[:, :4], cache=cache)
    model(ids[:, 4:], cache=cache)
    expected = oracle(llama)(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(torch.cat(seen, dim=1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("where", ["in process", "server"])
def test_draft_head_greedy_equals_plain_greedy_and_the_unsplit_model(llama, local, server, trained, where):
    device = SplitDevice.load(llama, (2, 2))
    body = local if where == "in process" else RemoteBody(server.url, device.manifest, Codec.FP32, token=TOKEN)
    ids = device.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    plain = device.generate_ids(body, ids, None, GenerationOptions(max_new_tokens=24, ignore_eos=True))
    fast = device.generate_ids(body, ids, None, GenerationOptions(max_new_tokens=24, ignore_eos=True,
                                                                  speculate=f"draft-head:{trained[0]}", draft_tokens=6))
    if where == "server":
        body.close()
    assert fast.token_ids == plain.token_ids
    reference = oracle(llama).generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    assert fast.token_ids[0] == reference.tolist()
    assert plain.round_trips == 24 and fast.round_trips < 24
    assert fast.drafting["accepted"] > 0 and fast.drafting["drafted"] > fast.drafting["accepted"], fast.drafting
    assert fast.tokens_per_round_trip == 24 / fast.round_trips


def test_a_connection_lost_after_a_crop_keeps_the_draft_head_exact(llama, server, trained):
    """The socket drops right after the first CROP of a rejected draft: the device reconnects,
    replays (CROP included), and the tokens stay the plain ones."""
    device = SplitDevice.load(llama, (2, 2))
    body = RemoteBody(server.url, device.manifest, Codec.FP32, token=TOKEN, backoff=0.05)
    ids = device.encode_chat([{"role": "user", "content": PROMPTS[1]}])
    plain = device.generate_ids(body, ids, None, GenerationOptions(max_new_tokens=24, ignore_eos=True))
    crop, dropped = body._crop, []

    def crop_then_drop(length: int) -> None:
        crop(length)
        if not dropped:
            dropped.append(length)
            body._ws.close()

    body._crop = crop_then_drop
    fast = device.generate_ids(body, ids, None, GenerationOptions(max_new_tokens=24, ignore_eos=True,
                                                                  speculate=f"draft-head:{trained[0]}", draft_tokens=6))
    body.close()
    assert dropped and body.reconnects == 1
    assert fast.token_ids == plain.token_ids


def test_sampling_with_the_draft_head_gives_draft_probabilities_and_runs_exactly_at_low_temperature(llama, local, trained):
    """Speculative sampling needs q: the generator returns the draft's processed logits. At a
    temperature where sampling is argmax, the tokens are the greedy ones."""
    device = SplitDevice.load(llama, (2, 2))
    ids = device.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    greedy = device.generate_ids(local, ids, None, GenerationOptions(max_new_tokens=16, ignore_eos=True))
    options = GenerationOptions(max_new_tokens=16, ignore_eos=True, greedy=False, temperature=1e-4, seed=3,
                                speculate=f"draft-head:{trained[0]}", draft_tokens=6)
    sampled = device.generate_ids(local, ids, None, options)
    assert sampled.token_ids == greedy.token_ids
    assert sampled.drafting["drafted"] > 0


def test_a_head_for_another_model_or_a_broken_directory_is_refused(llama, local, trained, tmp_path):
    device = SplitDevice.load(llama, (2, 2))
    ids = torch.tensor([[1, 504, 3458]])
    with pytest.raises(DraftHeadError, match="hidden_size 576"):
        device.generate_ids(local, ids, None, GenerationOptions(max_new_tokens=2, speculate="draft-head"))
    assert read_meta(SHIPPED)["hidden_size"] == 576
    (tmp_path / "draft_head.json").write_text("{not json")
    with pytest.raises(DraftHeadError, match="not valid JSON"):
        device.generate_ids(local, ids, None, GenerationOptions(max_new_tokens=2, speculate=f"draft-head:{tmp_path}"))
    with pytest.raises(DraftHeadError, match="not a draft head directory"):
        device.generate_ids(local, ids, None, GenerationOptions(max_new_tokens=2, speculate=f"draft-head:{tmp_path / 'none'}"))
