"""The command line as a user meets it: JSON output checked against generate(), clear errors."""

import json
import os
import subprocess
import sys

import pytest

from lambdasplit.device.runtime import SplitRuntime
from tests.conftest import oracle

CLI = [sys.executable, "-m", "lambdasplit.cli"]


def run(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("split", ["2,2", "4,1", "1-6,2"])
def test_generate_json_matches_unsplit_generate(smollm2_dir, split):
    """A range (randomised split) draws K per run; the output is still the unsplit model's."""
    prompt = "Give me one word that rhymes with cat."
    out = json.loads(run("generate", prompt, "--split", split, "--json", "-n", "20").stdout)
    m = int(split.split(",")[1])
    k = out["split"]["head"][1]
    assert k == int(split.split(",")[0]) if "-" not in split else 1 <= k <= 6
    assert out["split"] == {"layers": 30, "head": [0, k], "body": [k, 30 - m], "tail": [30 - m, 30]}
    runtime = SplitRuntime.load(None, (k, m))
    ids, _ = runtime.encode(prompt)
    assert out["prompt_token_ids"] == ids[0].tolist()
    ref = oracle(smollm2_dir).generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = next((i + 1 for i, t in enumerate(ref) if t in runtime.eos_ids), len(ref))
    assert out["token_ids"] == ref[:eos]
    assert out["text"] == runtime.tokenizer.decode(ref[:eos], skip_special_tokens=True)
    assert out["bytes"]["to_cloud"] > 0 and out["bytes"]["from_cloud"] == out["bytes"]["to_cloud"]
    assert out["timings"]["total"] > 0 and out["timings"]["tokens_per_second"] > 0


def test_generate_streams_plain_text(smollm2_dir):
    proc = run("generate", "What is the capital of France?", "--greedy", "-n", "24")
    assert "Paris" in proc.stdout


def test_raw_prompt_skips_the_chat_template(smollm2_dir):
    out = json.loads(run("generate", "The capital of France is", "--raw", "--json", "-n", "4").stdout)
    runtime = SplitRuntime.load(None, (2, 2))
    assert out["prompt_token_ids"] == runtime.tokenizer("The capital of France is")["input_ids"]


def test_info_lists_the_parts(smollm2_dir):
    out = run("info", "--split", "3,1").stdout
    assert "llama" in out and "L = 30" in out and "D = 576" in out
    assert "[0, 3)" in out and "[3, 29)" in out and "[29, 30)" in out


def test_export_then_generate_from_the_device_part(smollm2_dir, tmp_path):
    run("export", "--split", "1,1", "--out", str(tmp_path))
    assert (tmp_path / "device" / "manifest.json").is_file() and (tmp_path / "cloud" / "manifest.json").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", ""], "prompt is empty"),
        (["generate", "hi", "--model", "/no/such/model"], "does not exist"),
        (["generate", "hi", "--split", "20,20"], "exceeds"),
        (["generate", "hi", "--split", "0,2"], "--allow-shallow"),
        (["generate", "hi", "--split", "x"], "K,M"),
        (["generate", "hi", "--greedy", "--temperature", "0.7"], "cannot be combined"),
        (["generate", "hi", "--codec", "zip"], "unknown codec"),
    ],
)
def test_errors_are_one_clear_line(args, message):
    proc = run(*args, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_python_dash_m_lambdasplit_is_the_lambdasplit_command():
    """`python -m lambdasplit` (for an environment whose scripts are not on PATH) runs the same app:
    its commands, its one-line errors and exit status 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    shown = subprocess.run([sys.executable, "-m", "lambdasplit", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0 and "python -m lambdasplit" in shown.stdout
    assert all(command in shown.stdout for command in ("generate", "info", "export", "serve", "gateway", "ui"))
    bad = subprocess.run([sys.executable, "-m", "lambdasplit", "info", "--split", "x"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("error: Invalid value for '--split'")


def test_top_k_zero_is_no_filter_and_keeps_greedy_decoding(llama):
    """--top-k 0 means no top-k filter (transformers' top_k=0): alone it decodes greedily (it turned
    unseeded sampling on), it combines with --greedy, and with --temperature it samples unfiltered."""
    from lambdasplit.device.sampling import SamplingParams
    from lambdasplit.engine.local import load_local_body

    args = ("generate", "Hello there", "--model", str(llama), "--split", "2,2", "--raw", "--json", "-n", "8")
    greedy = json.loads(run(*args).stdout)["token_ids"]
    assert json.loads(run(*args, "--top-k", "0").stdout)["token_ids"] == greedy
    assert json.loads(run(*args, "--top-k", "0", "--greedy").stdout)["token_ids"] == greedy
    sampled = json.loads(run(*args, "--top-k", "0", "--temperature", "1.5", "--seed", "3").stdout)["token_ids"]
    runtime = SplitRuntime.load(llama, (2, 2))
    ids, _ = runtime.encode("Hello there", raw=True)
    options = SamplingParams(max_new_tokens=8, greedy=False, temperature=1.5, top_k=0, seed=3)
    assert [sampled] == runtime.generate_ids(load_local_body(llama, (2, 2)), ids, None, options).token_ids != [greedy]


def test_unsupported_architecture_and_long_prompt(tmp_path, tiny_models):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    proc = run("generate", "hi", "--model", str(tmp_path / "gpt2"), check=False)
    assert proc.returncode != 0 and "not supported" in proc.stderr and "llama" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("generate", "word " * 400, "--model", str(tiny_models["llama"]), "--split", "1,1", check=False)
    assert proc.returncode != 0 and "context window of 256" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_with_server_equals_in_process(smollm2_dir, tmp_path):
    from lambdasplit.cloud.process import ServerProcess

    token = tmp_path / "token"
    token.write_text("a-long-random-token-for-the-test")
    prompt = "Name two planets."
    local = json.loads(run("generate", prompt, "--split", "3,2", "--json", "-n", "16").stdout)
    with ServerProcess("--split", "3,2", "--token-file", str(token)) as server:
        remote = json.loads(
            run("generate", prompt, "--split", "3,2", "--json", "-n", "16", "--server", server.url, "--token-file", str(token)).stdout
        )
        refused = run("generate", prompt, "--split", "3,2", "--server", server.url, check=False)
    assert remote["token_ids"] == local["token_ids"] and remote["text"] == local["text"]
    assert remote["bytes"] == local["bytes"]
    assert refused.returncode != 0 and "401" in refused.stderr and "Traceback" not in refused.stderr


def test_demo_shows_the_split_and_no_plaintext_on_the_wire(smollm2_dir):
    proc = run("demo", "-n", "12")
    out = proc.stdout
    assert "WARNING" not in proc.stderr, proc.stderr  # its frame capture is asked for, not a warning
    assert "Paris" in out
    assert "cloud" in out and "2..27" in out and "decode bytes per token" in out
    assert "2,356 / 2,356" in out  # 52-byte header + 576 x 4 bytes, each way
    assert out.count("not found") == 2 and "FOUND" not in out


def test_generate_json_with_the_shipped_draft_head_and_its_tree_reports_round_trips_and_keeps_the_tokens(smollm2_dir):
    prompt = "Why is the sky blue? Answer in two sentences."
    plain = json.loads(run("generate", prompt, "--json", "-n", "24").stdout)
    drafted = json.loads(run("generate", prompt, "--json", "-n", "24", "--speculate", "draft-head").stdout)
    assert drafted["token_ids"] == plain["token_ids"]
    assert plain["round_trips"] == len(plain["token_ids"]) and plain["tokens_per_round_trip"] == 1.0
    assert drafted["tokens_per_round_trip"] == len(drafted["token_ids"]) / drafted["round_trips"]
    assert drafted["drafting"]["drafted"] > 0 and "drafting" not in plain
    tree = json.loads(run("generate", prompt, "--json", "-n", "24", "--speculate", "draft-tree").stdout)
    assert tree["token_ids"] == plain["token_ids"] and tree["round_trips"] < plain["round_trips"]
    assert tree["drafting"]["drafted"] > tree["drafting"]["accepted"] > 0
    streamed = run("generate", prompt, "-n", "24", "--speculate", "draft-tree").stdout  # the answer streams as it comes
    assert streamed.strip() == tree["text"].strip()


@pytest.mark.parametrize("argv,value,expected", [
    (["generate", "hi"], "-1,2", "expected K,M or KMIN-KMAX,M with non-negative integers, e.g. 2,2 or 1-4,2"),
    (["serve"], "4-1,2", "the K range must rise, e.g. 1-4,2"),
    (["info"], "1-4,2", "expected K,M with two non-negative integers, e.g. 2,2"),
    (["export", "--out", "unused"], "2", "expected K,M with two non-negative integers"),
    (["gateway", "--server", "ws://127.0.0.1:1"], "a,b", "expected K,M with two non-negative integers"),
    (["ui"], "2;2", "expected K,M with two non-negative integers"),
    (["audit", "--split", "2,2"], "2,-2", "expected K,M with two non-negative integers"),  # each repeat is checked
])
def test_split_parameter_type_names_the_option_the_value_and_the_grammar(monkeypatch, capsys, argv, value, expected):
    """--split is parsed while the command line is (the SplitChoice parameter type), before anything loads."""
    from lambdasplit.cli import main

    monkeypatch.setattr(sys, "argv", ["lambdasplit", *argv, "--split", value])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Invalid value for '--split': {value!r}: {expected}") and err.count("\n") == 1, err
