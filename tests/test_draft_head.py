"""The trained draft head (issue 24): training runs and learns on a tiny model, and drafting with it
gives exactly the plain greedy tokens, in process and over a server, also across a lost connection."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lambdasplit.device import draft_prompts
from lambdasplit.device.draft import SHIPPED, DraftHead, DraftHeadError, read_meta
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.device.train_draft import Objective, TrainSettings, answer, draft_vocabulary, train, train_draft
from lambdasplit.wire.codec import Codec
from scripts import eval_draft
from tests.conftest import oracle
from tests.test_server_hardening import TOKEN

PROMPTS = ["Tell me about the sea.", "Write a poem about trees.", "What is a cat?", "Explain rain.",
           "Tell me about the moon.", "Write a poem about rivers.", "What is a dog?", "Explain snow."]


@pytest.fixture(scope="module")
def trained(llama, tmp_path_factory):
    """A head trained on the tiny model's own answers to PROMPTS, greedy and sampled (two of them
    validate; the held-out set is the shipped one). Hard labels: the random model's next-token
    distributions are nearly uniform, and a head that learns them is never confident enough to draft."""
    root = tmp_path_factory.mktemp("draft")
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    settings = TrainSettings(epochs=24, lr=3e-3, max_new_tokens=24, heldout_limit=2, gen_batch=4, batch=4, draft_vocab=1024,
                             sampled=0.5, validation=0.25, validation_replays=2, hard_labels=True)
    meta = train_draft(str(llama), (2, 2), root / "head", prompts, "cpu", settings)
    return root / "head", meta




def test_training_reduces_the_loss_improves_acceptance_and_writes_a_head_within_the_size_budget(trained):
    directory, meta = trained
    training = meta["training"]
    losses = training["epoch_losses"]
    assert len(losses) == training["epochs"] == 24 and losses[-1] < 0.75 * losses[0]
    first, best = training["history"][0], training["history"][training["best_epoch"] - 1]
    assert best["depth1"] > first["depth1"] and best["depth2"] > first["depth2"], training["history"]
    assert meta["validation"]["prompts"] == meta["validation"]["answers"] == 2 and meta["validation"]["tokens_per_round_trip"] >= 1.0
    assert meta["size"]["ratio"] <= 0.05 and meta["size"]["split"] == [2, 2]
    assert training["prompts"] == len(PROMPTS) and meta["heldout_chat"]["prompts"] == 2
    assert training["answers"] == 6 + 3 and training["greedy_answers"] == 6  # 6 greedy, 3 sampled; 2 validate
    assert read_meta(directory)["intermediate_size"] == meta["intermediate_size"]
    assert (directory / "draft_head.safetensors").stat().st_size < 4 * meta["size"]["head_parameters"] + 1024 * 64


def test_the_tail_hands_the_draft_head_the_unsplit_models_final_features(llama, local):
    runtime = SplitRuntime.load(llama, (2, 2))
    model = runtime.model
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
    runtime = SplitRuntime.load(llama, (2, 2))
    body = local if where == "in process" else RemoteBody(server.url, runtime.manifest, Codec.FP32, token=TOKEN)
    ids = runtime.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    plain = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=24, ignore_eos=True))
    fast = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=24, ignore_eos=True,
                                                                  speculate=f"draft-head:{trained[0]}", draft_tokens=6))
    if where == "server":
        body.close()
    assert fast.token_ids == plain.token_ids
    reference = oracle(llama).generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    assert fast.token_ids[0] == reference.tolist()
    assert plain.round_trips == 24 and fast.round_trips < 24
    assert fast.drafting["accepted"] > 0 and fast.drafting["drafted"] > fast.drafting["accepted"], fast.drafting
    assert fast.tokens_per_round_trip == 24 / fast.round_trips


@pytest.mark.parametrize("where", ["in process", "server"])
def test_a_draft_tree_verified_in_one_round_trip_gives_the_plain_greedy_tokens_and_logits(llama, local, server, trained, where):
    """--speculate draft-tree: the body verifies the head's static tree per round trip (TREE), the
    device walks it greedily, crops head, body and tail to the accepted prefix in frame order and
    re-sends the rest: the tokens and every token's logits are plain greedy decoding's."""
    runtime = SplitRuntime.load(llama, (2, 2))
    body = local if where == "in process" else RemoteBody(server.url, runtime.manifest, Codec.FP32, token=TOKEN)
    ids = runtime.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    plain = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=24, ignore_eos=True), keep_logits=True)
    streamed: list[list[int]] = []
    tree = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=24, ignore_eos=True, speculate=f"draft-tree:{trained[0]}",
                                                                draft_tokens=12), keep_logits=True, on_tokens=streamed.append)
    if where == "server":
        body.close()
    assert tree.token_ids == plain.token_ids
    reference = oracle(llama).generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    assert tree.token_ids[0] == reference.tolist()  # the unsplit model's greedy tokens
    assert [t for step in streamed for t in step[0]] == tree.token_ids[0] and len(streamed) == tree.round_trips  # one step per trip
    assert tree.timings.prefill < tree.timings.total
    torch.testing.assert_close(tree.logits, plain.logits, atol=1e-4, rtol=1e-4)
    assert tree.round_trips < plain.round_trips == 24
    drafting = tree.drafting  # the last trees lose the nodes deeper than the tokens left
    assert drafting["rounds"] == tree.round_trips - 1 and drafting["accepted"] < drafting["drafted"] <= 12 * drafting["rounds"], drafting
    assert 0 < tree.drafting["accepted"] == 24 - tree.round_trips, tree.drafting  # each trip: its accepted drafts + one token


def test_a_draft_tree_stops_at_eos_and_max_length_and_continues_a_cached_conversation(llama, local, trained):
    runtime = SplitRuntime.load(llama, (2, 2))
    model = runtime.model
    ids = runtime.encode_chat([{"role": "user", "content": PROMPTS[3]}])
    mode = f"draft-tree:{trained[0]}"
    for n in (1, 2, 7):
        plain = runtime.generate_ids(local, ids, None, SamplingParams(max_new_tokens=n))
        assert runtime.generate_ids(local, ids, None, SamplingParams(max_new_tokens=n, speculate=mode)).token_ids == plain.token_ids
    first = runtime.generate_ids(local, ids, None, SamplingParams(max_new_tokens=10, ignore_eos=True))
    longer = torch.cat([ids, torch.tensor([first.token_ids[0]]), ids[:, -3:]], dim=1)
    plain = runtime.generate_ids(local, longer, None, SamplingParams(max_new_tokens=12, ignore_eos=True))
    cache = model.new_cache(local)  # (a new cache resets the body's session: after the plain run)
    model(longer[:, :-5], cache=cache)  # a conversation whose first positions are cached (the gateway's reuse)
    continued = runtime.generate_ids(local, longer, None, SamplingParams(max_new_tokens=12, ignore_eos=True, speculate=mode), cache=cache)
    assert continued.token_ids == plain.token_ids


def test_a_draft_tree_falls_back_to_the_chain_for_sampling_and_for_a_body_without_trees(llama, local, trained, monkeypatch, caplog):
    runtime = SplitRuntime.load(llama, (2, 2))
    ids = runtime.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    greedy = runtime.generate_ids(local, ids, None, SamplingParams(max_new_tokens=16, ignore_eos=True))
    sampled = runtime.generate_ids(local, ids, None, SamplingParams(max_new_tokens=16, ignore_eos=True, greedy=False, temperature=1e-4,
                                                                    seed=3, speculate=f"draft-tree:{trained[0]}", draft_tokens=6))
    assert sampled.token_ids == greedy.token_ids and sampled.drafting["drafted"] > 0
    monkeypatch.setattr(local, "max_tree_positions", None)  # an older server: WELCOME names no tree limit
    chained = runtime.generate_ids(local, ids, None, SamplingParams(max_new_tokens=16, ignore_eos=True, speculate=f"draft-tree:{trained[0]}",
                                                                    draft_tokens=6))
    assert chained.token_ids == greedy.token_ids and chained.drafting["drafted"] > 0
    assert "verifies no draft trees" in caplog.text


def test_drafting_through_the_paged_decode_kernel_keeps_the_unsplit_models_tokens(llama, trained, monkeypatch):
    """A GPU body attends decode rows through the paged kernel and verification rows through gather
    + SDPA, and a CROP hands the rejected positions' blocks back to the pool the kernel reads: run
    here by Triton's interpreter, plain decoding, prompt lookup and the draft head all give the
    unsplit model's greedy tokens, with drafts rejected (so cropped) and decode rows through the kernel."""
    pytest.importorskip("triton")
    from lambdasplit.engine import decode_kernel
    from lambdasplit.engine.local import load_local_body

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU machine): the GPU benchmarks check the kernel there")
    monkeypatch.setattr(decode_kernel, "CPU_INTERPRETER", True)
    calls = []
    original = decode_kernel.decode_attention
    monkeypatch.setattr("lambdasplit.engine.step.decode_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    body = load_local_body(str(llama), (2, 2), codec=Codec.FP32)
    runtime = SplitRuntime.load(llama, (2, 2))
    ids = runtime.encode_chat([{"role": "user", "content": PROMPTS[2]}])
    modes = [None, "prompt-lookup", f"draft-head:{trained[0]}", f"draft-tree:{trained[0]}"]
    try:
        assert body.scheduler.bodies[0].kernel, "the kernel should run under Triton's interpreter"
        results = [runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=24, ignore_eos=True, speculate=mode,
                                                                        draft_tokens=6)) for mode in modes]
    finally:
        body.scheduler.shutdown()
    reference = oracle(llama).generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    assert [r.token_ids[0] for r in results] == [reference] * 4
    assert results[3].round_trips < 24  # the trees went through gather + SDPA beside the kernel's decode rows
    drafting = results[2].drafting
    assert drafting["drafted"] > drafting["accepted"] > 0 and results[2].round_trips < 24, drafting
    assert calls, "no decode row went through the kernel"


@pytest.mark.parametrize("mode", ["draft-head", "draft-tree"])
def test_a_connection_lost_after_a_crop_keeps_the_draft_head_exact(llama, server, trained, mode):
    """The socket drops right after the first CROP of a rejected draft: the device reconnects,
    replays (CROP and TREE included), and the tokens stay the plain ones."""
    runtime = SplitRuntime.load(llama, (2, 2))
    body = RemoteBody(server.url, runtime.manifest, Codec.FP32, token=TOKEN, backoff=0.05)
    ids = runtime.encode_chat([{"role": "user", "content": PROMPTS[1]}])
    plain = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=24, ignore_eos=True))
    crop, dropped = body._crop, []

    def crop_then_drop(length: int) -> None:
        crop(length)
        if not dropped:
            dropped.append(length)
            body._ws.close()

    body._crop = crop_then_drop
    fast = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=24, ignore_eos=True,
                                                                  speculate=f"{mode}:{trained[0]}", draft_tokens=6))
    body.close()
    assert dropped and body.reconnects == 1
    assert fast.token_ids == plain.token_ids


def test_sampling_with_the_draft_head_gives_draft_probabilities_and_runs_exactly_at_low_temperature(llama, local, trained):
    """Speculative sampling needs q: the generator returns the draft's processed logits. At a
    temperature where sampling is argmax, the tokens are the greedy ones."""
    runtime = SplitRuntime.load(llama, (2, 2))
    ids = runtime.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    greedy = runtime.generate_ids(local, ids, None, SamplingParams(max_new_tokens=16, ignore_eos=True))
    options = SamplingParams(max_new_tokens=16, ignore_eos=True, greedy=False, temperature=1e-4, seed=3,
                                speculate=f"draft-head:{trained[0]}", draft_tokens=6)
    sampled = runtime.generate_ids(local, ids, None, options)
    assert sampled.token_ids == greedy.token_ids
    assert sampled.drafting["drafted"] > 0


def test_a_head_for_another_model_or_a_broken_directory_is_refused(llama, local, trained, tmp_path):
    runtime = SplitRuntime.load(llama, (2, 2))
    ids = torch.tensor([[1, 504, 3458]])
    with pytest.raises(DraftHeadError, match="hidden_size 576"):
        runtime.generate_ids(local, ids, None, SamplingParams(max_new_tokens=2, speculate="draft-head"))
    assert read_meta(SHIPPED)["hidden_size"] == 576
    (tmp_path / "draft_head.json").write_text("{not json")
    with pytest.raises(DraftHeadError, match="not valid JSON"):
        runtime.generate_ids(local, ids, None, SamplingParams(max_new_tokens=2, speculate=f"draft-head:{tmp_path}"))
    with pytest.raises(DraftHeadError, match="not a draft head directory"):
        runtime.generate_ids(local, ids, None, SamplingParams(max_new_tokens=2, speculate=f"draft-head:{tmp_path / 'none'}"))


def test_generated_training_prompts_are_many_distinct_deterministic_and_never_near_the_held_out_chat_set():
    prompts = draft_prompts.generate(6000, seed=0)
    assert len(prompts) == len(set(prompts)) == 6000
    assert prompts[:50] == draft_prompts.generate(50, seed=0) and prompts[:50] != draft_prompts.generate(50, seed=1)
    held = draft_prompts.heldout_prompts()
    assert len(held) == 40 and not set(held) & set(prompts)
    held_words = [draft_prompts.words(h) for h in held]
    nearest = max(draft_prompts.similarity(draft_prompts.words(p), h) for p in prompts for h in held_words)
    assert nearest < draft_prompts.NEAR
    kinds = {p.split()[0] for p in prompts}  # opening words: explanations, how-tos, code, arithmetic, rewriting...
    assert {"Explain", "How", "Write", "What", "Translate", "Suggest", "Pretend", "Solve", "Rewrite", "Compare"} <= kinds
    assert len(kinds) > 30


def test_a_spent_time_budget_stops_generation_and_training_gracefully(llama):
    """Generation takes no batch after its deadline; training ends after the epoch in which its
    deadline passed (the plan shrinks to what fits) and keeps the best epoch's weights."""
    model = oracle(llama)
    tokenizer = AutoTokenizer.from_pretrained(str(llama))
    settings = TrainSettings(epochs=50, max_new_tokens=8, gen_batch=2, batch=2, draft_vocab=256)
    assert answer(model, tokenizer, PROMPTS, settings, "test", deadline=time.monotonic() - 1) == []
    samples = answer(model, tokenizer, PROMPTS[:4], settings, "test", temperature=0.7)
    assert len(samples) == 4 and all(len(s.features) == len(s.ids) - 1 for s in samples)
    vocab = draft_vocabulary(samples, settings.draft_vocab, [0])
    head = DraftHead(model.config, 64, vocab)
    lm_rows = model.get_output_embeddings().weight[vocab].detach()
    objective = Objective(model.get_input_embeddings(), lm_rows, torch.tensor(1.0), settings, torch.device("cpu"))
    result = train(head, samples[:3], samples[3:], objective, deadline=time.monotonic())
    assert result["epochs"] == 1 and result["best_epoch"] == 1 and set(result["history"][0]) == {"epoch", "loss", "depth1", "depth2"}


def test_the_second_epoch_plans_again_when_the_first_was_slow(llama, monkeypatch):
    """A first epoch 5x slower than the rest (allocator, kernel warm-up on a GPU) must not cut the
    run to what the first epoch's pace would fit: on a clock where epoch 1 takes 10 s, later ones
    2 s and the budget is 20 s, training runs 6 epochs (1 + 1 + 8 s / 2 s), not 2."""
    from types import SimpleNamespace

    from lambdasplit.device import train_draft as module

    model = oracle(llama)
    tokenizer = AutoTokenizer.from_pretrained(str(llama))
    settings = TrainSettings(epochs=50, max_new_tokens=8, gen_batch=2, batch=2, draft_vocab=256)
    samples = answer(model, tokenizer, PROMPTS[:4], settings, "test")
    vocab = draft_vocabulary(samples, settings.draft_vocab, [0])
    head = DraftHead(model.config, 64, vocab)
    objective = Objective(model.get_input_embeddings(), model.get_output_embeddings().weight[vocab].detach(),
                          torch.tensor(1.0), settings, torch.device("cpu"))
    clock = {"now": 0.0, "batches": 0}
    batch_loss = module._batch_loss

    def timed(*args):  # two batches per epoch: 5 s each in the first epoch, 1 s after
        clock["now"] += 5.0 if clock["batches"] < 2 else 1.0
        clock["batches"] += 1
        return batch_loss(*args)

    monkeypatch.setattr(module, "_batch_loss", timed)
    monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    result = train(head, samples[:3], samples[3:], objective, deadline=20.0)
    assert result["epochs"] == 6 and clock["now"] == 20.0


def test_eval_script_counts_round_trips_and_checks_tokens_against_plain_decoding(llama, trained, tmp_path):
    """scripts/eval_draft.py (what scripts/train_draft_gpu.sh runs after training), on the CPU."""
    out = tmp_path / "eval.json"
    assert eval_draft.main(["--model", str(llama), "--head", str(trained[0]), "--limit", "1", "--new-tokens", "12",
                            "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["prompts"] == report["of"] == 1 and report["identical"] and report["device"] == "cpu"
    modes = report["modes"]
    assert modes["plain"]["tokens"] == modes["draft-head"]["tokens"] == modes["plain"]["round_trips"]
    assert modes["plain"]["tokens_per_round_trip"] == 1.0
    assert modes["draft-head"]["tokens_per_round_trip"] == modes["draft-head"]["tokens"] / modes["draft-head"]["round_trips"]
    assert modes["draft-head"]["drafted"] > 0


def test_the_gpu_training_script_is_valid_bash_and_stops_without_both_model_halves(tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "train_draft_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PARTS": str(tmp_path / "parts"), "GGUF": str(tmp_path / "m.gguf")}
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 3 and "send the other half" in done.stderr
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env={**env, "STAGE": "serve"}, capture_output=True, text=True)
    assert done.returncode == 2 and "STAGE must be all, train, eval or speculative" in done.stderr
