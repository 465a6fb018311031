"""Smoke test of the load generator (`python -m benchmarks serve`): 2 sessions x 3 decode steps on a
tiny model, in a worker process against a `lambdasplit serve` child. No timing is asserted."""

from __future__ import annotations

import json

from tests.conftest import build_tiny


def test_serve_load_generator_smoke(tmp_path, smollm2_dir, monkeypatch):
    import benchmarks.common
    import benchmarks.serve as serve

    model = build_tiny("llama", tmp_path / "tiny", smollm2_dir)
    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(serve, "RESULTS", tmp_path / "results")
    payload = serve.run_serve(str(model), (2, 2), prompt=4, steps=3, sessions=(2,), procs=1)
    path, _ = serve.write_results("serve-test", payload)

    data = json.loads(path.read_text())
    assert data["suite"] == "serve-test" and data["hidden_size"] == 64 and data["open_loop"] is None
    (row,) = data["closed_loop"]
    assert row["mode"] == "closed" and row["sessions"] == row["completed"] == 2 and row["errors"] == []
    assert row["replies"] == 2 * (1 + 3) and row["bad_replies"] == 0  # every reply: HIDDEN, seq echoed, same shape
    assert row["aggregate_decode_tok_s"] > 0 and row["per_session_decode_tok_s_median"] > 0
    for key in ("ttft_ms", "itl_ms", "connect_ms"):
        assert 0 < row[key]["p50"] <= row[key]["p99"]


def test_the_report_renders_the_serving_results_with_their_targets():
    """`benchmarks report` turns the committed serve-gpu / serve-cpu-paged results into tables whose
    target verdicts follow from the numbers in the JSON."""
    from benchmarks.report import _load, serve_cpu_section, serve_gpu_section

    gpu = _load("serve-gpu")
    text = serve_gpu_section(gpu)
    assert f"| eager | **{gpu['unsplit']['eager_generate_batch64_tok_s']:.0f}** (" in text
    assert "static cache" not in text.split("### The body")[0]  # this run had no static-compile baseline: no row
    assert text.count("\n| 1 |") == 2  # one row in the body-step table, one in the load-generator table
    # With the static cache + compile baseline, the 64-session target is judged against it.
    served = next(r for r in gpu["closed_loop"] if r["sessions"] == 64)["aggregate_decode_tok_s"]
    for static in (served * 0.9, served * 1.1):
        unsplit = {**gpu["unsplit"], "static_compile_generate_batch64_tok_s": static,
                   "static_compile_generate_batch64_runs": [static]}
        text = serve_gpu_section({**gpu, "unsplit": unsplit})
        row = next(line for line in text.splitlines() if line.startswith("| 64 sessions: aggregate decode >= 1.0x"))
        assert f"| {served / static:.2f}x ({served:.0f} / {static:.0f} tok/s) | {'yes' if served >= static else 'no'} |" in row
    cpu = _load("serve-cpu-paged")
    by = {r["sessions"]: r["aggregate_decode_tok_s"] for r in cpu["closed_loop"]}
    assert f"**{by[8] / by[1]:.2f}x**" in serve_cpu_section(cpu, "serve-cpu-paged")


def test_serve_gpu_parts_never_rewrite_the_committed_result(tmp_path, monkeypatch):
    """A run of some --parts merged into the committed serve-gpu.json and wrote it back: the other
    parts' rows stayed, under this run's environment. Now it writes to --out (default results/local)
    and adds only to the serve-gpu.json there. The parts are stood in for: they need a CUDA GPU."""
    import logging

    import torch
    from typer.testing import CliRunner

    import benchmarks.common
    import benchmarks.serve_gpu as suite
    from benchmarks.__main__ import app

    committed, local, mine = tmp_path / "results", tmp_path / "results" / "local", tmp_path / "mine"
    monkeypatch.setattr(benchmarks.common, "RESULTS", committed)
    monkeypatch.setattr(benchmarks.common, "LOCAL_RESULTS", local)
    monkeypatch.setattr(suite, "CLIENTS", suite.CLIENTS)  # the command sets it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(suite, "build_random", lambda name: tmp_path / name)
    monkeypatch.setattr(suite, "environment", lambda device: {"date": "this run"})
    monkeypatch.setattr(suite, "body_agreement", lambda gguf: {"bodies": "this run's"})
    committed.mkdir()
    before = json.dumps({"suite": "serve-gpu", "environment": {"date": "earlier"}, "unsplit": "earlier"})
    (committed / "serve-gpu.json").write_text(before)
    mine.mkdir()
    (mine / "serve-gpu.json").write_text(json.dumps({"unsplit": "my earlier call's"}))
    level = logging.getLogger("lambdasplit").level
    try:
        result = CliRunner().invoke(app, ["serve-gpu", "--parts", "agreement"])
        assert result.exit_code == 0, result.output
        assert (committed / "serve-gpu.json").read_text() == before
        ours = json.loads((local / "serve-gpu.json").read_text())
        assert ours["environment"] == {"date": "this run"} and ours["body_agreement"] == {"bodies": "this run's"}
        assert "unsplit" not in ours

        result = CliRunner().invoke(app, ["serve-gpu", "--parts", "agreement", "--out", str(mine)])
        assert result.exit_code == 0, result.output
        merged = json.loads((mine / "serve-gpu.json").read_text())
        assert merged["unsplit"] == "my earlier call's" and merged["body_agreement"] == {"bodies": "this run's"}
    finally:
        logging.getLogger("lambdasplit").setLevel(level)  # the run quiets lambdasplit's logging
