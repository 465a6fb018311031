"""The server under fuzz (issue 21): hostile frames on several connections while a victim device
generates alongside. Every hostile burst gets a reply or a clean close, the victim's tokens stay
exact with no error or reconnect, and the server logs no traceback (scripts/fuzz_server.py runs the
same fuzz for longer, against `lambdasplit serve`)."""

from __future__ import annotations

import logging

import torch

from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.loading import load_scheduler
from lambdasplit.engine.local import LocalBody
from lambdasplit.engine.scheduler import BodyScheduler, SchedulerLimits
from lambdasplit.wire.codec import Codec
from scripts.fuzz_server import Target, fuzz
from tests.test_server_hardening import IDS, TOKEN, ThreadServer, assert_no_tracebacks

SECONDS = 20.0  # of fuzzing; the whole test stays near half a minute
PROMPTS = [IDS, torch.tensor([[1, 2030, 30, 282]]), torch.tensor([[1, 253, 2030, 30, 282, 4649, 314]])]


def test_hostile_frames_are_all_answered_and_never_touch_a_victim_session(llama, caplog):
    bodies = load_scheduler(str(llama), (2, 2)).bodies
    runtime = SplitRuntime.load(llama, (2, 2))
    options = SamplingParams(max_new_tokens=8, ignore_eos=True)
    local = LocalBody(BodyScheduler(bodies), Codec.FP32)
    expected = [runtime.generate_ids(local, ids, None, options).token_ids[0] for ids in PROMPTS]
    local.scheduler.shutdown()
    caplog.set_level(logging.WARNING)
    # Small limits, so that over-limit frames and oversized messages are cheap to send.
    limits = SchedulerLimits(max_batch=4, max_frame_positions=64, max_context=256)
    with ThreadServer(bodies, limits, max_frame_bytes=1 << 20) as server:
        victim = RemoteBody(server.url, runtime.manifest, Codec.FP32, token=TOKEN, reconnect_window=0)
        victim.frame_positions()  # its session opens first
        target = Target(server.url, TOKEN, runtime.manifest.as_dict(), runtime.manifest.hidden_size)
        report = fuzz(target, SECONDS, connections=3, seed=21, timeout=30.0,
                      generate=lambda i: runtime.generate_ids(victim, PROMPTS[i], None, options).token_ids[0],
                      expected=expected)
        victim.close()
        server.wait_metric("lambdasplit_sessions_active", 0)
    print(report.summary())
    assert report.no_reply == [], report.summary()
    assert report.unclean == [] and report.failures == [], report.summary()
    assert report.victim_errors == [] and victim.reconnects == 0, report.summary()
    assert report.victim_runs >= 1 and report.bursts >= 50, report.summary()
    assert report.replied > 0 and report.closed > 0
    assert_no_tracebacks(caplog)
    assert "failed a step" not in caplog.text
