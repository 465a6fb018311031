"""`python -m benchmarks speculative --draft-lengths` (issue 24): the draft head at each longest chain
in the same run as plain decoding, on a tiny setup (the embedded SmolLM2 and its shipped head, one
held-out prompt, 8 tokens, no added delay). Counts and plumbing are asserted, never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from benchmarks import speculative
from benchmarks.__main__ import _caps, app
from benchmarks.report import draft_lengths_section
from benchmarks.speculative import CHAT, run_draft_lengths


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
