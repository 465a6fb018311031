"""Attacks on captured frames of a small seeded model: they must work, and a strong defense must
measurably lower what they recover."""

from pathlib import Path

import pytest
import torch

from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.local import load_local_body
from lambdasplit.privacy.attacks import Attacker
from lambdasplit.privacy.capture import observe, positions
from lambdasplit.privacy.defenses import GaussianNoise
from lambdasplit.privacy.metrics import pii_recovered, rouge_l, token_accuracy
from lambdasplit.split.load import open_source
from tests.conftest import build_tiny

PROMPT = torch.tensor([[1, 17, 230, 45, 399, 12, 77, 301, 150, 8]])


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_dir) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("priv") / "m", smollm2_dir, seed=7, vocab_size=512, num_hidden_layers=8)


@pytest.fixture(scope="module")
def attacker(model) -> Attacker:
    return Attacker(open_source(model, None, allow_shallow=True), budget=512)


def _capture(model, split, noise=None, new_tokens=8):
    runtime = SplitRuntime.load(model, split)
    body = load_local_body(model, split)
    body.uplink_defense = noise
    body.captured = []
    result = runtime.generate_ids(body, PROMPT, None, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    return observe(body.captured), result.token_ids[0]


@pytest.mark.parametrize("k", [1, 4])
def test_vocabulary_matching_recovers_the_prompt_exactly(model, attacker, k):
    seen, generated = _capture(model, (k, 2))
    recovered = attacker.match(k, positions(seen.uplink)).token_ids
    assert recovered[: PROMPT.shape[1]] == PROMPT[0].tolist()
    assert recovered[PROMPT.shape[1]:] == generated[:-1]  # decode frames carry the generated tokens


def test_tail_replay_recovers_the_generated_ids(model, attacker):
    seen, generated = _capture(model, (2, 3))
    assert attacker.replay(3, seen.downlink).token_ids == generated


def test_split_probing_finds_k(model, attacker):
    seen, _ = _capture(model, (4, 2))
    k, errors = attacker.probe_split(positions(seen.uplink), [1, 2, 4, 6])
    assert k == 4 and errors[4] < 0.5 * min(errors[1], errors[2], errors[6])


def test_strong_noise_lowers_recovery(model, attacker):
    clean, _ = _capture(model, (1, 2))
    noisy, _ = _capture(model, (1, 2), GaussianNoise(4.0, "all", seed=0))
    truth = PROMPT[0].tolist()
    acc_clean = token_accuracy(attacker.match(1, positions(clean.uplink)).token_ids[: len(truth)], truth)
    acc_noisy = token_accuracy(attacker.match(1, positions(noisy.uplink)).token_ids[: len(truth)], truth)
    assert acc_clean == 1.0
    assert acc_noisy <= 0.5, acc_noisy


def test_noise_only_on_prompt_positions_leaves_decode_frames_clean():
    noise = GaussianNoise(1.0, "prompt", seed=0)
    x = torch.randn(1, 3, 16)
    assert not torch.equal(noise(x, True), x)
    assert torch.equal(noise(x, False), x)


def test_metrics():
    assert token_accuracy([1, 2, 9], [1, 2, 3]) == pytest.approx(2 / 3)
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([1, 9, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert rouge_l([], [1]) == 0.0
    assert pii_recovered("call Ann at 555-0101", ["Ann", "555-0101", "Bob"]) == pytest.approx(2 / 3)


def test_audit_command_writes_a_report(tiny_models, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "audit"
    cmd = [sys.executable, "-m", "lambdasplit.cli", "audit", "--model", str(tiny_models["llama"]), "--split", "2,2",
           "--defenses", "none,tls", "--prompts", "1", "-n", "4", "--inversion-steps", "20", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    summary = {(s["defense"], s["threat"]): s for s in report["summary"]}
    assert summary[("none", "cloud")]["output_token_accuracy"] == 1.0  # tail replay on a greedy device
    assert summary[("tls", "eavesdropper")]["prompt_token_accuracy"] == 0.0
    assert summary[("tls", "cloud")]["output_token_accuracy"] == 1.0  # TLS does nothing against the cloud
    assert "lambdasplit audit" in (out / "report.md").read_text()


def test_learned_inversion_reads_states_and_noise_defeats_it(model):
    from lambdasplit.privacy.inversion import InversionConfig, LearnedInverter

    opened = open_source(model, None, allow_shallow=True)
    inverter = LearnedInverter(opened, 1, InversionConfig(steps=1500, seed=0)).fit(list(range(512)) * 4)
    clean, _ = _capture(model, (1, 2))
    noisy, _ = _capture(model, (1, 2), GaussianNoise(4.0, "all", seed=0))
    truth = PROMPT[0].tolist()
    acc_clean = token_accuracy(inverter.recover(positions(clean.uplink)).token_ids[: len(truth)], truth)
    acc_noisy = token_accuracy(inverter.recover(positions(noisy.uplink)).token_ids[: len(truth)], truth)
    # Chance is 1/512; the random 8-layer model mixes context strongly, so K = 1 is the fair test.
    assert acc_clean >= 0.5, acc_clean
    assert acc_noisy <= 0.2, acc_noisy


def test_generator_prior_names_a_row_the_decoy_generator_could_not_produce():
    """Decoy names come from Faker's lists: a real name outside them gives the real row away (the audit
    reports this; pseudonymising first removes it, since the real row then carries a generated name too)."""
    from lambdasplit.privacy.distinguish import GeneratorPriorDistinguisher
    from lambdasplit.privacy.pseudonym import Detector

    prior = GeneratorPriorDistinguisher(None, Detector())
    values = [[("PERSON", "Mary Smith")], [("PERSON", "Zyxwa Qortho")], [("PERSON", "John Miller")]]
    scores = prior.scores(["", "", ""], values)
    assert max(range(3), key=scores.__getitem__) == 1
    assert prior.looks_generated("EMAIL", "j.miller@smithmail.com") and not prior.looks_generated("EMAIL", "j.miller@gmail.com")


def test_decoy_summary_counts_ties_as_expected_success():
    from lambdasplit.privacy.pii_audit import _decoy_summary

    rows = [{"mode": "decoys", "length_matched": True, "by_n": {"1": {"lm": {"row": 0.5, "identifiers": 0.5}}}}]
    (entry,) = _decoy_summary(rows, (1,))
    assert entry["chance"] == 0.5 and entry["lm_row"] == 0.5


def test_audit_options_quick_policy_and_unknown_names():
    """`lambdasplit audit --quick` is AuditConfig.from_options' policy; what the user gives still wins."""
    from lambdasplit.errors import LambdaSplitError
    from lambdasplit.privacy.audit import ATTACKS, DEFENSES, AuditConfig

    full = AuditConfig.from_options(None, None, list(ATTACKS), None, None, 24, 300)
    assert (full.splits, full.defenses, full.prompts, full.max_new_tokens) == ([(1, 1), (2, 2), (4, 4), (8, 8)], list(DEFENSES), None, 24)
    quick = AuditConfig.from_options(None, [(2, 2)], ["tail-replay"], None, None, 24, 300, quick=True)
    assert (quick.splits, quick.prompts, quick.max_new_tokens, quick.inversion_steps) == ([(2, 2)], 3, 12, 100)
    assert quick.defenses == ["none", "tls", "int8", "noise-1.0"]
    assert AuditConfig.from_options(None, None, ["tail-replay"], ["int8"], 5, 24, 300, quick=True).defenses == ["int8"]
    with pytest.raises(LambdaSplitError, match="unknown defense or attack: noise-9, mind-reading"):
        AuditConfig.from_options(None, None, ["mind-reading"], ["noise-9"], None, 24, 300)
