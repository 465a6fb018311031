"""`python -m benchmarks speculative --draft-lengths` and `--body-device` (issue 24): the draft head at
each longest chain in the same run as plain decoding, and plain vs prompt lookup vs the draft head with
the body served apart, on a tiny setup (the embedded SmolLM2 and its shipped head, one held-out prompt,
8 tokens). Counts and plumbing are asserted, never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from benchmarks import speculative
from benchmarks.__main__ import _caps, _rtts, app
from benchmarks.report import draft_lengths_section, speculative_section
from benchmarks.speculative import CHAT, run_draft_lengths, run_served_body, served_suite


def test_draft_lengths_run_every_cap_beside_plain_decoding_with_the_same_tokens(tmp_path):
    path = run_draft_lengths([1, 3], prompts=1, new_tokens=8, rtts=(0,), out=tmp_path)

    data = json.loads(path.read_text())
    assert path.name == "speculative-draft-lengths-cpu.json" and data["draft_lengths"] == [1, 3]
    assert data["prompts"] == {CHAT: 1} and data["new_tokens"] == 8 and data["confidence"] == 0.1
    (row,) = data["rows"]
    assert row["rtt_ms"] == 0 and row["set"] == CHAT and row["identical"] is True
    modes = row["modes"]
    assert list(modes) == ["plain", "draft head, up to 1", "draft head, up to 3"]
    assert all(len(m["tok_s_per_prompt"]) == 1 for m in modes.values())
    plain = modes["plain"]
    assert plain["tokens"] == plain["round_trips"] and plain["tokens_per_trip"] == 1.0 and "draft_tokens" not in plain
    for cap in (1, 3):
        head = modes[f"draft head, up to {cap}"]
        assert head["draft_tokens"] == cap and head["tokens"] == plain["tokens"]  # same tokens, so as many
        assert head["drafted"] > 0 and 1 <= head["drafted_per_round"] <= cap  # the cap reached the candidate generator
        assert head["round_trips"] < plain["round_trips"] and head["tokens_per_trip"] == head["tokens"] / head["round_trips"]
        assert 0 <= head["acceptance"] <= 1 and head["ms_per_drafted_token"] > 0

    table = draft_lengths_section(data)
    assert "| 0 | plain |" in table and "| 0 | draft head, up to 1 |" in table and "| 0 | draft head, up to 3 |" in table
    assert table.count("| yes |") == 3 and "at most 1 or 3 tokens" in table


@pytest.mark.parametrize("given", ["3,3", "0,8", "3,x", ","])
def test_draft_lengths_must_be_distinct_whole_numbers_from_1_to_64(given):
    with pytest.raises(typer.BadParameter):
        _caps(given)
    assert _caps("3, 8") == [3, 8]


@pytest.mark.parametrize("given", [["--prompts", "3"], ["--new-tokens", "8"], ["--quick", "--prompts", "3"]])
def test_prompts_and_new_tokens_are_refused_without_draft_lengths(given, monkeypatch):
    """They were ignored there: the run took its fixed sets and length, not what was asked."""
    monkeypatch.setattr(speculative, "run", lambda *args, **kwargs: pytest.fail("the benchmark ran"))
    result = CliRunner().invoke(app, ["speculative", *given])
    assert result.exit_code == 2 and "only with --draft-lengths" in result.output


def test_python_dash_m_benchmarks_speculative_is_the_subcommand():
    """`python -m benchmarks.speculative` imported the module and exited 0 without running anything."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.speculative", "--new-tokens", "8"], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "only with --draft-lengths" in out.stderr


def test_a_served_body_run_measures_every_mode_at_every_rtt_on_the_same_prompts_within_its_budget(tmp_path):
    """A budget spent before the first prompt still runs one prompt, at every RTT, so the rows compare
    like with like; the shipped head drafts and every mode gives plain decoding's tokens."""
    path = run_served_body(None, None, "cpu", prompts=2, new_tokens=8, rtts=(0, 20), max_minutes=1e-4, out=tmp_path,
                           caps=(1, 3))

    data = json.loads(path.read_text())
    assert path.name == "speculative-body-cpu.json" and data["suite"] == "speculative-body-cpu"
    assert data["prompts"] == {CHAT: 1} and data["of"] == 2 and data["head"] == "shipped" and data["body_device"] == "cpu"
    assert data["device_parts"] == "cpu" and data["draft_lengths"] == [1, 3] and [row["rtt_ms"] for row in data["rows"]] == [0, 20]
    assert data["server_warnings"] == [], "the body served without falling back"
    for row in data["rows"]:  # cap 3 is --draft-tokens' own mode, not a second one
        assert row["identical"] is True and list(row["modes"]) == ["plain", "prompt-lookup", "draft-head", "draft head, up to 1"]
        plain, head, one = row["modes"]["plain"], row["modes"]["draft-head"], row["modes"]["draft head, up to 1"]
        assert all(len(m["tok_s_per_prompt"]) == 1 and m["tokens"] == plain["tokens"] for m in row["modes"].values())
        assert plain["round_trips"] == plain["tokens"] and head["drafted"] > 0 and head["draft_tokens"] == 3
        assert one["draft_tokens"] == 1 and one["drafted_per_round"] == 1.0
    section = speculative_section(data, data["suite"])
    assert "| 20 | chat (held out) |" in section and "| 20 | draft head, up to 1 |" in section
    assert served_suite("cuda:0", "cuda") == "speculative-body-cuda-parts-cuda" and served_suite("cuda", "cpu") == "speculative-body-cuda"


def test_served_body_options_are_refused_without_body_device_and_rtts_must_be_distinct_milliseconds():
    result = CliRunner().invoke(app, ["speculative", "--head", "somewhere"])
    assert result.exit_code == 2 and "--head go with --body-device" in result.output
    for option, value in (("--parts-device", "cuda"), ("--rtts", "50"), ("--draft-tokens", "6")):  # were ignored without it
        result = CliRunner().invoke(app, ["speculative", "--draft-lengths", "3", option, value])
        assert result.exit_code == 2 and f"{option} go with --body-device" in result.output
    result = CliRunner().invoke(app, ["speculative", "--body-device", "cuda", "--quick"])
    assert result.exit_code == 2 and "a run of its own" in result.output
    assert _rtts("50, 100") == [50, 100]
    for given in ("50,50", "-1", "x", ""):
        with pytest.raises(typer.BadParameter):
            _rtts(given)


def test_a_row_names_the_prompt_mode_and_first_position_where_tokens_differ_from_plain_decoding():
    from types import SimpleNamespace

    from benchmarks.speculative import Mode, _Tally
    from lambdasplit.device.generation import Timings

    def result(ids):
        steps = [(0.01, 0.2, 0.03)] * len(ids)  # head, body and network, tail: seconds per forward
        return SimpleNamespace(token_ids=[ids], timings=Timings(total=1.0, steps=steps), round_trips=len(ids), drafting=None)

    tally = _Tally((Mode("plain"), Mode("prompt-lookup", "prompt-lookup")), 50, CHAT)
    tally.add({"plain": result([5, 6, 7]), "prompt-lookup": result([5, 6, 7])})
    tally.add({"prompt-lookup": result([5, 9, 7]), "plain": result([5, 6, 7])})
    tally.add({"plain": result([5, 6, 7]), "prompt-lookup": result([5, 6])})
    row = tally.row()
    assert row["identical"] is False and row["differing"] == [{"prompt": 1, "mode": "prompt-lookup", "first_position": 1},
                                                             {"prompt": 2, "mode": "prompt-lookup", "first_position": 2}]
    assert row["modes"]["plain"]["tokens"] == 9 and row["modes"]["prompt-lookup"]["round_trips"] == 8
    # 9 trips in 3 s of plain decoding: 10 + 200 + 30 ms per trip in the parts, the rest in generate()
    assert row["modes"]["plain"]["ms_per_trip"] == {"head": 10.0, "body and network": 200.0, "tail": 30.0,
                                                    "drafting": 0.0, "the rest": round(1000 * (3 - 9 * 0.24) / 9, 2)}
